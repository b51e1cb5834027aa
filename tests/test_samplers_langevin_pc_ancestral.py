"""Langevin (ULA / MALA), annealed Langevin, predictor-corrector and ancestral samplers, checked against
exact scores of Gaussians and Gaussian mixtures (score_toolkit.analytic), closed forms, diffusers' DDPM step
and the noise floor of the metrics (two independent exact sample sets of the same size).

Factors against the floor (stated in docs/samplers_langevin_pc_ancestral.md): the floor is the mean of 5
exact-vs-exact values; a sampler's sliced W2 must be within 1.5x, its mode-weight error within 2x (the
mode-weight metric of a single draw fluctuates between 0.4x and 1.7x of its mean on exact samples), its
within-mode sliced W2 within 1.5x (2x for annealed Langevin).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from score_toolkit import metrics as M
from score_toolkit._utils import per_sample_generators
from score_toolkit.analytic import anisotropic_mixture, gaussian, ring_mixture
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP, SubVPSDE
from score_toolkit.samplers.ancestral import AncestralSampler, forward_transition
from score_toolkit.samplers.annealed_langevin import AnnealedLangevinSampler
from score_toolkit.samplers.base import NonFiniteError
from score_toolkit.samplers.langevin import LangevinSampler
from score_toolkit.samplers.predictor_corrector import PredictorCorrectorSampler
from score_toolkit.scores import ScoreAdapter

F64 = torch.float64
PROCESSES = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE()}
MIXTURES = {"ring": (ring_mixture, 2000), "aniso": (anisotropic_mixture, 1000)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def _mixture(name):
    return MIXTURES[name][0]()


@functools.cache
def _floors(name: str, n: int, repeats: int = 5) -> dict[str, float]:
    mix = _mixture(name)
    metrics = {
        "sw": M.sliced_wasserstein,
        "mw": lambda s, r: M.mode_weight_error(s, mix),
        "wm": lambda s, r: M.within_mode_sliced_wasserstein(s, mix, reference=r),
    }
    return {k: sum(M.noise_floor(mix, n, f, seed=10 * i) for i in range(repeats)) / repeats for k, f in metrics.items()}


def _check_against_floor(name, x, factors):
    mix = _mixture(name)
    n = x.shape[0]
    floor = _floors(name, n)
    ref = mix.sample(n, generator=_gen(777))
    got = {
        "sw": M.sliced_wasserstein(x, ref),
        "mw": M.mode_weight_error(x, mix),
        "wm": M.within_mode_sliced_wasserstein(x, mix, reference=ref),
    }
    for k, factor in factors.items():
        assert got[k] <= factor * floor[k], f"{k}: {got[k]:.4f} > {factor} x floor {floor[k]:.4f} (all: {got}, floor: {floor})"
    return got, floor


# --------------------------------------------------------------------------- quality against the noise floor

QUALITY = {
    # sampler, NFE, factors (sw, mode weights, within-mode sw)
    "ancestral": (lambda: AncestralSampler(num_steps=200), 200, {"sw": 1.5, "mw": 2.0, "wm": 1.5}),
    "predictor_corrector": (lambda: PredictorCorrectorSampler(num_steps=100), 200, {"sw": 1.5, "mw": 2.0, "wm": 1.5}),
}


@pytest.mark.parametrize("proc_name", list(PROCESSES))
@pytest.mark.parametrize("mix_name", list(MIXTURES))
@pytest.mark.parametrize("sampler_name", list(QUALITY))
def test_samples_within_factor_of_noise_floor(sampler_name, mix_name, proc_name):
    make, nfe, factors = QUALITY[sampler_name]
    mix, n = _mixture(mix_name), MIXTURES[mix_name][1]
    process = PROCESSES[proc_name]()
    out = make().sample(mix.score_fn(process), process, shape=(n, mix.dim), generator=_gen(1), dtype=F64)
    assert out.nfe == nfe
    _check_against_floor(mix_name, out.samples, factors)


@pytest.mark.parametrize("proc_name", list(PROCESSES))
def test_annealed_langevin_ring_modes_and_weights(proc_name):
    """NCSN defaults (10 levels x 100 steps, eps = 2e-5): modes and equal weights of the ring right
    (measured over 3 seeds with N = 1000: sw 0.7-1.5x, mode weights 0.8-1.4x, within-mode 1.0-1.2x the floor)."""
    mix, n = _mixture("ring"), 1000
    process = PROCESSES[proc_name]()
    out = AnnealedLangevinSampler().sample(mix.score_fn(process), process, shape=(n, 2), generator=_gen(2), dtype=F64)
    assert out.nfe == 1000
    _check_against_floor("ring", out.samples, {"sw": 1.75, "mw": 2.0, "wm": 2.0})


def test_annealed_langevin_known_bias_on_unequal_weights():
    """On the 16-D mixture with weights 1..10 (10 levels x 30 steps) the output lands in the modes, but the
    mode weights are off by 2.5-3x the floor and the samples are over-dispersed (mean NLL above the exact
    one): the bias of a fixed number of levels with finite steps per level, stated in the docs. Measured
    over 3 seeds: sw 1.7-1.9x, mode weights 2.5-2.9x, within-mode 1.6x the floor."""
    mix, n = _mixture("aniso"), 1000
    process = VESDE(0.01, 50.0)
    x = AnnealedLangevinSampler(steps_per_level=30).sample(
        mix.score_fn(process), process, shape=(n, mix.dim), generator=_gen(3), dtype=F64
    ).samples
    _check_against_floor("aniso", x, {"sw": 2.5, "mw": 4.0, "wm": 2.0})
    exact_nll = M.mean_nll(mix.sample(20000, generator=_gen(4)), mix)
    assert M.mean_nll(x, mix) > exact_nll + 1.0  # over-dispersed


@pytest.mark.parametrize("make_process", [SubVPSDE, lambda: DiscreteVP(num_train_timesteps=1000)], ids=["subVP", "discreteVP"])
@pytest.mark.parametrize("make_sampler", [lambda: AncestralSampler(num_steps=200), lambda: PredictorCorrectorSampler(num_steps=100)],
                         ids=["ancestral", "pc"])
def test_other_processes(make_sampler, make_process):
    mix, process = _mixture("ring"), make_process()
    x = make_sampler().sample(mix.score_fn(process), process, shape=(2000, 2), generator=_gen(5), dtype=F64).samples
    _check_against_floor("ring", x, {"sw": 1.5, "mw": 2.0, "wm": 1.5})


# --------------------------------------------------------------------------- Langevin

@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_ula_stationary_variance_closed_form(eps):
    """ULA on N(0, v) with step eps has stationary variance v / (1 - eps / (4 v)) (eps < 4 v)."""
    v, d, b = 0.5, 32, 2000
    target = gaussian(torch.zeros(d, dtype=F64), v)
    x0 = math.sqrt(v) * torch.randn(b, d, generator=_gen(0), dtype=F64)
    out = LangevinSampler(step_size=eps, num_steps=60).sample(target.score_fn(), VPSDE(), x0, generator=_gen(1))
    expected = v / (1 - eps / (4 * v))
    se = expected * math.sqrt(2 / (b * d))
    assert out.nfe == 60
    assert abs(float(out.samples.var()) - expected) < 4 * se
    assert abs(float(out.samples.mean())) < 4 * math.sqrt(expected / (b * d))


def test_mala_removes_the_step_size_bias():
    v, d, b, eps, n = 1.0, 2, 10000, 1.0, 60
    target = gaussian(torch.zeros(d, dtype=F64), v)
    x0 = 0.5 * torch.randn(b, d, generator=_gen(0), dtype=F64)  # start away from stationarity
    ula = LangevinSampler(step_size=eps, num_steps=n).sample(target.score_fn(), VPSDE(), x0, generator=_gen(1))
    mala = LangevinSampler(step_size=eps, num_steps=n, metropolis=True).sample(target.score_fn(), VPSDE(), x0, generator=_gen(1))
    se = v * math.sqrt(2 / (b * d))
    assert abs(float(ula.samples.var()) - v / (1 - eps / (4 * v))) < 4 * se  # 1.333
    assert abs(float(mala.samples.var()) - v) < 4 * se
    assert mala.nfe == 2 * (n + 1)  # a score and an energy per proposal, plus both at the start


def test_mala_reports_a_failing_score_instead_of_rejecting():
    mix, process = _mixture("ring"), VPSDE()
    exact = mix.score_fn(process)

    class Faulty:
        calls = 0

        def __call__(self, x, t):
            self.calls += 1
            return exact(x, t) if self.calls < 3 else torch.full_like(x, math.nan)

        energy = staticmethod(exact.energy)

    with pytest.raises(NonFiniteError, match="langevin.*step 2"):
        LangevinSampler(metropolis=True, num_steps=5).sample(Faulty(), process, shape=(4, 2), generator=_gen(0), dtype=F64)


def test_mala_needs_energy_as_declared():
    """The declaration is measured: MALA refuses a score function without energy(x, t) and evaluates the energy
    num_steps + 1 times; ULA runs on the bare score function."""
    mix, process = _mixture("ring"), VPSDE()
    exact = mix.score_fn(process)
    calls = []

    def bare(x, t):  # a score function without an energy method
        return exact(x, t)

    class Counting:
        def __call__(self, x, t):
            return exact(x, t)

        def energy(self, x, t):
            calls.append(1)
            return exact.energy(x, t)

    mala, ula = LangevinSampler(metropolis=True, num_steps=5, t=0.3), LangevinSampler(num_steps=5, t=0.3)
    assert mala.properties.needs_energy is True and ula.properties.needs_energy is False
    with pytest.raises((TypeError, ValueError), match="energy"):
        mala.sample(bare, process, shape=(4, 2), generator=_gen(0))
    assert torch.isfinite(ula.sample(bare, process, shape=(4, 2), generator=_gen(0)).samples).all()
    out = mala.sample(Counting(), process, shape=(4, 2), generator=_gen(0))
    assert len(calls) == 5 + 1 and out.nfe == 2 * (5 + 1)


def test_mala_with_energy_network_matches_analytic_energy():
    mix, process = _mixture("ring"), VPSDE()
    t = 0.3
    x0 = torch.randn(64, 2, generator=_gen(0), dtype=F64)
    sampler = LangevinSampler(step_size=0.2, num_steps=20, t=t, metropolis=True)
    a = sampler.sample(mix.score_fn(process), process, x0, generator=_gen(1)).samples
    adapter = ScoreAdapter(mix.as_network(process, "energy"), process, prediction_type="energy")
    b = sampler.sample(adapter, process, x0, generator=_gen(1)).samples
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("metropolis", [False, True])
def test_langevin_at_a_noise_level_matches_p_t(metropolis):
    """Langevin at t = 0.3 of VP targets p_t (a blurred ring whose modes overlap): compare with exact p_t."""
    mix, process, t, n = _mixture("ring"), VPSDE(), 0.3, 2000
    alpha, sigma = (float(v) for v in process.marginal(torch.tensor(t, dtype=F64)))
    p_t = mix.perturbed(alpha, sigma)
    out = LangevinSampler(step_size=0.2, num_steps=150, t=t, metropolis=metropolis).sample(
        mix.score_fn(process), process, shape=(n, 2), generator=_gen(2), dtype=F64
    )
    floor_sw = sum(M.noise_floor(p_t, n, seed=10 * i) for i in range(5)) / 5
    floor_mw = sum(M.noise_floor(p_t, n, lambda s, r: M.mode_weight_error(s, p_t), seed=10 * i) for i in range(5)) / 5
    ref = p_t.sample(n, generator=_gen(3))
    assert M.sliced_wasserstein(out.samples, ref) <= 1.5 * floor_sw
    assert M.mode_weight_error(out.samples, p_t) <= 2.0 * floor_mw


def test_langevin_final_time_is_the_fixed_level():
    process, t = VESDE(0.01, 50.0), 0.4
    mix = _mixture("ring")
    sampler = LangevinSampler(step_size=0.01, num_steps=3, t=t, denoise=True)
    assert sampler.properties.final_time == "fixed" and sampler._final_time(process) == t
    seen = []
    out = sampler.sample(mix.score_fn(process), process, shape=(4, 2), generator=_gen(0), dtype=F64,
                         callback=lambda info: seen.append(info["t"]), return_trajectory=True)
    assert seen == [t] * 4  # three steps and the denoising step, all at t
    x_last = out.trajectory[-2]
    tt = torch.full((4,), t, dtype=F64)
    torch.testing.assert_close(out.samples, mix.denoiser(x_last, tt, process))
    assert LangevinSampler()._final_time(process) == process.t_min


def test_langevin_divergence_is_reported():
    target = gaussian(torch.zeros(2, dtype=F64), 0.01)
    with pytest.raises(NonFiniteError, match="langevin.*step"):
        LangevinSampler(step_size=1.0, num_steps=2000).sample(target.score_fn(), VPSDE(), shape=(8, 2), generator=_gen(0), dtype=F64)


# --------------------------------------------------------------------------- annealed Langevin

def test_annealed_levels_are_geometric_for_ve():
    process = VESDE(0.01, 50.0)
    ts = AnnealedLangevinSampler(num_levels=10).levels(process)
    sig = process.noise_to_signal(ts)
    assert ts.shape == (10,) and float(ts[0]) == 1.0 and float(ts[-1]) == process.t_min
    ratios = sig[:-1] / sig[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])))
    torch.testing.assert_close(sig[0], process.sigma(torch.tensor(1.0, dtype=F64)))


def test_annealed_step_sizes_follow_ncsn():
    """alpha_i = eps sigma_i^2 / sigma_L^2 (VE); checked by replaying the noise of one step per level."""
    process = VESDE(0.01, 50.0)
    target = gaussian(torch.zeros(2, dtype=F64), 1.0)
    score = target.score_fn(process)
    sampler = AnnealedLangevinSampler(num_levels=3, steps_per_level=1, step_size=1e-3)
    x0 = torch.randn(5, 2, generator=_gen(0), dtype=F64)
    out = sampler.sample(score, process, x0, generator=_gen(1), return_trajectory=True)
    ts = sampler.levels(process)
    sig = process.sigma(ts)
    g = _gen(1)
    x = x0
    for i in range(3):
        a = 1e-3 * float(sig[i] / sig[-1]) ** 2
        tt = torch.full((5,), float(ts[i]), dtype=F64)
        x = x + a / 2 * score(x, tt) + math.sqrt(a) * torch.randn(5, 2, generator=g, dtype=F64)
        torch.testing.assert_close(out.trajectory[i + 1], x)
    assert out.nfe == 3


# --------------------------------------------------------------------------- ancestral

def test_forward_transition_identities():
    ve, vp = VESDE(0.01, 50.0), VPSDE()
    t, s = 0.6, 0.5
    _, s_t, _, s_s, a_ts, var_ts = forward_transition(ve, t, s)
    assert a_ts == 1.0 and math.isclose(var_ts, s_t**2 - s_s**2)
    a_t, _, a_s, _, a_ts, var_ts = forward_transition(vp, t, s)
    assert math.isclose(a_ts, a_t / a_s) and math.isclose(var_ts, 1 - a_ts**2, rel_tol=1e-9)  # beta = 1 - alpha_{t|s}^2
    with pytest.raises(ValueError, match="increases"):
        forward_transition(vp, s, t)


@pytest.mark.parametrize("variance", ["posterior", "forward"])
def test_ancestral_matches_diffusers_ddpm_step(variance):
    """On a DDPM table the uniform grid with N - 1 steps visits every table entry, and each step equals
    diffusers' DDPMScheduler.step (epsilon prediction, fixed_small / fixed_large variance, no clipping)."""
    from diffusers import DDPMScheduler

    n_train = 10
    process = DiscreteVP(num_train_timesteps=n_train, beta_start=0.01, beta_end=0.3)
    mix = _mixture("ring")
    score = mix.score_fn(process)
    x0 = torch.randn(6, 2, generator=_gen(0), dtype=F64)
    ours = AncestralSampler(num_steps=n_train - 1, variance=variance).sample(score, process, x0, generator=_gen(1)).samples
    sched = DDPMScheduler(num_train_timesteps=n_train, beta_start=0.01, beta_end=0.3, clip_sample=False,
                          variance_type="fixed_small" if variance == "posterior" else "fixed_large")
    sched.set_timesteps(n_train)
    x, g = x0.clone(), _gen(1)
    for i in range(n_train - 1, 0, -1):  # table index i -> i - 1; stop at index 0 (t_min)
        t = torch.full((6,), (i + 1) / n_train, dtype=F64)
        eps = -process.sigma(t)[:, None] * score(x, t)
        x = sched.step(eps, i, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)  # diffusers keeps its coefficients in float32


