"""The sampler conformance suite, shipped for plugin authors (pytest needed).

A plugin tests its sampler against the whole :class:`~score_toolkit.samplers.base.Sampler` contract
with a few lines::

    from score_toolkit.testing import SamplerConformance

    class TestMySampler(SamplerConformance):
        sampler_name = "my_sampler"          # looked up in the registry (entry points)
        sampler_options = {"num_steps": 50}  # optional

Every built-in sampler runs the same suite (``tests/test_conformance.py`` builds one subclass per
registered name). Settings are resolved in this order: an attribute set on the test subclass, then
the sampler class's own ``conformance`` dict (``ClassVar``, same keys), then the defaults below:

* ``sampler_options`` ({}): options the sampler is built with in every check.
* ``accuracy_options`` ({}): extra options for the accuracy check only (merged over ``sampler_options``).
* ``accuracy_factor`` (2.0): the largest accepted ratio of the sampler's within-mode sliced Wasserstein-2
  distance to its noise floor (the mean distance of exact sample sets of the same size; exact sets of 2000
  stay below 1.5 times it).
* ``accuracy_processes`` (("ve", "vp")): processes of the accuracy check; a process the sampler
  rejects (its ``_check_process`` raises ``ValueError``) is skipped.
* ``accuracy_num_samples`` (2000).
* ``skip`` ({}): ``{test method name: reason}`` for checks that do not apply.

The analytic test bed: :func:`conformance_mixture` (2-D, three anisotropic components, unequal weights) with
its exact score under ``VESDE()`` and ``VPSDE()``; samples are compared with exact draws from the
mixture's marginal at the sampler's final time.

The accuracy check (``test_accuracy``, one run per process, :func:`accuracy_statistics`) judges two things
separately, because the plain sliced W2 of a mixture is dominated by the binomial noise of the mode weights
(exact sets of 2000 reached 2.4 times its mean, so a threshold loose enough for them misses shape errors):

* the shape of every mode: the within-mode sliced W2 (samples and an exact reference set split by their most
  likely component) must stay within ``accuracy_factor`` times its noise floor;
* the mode weights: Pearson's statistic of the mean posterior probabilities of the components must stay
  below the chi-square critical value at level ``MODE_WEIGHT_LEVEL`` (1e-4), a bound on the probability that
  exact samples fail it.

Both are sensitive (``tests/test_conformance.py``): 8 Euler steps on the PF-ODE (25 on VE), outputs scaled by
1.05 (within-mode ratio 2.4 on VP), a score scaled by 0.9 or 1.1 in an ODE sampler or by 0.8 in Euler-Maruyama,
and mode weights off by 0.08 all fail, while exact draws pass at every seed.

Why one module of this length: it is one test suite, a class a plugin author subclasses; its checks share the
reference problems, the seeds and the statistics above, and a plugin imports it as one name.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

try:
    import pytest
except ImportError as exc:  # the suite is pytest test classes
    raise ImportError("score_toolkit.testing is a pytest suite: install pytest (pip install pytest) to run it") from exc
import torch

from . import registry as _registry
from ._utils import append_dims, per_sample_generators
from .analytic import AnalyticScore, GaussianMixture
from .metrics import within_mode_sliced_wasserstein
from .processes import VESDE, VPSDE, Process
from .samplers.base import NonFiniteError, Sampler, SamplerOutput, SamplerProperties

__all__ = [
    "SamplerConformance",
    "conformance_mixture",
    "conformance_processes",
    "accuracy_statistics",
    "check_accuracy",
    "mode_weight_statistic",
    "CONFORMANCE_DEFAULTS",
    "MODE_WEIGHT_LEVEL",
    "FLOOR_DRAWS",
    "MIN_COMPONENT_WEIGHT",
]

CONFORMANCE_DEFAULTS: Mapping[str, Any] = {
    "sampler_options": {},
    "accuracy_options": {},
    "accuracy_factor": 2.0,
    "accuracy_processes": ("ve", "vp"),
    "accuracy_num_samples": 2000,
    "skip": {},
}

#: false-alarm probability of the mode-weight test for exact samples (an upper bound, see mode_weight_statistic)
MODE_WEIGHT_LEVEL = 1e-4
#: exact sample sets averaged into the within-mode sliced W2 noise floor (computed once per process and size)
FLOOR_DRAWS = 16
_NUM_PROJECTIONS = 128

_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
_MAX_CALLS_AFTER_FAILURE = 10_000


def conformance_mixture(dtype=torch.float64) -> GaussianMixture:
    """The 2-D test-bed mixture: three anisotropic Gaussians with weights 0.5, 0.3, 0.2."""
    means = [[-2.0, -1.0], [2.0, 0.5], [0.0, 2.5]]
    variances = [[0.3, 0.1], [0.15, 0.4], [0.2, 0.2]]
    return GaussianMixture(means, variances, [0.5, 0.3, 0.2], dtype=dtype)


def _mixture_4d() -> GaussianMixture:
    """A 4-feature mixture for the rank checks ((B, 4) vs (B, 1, 2, 2))."""
    means = [[1.0, -0.5, 0.0, 1.5], [-1.0, 1.0, 0.5, -1.0]]
    return GaussianMixture(means, [0.2, 0.3], [0.6, 0.4])


def conformance_processes() -> dict[str, Process]:
    """The processes of the test bed, by key: ``"ve"`` (``VESDE()``) and ``"vp"`` (``VPSDE()``)."""
    return {"ve": VESDE(), "vp": VPSDE()}


@functools.cache
def _chi2_critical_value(dof: int, level: float) -> float:
    """The x with P(chi2_dof > x) = level: ``scipy.stats.chi2.isf`` where scipy is installed, else
    :func:`_chi2_critical_value_bisection` (the suite must run with pytest and torch alone)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return _chi2_critical_value_bisection(dof, level)
    return float(chi2.isf(level, dof))


