"""Honest NFE and the sampler boundary: counted score calls against ``SamplerOutput.nfe`` and the declared
``Sampler.nfe`` for every registered sampler and option combination; per-step evaluation counts of every
torchdiffeq / torchsde method against counted calls; ``max_nfe``; dtypes at the boundary."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import recording_bars

from score_toolkit.analytic import ring_mixture
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler, get_sampler_class, list_samplers
from score_toolkit.samplers.base import NFEBudgetError

# values tried for each option name (every other option keeps its default); numbers stay small so that every
# combination runs in milliseconds
CHOICES: dict[str, tuple] = {
    "method": None,  # filled from the sampler module's METHODS / TABLEAUS
    "denoise": (False, True),
    "to_zero": (False, True),
    "lower_order_final": (False, True),
    "metropolis": (False, True),
    "last_step_noise": (False, True),
    "predictor": ("reverse_diffusion", "euler_maruyama"),
    "corrector": ("langevin", "none"),
    "variance": ("posterior", "forward"),
    "noise_on_reject": ("bridge", "redraw"),
    "grid": ("log_sigma", "karras", "uniform"),
}
SMALL = {"num_steps": 3, "num_levels": 2, "steps_per_level": 2, "corrector_steps": 2, "reference_steps": 2,
         "rtol": 1e-2, "atol": 1e-2, "eps_rel": 0.2, "eps_abs": 0.05, "S_churn": 0.0,
         "twist": "none",  # tds with a plain score function (its NFE with a transform: tests/test_tds.py)
         "likelihood": "none"}  # importance_ode likewise (with a transform: tests/test_importance_ode.py)


def _method_choices(cls) -> tuple:
    import importlib

    mod = importlib.import_module(cls.__module__)
    for attr in ("METHODS", "TABLEAUS"):
        if hasattr(mod, attr):
            return tuple(getattr(mod, attr))
    return (cls.options["method"],)


def option_combinations(name: str):
    cls = get_sampler_class(name)
    allowed = {**cls.common_options, **cls.options}
    varied = {}
    for key in allowed:
        if key == "method":
            varied[key] = _method_choices(cls)
        elif key in CHOICES and key != "progress":
            varied[key] = CHOICES[key]
    base = {k: v for k, v in SMALL.items() if k in allowed}
    keys = sorted(varied)
    for values in itertools.product(*(varied[k] for k in keys)):
        opts = {**base, **dict(zip(keys, values))}
        if name == "heun":  # churn: one stochastic variant as well
            yield {**opts, "S_churn": 1.0} if opts.get("grid") == "karras" and not opts.get("to_zero") else opts
        else:
            yield opts


class CountingScore:
    """An exact ring score (with energy) that counts every call."""

    def __init__(self, process):
        self._s = ring_mixture().score_fn(process)
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self._s(x, t)

    def energy(self, x, t):
        self.calls += 1
        return self._s.energy(x, t)


def _build(name, opts):
    opts = dict(opts)
    while True:
        try:
            return get_sampler(name, **opts)
        except (ValueError, TypeError) as exc:
            # a small setting that this combination does not use (e.g. corrector_steps without a corrector) is
            # dropped; any other refusal is an invalid combination (e.g. denoise with to_zero)
            # (num_steps too where the sampler's default is None: a fixed-grid setting its adaptive methods refuse)
            optional = get_sampler_class(name).options.get("num_steps", 0) is None
            unused = [k for k in SMALL if k in opts and (k != "num_steps" or optional) and k in str(exc)]
            if not unused:
                return None
            del opts[unused[0]]


@pytest.mark.parametrize("name", list_samplers())
def test_nfe_equals_counted_calls_for_every_option_combination(name):
    process = VPSDE()
    ran = 0
    for opts in option_combinations(name):
        sampler = _build(name, opts)
        if sampler is None:
            continue
        score = CountingScore(process)
        out = sampler.sample(score, process, shape=(6, 2), generator=torch.Generator().manual_seed(0))
        assert out.nfe == score.calls, (name, opts, out.nfe, score.calls)
        declared = sampler.nfe
        if declared is not None:
            assert declared == score.calls, (name, opts, declared, score.calls)
        else:
            assert sampler.properties.adaptive, f"{name} {opts}: only adaptive samplers may leave nfe undeclared"
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("name", list_samplers())
def test_progress_bar_total_is_the_steps_run_for_every_option_combination(name, monkeypatch):
    """The tqdm bar of ``progress=True`` counts every recorded step, final ``to_zero`` / ``denoise`` steps included,
    and its total is that count, known up front for every run on a fixed grid (adaptive runs, which choose their
    steps, may leave it open)."""
    bars = recording_bars(monkeypatch)
    process = VPSDE()
    ran = 0
    for opts in option_combinations(name):
        sampler = _build(name, {**opts, "progress": True})
        if sampler is None:
            continue
        steps = []
        sampler.sample(CountingScore(process), process, shape=(6, 2), generator=torch.Generator().manual_seed(0),
                       callback=steps.append)
        (bar,) = bars
        bars.clear()
        assert bar.n == len(steps) > 0, (name, opts, bar.n, len(steps))
        assert bar.total in (None, len(steps)), (name, opts, bar.total, len(steps))
        assert bar.total is not None or sampler.properties.adaptive, (name, opts)
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3", "adaptive_heun"])
@pytest.mark.parametrize("to_zero", [False, True])
def test_pf_ode_adaptive_evaluations_per_step_are_counted(method, to_zero):
    from score_toolkit.samplers.pf_ode import METHODS

    process = VESDE(0.01, 50.0)
    score = CountingScore(process)
    out = get_sampler("pf_ode", method=method, rtol=1e-3, atol=1e-3, to_zero=to_zero).sample(
        score, process, shape=(4, 2), generator=torch.Generator().manual_seed(1))
    steps = out.info["steps_attempted"]
    # two evaluations choose the initial step size, then nfe_per_step per attempted step
    assert score.calls == out.nfe == 2 + METHODS[method].nfe_per_step * steps + int(to_zero)


@pytest.mark.parametrize("name", ["adaptive_ode", "adaptive_sde"])
def test_adaptive_statistics_reach_the_output(name):
    process = VPSDE()
    out = get_sampler(name).sample(ring_mixture().score_fn(process), process, shape=(8, 2),
                                   generator=torch.Generator().manual_seed(0))
    info = out.info
    assert info["iterations"] >= 1 and info["nfe_per_sample_max"] >= info["nfe_per_sample_mean"] > 0
    # batched calls: at least the hungriest sample's evaluations, at most 2 per iteration for the SDE pair
    assert info["nfe_per_sample_max"] <= out.nfe


@pytest.mark.parametrize("name,opts", [("pf_ode", {}), ("adaptive_ode", {"rtol": 1e-6, "atol": 1e-6}),
                                       ("adaptive_sde", {"eps_rel": 1e-3, "eps_abs": 1e-4})])
def test_max_nfe_caps_the_adaptive_samplers(name, opts):
    process = VESDE(0.01, 50.0)
    score = CountingScore(process)

    def rough(x, t):  # a piecewise-constant score: adaptive steps shrink without end
        return torch.round(score(x, t))

    with pytest.raises(NFEBudgetError, match="max_nfe=40"):
        get_sampler(name, max_nfe=40, **opts).sample(rough, process, shape=(4, 2),
                                                     generator=torch.Generator().manual_seed(0))
    assert score.calls == 40


def test_pf_ode_has_a_default_evaluation_cap():
    process = VESDE(0.01, 50.0)
    s = ring_mixture().score_fn(process)
    calls = [0]

    def rough(x, t):
        calls[0] += 1
        return torch.round(4 * s(x, t)) / 4

    with pytest.raises(NFEBudgetError, match="max_nfe=10000"):
        get_sampler("pf_ode", rtol=1e-7, atol=1e-7).sample(rough, process, shape=(8, 2),
                                                          generator=torch.Generator().manual_seed(0))
    assert calls[0] == 10_000


# ---------------------------------------------------------------------------------------------- dtypes
DTYPE_SAMPLERS = [n for n in list_samplers() if n != "langevin"] + ["langevin"]


@pytest.mark.parametrize("name", DTYPE_SAMPLERS)
def test_float64_score_for_float32_state_returns_float32(name):
    process = VPSDE()
    s = ring_mixture().score_fn(process)

    def promoting(x, t):  # returns float64 whatever x is
        return s(x.double(), t.double())

    opts = {k: v for k, v in SMALL.items() if k in get_sampler_class(name).options}
    out = _build(name, opts).sample(promoting, process, shape=(4, 2), dtype=torch.float32,
                                           generator=torch.Generator().manual_seed(0))
    assert out.samples.dtype == torch.float32 and bool(torch.isfinite(out.samples).all())


def test_time_reaches_the_score_in_float64_for_a_float32_state():
    process = VESDE(0.01, 50.0)
    s = ring_mixture().score_fn(process)
    seen = []

    def spy(x, t):
        seen.append(t)
        return s(x, t)

    sampler = get_sampler("dpmpp_2m", num_steps=5, to_zero=False)
    sampler.sample(spy, process, shape=(3, 2), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    grid = sampler.time_grid(process)
    assert all(t.dtype == torch.float64 for t in seen)
    # exactly the solver's grid times (a float32 t would be off by up to 6e-8 relative)
    assert torch.equal(torch.stack([t[0] for t in seen]), grid[:-1])


@pytest.mark.parametrize("name,opts", [("pf_ode", {}), ("pf_ode", {"method": "rk4", "num_steps": 10}),
                                       ("dpmpp_2m", {"num_steps": 10}), ("euler_maruyama", {"num_steps": 50})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_are_integrated_in_float32(name, opts, dtype):
    process = VPSDE()
    mix = ring_mixture()
    x0 = process.prior_sample((64, 2), generator=torch.Generator().manual_seed(0))
    sampler = get_sampler(name, **opts)
    half = sampler.sample(mix.score_fn(process), process, x_init=x0.to(dtype), generator=torch.Generator().manual_seed(1))
    full = sampler.sample(mix.score_fn(process), process, x_init=x0.to(dtype).float(),
                          generator=torch.Generator().manual_seed(1))
    assert half.samples.dtype == dtype
    assert torch.equal(half.samples, full.samples.to(dtype))
    # and the samples are on the ring (radius 4): the integration did not degrade
    r = half.samples.float().norm(dim=1)
    assert float((r - 4).abs().median()) < 0.3 and math.isfinite(float(r.max()))


@pytest.mark.parametrize("name", list_samplers())
@pytest.mark.parametrize("kind", ["times", "saved"])
def test_nfe_and_num_steps_follow_a_grid_that_sets_its_own_steps(name, kind, tmp_path):
    """A grid given as explicit times or as a saved file fixes the number of steps: the sampler's config, its
    declared nfe and its progress count follow it with every option left at its default (unipc's
    ``lower_order_final="auto"`` once hid this: config and nfe kept the default 20 steps)."""
    from score_toolkit.samplers.fixed_grid import GridSampler
    from score_toolkit.samplers.grid_store import save_grid

    if not issubclass(get_sampler_class(name), GridSampler):
        pytest.skip(f"{name} does not run on a fixed grid")
    process = VPSDE()
    times = process.time_grid(5, "log_sigma", dtype=torch.float64).tolist()  # 5 steps, not the default 20
    grid = times if kind == "times" else str(save_grid(tmp_path / "g.json", times, process, sampler=name))
    sampler = get_sampler(name, grid=grid)
    assert sampler.config["num_steps"] == 5, (name, sampler.config["num_steps"])
    assert sampler._num_progress_steps() == 5
    score = CountingScore(process)
    out = sampler.sample(score, process, shape=(4, 2), generator=torch.Generator().manual_seed(0))
    assert out.nfe == score.calls == sampler.nfe, (name, out.nfe, score.calls, sampler.nfe)
