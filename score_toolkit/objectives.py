"""Score-matching objectives, all with one call shape.

Every objective is a small class built with its options (an unknown option is a ``TypeError``, a bad
value a ``ValueError``) and called as::

    loss = objective(score_fn, x, generator=None)

``score_fn(x, t)`` is the canonical score function (a :class:`~score_toolkit.scores.ScoreAdapter`
around a network, or any callable; ``t`` is a float tensor (B,)), ``x`` a data batch (B, ...) of any
rank. The result is the batch mean of the per-sample losses (``reduction="mean"``) or the per-sample
losses (B,) (``reduction="none"``). Per-sample losses are sums over all features (not means), as in
the formulas. Randomness enters only through ``generator`` (one ``torch.Generator`` or a list with one
per sample, in which case sample ``i``'s noise comes from ``generator[i]`` only).

Formulas (FORMULAS.md, "Objectives"; s = s_theta, d = number of features):

=================  ==========================================================================
``ESM``            1/2 E ||s(x) - grad log p(x)||^2                        (Hyvarinen 2005, eq. 2)
``ISM``            E [1/2 ||s(x)||^2 + tr(grad_x s(x))]                    (Hyvarinen 2005, Theorem 1)
``SSM``            E_v E_x [v^T (grad_x s) v + 1/2 (v^T s)^2]              (Song et al. 2019, eq. 7)
``SSM`` (VR)       E_v E_x [v^T (grad_x s) v + 1/2 ||s||^2]                (Song et al. 2019, eq. 8)
``DSM``            1/2 E ||s(x + sigma z) + z / sigma||^2                  (Vincent 2011, eq. 11)
``NCSN``           1/L sum_i sigma_i^2 DSM(sigma_i)                        (Song & Ermon 2019, eqs. 5-6)
``ContinuousDSM``  E_t lambda(t) 1/2 ||s(x_t, t) + z / sigma(t)||^2        (Song et al. 2021, eq. 7)
``EpsilonLoss``    E_t ||eps_theta(x_t, t) - z||^2                         (Ho et al. 2020, eq. 14)
=================  ==========================================================================

The 1/2 factors follow FORMULAS.md. ``ContinuousDSM`` keeps the 1/2 of ``DSM`` (FORMULAS.md writes the
continuous loss without it): with ``weighting="uniform"`` (lambda = sigma^2) it is half the epsilon
loss, and with ``weighting="likelihood"`` (lambda = g^2) ``(1 - t_min)`` times it is the score-matching
term of the likelihood bound of Song et al. 2021b (Theorem 1), up to a constant in theta.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ._utils import GeneratorLike, append_dims, check_positive, check_tensor, rand, randn
from .processes import Process
from .scores import ScoreAdapter, epsilon_from_score

__all__ = [
    "Objective",
    "ESM",
    "ISM",
    "SSM",
    "DSM",
    "NCSN",
    "ContinuousDSM",
    "EpsilonLoss",
    "OBJECTIVES",
    "get_objective",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REDUCTIONS = ("mean", "none")
PROJECTIONS = ("rademacher", "gaussian", "sphere")
WEIGHTINGS = ("uniform", "likelihood")


# ---------------------------------------------------------------------------------------- helpers
def _check_time_value(t, name: str = "t") -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"expected {name} to be a float, found {type(t).__name__}")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"expected a finite {name}, found {t!r}")
    return t


def _check_process(process) -> Process:
    if not isinstance(process, Process):
        raise TypeError(f"expected process to be a score_toolkit Process, found {type(process).__name__}")
    return process


def _check_generator(generator, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"expected one generator per sample ({batch}), found a list of {len(generator)}")
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"expected a list of torch.Generator, found an element of type {bad[0]}")
        return
    raise TypeError(
        f"expected generator to be None, a torch.Generator or a list of them, found {type(generator).__name__}"
    )


def _check_same_process(score_fn, process: Process) -> None:
    """A ScoreAdapter converts its network's prediction with its own process: it must be ours."""
    if isinstance(score_fn, ScoreAdapter) and score_fn.process != process:
        raise ValueError(
            f"the ScoreAdapter's process {score_fn.process!r} differs from the objective's process {process!r}"
        )