def _chi2_critical_value_bisection(dof: int, level: float) -> float:
    """The x with P(chi2_dof > x) = level by bisection on the regularised upper incomplete gamma function."""
    lo, hi = 0.0, 10.0 * dof + 100.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        upper = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                              torch.tensor(mid / 2, dtype=torch.float64)))
        lo, hi = (mid, hi) if upper > level else (lo, mid)
    return 0.5 * (lo + hi)


def mode_weight_statistic(samples: torch.Tensor, mixture: GaussianMixture) -> tuple[float, list[float]]:
    """Pearson's statistic ``n sum_k (r_k - w_k)^2 / w_k`` of the mean posterior probabilities ``r_k`` of the
    components over the samples (soft mode weights), and the ``r_k``.

    For exact samples ``E[r_k] = w_k`` exactly, and the covariance of the vector of posteriors is at most the
    multinomial one (``diag(w) - w w^T - Cov(r) = E[diag(r) - r r^T]``, positive semi-definite), so by Anderson's
    inequality the statistic is, for large ``n``, stochastically smaller than Pearson's statistic of counts:
    chi-square with ``K - 1`` degrees of freedom."""
    x = samples.reshape(samples.shape[0], -1).to(mixture.dtype)
    r = mixture.posterior(x).mean(0)
    w = mixture.weights.to(r.device)
    return float(x.shape[0] * ((r - w) ** 2 / w).sum()), r.tolist()


@functools.cache
def _default_mixture() -> GaussianMixture:
    return conformance_mixture()


@functools.lru_cache(maxsize=16)
def _exact_reference(mixture: GaussianMixture, alpha: float, sigma: float, n: int) -> tuple[GaussianMixture, torch.Tensor, float]:
    """The marginal of ``mixture`` at noise (alpha, sigma), an exact reference set of ``n`` draws and the
    within-mode sliced W2 floor: the mean distance of ``FLOOR_DRAWS`` further exact sets of ``n`` to the reference."""
    target = mixture.perturbed(alpha, sigma)
    reference = target.sample(n, generator=torch.Generator().manual_seed(1))
    draws = [within_mode_sliced_wasserstein(target.sample(n, generator=torch.Generator().manual_seed(10 + k)), target,
                                            reference=reference, num_projections=_NUM_PROJECTIONS)
             for k in range(FLOOR_DRAWS)]
    return target, reference, sum(draws) / len(draws)