def _one_step_from_the_prior(proc_name, sampler_cls):
    """One step of ``sampler_cls(num_steps=1)`` from t = 1 to t_min on a Gaussian: (process, score, x_1, output,
    (alpha_1, alpha_min, sigma_1, sigma_min)); the sampler's noise comes from ``_gen(1)``."""
    process = PROCESSES[proc_name]()
    score = gaussian(torch.tensor([1.0, -1.0], dtype=F64), 0.3).score_fn(process)
    x0 = process.prior_sample((5, 2), generator=_gen(0), dtype=F64)
    out = sampler_cls(num_steps=1).sample(score, process, x0, generator=_gen(1)).samples
    (a_t, a_s), (s_t, s_s) = (v.tolist() for v in process.marginal(torch.tensor([1.0, process.t_min], dtype=F64)))
    return process, score, x0, out, (a_t, a_s, s_t, s_s)


@pytest.mark.parametrize("proc_name", list(PROCESSES))
def test_ancestral_vp_ve_closed_forms(proc_name):
    """One step from t = 1 to t_min reproduces the closed forms: VP (x + beta s) / sqrt(1 - beta) + sqrt(beta~) z;
    VE x + (sigma_t^2 - sigma_s^2) s + sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2) z."""
    process, score, x0, out, (a_t, a_s, s_t, s_s) = _one_step_from_the_prior(proc_name, AncestralSampler)
    z = torch.randn(5, 2, generator=_gen(1), dtype=F64)
    s = score(x0, torch.ones(5, dtype=F64))
    if proc_name == "VP":
        beta = 1 - (a_t / a_s) ** 2
        expected = (x0 + beta * s) / math.sqrt(1 - beta) + math.sqrt(beta * s_s**2 / s_t**2) * z
    else:
        d2 = s_t**2 - s_s**2
        expected = x0 + d2 * s + math.sqrt(s_s**2 * d2 / s_t**2) * z
    torch.testing.assert_close(out, expected)