def _score(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = score_fn(x, t)
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"expected score_fn to return a tensor, found {type(s).__name__}")
    if s.shape != x.shape:
        raise ValueError(f"expected score_fn to return a tensor of shape {tuple(x.shape)} (like x), found {tuple(s.shape)}")
    return s


def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Euclidean norm over all features, shape (B,)."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _input_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


def _needs_x_graph(s: torch.Tensor, objective: str) -> None:
    if not s.requires_grad:
        raise ValueError(
            f"{objective} differentiates the score with respect to x, but score_fn returned a tensor without an "
            "autograd graph (was it computed under torch.no_grad() or detached?)"
        )


# ---------------------------------------------------------------------------------------- base
class Objective:
    """Base class: validation of the call, reduction and ``repr``. Subclasses implement
    :meth:`_per_sample` and return per-sample losses (B,)."""

    name: ClassVar[str] = ""

    def __init__(self, *, reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"expected reduction in {REDUCTIONS}, found {reduction!r}")
        self.reduction = reduction

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options (for logging and ``repr``)."""
        return {**self._options(), "reduction": self.reduction}

    def _options(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        """The loss of ``score_fn`` on the data batch ``x`` (a scalar, or (B,) with ``reduction="none"``)."""
        if not callable(score_fn):
            raise TypeError(f"expected score_fn to be callable as score_fn(x, t), found {type(score_fn).__name__}")
        check_tensor(x, "x")
        if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
            raise ValueError(
                f"expected x of shape (B, ...) with B >= 1 and at least one feature (rank >= 2; use x[:, None] for "
                f"scalar data), found shape {tuple(x.shape)}"
            )
        _check_generator(generator, x.shape[0])
        losses = self._per_sample(score_fn, x, generator)
        return losses.mean() if self.reduction == "mean" else losses

    def _per_sample(self, score_fn, x, generator) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _time(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------- no noise
class ESM(Objective):
    """Explicit score matching against a known target score: ``1/2 E ||s(x, t) - target(x)||^2``
    (Hyvarinen 2005, eq. 2). Minimiser: ``s = target`` on the data's support.

    Args:
        target_score: callable ``x -> score`` of the same shape as ``x``.
        t: the time handed to ``score_fn`` (default 0.0).
    """

    name = "esm"

    def __init__(self, target_score: Callable[[torch.Tensor], torch.Tensor], t: float = 0.0, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        if not callable(target_score):
            raise TypeError(f"expected target_score to be callable as target_score(x), found {type(target_score).__name__}")
        self.target_score = target_score
        self.t = _check_time_value(t)

    def _options(self):
        return {"target_score": getattr(self.target_score, "__name__", type(self.target_score).__name__), "t": self.t}

    def _per_sample(self, score_fn, x, generator):
        s = _score(score_fn, x, self._time(x, self.t))
        target = self.target_score(x)
        if not isinstance(target, torch.Tensor) or target.shape != x.shape:
            found = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"expected target_score to return a tensor of shape {tuple(x.shape)}, found {found}")
        return 0.5 * _sq_norm(s - target.detach().to(s.dtype))


class ISM(Objective):
    """Implicit score matching (Hyvarinen 2005, Theorem 1): ``E [1/2 ||s(x, t)||^2 + tr(grad_x s(x, t))]``.

    The trace is exact: one backward pass per feature (d passes for d features of any rank, which are
    flattened), so the cost grows linearly with d; use :class:`SSM` in high dimension. The graph is
    kept (``create_graph=True`` when gradients are enabled) so the loss can be trained. Each sample's
    trace is obtained from the gradient of the batch sum, which assumes samples do not interact
    through the network (no batch norm). Minimiser: the data score (ESM = ISM + 1/2 E ||grad log p||^2).

    Args:
        t: the time handed to ``score_fn`` (default 0.0).
    """

    name = "ism"

    def __init__(self, t: float = 0.0, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        self.t = _check_time_value(t)

    def _options(self):
        return {"t": self.t}

    def _per_sample(self, score_fn, x, generator):
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = _input_with_grad(x)
            s = _score(score_fn, xg, self._time(x, self.t))
            _needs_x_graph(s, "ISM")
            s_flat = s.reshape(s.shape[0], -1)
            trace = torch.zeros_like(s_flat[:, 0])
            for i in range(s_flat.shape[1]):
                (g,) = torch.autograd.grad(
                    s_flat[:, i].sum(), xg, create_graph=create_graph, retain_graph=True, allow_unused=True
                )
                if g is not None:
                    trace = trace + g.reshape(g.shape[0], -1)[:, i]
            loss = 0.5 * _sq_norm(s) + trace
        return loss if create_graph else loss.detach()


def _projections(kind: str, shape, *, generator, device, dtype) -> torch.Tensor:
    """Random directions with E[v v^T] = I, shape ``shape`` = (B, M, *features)."""
    if kind == "rademacher":
        return torch.where(rand(shape, generator=generator, device=device, dtype=dtype) < 0.5, -1.0, 1.0).to(dtype)
    v = randn(shape, generator=generator, device=device, dtype=dtype)
    if kind == "sphere":
        flat = v.reshape(shape[0], shape[1], -1)
        d = flat.shape[-1]
        v = (flat * (math.sqrt(d) / flat.norm(dim=-1, keepdim=True))).reshape(shape)
    return v


class SSM(Objective):
    """Sliced score matching (Song et al. 2019, "Sliced score matching", eq. 7):
    ``E_v E_x [v^T (grad_x s) v + 1/2 (v^T s)^2]``; with ``variance_reduction=True`` (SSM-VR, eq. 8)
    ``1/2 (v^T s)^2`` is replaced by its expectation ``1/2 ||s||^2``. Minimiser: the data score.

    Args:
        num_projections: M random directions per sample, averaged (the batch is repeated M times, so
            all projections cost one backward pass together).
        projection: the law of v, always with E[v v^T] = I: ``"rademacher"`` (+-1 entries),
            ``"gaussian"`` (N(0, I)) or ``"sphere"`` (sqrt(d) times uniform on the unit sphere).
        variance_reduction: SSM-VR.
        t: the time handed to ``score_fn`` (default 0.0).

    Unbiased for ISM: for every x, E_v of the per-sample loss equals the ISM per-sample loss.
    """

    def __init__(
        self,
        num_projections: int = 1,
        projection: str = "rademacher",
        variance_reduction: bool = False,
        t: float = 0.0,
        *,
        reduction: str = "mean",
    ):
        super().__init__(reduction=reduction)
        if isinstance(num_projections, bool) or not isinstance(num_projections, int):
            raise TypeError(f"expected num_projections to be an int, found {type(num_projections).__name__}")
        if num_projections < 1:
            raise ValueError(f"expected num_projections >= 1, found {num_projections}")
        if projection not in PROJECTIONS:
            raise ValueError(f"expected projection in {PROJECTIONS}, found {projection!r}")
        if not isinstance(variance_reduction, bool):
            raise TypeError(f"expected variance_reduction to be a bool, found {type(variance_reduction).__name__}")
        self.num_projections = num_projections
        self.projection = projection
        self.variance_reduction = variance_reduction
        self.t = _check_time_value(t)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "ssm_vr" if self.variance_reduction else "ssm"

    def _options(self):
        return {
            "num_projections": self.num_projections,
            "projection": self.projection,
            "variance_reduction": self.variance_reduction,
            "t": self.t,
        }

    def _per_sample(self, score_fn, x, generator):
        b, m = x.shape[0], self.num_projections
        v = _projections(self.projection, (b, m, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        v = v.reshape(b * m, *x.shape[1:])
        xr = x.unsqueeze(1).expand(b, m, *x.shape[1:]).reshape(b * m, *x.shape[1:])
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = _input_with_grad(xr)
            s = _score(score_fn, xg, self._time(xr, self.t))
            _needs_x_graph(s, "SSM")
            vs = _dot(v, s)
            (g,) = torch.autograd.grad(vs.sum(), xg, create_graph=create_graph, allow_unused=True)
            vjv = _dot(v, g) if g is not None else torch.zeros_like(vs)
            second = 0.5 * _sq_norm(s) if self.variance_reduction else 0.5 * vs.pow(2)
            loss = (vjv + second).reshape(b, m).mean(1)
        return loss if create_graph else loss.detach()


# ---------------------------------------------------------------------------------------- with noise
class DSM(Objective):
    """Denoising score matching at one noise level (Vincent 2011, eq. 11):
    ``1/2 E_x E_z ||s(x + sigma z, t) + z / sigma||^2``.

    Minimiser: the score of ``p_sigma = p * N(0, sigma^2 I)``; ESM on ``p_sigma`` equals DSM minus a
    constant independent of the model.

    Args:
        sigma: the noise level (> 0).
        t: the time handed to ``score_fn``; ``None`` (default) hands it ``sigma`` itself, which suits
            networks conditioned on the noise level. To train a :class:`ScoreAdapter` of a VE process on
            its own time axis, pass ``t = float(process.t_from_noise_to_signal(sigma))``.
    """

    name = "dsm"

    def __init__(self, sigma: float, t: float | None = None, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        self.sigma = check_positive(sigma, "sigma")
        self.t = None if t is None else _check_time_value(t)

    def _options(self):
        return {"sigma": self.sigma, "t": self.t}

    def _per_sample(self, score_fn, x, generator):
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = self._time(x, self.sigma if self.t is None else self.t)
        s = _score(score_fn, x + self.sigma * z, t)
        return 0.5 * _sq_norm(s + z / self.sigma)


class NCSN(Objective):
    """Multi-level denoising score matching of NCSN (Song & Ermon 2019, eqs. 5-6):
    ``1/L sum_i lambda(sigma_i) 1/2 E ||s(x + sigma_i z, t_i) + z / sigma_i||^2`` with
    ``lambda(sigma) = sigma^2`` on the geometric ladder ``sigma_1 = sigma_max > ... > sigma_L = sigma_min``
    (property :attr:`sigmas`). Each sample draws one level uniformly, an unbiased estimate of the average.
    Per sample the loss is ``1/2 ||sigma s + z||^2``. Minimiser: the score of ``p_{sigma_i}`` at every level.

    Args:
        sigma_min, sigma_max: ends of the ladder (``0 < sigma_min < sigma_max``).
        num_levels: L >= 2 (10 in NCSN).
        process: ``None`` (default): the network is called with ``t = sigma_i``. A variance-exploding
            process (alpha(t) = 1, e.g. :class:`~score_toolkit.processes.VESDE`): the network is called
            with the time ``t_i`` at which the process's ``sigma(t_i) = sigma_i``, so the same network
            (e.g. a ``ScoreAdapter`` with ``time_input="sigma"``) trains on the SDE's time axis; then
            ``sigma_min`` and ``sigma_max`` default to ``sigma(t_min)`` and ``sigma(1)``, and the ladder
            must lie inside that range (property :attr:`times`).
    """

    name = "ncsn"

    def __init__(
        self,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        num_levels: int = 10,
        *,
        process: Process | None = None,
        reduction: str = "mean",
    ):
        super().__init__(reduction=reduction)
        if process is not None:
            _check_process(process)
            lo_hi = process.sigma(torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).tolist()
            sigma_min = lo_hi[0] if sigma_min is None else sigma_min
            sigma_max = lo_hi[1] if sigma_max is None else sigma_max
        if sigma_min is None or sigma_max is None:
            raise ValueError("expected sigma_min and sigma_max (they default to the process's range only with process=)")
        smin, smax = check_positive(sigma_min, "sigma_min"), check_positive(sigma_max, "sigma_max")
        if not smax > smin:
            raise ValueError(f"expected sigma_max > sigma_min, found sigma_min={smin:g}, sigma_max={smax:g}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int):
            raise TypeError(f"expected num_levels to be an int, found {type(num_levels).__name__}")
        if num_levels < 2:
            raise ValueError(f"expected num_levels >= 2 (use DSM for one level), found {num_levels}")
        self.sigma_min, self.sigma_max, self.num_levels, self.process = smin, smax, num_levels, process
        self._sigmas = torch.exp(torch.linspace(math.log(smax), math.log(smin), num_levels, dtype=torch.float64))
        self._times = self._sigmas.clone() if process is None else self._ladder_times(process)

    def _ladder_times(self, process: Process) -> torch.Tensor:
        t = process.t_from_noise_to_signal(self._sigmas)
        tol = 1e-9
        if not (float(t.min()) >= process.t_min - tol and float(t.max()) <= process.t_max + tol):
            lo_hi = process.sigma(torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).tolist()
            raise ValueError(
                f"expected the ladder [{self.sigma_min:g}, {self.sigma_max:g}] inside the process's sigma range "
                f"[{lo_hi[0]:g}, {lo_hi[1]:g}] (t in [{process.t_min:g}, {process.t_max:g}])"
            )
        t = process.clamp_t(t)
        log_alpha = process.log_alpha(t)
        if float(log_alpha.abs().max()) > 1e-9 or not torch.allclose(process.sigma(t), self._sigmas, rtol=1e-6):
            raise ValueError(
                f"NCSN perturbs x + sigma z (alpha = 1): expected a variance-exploding process, found {process!r} "
                f"with alpha in [{float(log_alpha.exp().min()):g}, {float(log_alpha.exp().max()):g}] on the ladder"
            )
        return t

    @property
    def sigmas(self) -> torch.Tensor:
        """The ladder sigma_1 > ... > sigma_L (float64, (L,))."""
        return self._sigmas.clone()

    @property
    def times(self) -> torch.Tensor:
        """What the network is called with at each level: the sigmas, or the process times t_i."""
        return self._times.clone()

    def _options(self):
        return {
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "num_levels": self.num_levels,
            "process": self.process,
        }

    def _per_sample(self, score_fn, x, generator):
        if self.process is not None:
            _check_same_process(score_fn, self.process)
        b = x.shape[0]
        u = rand((b,), generator=generator, device=x.device, dtype=torch.float32)
        level = (u * self.num_levels).long().clamp(max=self.num_levels - 1)
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # float64 -> x.dtype before moving: some devices have no float64
        sigma = self._sigmas.to(dtype=x.dtype).to(x.device)[level]
        t = self._times.to(dtype=x.dtype).to(x.device)[level]
        s = _score(score_fn, x + append_dims(sigma, x.ndim) * z, t)
        # sigma^2 * 1/2 ||s + z / sigma||^2, written without dividing by sigma
        return 0.5 * _sq_norm(append_dims(sigma, x.ndim) * s + z)


class _ProcessObjective(Objective):
    """Shared pieces of the objectives on a process: t ~ U[t_min, 1], then x_t = alpha x + sigma z."""

    def __init__(self, process: Process, t_min: float | None, *, reduction: str):
        super().__init__(reduction=reduction)
        self.process = _check_process(process)
        if t_min is None:
            t_min = process.t_min
        t_min = _check_time_value(t_min, "t_min")
        if not process.t_min <= t_min < process.t_max:
            raise ValueError(f"expected {process.t_min:g} <= t_min < {process.t_max:g} for {process!r}, found {t_min:g}")
        self.t_min = t_min

    def _noisy(self, x, generator):
        t = self.t_min + (self.process.t_max - self.t_min) * rand(
            (x.shape[0],), generator=generator, device=x.device, dtype=x.dtype
        )
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        alpha, sigma = self.process.marginal(t)
        return t, z, append_dims(alpha, x.ndim) * x + append_dims(sigma, x.ndim) * z, sigma


class ContinuousDSM(_ProcessObjective):
    """Continuous-time denoising score matching on a process (Song et al. 2021, eq. 7):
    ``E_{t ~ U[t_min, 1]} lambda(t) 1/2 E ||s(x_t, t) + z / sigma(t)||^2`` with
    ``x_t = alpha(t) x + sigma(t) z``.

    ``weighting="uniform"``: ``lambda = sigma(t)^2`` (uniform in the epsilon sense; the loss is half
    :class:`EpsilonLoss`). ``weighting="likelihood"``: ``lambda = g(t)^2`` (Song et al. 2021b,
    "Maximum likelihood training of score-based diffusion models", Theorem 1: ``(1 - t_min)`` times this
    loss is the bound's score-matching term up to a constant). Minimiser: the score of p_t at every t.

    Args:
        process: any :class:`~score_toolkit.processes.Process`; ``score_fn`` is called with its time t.
        weighting: ``"uniform"`` or ``"likelihood"``.
        t_min: lower end of the time interval (default ``process.t_min``).
    """

    name = "continuous_dsm"

    def __init__(self, process: Process, weighting: str = "uniform", t_min: float | None = None, *, reduction: str = "mean"):
        super().__init__(process, t_min, reduction=reduction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"expected weighting in {WEIGHTINGS}, found {weighting!r}")
        self.weighting = weighting

    def _options(self):
        return {"process": self.process, "weighting": self.weighting, "t_min": self.t_min}

    def _per_sample(self, score_fn, x, generator):
        _check_same_process(score_fn, self.process)
        t, z, xt, sigma = self._noisy(x, generator)
        s = _score(score_fn, xt, t)
        sig = append_dims(sigma, x.ndim)
        if self.weighting == "uniform":
            return 0.5 * _sq_norm(sig * s + z)
        return 0.5 * self.process.diffusion_squared(t) * _sq_norm(s + z / sig)


class EpsilonLoss(_ProcessObjective):
    """The epsilon loss of DDPM (Ho et al. 2020, eq. 14, "L_simple" in continuous time):
    ``E_{t ~ U[t_min, 1]} E ||eps_theta(x_t, t) - z||^2`` with ``eps_theta = -sigma(t) s(x_t, t)``
    (or the adapter's own ``epsilon`` view when ``score_fn`` is a :class:`ScoreAdapter`). No 1/2, as in
    FORMULAS.md; the per-sample loss sums over features (diffusers' ``mse_loss`` averages them).
    Minimiser: the score of p_t at every t (eps_theta = E[z | x_t]).

    Args:
        process: any :class:`~score_toolkit.processes.Process`.
        t_min: lower end of the time interval (default ``process.t_min``).
    """

    name = "epsilon"

    def __init__(self, process: Process, t_min: float | None = None, *, reduction: str = "mean"):
        super().__init__(process, t_min, reduction=reduction)

    def _options(self):
        return {"process": self.process, "t_min": self.t_min}

    def _per_sample(self, score_fn, x, generator):
        _check_same_process(score_fn, self.process)
        t, z, xt, _ = self._noisy(x, generator)
        if isinstance(score_fn, ScoreAdapter):
            eps = score_fn.epsilon(xt, t)
        else:
            eps = epsilon_from_score(lambda y, tt: _score(score_fn, y, tt), self.process)(xt, t)
        if eps.shape != x.shape:
            raise ValueError(f"expected an epsilon prediction of shape {tuple(x.shape)} (like x), found {tuple(eps.shape)}")
        return _sq_norm(eps - z)


# ---------------------------------------------------------------------------------------- lookup
def _ssm_vr(**options) -> SSM:
    if "variance_reduction" in options:
        raise TypeError("'ssm_vr' fixes variance_reduction=True; use 'ssm' to choose it")
    return SSM(variance_reduction=True, **options)


_FACTORIES: dict[str, Callable[..., Objective]] = {
    "esm": ESM,
    "ism": ISM,
    "ssm": SSM,
    "ssm_vr": _ssm_vr,
    "dsm": DSM,
    "ncsn": NCSN,
    "continuous_dsm": ContinuousDSM,
    "epsilon": EpsilonLoss,
}

#: The names :func:`get_objective` knows.
OBJECTIVES: tuple[str, ...] = tuple(_FACTORIES)


def get_objective(name: str, **options) -> Objective:
    """Build the objective called ``name`` (one of :data:`OBJECTIVES`) with its ``options``, e.g.
    ``get_objective("continuous_dsm", process=VPSDE(), weighting="likelihood")``."""
    if not isinstance(name, str):
        raise TypeError(f"expected the objective name to be a str, found {type(name).__name__}")
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), OBJECTIVES, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown objective {name!r}.{hint} Available: {', '.join(OBJECTIVES)}")
    return _FACTORIES[name](**options)