#: components lighter than this are dropped from the target of the accuracy check of a general mixture
#: (Pearson's statistic divides by the weights; exact samples almost never visit such components)
MIN_COMPONENT_WEIGHT = 1e-4


def accuracy_statistics(samples: torch.Tensor, alpha: float, sigma: float,
                        mixture: GaussianMixture | None = None) -> dict[str, Any]:
    """What ``test_accuracy`` checks, for ``samples`` (``(n, d)``) meant to follow ``mixture`` (default: the test-bed
    mixture :func:`conformance_mixture`) perturbed to ``alpha x_0 + sigma z`` (the marginal at the sampler's final
    time). Any Gaussian mixture can be the target (e.g. an exact posterior of
    :meth:`~score_toolkit.analytic.GaussianMixture.condition`); components of weight below ``MIN_COMPONENT_WEIGHT``
    are dropped from it first (pass the same object again to reuse the cached reference set and floor).

    Returns ``within_mode_sw2`` (:func:`~score_toolkit.metrics.within_mode_sliced_wasserstein` to an exact reference
    set of ``n`` draws, samples and reference split by their most likely component, 128 projections), ``floor`` (the
    mean of that distance over ``FLOOR_DRAWS`` exact sets of ``n``), ``within_mode_ratio`` (their ratio: about 1
    for exact samples, at most 1.5 in 2000 exact sets of 2000 of the test-bed mixture), ``mode_weight_chi2`` and
    ``mode_weights`` (:func:`mode_weight_statistic`), and ``mode_weight_limit`` (the chi-square critical value at
    ``MODE_WEIGHT_LEVEL`` with ``K - 1`` degrees of freedom; infinite for one component).

    The two parts are judged separately because the plain sliced W2 of a mixture is dominated by the binomial
    noise of the mode weights: exact sets of 2000 reached 2.4 times its mean, so a threshold loose enough for them
    is blind to shape errors."""
    n = samples.shape[0]
    if mixture is None:
        mixture = _default_mixture()
    elif bool((mixture.weights < MIN_COMPONENT_WEIGHT).any()):
        mixture = _pruned(mixture)
    target, reference, floor = _exact_reference(mixture, float(alpha), float(sigma), n)
    dist = within_mode_sliced_wasserstein(samples, target, reference=reference, num_projections=_NUM_PROJECTIONS)
    chi2, weights = mode_weight_statistic(samples, target)
    k = target.num_components
    return {
        "within_mode_sw2": dist,
        "floor": floor,
        "within_mode_ratio": dist / floor,
        "mode_weight_chi2": chi2,
        "mode_weights": weights,
        "mode_weight_limit": _chi2_critical_value(k - 1, MODE_WEIGHT_LEVEL) if k > 1 else math.inf,
    }


_PRUNED: dict[int, tuple[GaussianMixture, GaussianMixture]] = {}


def _pruned(mixture: GaussianMixture) -> GaussianMixture:
    hit = _PRUNED.get(id(mixture))
    if hit is None or hit[0] is not mixture:
        hit = (mixture, mixture.components(mixture.weights >= MIN_COMPONENT_WEIGHT))
        _PRUNED[id(mixture)] = hit
    return hit[1]


