"""Final-level MCMC correction of conditional samplers (docs/conditioning.md, benchmarks/bench_final_correction.py):
the energies of guided and likelihood scores, the tempered target of classifier guidance reached in closed form
(1-D quadrature, 2-D exact rejection draws), and the conformance accuracy check on the approximate inverse-problem
methods (it fails them; the correction fixes their within-mode shape but not their mode weights)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import projection_problem

from score_toolkit.analytic import ClassConditionalMixture, GaussianMixture, gaussian, ring_mixture
from score_toolkit.conditioning import (
    DPS,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    Downsample,
    GaussianBlur,
    Mask,
    MatrixOperator,
    ObservationLikelihood,
    PiGDM,
    Replacement,
    sample_with_final_correction,
)
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.testing import accuracy_statistics, check_accuracy, conformance_mixture

D64 = torch.float64


def _grad_of_minus_energy(fn, x, t):
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(-fn.energy(xg, t).sum(), xg)
    return g


def _two_class_1d():
    return ClassConditionalMixture(GaussianMixture([[-1.0], [1.0]], 0.36, dtype=D64), [0, 1])


# ---------------------------------------------------------------------- energies
@pytest.mark.parametrize("proc", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_guided_energy_is_the_potential_of_the_guided_score(proc):
    cc = ClassConditionalMixture(conformance_mixture(), [0, 1, 1])
    guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=2.5)
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=D64)
    torch.testing.assert_close(_grad_of_minus_energy(guided, x, t), guided(x, t))
    # the energy is that of p_t(x) p_t(c | x)^w: differences against the closed form
    e = guided.energy(x, t)
    ref = -cc.mixture.log_prob(x, t, proc) - 2.5 * cc.class_log_prob(x, t, proc)[:, 1]
    torch.testing.assert_close(e - e[0], ref - ref[0])


def test_classifier_free_guidance_energy_and_its_samples_equal_classifier_guidance():
    """With exact scores CFG at gamma equals classifier guidance at w = gamma: the same energy up to a constant, and the
    same corrected samples (common random numbers)."""
    cc, proc = ClassConditionalMixture(conformance_mixture(), [0, 1, 1]), VPSDE()
    cfg = ClassifierFreeGuidance(cc.score_fn(proc), 1, guidance_scale=2.0)
    cg = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=2.0)
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=D64)
    torch.testing.assert_close(_grad_of_minus_energy(cfg, x, t), cfg(x, t))
    for tt in (0.05, 0.5):  # equal up to a constant in x at each t
        tv = torch.full((6,), tt, dtype=D64)
        d = cfg.energy(x, tv) - cg.energy(x, tv)
        torch.testing.assert_close(d, d[:1].expand(6))
    outs = [sample_with_final_correction(get_sampler("euler_maruyama", num_steps=20), fn, proc, shape=(50, 2), dtype=D64,
                                         corrector_steps=5, step_size=0.05, generator=torch.Generator().manual_seed(1))
            for fn in (cfg, cg)]
    torch.testing.assert_close(outs[0].samples, outs[1].samples)


def test_guided_score_without_an_energy_has_none_and_mala_says_so():
    cc = _two_class_1d()
    proc = VPSDE()
    exact = cc.mixture.score_fn(proc)
    guided = ClassifierGuidance(lambda x, t: exact(x, t), cc.classifier(proc), 1, scale=2.0)
    assert not hasattr(guided, "energy")
    with pytest.raises(ValueError, match="metropolis=True needs a score function with an energy"):
        sample_with_final_correction(get_sampler("euler_maruyama", num_steps=5), guided, proc, shape=(4, 1),
                                     corrector_steps=2, step_size=0.1, dtype=D64)
    out = sample_with_final_correction(get_sampler("euler_maruyama", num_steps=5), guided, proc, shape=(4, 1),
                                       corrector_steps=3, step_size=0.1, metropolis=False, dtype=D64)
    assert out.nfe == 5 + 3 and out.info["acceptance"] == 1.0  # ULA: one score per step, no energy


def test_observation_likelihood_energy_and_its_limit_at_t_min():
    proc = VPSDE()
    prior = gaussian([0.5, -1.0, 0.2], [0.3, 0.5, 0.8])
    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]], dtype=D64)
    y, sy = torch.tensor([0.4, -0.6], dtype=D64), 0.2
    fn = ObservationLikelihood(prior.score_fn(proc), proc, MatrixOperator(a), y, sy)
    x = torch.randn(5, 3, dtype=D64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.9], dtype=D64)
    torch.testing.assert_close(_grad_of_minus_energy(fn, x, t), fn(x, t))
    exact = prior.condition(a, y, sy).score_fn(proc)
    xt = prior.condition(a, y, sy).perturbed(*proc.marginal(torch.tensor(proc.t_min, dtype=D64))).sample(
        200, generator=torch.Generator().manual_seed(2))
    rel = lambda tt: float((fn(xt, tt) - exact(xt, tt)).norm() / exact(xt, tt).norm())  # noqa: E731
    assert rel(proc.t_min) < 0.01  # exact as t -> 0
    assert rel(0.3) > 0.05  # an approximation away from t_min (flat prior in the likelihood)


@pytest.mark.parametrize("op", [Mask(torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5), Downsample(2),
                                GaussianBlur(0.8)], ids=["mask", "downsample", "blur"])
def test_observation_likelihood_on_images_and_the_corrector_runs(op):
    """Any operator and tensor rank: the score is minus the gradient of the energy on (B, C, H, W) samples, and the
    corrector runs on them."""
    proc = VPSDE()
    prior = gaussian(torch.zeros(2 * 4 * 4), 0.5)
    score = _ImageScore(prior.score_fn(proc), (2, 4, 4))
    y = op.forward(torch.randn(1, 2, 4, 4, dtype=D64, generator=torch.Generator().manual_seed(1)))[0]
    fn = ObservationLikelihood(score, proc, op, y, 0.1)
    x = torch.randn(3, 2, 4, 4, dtype=D64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1e-3, 0.2, 0.7], dtype=D64)
    torch.testing.assert_close(_grad_of_minus_energy(fn, x, t), fn(x, t))
    out = sample_with_final_correction(get_sampler("ancestral", num_steps=10), score, proc, shape=(3, 2, 4, 4), dtype=D64,
                                       corrector_steps=5, step_size=1e-3, corrector_score_fn=fn)
    assert out.samples.shape == (3, 2, 4, 4) and out.info["acceptance"] > 0


class _ImageScore:
    """A flat analytic score seen on (B, C, H, W) samples (energy included)."""

    def __init__(self, flat, shape):
        self.flat, self.shape = flat, shape

    def __call__(self, x, t):
        return self.flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    def energy(self, x, t):
        return self.flat.energy(x.reshape(x.shape[0], -1), t)


def test_final_correction_bad_input():
    proc = VPSDE()
    score = ring_mixture().score_fn(proc)
    with pytest.raises(ValueError, match="denoise=True ends below t_min"):
        sample_with_final_correction(get_sampler("ancestral", num_steps=5, denoise=True), score, proc, shape=(3, 2),
                                     corrector_steps=1, step_size=0.01)
    with pytest.raises(ValueError, match="ends at t = 0.5"):
        sample_with_final_correction(get_sampler("langevin", t=0.5, num_steps=2), score, proc, shape=(3, 2),
                                     corrector_steps=1, step_size=0.01)
    with pytest.raises(ValueError, match="corrector_steps to be an int >= 0"):
        sample_with_final_correction(get_sampler("ancestral", num_steps=5), score, proc, shape=(3, 2),
                                     corrector_steps=-1, step_size=0.01)
    out = sample_with_final_correction(get_sampler("ancestral", num_steps=5), score, proc, shape=(3, 2),
                                       corrector_steps=0, step_size=0.01, dtype=D64)
    assert out.nfe == 5 and out.info["corrector_nfe"] == 0
    out = sample_with_final_correction(get_sampler("ancestral", num_steps=5), score, proc, shape=(3, 2),
                                       corrector_steps=4, step_size=0.01, dtype=D64)
    assert out.nfe == 5 + 2 * (4 + 1) and 0 <= out.info["acceptance"] <= 1
    # device= reaches the first stage (a meta tensor would fail; the CPU is the one device every machine has)
    out = sample_with_final_correction(get_sampler("ancestral", num_steps=5), score, proc, shape=(3, 2),
                                       corrector_steps=2, step_size=0.01, dtype=D64, device="cpu")
    assert out.samples.device.type == "cpu" and out.samples.dtype == D64
    with pytest.raises(RuntimeError, match="meta tensors"):  # the state was drawn on the requested device
        sample_with_final_correction(get_sampler("ancestral", num_steps=5), score, proc, shape=(3, 2),
                                     corrector_steps=2, step_size=0.01, dtype=D64, device="meta")


# ---------------------------------------------------------------------- the tempered target of classifier guidance
def _tempered_cdf_1d(cc, w, proc):
    """CDF of pi_w = p(x) p(c | x)^w / Z perturbed to t_min, on a grid (quadrature)."""
    grid = torch.linspace(-8, 8, 8001, dtype=D64)
    x0 = grid[:, None]
    logp = cc.mixture.log_prob(x0) + w * cc.class_log_prob(x0)[:, 1]
    alpha, sigma = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=D64)))
    dens0 = (logp - logp.max()).exp()
    k = torch.exp(-0.5 * ((grid[:, None] - alpha * grid[None]) / sigma) ** 2)
    dens = (k * dens0[None]).sum(1)
    cdf = torch.cat([dens.new_zeros(1), torch.cumulative_trapezoid(dens, grid)])
    return grid, cdf / cdf[-1]


def _sqrt_n_ks(x, grid, cdf):
    import numpy as np

    xs = x.reshape(-1).sort().values
    f = torch.from_numpy(np.interp(xs.numpy(), grid.numpy(), cdf.numpy()))
    n = len(xs)
    i = torch.arange(1, n + 1, dtype=D64) / n
    return math.sqrt(n) * float(torch.maximum(i - f, f - (i - 1 / n)).max())


@pytest.mark.parametrize("proc,sampler,options", [(VPSDE(), "pf_ode", {}), (VPSDE(), "euler_maruyama", {"num_steps": 100}),
                                                  (VESDE(), "euler_maruyama", {"num_steps": 200})],
                         ids=["vp-pf_ode", "vp-euler_maruyama", "ve-euler_maruyama"])
def test_guided_sampling_with_final_mala_reaches_the_tempered_target_1d(proc, sampler, options):
    """w = 2: the guided sampler alone is far from pi_w (Kolmogorov-Smirnov), 60 MALA steps at t_min reach it."""
    cc = _two_class_1d()
    guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=2.0)
    grid, cdf = _tempered_cdf_1d(cc, 2.0, proc)
    ks = {}
    for k in (0, 60):
        out = sample_with_final_correction(get_sampler(sampler, **options), guided, proc, shape=(2000, 1), dtype=D64,
                                           corrector_steps=k, step_size=0.1, generator=torch.Generator().manual_seed(3))
        ks[k] = _sqrt_n_ks(out.samples, grid, cdf)
    assert ks[0] > 3.0  # P(sqrt(n) KS > 3) < 1e-7 for exact samples
    assert ks[60] < 1.95  # the Kolmogorov distribution's 0.999 quantile


def test_guided_sampling_with_final_mala_reaches_the_tempered_target_on_a_ring():
    """2-D ring of overlapping Gaussians, alternating classes, w = 2: the class share of the guided SDE alone is too
    high (the over-sharpening); after 100 MALA steps at t_min it matches exact rejection draws of pi_w."""
    cc, proc, n = ClassConditionalMixture(ring_mixture(8, radius=2.0, std=0.5), [0, 1] * 4), VPSDE(), 3000
    guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=2.0)
    g = torch.Generator().manual_seed(0)
    x = cc.mixture.sample(8 * n, generator=g)
    exact = x[torch.rand(len(x), generator=g, dtype=D64).log() < 2.0 * cc.class_log_prob(x)[:, 1]]
    target = float((cc.class_log_prob(exact).argmax(1) == 1).double().mean())  # about 0.96
    se = math.sqrt(target * (1 - target) / n)
    share = {}
    for k in (0, 100):
        out = sample_with_final_correction(get_sampler("euler_maruyama", num_steps=100), guided, proc, shape=(n, 2),
                                           dtype=D64, corrector_steps=k, step_size=0.1,
                                           generator=torch.Generator().manual_seed(4))
        share[k] = float((cc.class_log_prob(out.samples).argmax(1) == 1).double().mean())
    assert share[0] > target + 4 * se
    assert abs(share[100] - target) < 4 * se


# ---------------------------------------------------------------------- the conformance check on the approximate methods
SAMPLERS = [("ancestral", {"num_steps": 200}), ("pf_ode", {})]



def _approximate(name, mix, proc, a, y, sy):
    op = MatrixOperator(a)
    if name == "dps":
        return DPS(mix.score_fn(proc), proc, op, y, sy)
    if name == "pigdm":
        return PiGDM(mix.score_fn(proc), proc, op, y, sy, data_variance=1.0)
    return Replacement(mix.score_fn(proc), proc, op, y, sy)


@pytest.mark.parametrize("method", ["dps", "pigdm", "replacement"])
@pytest.mark.parametrize("sampler,options", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_conformance_check_fails_the_biased_methods(method, sampler, options):
    """DPS, PiGDM and replacement are biased by construction: the accuracy check on the exact posterior fails them
    with a stochastic and a deterministic sampler (their numbers: benchmarks/results/final_correction.md)."""
    mix, a, y, sy, post = projection_problem()
    proc = VPSDE()
    with pytest.raises(AssertionError, match="mode weights|within-mode"):
        check_accuracy(get_sampler(sampler, **options), _approximate(method, mix, proc, a, y, sy), proc, post)


@pytest.mark.parametrize("method", ["dps", "pigdm", "replacement"])
def test_final_mala_fixes_the_shape_of_the_modes_but_not_their_weights(method):
    """After 300 MALA steps at t_min on prior x likelihood, each mode's shape is at the noise floor of the check, but
    the mode weights stay those of the biased sampler (a local chain does not move mass between modes)."""
    mix, a, y, sy, post = projection_problem()
    proc = VPSDE()
    corrector = ObservationLikelihood(mix.score_fn(proc), proc, MatrixOperator(a), y, sy)
    out = sample_with_final_correction(get_sampler("ancestral", num_steps=100), _approximate(method, mix, proc, a, y, sy),
                                       proc, shape=(2000, 2), dtype=D64, corrector_steps=300, step_size=0.05,
                                       corrector_score_fn=corrector, generator=torch.Generator().manual_seed(2024))
    alpha, sigma = proc.marginal(torch.tensor(proc.t_min, dtype=D64))
    stats = accuracy_statistics(out.samples, float(alpha), float(sigma), post)
    assert stats["within_mode_ratio"] < 1.5
    assert stats["mode_weight_chi2"] > stats["mode_weight_limit"]