ORDER_CASES = {
    "ancestral-VE-posterior": (lambda n: AncestralSampler(num_steps=n), "VE"),
    "ancestral-VE-forward": (lambda n: AncestralSampler(num_steps=n, variance="forward"), "VE"),
    "pc-none-VP-reverse_diffusion": (lambda n: PredictorCorrectorSampler(num_steps=n, corrector="none"), "VP"),
}


def _gaussian_score(process, m, c):
    """Exact score of p_t for data N(m, c) in every coordinate: -(x - alpha m) / (alpha^2 c + sigma^2)."""

    def score(x, t):
        alpha, sigma = process.marginal(t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        return -(x - alpha * m) / (alpha**2 * c + sigma**2)

    return score


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_weak_order_one_on_gaussian_data(case):
    """Data N(0.5, 0.25) in each of 64 independent coordinates (2000 x 64 draws): the error of the output
    variance falls at the declared weak order 1 as the number of steps doubles (25 -> 200). Measured
    errors (variance 0.25): ancestral VE posterior -0.068, -0.039, -0.020, -0.012; VP reverse diffusion
    +0.066, +0.031, +0.015, +0.007 (recursion of the exact moments: ratios 1.8-2.2 per doubling).
    (The VP ancestral error is still pre-asymptotic at these grids, ratios 1.6-1.9, and Euler-Maruyama on
    VE has a variance error below the Monte Carlo noise: both left out.)"""
    make, proc_name = ORDER_CASES[case]
    process = PROCESSES[proc_name]()
    m, c, d, b = 0.5, 0.25, 64, 2000
    alpha, sigma = (float(v) for v in process.marginal(torch.tensor(process.t_min, dtype=F64)))
    exact_var = alpha**2 * c + sigma**2
    steps = [25, 50, 100, 200]
    errors = []
    for n in steps:
        sampler = make(n)
        assert sampler.properties.order == 1.0
        x = sampler.sample(_gaussian_score(process, m, c), process, shape=(b, d), generator=_gen(n), dtype=F64).samples
        errors.append(abs(float(x.var()) - exact_var))
    se = exact_var * math.sqrt(2 / (b * d))
    assert errors[-1] > 5 * se, f"too little bias to measure an order: {errors}, standard error {se:.2g}"
    slope = -torch.linalg.lstsq(
        torch.stack([torch.log(torch.tensor(steps, dtype=F64)), torch.ones(4, dtype=F64)], 1),
        torch.log(torch.tensor(errors, dtype=F64))[:, None],
    ).solution[0, 0]
    assert 0.75 <= float(slope) <= 1.3, f"empirical order {float(slope):.2f}, errors {errors}"


def test_ancestral_rejects_non_monotone_process():
    class Flat(VPSDE):
        def sigma(self, t):
            return torch.full_like(torch.as_tensor(t, dtype=F64), 0.5)

        def log_alpha(self, t):
            return torch.zeros_like(torch.as_tensor(t, dtype=F64))

    with pytest.raises(ValueError, match="sigma/alpha strictly increases"):
        AncestralSampler(num_steps=3).sample(lambda x, t: -x, Flat(), shape=(2, 2), generator=_gen(0))


# --------------------------------------------------------------------------- predictor-corrector

@pytest.mark.parametrize("proc_name", list(PROCESSES))
def test_pc_one_step_closed_forms(proc_name):
    """Reverse-diffusion predictor (Algorithms 2 / 3) then one Langevin corrector step with the
    default sigma rule, eps = 2 a r^2 sigma(s)^2, replayed with the same noise."""
    process, score, x0, out, (a_t, a_s, s_t, s_s) = _one_step_from_the_prior(proc_name, PredictorCorrectorSampler)
    g = _gen(1)
    z1, z2 = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    s1 = score(x0, torch.ones(5, dtype=F64))
    if proc_name == "VP":
        beta = 1 - (a_t / a_s) ** 2
        x = (2 - math.sqrt(1 - beta)) * x0 + beta * s1 + math.sqrt(beta) * z1
        a = 1 - beta
    else:
        d2 = s_t**2 - s_s**2
        x = x0 + d2 * s1 + math.sqrt(d2) * z1
        a = 1.0
    eps = 2 * a * (0.16 * s_s) ** 2
    x = x + eps * score(x, torch.full((5,), process.t_min, dtype=F64)) + math.sqrt(2 * eps) * z2
    torch.testing.assert_close(out, x)


def _variance_excess(process, sampler, n=1000, d=16):
    v = torch.exp(torch.linspace(math.log(0.01), math.log(0.25), d, dtype=F64))
    target = gaussian(torch.zeros(d, dtype=F64), v)
    alpha, sigma = process.marginal(torch.tensor(process.t_min, dtype=F64))
    x = sampler.sample(target.score_fn(process), process, shape=(n, d), generator=_gen(1), dtype=F64).samples
    return float((x.pow(2) / (alpha**2 * v + sigma**2)).mean()) - 1


def test_pc_snr_scaling_grid_removes_corrector_bias():
    """16-D anisotropic Gaussian (variances 0.01..0.25), VE, corrector with batch-averaged norms and r = 0.3:
    with constant SNR the excess variance stays as the grid refines 50 -> 200 (measured +8.9 % -> +9.9 %);
    with snr_scaling="grid" (reference 50) it shrinks (+8.9 % -> +2.2 %). The per-sample "sample" rule is
    far more biased at every grid size (+46 %); the default "sigma" rule is not (+1.2 %)."""
    process = VESDE(0.01, 50.0)
    kw = {"snr": 0.3, "snr_rule": "batch"}
    const_50 = _variance_excess(process, PredictorCorrectorSampler(num_steps=50, **kw))
    const_200 = _variance_excess(process, PredictorCorrectorSampler(num_steps=200, **kw))
    grid_200 = _variance_excess(process, PredictorCorrectorSampler(num_steps=200, snr_scaling="grid", reference_steps=50, **kw))
    se = math.sqrt(2 / (1000 * 16))
    assert const_200 > 0.7 * const_50 and const_200 > 0.05
    assert grid_200 < 0.4 * const_50 and grid_200 < const_200 - 5 * se
    sample_rule = _variance_excess(process, PredictorCorrectorSampler(num_steps=200, snr=0.3, snr_rule="sample"))
    sigma_rule = _variance_excess(process, PredictorCorrectorSampler(num_steps=200, snr=0.3))
    assert sample_rule > 0.25
    assert abs(sigma_rule) < 0.04


def test_pc_properties_follow_the_configuration():
    assert PredictorCorrectorSampler().properties.order is None
    assert PredictorCorrectorSampler(corrector="none").properties.order == 1.0
    assert PredictorCorrectorSampler(snr_scaling="grid").properties.order == 1.0
    assert PredictorCorrectorSampler(snr_scaling="grid", snr_rule="sample").properties.order is None
    batch = PredictorCorrectorSampler(snr_rule="batch").properties
    assert batch.per_sample is False and PredictorCorrectorSampler().properties.per_sample is True
    assert PredictorCorrectorSampler.properties.order is None  # the class keeps the default's declaration


@pytest.mark.parametrize("rule", ["sigma", "sample", "batch"])
def test_pc_per_sample_declaration_is_measured(rule):
    """With one generator per sample, a per-sample sampler gives a sample the result it gets in any batch; the
    batch snr rule couples the samples through the batch-mean norms, as it declares."""
    mix, process = _mixture("ring"), VPSDE()
    sampler = PredictorCorrectorSampler(num_steps=10, snr_rule=rule)
    x1 = process.prior_sample((6, 2), generator=_gen(0), dtype=F64)

    def run(k):
        return sampler.sample(mix.score_fn(process), process, x1[:k], generator=[_gen(100 + i) for i in range(k)]).samples

    diff = float((run(6)[:3] - run(3)).abs().max())
    if sampler.properties.per_sample:
        assert diff < 1e-10, diff
    else:
        assert diff > 1e-6, diff


def test_pc_nfe_and_trajectory():
    process, mix = VPSDE(), _mixture("ring")
    out = PredictorCorrectorSampler(num_steps=7, corrector_steps=2, denoise=True).sample(
        mix.score_fn(process), process, shape=(3, 2), generator=_gen(0), dtype=F64, return_trajectory=True)
    assert out.nfe == 7 * 3 + 1
    assert len(out.trajectory) == 7 + 2 and out.times[0] == 1.0 and out.times[-1] == process.t_min
    torch.testing.assert_close(torch.tensor(out.times[1:-1], dtype=F64), process.time_grid(7)[1:])


# --------------------------------------------------------------------------- randomness, dtypes

PER_SAMPLE = {
    "ula": lambda: LangevinSampler(step_size=0.01, num_steps=5, t=0.5),
    "mala": lambda: LangevinSampler(step_size=0.05, num_steps=5, t=0.5, metropolis=True),
    "annealed": lambda: AnnealedLangevinSampler(num_levels=3, steps_per_level=2),
    "pc-sigma": lambda: PredictorCorrectorSampler(num_steps=5),
    "pc-sample": lambda: PredictorCorrectorSampler(num_steps=5, snr_rule="sample"),
    "pc-em": lambda: PredictorCorrectorSampler(num_steps=5, predictor="euler_maruyama"),
    "ancestral": lambda: AncestralSampler(num_steps=5),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_generator_lists_make_samples_independent_of_batch(name):
    process, mix = VPSDE(), _mixture("ring")
    score = mix.score_fn(process)
    sampler = PER_SAMPLE[name]()
    big = sampler.sample(score, process, shape=(6, 2), generator=per_sample_generators(7, range(6)), dtype=F64).samples
    small = sampler.sample(score, process, shape=(3, 2), generator=per_sample_generators(7, range(3, 6)), dtype=F64).samples
    torch.testing.assert_close(big[3:], small)
    again = sampler.sample(score, process, shape=(6, 2), generator=per_sample_generators(7, range(6)), dtype=F64).samples
    assert torch.equal(big, again)
    other = sampler.sample(score, process, shape=(6, 2), generator=per_sample_generators(8, range(6)), dtype=F64).samples
    assert not torch.allclose(big, other)


def test_batch_rule_couples_samples():
    process, mix = VPSDE(), _mixture("ring")
    sampler = PredictorCorrectorSampler(num_steps=5, snr_rule="batch")
    big = sampler.sample(mix.score_fn(process), process, shape=(6, 2), generator=per_sample_generators(7, range(6)), dtype=F64).samples
    small = sampler.sample(mix.score_fn(process), process, shape=(3, 2), generator=per_sample_generators(7, range(3, 6)), dtype=F64).samples
    assert not torch.allclose(big[3:], small)


@pytest.mark.parametrize("make", [lambda: AncestralSampler(num_steps=200), lambda: PredictorCorrectorSampler(num_steps=100),
                                  lambda: AnnealedLangevinSampler(steps_per_level=50)], ids=["ancestral", "pc", "annealed"])
def test_float32(make):
    process, mix = VESDE(0.01, 50.0), _mixture("ring")
    out = make().sample(mix.score_fn(process), process, shape=(2000, 2), generator=_gen(4), dtype=torch.float32)
    assert out.samples.dtype == torch.float32
    _check_against_floor("ring", out.samples, {"sw": 1.5, "mw": 2.0})


def test_images_shape():
    """Any rank: (B, C, H, W) states with per-sample scalars broadcast by append_dims."""
    process = VPSDE()
    target = gaussian(torch.zeros(12, dtype=F64), 0.5)
    score = target.score_fn(process)
    for sampler in (LangevinSampler(num_steps=3, metropolis=True), AnnealedLangevinSampler(num_levels=2, steps_per_level=2),
                    PredictorCorrectorSampler(num_steps=3, snr_rule="sample"), AncestralSampler(num_steps=3)):
        out = sampler.sample(score, process, shape=(4, 3, 2, 2), generator=_gen(0), dtype=F64)
        assert out.samples.shape == (4, 3, 2, 2) and torch.isfinite(out.samples).all()


# --------------------------------------------------------------------------- bad options

@pytest.mark.parametrize(
    "cls, options, error, match",
    [
        (LangevinSampler, {"step": 0.1}, TypeError, "did you mean 'num_steps'|step_size"),
        (LangevinSampler, {"step_size": -1.0}, ValueError, "step_size"),
        (LangevinSampler, {"step_size": float("nan")}, TypeError, "step_size"),
        (LangevinSampler, {"num_steps": 0}, ValueError, "num_steps"),
        (LangevinSampler, {"metropolis": "yes"}, TypeError, "metropolis"),
        (LangevinSampler, {"t": "end"}, TypeError, "option t"),
        (AnnealedLangevinSampler, {"num_levels": 1}, ValueError, "num_levels"),
        (AnnealedLangevinSampler, {"step_size": 0}, ValueError, "step_size"),
        (AnnealedLangevinSampler, {"grid": "linear"}, ValueError, "grid"),
        (PredictorCorrectorSampler, {"predictor": "ancestral"}, ValueError, "predictor"),
        (PredictorCorrectorSampler, {"corrector": "ald"}, ValueError, "corrector"),
        (PredictorCorrectorSampler, {"snr": -0.1}, ValueError, "snr"),
        (PredictorCorrectorSampler, {"snr_rule": "mean"}, ValueError, "snr_rule"),
        (PredictorCorrectorSampler, {"snr_scaling": "sqrt"}, ValueError, "snr_scaling"),
        (PredictorCorrectorSampler, {"corrector": "none", "snr": 0.2}, ValueError, "no effect"),
        (PredictorCorrectorSampler, {"reference_steps": 100}, ValueError, "no effect"),
        (PredictorCorrectorSampler, {"corrector_steps": 1.5}, ValueError, "corrector_steps"),
        (AncestralSampler, {"variance": "learned"}, ValueError, "variance"),
        (AncestralSampler, {"grid": "cosine"}, ValueError, "grid"),
        (AncestralSampler, {"num_step": 10}, TypeError, "num_steps"),
    ],
)
def test_bad_options_raise(cls, options, error, match):
    with pytest.raises(error, match=match):
        cls(**options)


def test_langevin_time_outside_process_range():
    with pytest.raises(ValueError, match=r"option t in \[0.001, 1\]"):
        LangevinSampler(t=1e-4).sample(lambda x, t: -x, VPSDE(), shape=(2, 2))


def test_mala_without_energy_raises():
    process = VPSDE()
    mala = LangevinSampler(metropolis=True, num_steps=2)
    with pytest.raises(ValueError, match="energy"):
        mala.sample(lambda x, t: -x, process, shape=(2, 2))
    adapter = ScoreAdapter(_mixture("ring").as_network(process, "epsilon"), process, prediction_type="epsilon")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        mala.sample(adapter, process, shape=(2, 2))


def test_names_and_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="score_toolkit.samplers")}
    for cls in (LangevinSampler, AnnealedLangevinSampler, PredictorCorrectorSampler, AncestralSampler):
        assert eps[cls.name] == f"{cls.__module__}:{cls.__name__}"
        assert cls.description and cls.options