def check_accuracy(sampler: Sampler, score_fn, process: Process, target: GaussianMixture, *, num_samples: int = 2000,
                   factor: float = 2.0, seed: int = 2024) -> dict[str, Any]:
    """The accuracy check of ``test_accuracy`` for any score function and any Gaussian-mixture target (e.g. a
    conditional score transform against the exact posterior): ``sampler`` draws ``num_samples`` samples with
    ``score_fn`` under ``process``; raises ``AssertionError`` unless the within-mode sliced W2 is within ``factor``
    times its noise floor and the mode weights pass the chi-square test (see :func:`accuracy_statistics`).
    Returns the statistics (plus ``nfe``)."""
    out = sampler.sample(score_fn, process, shape=(num_samples, target.dim),
                         generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    alpha, sigma = process.marginal(torch.tensor(sampler._final_time(process), dtype=torch.float64))
    stats = accuracy_statistics(out.samples, float(alpha), float(sigma), target)
    where = f"sampler {sampler.name!r} on {type(process).__name__} with {score_fn!r} (nfe = {out.nfe})"
    _expect(stats["within_mode_ratio"] <= factor,
            f"{where}: within-mode sliced W2 {stats['within_mode_sw2']:.4g} is {stats['within_mode_ratio']:.2f} times "
            f"the noise floor {stats['floor']:.4g} of {num_samples} samples (accepted: {factor:g})")
    _expect(stats["mode_weight_chi2"] <= stats["mode_weight_limit"],
            f"{where}: mode weights {[round(v, 4) for v in stats['mode_weights']]} differ from the exact ones by more "
            f"than sampling noise: Pearson statistic {stats['mode_weight_chi2']:.1f} > {stats['mode_weight_limit']:.1f}")
    return {**stats, "nfe": out.nfe}


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class _FaultyScore:
    """An exact score that turns bad after ``good_calls`` evaluations: NaN/inf values or a wrong shape.
    Raises if the sampler keeps calling it long after (so a hang becomes a failure)."""

    def __init__(self, exact: AnalyticScore, good_calls: int, fault: str):
        self.exact, self.good_calls, self.fault, self.calls = exact, good_calls, fault, 0

    def _after(self) -> bool:
        self.calls += 1
        if self.calls > self.good_calls + _MAX_CALLS_AFTER_FAILURE:
            raise RuntimeError(
                f"the sampler kept evaluating a failing score {_MAX_CALLS_AFTER_FAILURE} times without raising"
            )
        return self.calls > self.good_calls

    def __call__(self, x, t):
        if not self._after():
            return self.exact(x, t)
        if self.fault == "shape":
            return self.exact(x, t)[:, :1]
        return torch.full_like(x, math.nan if self.fault == "nan" else math.inf)

    def energy(self, x, t):
        if not self._after():
            return self.exact.energy(x, t)
        return torch.full((x.shape[0],), math.nan if self.fault == "nan" else math.inf, dtype=x.dtype)


class _CountingScore:
    def __init__(self, exact: AnalyticScore):
        self.exact, self.calls = exact, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.exact(x, t)

    def energy(self, x, t):
        return self.exact.energy(x, t)


class SamplerConformance:
    """Base class of a sampler's conformance tests: subclass it in a test file (named ``Test...``) and
    set ``sampler_name`` (see the module docstring for the other settings)."""

    sampler_name: ClassVar[str | None] = None
    #: the registry to look the sampler up in (``None``: the shared one, filled from entry points)
    registry: ClassVar[_registry.SamplerRegistry | None] = None

    sampler_options: ClassVar[Mapping[str, Any] | None] = None
    accuracy_options: ClassVar[Mapping[str, Any] | None] = None
    accuracy_factor: ClassVar[float | None] = None
    accuracy_processes: ClassVar[tuple[str, ...] | None] = None
    accuracy_num_samples: ClassVar[int | None] = None
    skip: ClassVar[Mapping[str, str] | None] = None

    batch: ClassVar[int] = 6
    #: seed of the generator the accuracy check samples with
    accuracy_seed: ClassVar[int] = 2024

    # ------------------------------------------------------------------ helpers
    @pytest.fixture(autouse=True)
    def _conformance_skip(self, request):
        reason = self.settings()["skip"].get(request.function.__name__)
        if reason:
            pytest.skip(f"{self.sampler_name}: {reason}")

    @classmethod
    def sampler_class(cls) -> type[Sampler]:
        if not cls.sampler_name:
            raise TypeError(f"{cls.__name__}: set sampler_name to the registered name of the sampler under test")
        reg = cls.registry if cls.registry is not None else _registry._REGISTRY
        return reg.get_class(cls.sampler_name)

    @classmethod
    def settings(cls) -> dict[str, Any]:
        """The resolved settings (test subclass attribute > sampler's ``conformance`` dict > defaults)."""
        declared = getattr(cls.sampler_class(), "conformance", None) or {}
        unknown = sorted(set(declared) - set(CONFORMANCE_DEFAULTS))
        if unknown:
            raise TypeError(
                f"sampler {cls.sampler_name!r}: unknown key(s) {unknown} in its conformance dict; "
                f"expected keys among {sorted(CONFORMANCE_DEFAULTS)}"
            )
        out = {}
        for key, default in CONFORMANCE_DEFAULTS.items():
            value = getattr(cls, key)
            out[key] = value if value is not None else declared.get(key, default)
        return out

    def make_sampler(self, **extra: Any) -> Sampler:
        return self.sampler_class()(**{**self.settings()["sampler_options"], **extra})

    def make_score_fn(self, mixture: GaussianMixture, process: Process):
        """The score function handed to the sampler (exact, with ``energy`` and ``denoiser`` views).
        Override for samplers that need something else."""
        return AnalyticScore(mixture, process)

    def process(self) -> Process:
        """A process the sampler accepts (VP first, then VE), for the functional checks."""
        sampler = self.make_sampler()
        procs = conformance_processes()
        for key in ("vp", "ve"):
            try:
                sampler._check_process(procs[key])
            except ValueError:
                continue
            return procs[key]
        pytest.skip(f"sampler {self.sampler_name!r} accepts neither VESDE() nor VPSDE()")

    def _run(self, sampler=None, *, mixture=None, process=None, **kwargs) -> SamplerOutput:
        sampler = sampler if sampler is not None else self.make_sampler()
        mixture = mixture if mixture is not None else conformance_mixture()
        process = process if process is not None else self.process()
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        if "x_init" not in kwargs:
            kwargs.setdefault("shape", (self.batch, mixture.dim))
            kwargs.setdefault("dtype", torch.float64)
        score_fn = kwargs.pop("score_fn", None) or self.make_score_fn(mixture, process)
        return sampler.sample(score_fn, process, **kwargs)

    # ------------------------------------------------------------------ declarations
    def test_declarations(self):
        cls = self.sampler_class()
        name = self.sampler_name
        _expect(isinstance(cls.name, str) and _NAME_PATTERN.fullmatch(cls.name) is not None,
                f"{cls.__qualname__}.name: expected a lowercase identifier like 'my_sampler', found {cls.name!r}")
        _expect(cls.name == name, f"{cls.__qualname__}.name is {cls.name!r} but it is registered as {name!r}")
        desc = cls.description
        _expect(isinstance(desc, str) and desc.strip() != "" and "\n" not in desc.strip(),
                f"sampler {name!r}: expected description to be one non-empty line, found {desc!r}")
        self._check_properties(cls.properties, f"{cls.__qualname__}.properties")
        _expect(isinstance(cls.options, Mapping) and all(isinstance(k, str) for k in cls.options),
                f"sampler {name!r}: expected options to be a mapping of option name -> default, found {cls.options!r}")
        clash = sorted(set(cls.options) & set(Sampler.common_options))
        _expect(not clash, f"sampler {name!r}: options {clash} redefine common options handled by the base class")
        sampler = cls()  # every option has a usable default
        _expect(set(sampler.config) == set(cls.options) | set(Sampler.common_options),
                f"sampler {name!r}: config keys {sorted(sampler.config)} differ from its declared options")
        # properties may depend on the options (set on the instance): they must be well-formed too
        self._check_properties(self.make_sampler().properties, f"sampler {name!r} built with its test options")

    def _check_properties(self, props, where: str) -> None:
        _expect(isinstance(props, SamplerProperties), f"{where}: expected a SamplerProperties, found {props!r}")
        for flag in ("stochastic", "adaptive", "fixed_grid", "per_sample", "needs_energy"):
            value = getattr(props, flag)
            _expect(isinstance(value, bool), f"{where}: expected {flag} to be a bool, found {value!r}")
        _expect(props.order is None or (isinstance(props.order, (int, float)) and not isinstance(props.order, bool)
                                        and props.order > 0),
                f"{where}: expected order to be None or a number > 0, found {props.order!r}")
        _expect(props.final_time in ("t_min", "fixed"),
                f"{where}: expected final_time 't_min' or 'fixed', found {props.final_time!r}")
        _expect(not (props.adaptive and props.fixed_grid), f"{where}: declares both adaptive=True and fixed_grid=True")

    def test_unknown_option_is_type_error(self):
        with pytest.raises(TypeError, match=re.escape(repr(self.sampler_name))):
            self.make_sampler(definitely_not_an_option=1)

    def test_bad_inputs(self):
        sampler, process = self.make_sampler(), self.process()
        score_fn = self.make_score_fn(conformance_mixture(), process)
        with pytest.raises(TypeError):
            sampler.sample(score_fn, process, x_init=[[0.0, 0.0]])
        with pytest.raises(TypeError):
            sampler.sample(score_fn, process, x_init=torch.zeros(3, 2, dtype=torch.int64))
        with pytest.raises(ValueError):
            sampler.sample(score_fn, process, x_init=torch.tensor(0.5, dtype=torch.float64))  # no batch dimension
        with pytest.raises(ValueError):
            sampler.sample(score_fn, process, shape=())
        with pytest.raises(ValueError):
            sampler.sample(score_fn, process)  # neither x_init nor shape
        with pytest.raises(ValueError):
            sampler.sample(score_fn, process, x_init=torch.zeros(3, 2, dtype=torch.float64), shape=(4, 2))
        with pytest.raises(TypeError):
            sampler.sample(score_fn, "vp", shape=(3, 2))
        with pytest.raises(TypeError):
            sampler.sample(None, process, shape=(3, 2))
        with pytest.raises(ValueError):
            sampler.sample(score_fn, process, shape=(3, 2), generator=per_sample_generators(0, range(2)))
        with pytest.raises(TypeError, match="expected a floating-point torch.dtype"):
            sampler.sample(score_fn, process, shape=(3, 2), dtype=torch.int32)
        with pytest.raises(ValueError, match="expected a device available on this machine"):
            sampler.sample(score_fn, process, shape=(3, 2), device="no_such_device")

    # ------------------------------------------------------------------ outputs
    def test_output_shape_and_nfe(self):
        process = self.process()
        counting = _CountingScore(self.make_score_fn(conformance_mixture(), process))
        out = self._run(process=process, score_fn=counting)
        _expect(isinstance(out, SamplerOutput), f"expected a SamplerOutput, found {type(out).__name__}")
        _expect(tuple(out.samples.shape) == (self.batch, 2),
                f"expected samples of shape {(self.batch, 2)}, found {tuple(out.samples.shape)}")
        _expect(bool(torch.isfinite(out.samples).all()), "expected finite samples")
        _expect(isinstance(out.nfe, int) and not isinstance(out.nfe, bool) and out.nfe > 0,
                f"expected nfe to be an int > 0, found {out.nfe!r}")
        if not self.make_sampler().properties.needs_energy:
            _expect(out.nfe == counting.calls,
                    f"expected nfe to count score evaluations: reported {out.nfe}, the score was called {counting.calls} times")
        _expect(out.trajectory is None, "expected no trajectory unless return_trajectory=True")

    def test_any_rank(self):
        """(B, 1, 2, 2) data gives the same samples as the same data flattened to (B, 4)."""
        mixture = _mixture_4d()
        flat = self._run(mixture=mixture, shape=(self.batch, 4))
        image = self._run(mixture=mixture, shape=(self.batch, 1, 2, 2))
        _expect(tuple(image.samples.shape) == (self.batch, 1, 2, 2),
                f"expected samples of shape {(self.batch, 1, 2, 2)}, found {tuple(image.samples.shape)}")
        torch.testing.assert_close(image.samples.reshape(self.batch, 4), flat.samples, rtol=1e-9, atol=1e-9)

    def test_trajectory_and_callback(self):
        process = self.process()
        x_init = process.prior_sample((self.batch, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        calls = []
        out = self._run(process=process, x_init=x_init, return_trajectory=True, callback=calls.append)
        traj = out.trajectory
        _expect(isinstance(traj, list) and len(traj) >= 2,
                f"expected a trajectory list of >= 2 states, found {type(traj).__name__}")
        _expect(torch.equal(traj[0], x_init), "expected the trajectory to start with the initial state")
        _expect(torch.equal(traj[-1], out.samples), "expected the trajectory to end with the returned samples")
        _expect(all(s.shape == x_init.shape for s in traj), "expected every trajectory state shaped like x_init")
        _expect(out.times is not None and len(out.times) == len(traj),
                "expected one time per trajectory state in out.times")
        _expect(len(calls) == len(traj) - 1,
                f"expected the callback once per recorded step ({len(traj) - 1}), found {len(calls)} calls")
        _expect(all({"step", "t", "x", "nfe"} <= set(c) for c in calls),
                "expected callback dicts with keys step, t, x, nfe")
        _expect(calls[-1]["nfe"] == out.nfe, "expected the last callback's nfe to equal the output's nfe")

    # ------------------------------------------------------------------ randomness
    def test_seed_reproducible(self):
        a = self._run(generator=torch.Generator().manual_seed(7))
        b = self._run(generator=torch.Generator().manual_seed(7))
        c = self._run(generator=torch.Generator().manual_seed(8))
        _expect(torch.equal(a.samples, b.samples), "expected identical samples for the same generator seed")
        _expect(not torch.equal(a.samples, c.samples), "expected different samples for different seeds")

    def test_per_sample_generators(self):
        """With one generator per sample, sample i does not depend on the batch it is drawn in."""
        if not self.make_sampler().properties.per_sample:
            pytest.skip(f"sampler {self.sampler_name!r} declares per_sample=False")
        five = self._run(generator=per_sample_generators(11, range(5)), shape=(5, 2))
        three = self._run(generator=per_sample_generators(11, range(3)), shape=(3, 2))
        torch.testing.assert_close(five.samples[:3], three.samples, rtol=1e-9, atol=1e-9)

    def test_deterministic_given_initial_state(self):
        """A sampler declaring stochastic=False ignores the generator once x_init is given."""
        if self.make_sampler().properties.stochastic:
            pytest.skip(f"sampler {self.sampler_name!r} is stochastic")
        process = self.process()
        x_init = process.prior_sample((self.batch, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        a = self._run(process=process, x_init=x_init, generator=torch.Generator().manual_seed(1))
        b = self._run(process=process, x_init=x_init, generator=torch.Generator().manual_seed(2))
        _expect(torch.equal(a.samples, b.samples),
                "expected a sampler declaring stochastic=False to give the same samples for any generator")

    def test_dtypes_preserved(self):
        for dtype in (torch.float32, torch.float64):
            out = self._run(dtype=dtype)
            _expect(out.samples.dtype == dtype, f"expected samples of dtype {dtype}, found {out.samples.dtype}")
            _expect(bool(torch.isfinite(out.samples).all()), f"expected finite samples in {dtype}")
            if dtype == torch.float64:  # computed in float64, not computed in float32 and cast at the boundary
                rounded = out.samples.float().double()
                _expect(not torch.equal(out.samples, rounded),
                        "expected float64 samples to carry more than float32 precision; found every value "
                        "representable in float32 (the sampler computes in float32)")

    # ------------------------------------------------------------------ failures
    def test_non_finite_score_raises(self):
        process = self.process()
        exact = self.make_score_fn(conformance_mixture(), process)
        for fault in ("nan", "inf"):
            faulty = _FaultyScore(exact, good_calls=2, fault=fault)
            with pytest.raises(NonFiniteError) as info:
                self._run(process=process, score_fn=faulty)
            msg = str(info.value)
            _expect(self.sampler_name in msg and "step" in msg,
                    f"expected the NonFiniteError message to name the sampler and the step, found {msg!r}")

    def test_wrong_shape_score_raises(self):
        process = self.process()
        faulty = _FaultyScore(self.make_score_fn(conformance_mixture(), process), good_calls=0, fault="shape")
        with pytest.raises(ValueError, match="shape"):
            self._run(process=process, score_fn=faulty)

    # ------------------------------------------------------------------ numerics
    def test_denoise(self):
        """``denoise=True`` ends with Tweedie's step at the final time: x <- (x + sigma^2 s(x, t)) / alpha."""
        process = self.process()
        mixture = conformance_mixture()
        den_sampler = self.make_sampler(denoise=True)
        # a final step that is on by default (to_zero) gives way to denoise: compare with the run without it
        off = {"to_zero": False} if den_sampler.config.get("to_zero") is False and self.make_sampler().config.get("to_zero") else {}
        plain = self._run(self.make_sampler(**off), process=process, generator=torch.Generator().manual_seed(4))
        denoised = self._run(den_sampler, process=process, generator=torch.Generator().manual_seed(4))
        x = plain.samples
        t = torch.full((x.shape[0],), self.make_sampler()._final_time(process), dtype=x.dtype)
        alpha, sigma = process.marginal(t)
        expected = (x + append_dims(sigma**2, x.ndim) * mixture.score(x, t, process)) / append_dims(alpha, x.ndim)
        _expect(not torch.equal(denoised.samples, plain.samples), "expected denoise=True to change the samples")
        torch.testing.assert_close(denoised.samples, expected, rtol=1e-7, atol=1e-7)

    @pytest.mark.parametrize("process_key", ["ve", "vp"])
    def test_accuracy(self, process_key):
        """Samples against the exact marginal at the sampler's final time (see :func:`accuracy_statistics`):
        the within-mode sliced W2 within ``accuracy_factor`` times its noise floor, and the mode weights
        within binomial noise (Pearson statistic below its level-``MODE_WEIGHT_LEVEL`` critical value)."""
        cfg = self.settings()
        if process_key not in cfg["accuracy_processes"]:
            pytest.skip(f"sampler {self.sampler_name!r}: accuracy on {process_key!r} not requested")
        process = conformance_processes()[process_key]
        sampler = self.make_sampler(**cfg["accuracy_options"])
        try:
            sampler._check_process(process)
        except ValueError as exc:
            pytest.skip(f"sampler {self.sampler_name!r} does not handle {type(process).__name__}: {exc}")
        n = int(cfg["accuracy_num_samples"])
        mixture = conformance_mixture()
        out = sampler.sample(self.make_score_fn(mixture, process), process, shape=(n, 2),
                             generator=torch.Generator().manual_seed(self.accuracy_seed), dtype=torch.float64)
        alpha, sigma = process.marginal(torch.tensor(sampler._final_time(process), dtype=torch.float64))
        stats = accuracy_statistics(out.samples, float(alpha), float(sigma))
        factor = float(cfg["accuracy_factor"])
        where = (f"sampler {self.sampler_name!r} on {type(process).__name__} with options {dict(sampler.config)} "
                 f"(nfe = {out.nfe})")
        _expect(stats["within_mode_ratio"] <= factor,
                f"{where}: within-mode sliced W2 {stats['within_mode_sw2']:.4g} is {stats['within_mode_ratio']:.2f} "
                f"times the noise floor {stats['floor']:.4g} of {n} samples (accepted: {factor:g})")
        _expect(stats["mode_weight_chi2"] <= stats["mode_weight_limit"],
                f"{where}: mode weights {[round(v, 4) for v in stats['mode_weights']]} differ from the exact "
                f"{[round(v, 4) for v in mixture.weights.tolist()]} by more than sampling noise: Pearson statistic "
                f"{stats['mode_weight_chi2']:.1f} > {stats['mode_weight_limit']:.1f} (the chi-square level-"
                f"{MODE_WEIGHT_LEVEL:g} critical value for exact samples, {n} of them)")
