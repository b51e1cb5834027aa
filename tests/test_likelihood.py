"""Likelihoods through the probability-flow ODE against closed forms (score_toolkit.likelihood).

* the exact-divergence ODE log-density of a 2-D mixture equals the mixture's exact log p_{t_min} (VE, VP);
* Hutchinson's estimate is unbiased within its reported standard error (16-D mixture), and the standard
  error is calibrated;
* bits/dim with uniform dequantization against the exact discrete probability of quantised Gaussian data
  (8 and 5 bits, 17 levels, several scalings), and end to end through the ODE;
* every process and prediction type, any tensor rank, batch independence, two real processes;
* bad input: clear errors, no hang, no silent NaN.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from functools import partial

import pytest
import torch

from score_toolkit.analytic import anisotropic_mixture, gaussian, ring_mixture
from score_toolkit.likelihood import (
    SolverError,
    bits_per_dim,
    dequantize,
    dequantized_bits_per_dim,
    log_likelihood,
    to_levels,
)
from score_toolkit.likelihood.bits import _mix_seed
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP, SubVPSDE
from score_toolkit.samplers.base import NonFiniteError
from score_toolkit.scores import PREDICTION_TYPES, ScoreAdapter

PROCESSES = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE(0.1, 20.0)}


def _ring_data(n=48, seed=0):
    m = ring_mixture()
    return m, m.sample(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("method", ["dopri5_per_sample", "dopri5"])
@pytest.mark.parametrize("time_variable", ["vp_t", "log_sigma", "t"])
@pytest.mark.parametrize("name", list(PROCESSES))
def test_exact_divergence_matches_the_mixture_log_density_2d(name, time_variable, method):
    proc = PROCESSES[name]()
    m, x = _ring_data()
    res = log_likelihood(m.score_fn(proc), proc, x, rtol=1e-5, atol=1e-5, time_variable=time_variable, method=method)
    exact = m.log_prob(x, proc.t_min, proc)
    err = (res.log_prob - exact).abs()
    # with the process's Gaussian prior standing in for p_1 (as users run it): measured 2.5e-3 (VE), 2.3e-4 (VP)
    assert float(err.mean()) < {"VE": 5e-3, "VP": 5e-4}[name], float(err.mean())
    assert torch.all(res.std_err == 0) and res.divergence == "exact" and res.nfe > 0
    assert torch.allclose(res.log_prob, res.prior_log_prob + res.delta_log_prob)
    # with the exact p_1 the remaining error is the solver's alone: much smaller
    res1 = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=lambda z: m.log_prob(z, 1.0, proc),
                          time_variable=time_variable, method=method)
    err1 = (res1.log_prob - exact).abs()
    if method == "dopri5":
        # measured: mean 1.4e-5 to 1.8e-5, max 7e-5 to 3.4e-4 (default rtol = atol = 1e-5)
        assert float(err1.mean()) < 5e-5 and float(err1.max()) < 1e-3, (float(err1.mean()), float(err1.max()))
    else:
        # each sample within its own tolerance: more accurate than score_sde's criterion (one RMS over the batch, in
        # t) at the same tolerances; measured on these 48 points: mean 5.9e-5 to 1.7e-4 against 2.1e-4 (VP) and
        # 3.3e-4 (VE), max 2.9e-4 to 1.8e-3 against 8e-3 and 1.2e-2
        batch = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=lambda z: m.log_prob(z, 1.0, proc),
                               method="dopri5", per_sample_norm=False, time_variable="t")
        err_b = (batch.log_prob - exact).abs()
        assert float(err1.mean()) < float(err_b.mean()) and float(err1.max()) < float(err_b.max()) / 5
        assert float(err1.mean()) < 2e-4 and float(err1.max()) < 2e-3, (float(err1.mean()), float(err1.max()))


def test_hutchinson_is_unbiased_within_its_standard_error_16d():
    proc = VPSDE(0.1, 20.0)
    m = anisotropic_mixture(16)
    x = m.sample(32, generator=torch.Generator().manual_seed(3))
    sf = m.score_fn(proc)
    exact = log_likelihood(sf, proc, x)
    assert float((exact.log_prob - m.log_prob(x, proc.t_min, proc)).abs().mean()) < 0.01
    for probe in ("rademacher", "gaussian"):
        h = log_likelihood(sf, proc, x, divergence="hutchinson", num_probes=4, probe=probe, seed=11)
        diff = h.log_prob - exact.log_prob
        combined = float(h.std_err.pow(2).sum().sqrt()) / len(diff)
        assert torch.all(h.std_err > 0)
        assert abs(float(diff.mean())) < 3 * combined, (probe, float(diff.mean()), combined)
        # calibration: the squared errors average to about the reported variances
        ratio = float(diff.pow(2).mean() / h.std_err.pow(2).mean())
        assert 0.25 < ratio < 4.0, (probe, ratio)


def test_hutchinson_probes_do_not_depend_on_the_batch():
    proc = VPSDE()
    m, x = _ring_data(6)
    kw = dict(divergence="hutchinson", num_probes=2, seed=5, method="rk4", num_steps=8)
    whole = log_likelihood(m.score_fn(proc), proc, x, **kw)
    alone = log_likelihood(m.score_fn(proc), proc, x, batch_size=1, **kw)
    # fixed grid: identical arithmetic per sample, so equal to round-off
    torch.testing.assert_close(whole.log_prob, alone.log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(whole.std_err, alone.std_err, rtol=0, atol=1e-12, equal_nan=True)
    other = log_likelihood(m.score_fn(proc), proc, x, **{**kw, "seed": 6})
    assert not torch.allclose(other.log_prob, whole.log_prob)


def test_per_sample_norm_keeps_each_sample_accurate_in_any_batch():
    proc = VESDE(0.01, 50.0)
    m, x = _ring_data(12)
    sf = m.score_fn(proc)
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    alone = log_likelihood(sf, proc, x[:1], prior_log_prob=prior)
    batched = log_likelihood(sf, proc, x, prior_log_prob=prior)
    assert abs(float(alone.log_prob[0] - batched.log_prob[0])) < 1e-3
    assert int(batched.nfe_per_sample[0]) >= int(alone.nfe)


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (1, 1, 2)])
def test_any_tensor_rank(shape):
    proc = VPSDE()
    m, x = _ring_data(5)
    kw = dict(method="rk4", num_steps=6)
    flat = log_likelihood(m.score_fn(proc), proc, x, **kw)
    shaped = log_likelihood(m.score_fn(proc), proc, x.reshape(5, *shape), return_latent=True, **kw)
    torch.testing.assert_close(shaped.log_prob, flat.log_prob, rtol=0, atol=1e-12)
    assert shaped.latent.shape == (5, *shape) and shaped.num_dims == 2


@pytest.mark.parametrize("proc", [VESDE(0.01, 50.0), VPSDE(), SubVPSDE(), DiscreteVP()], ids=lambda p: type(p).__name__)
def test_every_prediction_type_gives_the_same_likelihood(proc):
    m, x = _ring_data(4)
    kw = dict(method="rk4", num_steps=5, time_variable="log_sigma")  # the same steps for the analytic score too
    ref = log_likelihood(m.score_fn(proc), proc, x, **kw)
    for pt in PREDICTION_TYPES:
        adapter = ScoreAdapter(m.as_network(proc, pt), proc, pt)
        res = log_likelihood(adapter, proc, x, **kw)
        torch.testing.assert_close(res.log_prob, ref.log_prob, rtol=0, atol=1e-9, msg=pt)


@pytest.mark.parametrize("proc", [SubVPSDE(), DiscreteVP()], ids=lambda p: type(p).__name__)
def test_other_processes_match_the_exact_density(proc):
    m, x = _ring_data(8)
    res = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=lambda z: m.log_prob(z, 1.0, proc))
    assert float((res.log_prob - m.log_prob(x, res.t_min, proc)).abs().mean()) < 0.01


def test_log_sigma_variable_avoids_the_knots_of_a_discrete_table():
    """DiscreteVP's f and g jump at each of its 1000 steps: in t an adaptive solver must creep over them; in
    ln(sigma / alpha) the ODE of x / alpha is smooth, and both reach the same answer."""
    proc = DiscreteVP()
    m, x = _ring_data(8)
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    smooth = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior)
    in_t = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior, time_variable="t")
    exact = m.log_prob(x, proc.t_min, proc)
    assert float((smooth.log_prob - exact).abs().max()) < 1e-3
    assert float((in_t.log_prob - exact).abs().max()) < 0.05
    assert smooth.nfe < in_t.nfe / 2, (smooth.nfe, in_t.nfe)


@pytest.mark.parametrize("proc", [VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0), VESDE(0.01, 50.0), DiscreteVP()],
                         ids=lambda p: type(p).__name__)
def test_the_default_time_variable_of_an_analytic_score_is_the_vp_clock(proc):
    m, x = _ring_data(4)
    res = log_likelihood(m.score_fn(proc), proc, x, rtol=1e-3, atol=1e-3)
    assert res.info["time_variable"] == "vp_t"
    explicit = log_likelihood(m.score_fn(proc), proc, x, rtol=1e-3, atol=1e-3, time_variable="vp_t")
    assert torch.equal(res.log_prob, explicit.log_prob) and res.nfe == explicit.nfe


def test_the_vp_clock_is_t_itself_for_vp_0_1_20():
    """The clock is VP(0.1, 20)'s own time and its state x / sqrt(alpha^2 + sigma^2) is x under VP: the same ODE in
    the same variable, so the same steps and the same numbers as time_variable="t"."""
    from score_toolkit.likelihood.time_variable import _vp_clock

    proc = VPSDE(0.1, 20.0)
    t = torch.linspace(proc.t_min, 1.0, 50, dtype=torch.float64)
    assert torch.allclose(_vp_clock(proc.noise_to_signal(t)), t, rtol=1e-10, atol=1e-13)
    m, x = _ring_data(8)
    clock = log_likelihood(m.score_fn(proc), proc, x, time_variable="vp_t")
    in_t = log_likelihood(m.score_fn(proc), proc, x, time_variable="t")
    assert clock.nfe == in_t.nfe
    assert torch.allclose(clock.log_prob, in_t.log_prob, rtol=0, atol=1e-9)


@pytest.mark.parametrize("proc", [VESDE(0.01, 50.0), SubVPSDE(0.1, 20.0), DiscreteVP(), VPSDE(0.1, 10.0)],
                         ids=lambda p: type(p).__name__)
def test_the_vp_clock_matches_the_exact_density_and_is_cheaper_than_the_previous_variables(proc):
    """Under every process the VP clock reaches the mixture's exact log p_{t_min} (exact p_1 as prior: only the
    solver's error counts) in no more evaluations than t or ln(sigma / alpha) (benchmarks/results/
    likelihood_variables.md, 200 points: VE 134 against 164 in t and 182 in ln sigma; the DDPM table 134 against 194)."""
    m, x = _ring_data(32)
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    exact = m.log_prob(x, proc.t_min, proc)
    clock = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior, time_variable="vp_t")
    err = (clock.log_prob - exact).abs()
    assert float(err.mean()) < 1.5e-4 and float(err.max()) < 2e-3, (float(err.mean()), float(err.max()))
    others = ["log_sigma"] + ([] if isinstance(proc, DiscreteVP) else ["t"])
    for kind in others:
        other = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior, time_variable=kind)
        assert clock.nfe <= other.nfe, (kind, clock.nfe, other.nfe)


def test_the_default_on_vp_is_cheaper_and_more_accurate_than_log_sigma():
    """The reason for time_variable="auto": on a continuous VP process, the VP clock (t itself for VP(0.1, 20))
    needs fewer evaluations than ln(sigma / alpha) for a smaller error (exact p_1 as prior, so only the solver's
    error counts)."""
    proc = VPSDE(0.1, 20.0)
    m, x = _ring_data(32)
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    exact = m.log_prob(x, proc.t_min, proc)
    default = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior)
    scaled = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior, time_variable="log_sigma")
    assert default.nfe < scaled.nfe, (default.nfe, scaled.nfe)
    err_default = float((default.log_prob - exact).abs().mean())
    # measured 8.7e-5 against 9.7e-5 (per-sample steps at rtol = atol = 1e-5)
    assert err_default < float((scaled.log_prob - exact).abs().mean()) and err_default < 1.5e-4


def test_a_network_integrates_in_log_sigma_by_default_and_is_cheaper_there():
    """An epsilon network's score grows like 1 / sigma as t -> 0 (its noise prediction stays of order one), so the
    ODE in t is singular at t_min under VP; in ln(sigma / alpha) it is smooth: fewer evaluations, the same answer."""
    from score_toolkit.models import ScoreMLP

    torch.manual_seed(0)
    proc = VPSDE(0.1, 20.0)
    net = ScoreMLP(dim=16, hidden_dim=32, num_layers=2, time_embedding="linear").double()
    adapter = ScoreAdapter(net, proc, "epsilon", "t")
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-1, 1)
    default = log_likelihood(adapter, proc, x)
    in_t = log_likelihood(adapter, proc, x, time_variable="t")
    # the reference: a tight solve (agrees with torchdiffeq's dopri8 in t at 1e-9 to 2e-10)
    tight = log_likelihood(adapter, proc, x, rtol=1e-9, atol=1e-9)
    assert default.info["time_variable"] == "log_sigma"
    # measured: 92 against 98 evaluations, max error 2.4e-5 against 1.8e-4
    assert default.nfe <= in_t.nfe, (default.nfe, in_t.nfe)
    err_default = float((default.log_prob - tight.log_prob).abs().max())
    err_t = float((in_t.log_prob - tight.log_prob).abs().max())
    assert err_default < err_t / 3 and err_default < 1e-4, (err_default, err_t)


def test_unknown_time_variable_is_refused():
    m, x = _ring_data(2)
    proc = VPSDE(0.1, 20.0)
    with pytest.raises(ValueError, match="expected time_variable in \\('auto', 'vp_t', 'log_sigma', 't'\\), found 'sigma'"):
        log_likelihood(m.score_fn(proc), proc, x, time_variable="sigma")


def test_fixed_grid_converges_at_its_order():
    proc = VPSDE()
    m, x = _ring_data(4)
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    exact = m.log_prob(x, proc.t_min, proc)
    errs = [float((log_likelihood(m.score_fn(proc), proc, x, method="rk4", num_steps=n, grid="log_sigma",
                                  prior_log_prob=prior).log_prob - exact).abs().max()) for n in (16, 32)]
    assert errs[1] < errs[0] / 8, errs  # 4th order: 16x in theory


# ------------------------------------------------------------------------------------------ bits/dim
def _discrete_gaussian_log_prob(k, m, s, levels):
    """log P(k) of N(m, s^2) data on R quantised to cells [k, k+1), the outer cells taking the tails."""
    lo = torch.where(k == 0, torch.tensor(-math.inf, dtype=torch.float64), (k - m) / s)
    hi = torch.where(k == levels - 1, torch.tensor(math.inf, dtype=torch.float64), (k + 1 - m) / s)
    return torch.log(torch.special.ndtr(hi) - torch.special.ndtr(lo)).sum(1)


def _quantised_gaussian(levels, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    m, s = levels / 2, levels / 7
    k = torch.floor(m + s * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(0, levels - 1)
    return k, m, s


@pytest.mark.parametrize("bits", [8, 5])
@pytest.mark.parametrize("scale,offset", [(2.0, -1.0), (1.0, 0.0), (0.5, 3.0), (-2.0, 1.0)])
def test_bits_per_dim_is_exact_for_the_dequantised_density(bits, scale, offset):
    """The model IS the uniform dequantization of the discrete law: the formula gives -log2 P(k) / d exactly,
    for any bit depth and scaling, whatever u is."""
    levels, d = 2**bits, 3
    k, m, s = _quantised_gaussian(levels, 200, d, seed=bits)
    x = dequantize(k.long(), bits=bits, scale=scale, offset=offset, seed=1, dtype=torch.float64)
    # the model's density at x: invert x -> v = k + u, then p_x = P(floor v) (L / |a|)^d
    v = (x - offset) * levels / scale
    assert torch.equal(torch.floor(v), k)
    log_px = _discrete_gaussian_log_prob(torch.floor(v), m, s, levels) + d * math.log(levels / abs(scale))
    bpd = bits_per_dim(-log_px, d, bits=bits, scale=scale)
    expected = -_discrete_gaussian_log_prob(k, m, s, levels) / (d * math.log(2))
    torch.testing.assert_close(bpd, expected, rtol=0, atol=1e-10)
    assert torch.allclose(bits_per_dim(-log_px, d, levels=levels, scale=scale), bpd)


def test_bits_per_dim_offsets():
    assert bits_per_dim(0.0, 1, bits=8, scale=2.0) == pytest.approx(7.0)  # score_sde's offset
    assert bits_per_dim(0.0, 1, bits=8, scale=1.0) == pytest.approx(8.0)
    assert bits_per_dim(0.0, 1, bits=5, scale=2.0) == pytest.approx(4.0)
    assert bits_per_dim(0.0, 1, levels=17, scale=2.0) == pytest.approx(math.log2(17) - 1)
    assert bits_per_dim(math.log(2) * 64, 64, bits=8, scale=2.0) == pytest.approx(8.0)


@pytest.mark.parametrize("levels", [256, 32, 17])
def test_bits_per_dim_of_a_smooth_model_bounds_the_discrete_code_length(levels):
    """A continuous Gaussian model: E_u of the formula (closed form) is >= -log2 P_model(k) / d (Jensen), with the
    gap 1 / (24 s^2 ln 2) bits per dim to leading order for a cell-to-std ratio 1 / s."""
    d, scale = 2, 2.0
    k, m, s = _quantised_gaussian(levels, 300, d, seed=levels)
    # E_u[(k + u - m)^2] = (k + 1/2 - m)^2 + 1/12; model in v-space N(m, s^2) mapped to x-space
    e_nll_v = (0.5 * math.log(2 * math.pi * s * s) + ((k + 0.5 - m) ** 2 + 1 / 12) / (2 * s * s)).sum(1)
    e_nll_x = e_nll_v - d * math.log(levels / scale)  # p_x = p_v (L / a)^d
    bound = bits_per_dim(e_nll_x, d, levels=levels, scale=scale)
    cells = ((k - m) / s, (k + 1 - m) / s)
    code = -torch.log(torch.special.ndtr(cells[1]) - torch.special.ndtr(cells[0])).sum(1) / (d * math.log(2))
    gap = bound - code
    assert torch.all(gap >= -1e-12)
    assert float(gap.mean()) == pytest.approx(1 / (24 * s * s * math.log(2)), rel=0.05)


@pytest.mark.parametrize("bits", [8, 5])
def test_dequantized_bits_per_dim_through_the_ode(bits):
    """End to end: the ODE bits/dim of a Gaussian model equals the closed form at the same dequantised points,
    and its average agrees with the closed-form expectation over u."""
    levels, d, scale, offset = 2**bits, 3, 2.0, -1.0
    proc = VPSDE()
    k, m, s = _quantised_gaussian(levels, 24, d, seed=bits + 1)
    mean_x = torch.full((d,), scale * m / levels + offset, dtype=torch.float64)
    model = gaussian(mean_x, (scale * s / levels) ** 2)
    res = dequantized_bits_per_dim(model.score_fn(proc), proc, k.long(), bits=bits, scale=scale, offset=offset,
                                   num_dequant=2, seed=3, dtype=torch.float64, rtol=1e-6, atol=1e-6,
                                   prior_log_prob=lambda z: model.log_prob(z, 1.0, proc))
    for j, lk in enumerate(res.likelihoods):
        x = dequantize(k.long(), bits=bits, scale=scale, offset=offset, seed=_mix_seed(3, j), dtype=torch.float64)
        exact = bits_per_dim(-model.log_prob(x, proc.t_min, proc), d, bits=bits, scale=scale)
        torch.testing.assert_close(lk.bits_per_dim(bits=bits, scale=scale), exact, rtol=0, atol=1e-4)
    # closed-form E_u at t_min (the model there is N(alpha mu, alpha^2 var + sigma^2) per dim)
    a, sig = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=torch.float64)))
    var_x = a * a * (scale * s / levels) ** 2 + sig * sig
    cell = scale / levels
    xk = scale * (k + 0.5) / levels + offset  # cell centres; E_u[(x - mu)^2] = (xk - mu)^2 + cell^2 / 12
    e_nll = (0.5 * math.log(2 * math.pi * var_x) + ((xk - a * mean_x) ** 2 + cell**2 / 12) / (2 * var_x)).sum(1)
    expected = bits_per_dim(e_nll, d, bits=bits, scale=scale)
    diff = res.bpd - expected
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(len(diff)) + 1e-4
    assert res.summary()["num_dequant"] == 2 and res.nfe > 0


def test_to_levels_and_dequantize_checks():
    k = torch.tensor([[0, 16], [8, 3]])
    x = -1 + k.double() * 2 / 16
    assert torch.equal(to_levels(x, levels=17), k)
    with pytest.raises(ValueError, match="grid"):
        to_levels(x + 0.03, levels=17)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_levels(x * 2, levels=17)
    with pytest.raises(ValueError, match=r"levels k in \[0, 31\]"):
        dequantize(torch.tensor([[32]]), bits=5)
    with pytest.raises(ValueError, match="integers"):
        dequantize(torch.tensor([[1.5]]), bits=5)
    with pytest.raises(ValueError, match="exactly one of bits or levels"):
        bits_per_dim(1.0, 1, bits=8, levels=256)
    u = dequantize(k, levels=17, scale=2.0, offset=-1.0, dtype=torch.float64)
    assert torch.all((u >= -1) & (u < 1)) and torch.equal(torch.floor((u + 1) / 2 * 17).long(), k)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_clear_errors():
    from score_toolkit.models import ScoreMLP

    proc = VPSDE()
    m, x = _ring_data(4)
    net = ScoreMLP(dim=2, hidden_dim=8, num_layers=1, embedding_dim=8).double()
    adapter = ScoreAdapter(net, proc, "epsilon")
    with pytest.raises(ValueError, match="2 features"):
        log_likelihood(adapter, proc, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        log_likelihood(m.score_fn(proc), proc, x, sample_shape=(1, 2))
    with pytest.raises(ValueError, match=r"model's range \[-1, 1\]"):
        log_likelihood(adapter, proc, x, data_range=(-1, 1))
    with pytest.raises(ValueError, match="finite"):
        log_likelihood(adapter, proc, torch.full((2, 2), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match="ScoreAdapter"):
        log_likelihood(net, proc, x)
    with pytest.raises(ValueError, match="energy"):
        log_likelihood(lambda z, t: z.pow(2).sum(1), proc, x)
    with pytest.raises(TypeError, match="differentiable"):
        log_likelihood(lambda z, t: m.score(z.detach(), t, proc), proc, x)
    with pytest.raises(ValueError, match="num_probes"):
        log_likelihood(adapter, proc, x, num_probes=3)
    with pytest.raises(ValueError, match="num_steps"):
        log_likelihood(adapter, proc, x, method="rk4")
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(adapter, proc, x, method="euler", num_steps=3, rtol=1e-3)
    with pytest.raises(ValueError, match="method"):
        log_likelihood(adapter, proc, x, method="dopri")
    with pytest.raises(ValueError, match="t_min"):
        log_likelihood(adapter, proc, x, t_min=0.0)
    # an energy network is fine
    from score_toolkit.models import EnergyMLP

    energy = ScoreAdapter(EnergyMLP(dim=2, hidden_dim=8, num_layers=1, embedding_dim=8).double(), proc, "energy")
    res = log_likelihood(energy, proc, x, method="euler", num_steps=3)
    assert torch.isfinite(res.log_prob).all()


def test_step_budget_and_nan_are_errors_not_hangs():
    proc = VESDE(0.01, 50.0)
    m, x = _ring_data(4)
    with pytest.raises(SolverError, match="max_num_steps=3"):
        log_likelihood(m.score_fn(proc), proc, x, max_num_steps=3)

    def bad(z, t):
        s = m.score(z, t, proc)
        return torch.where(t[:, None] > 0.5, s * math.nan, s)

    with pytest.raises(NonFiniteError, match="NaN"):
        log_likelihood(bad, proc, x)


def test_step_budget_error_survives_without_torchdiffeqs_assert(monkeypatch):
    """Under ``python -O`` torchdiffeq's max_num_steps check (an assert) vanishes; emulate that by hiding the
    budget from torchdiffeq: our own step count must still stop the solve."""
    import torchdiffeq

    real = torchdiffeq.odeint

    def without_budget(*args, options=None, **kw):
        return real(*args, options={k: v for k, v in (options or {}).items() if k != "max_num_steps"}, **kw)

    monkeypatch.setattr(torchdiffeq, "odeint", without_budget)
    proc = VESDE(0.01, 50.0)
    m, x = _ring_data(3)
    with pytest.raises(SolverError, match="max_num_steps=2"):
        log_likelihood(m.score_fn(proc), proc, x, max_num_steps=2)


# ------------------------------------------------------------------------------------------ two processes
_TWO_PROCESS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from accelerate import Accelerator
from score_toolkit.analytic import ring_mixture
from score_toolkit.likelihood import log_likelihood
from score_toolkit.processes import VPSDE

acc = Accelerator(cpu=True)
m, proc = ring_mixture(), VPSDE()
x = m.sample(10, generator=torch.Generator().manual_seed(0))
kw = dict(divergence="hutchinson", num_probes=3, batch_size=3, seed=4, return_latent=True)
res = log_likelihood(m.score_fn(proc), proc, x, accelerator=acc, **kw)
if acc.is_main_process:
    torch.save({"log_prob": res.log_prob, "std_err": res.std_err, "latent": res.latent, "nfe": res.nfe,
                "nfe_per_sample": res.nfe_per_sample, "world": res.info["num_processes"]}, sys.argv[1])

def failing(z, t):  # only process 1's chunks go wrong; process 0 finishes its own and must not wait forever
    s = m.score(z, t, proc)
    return s * float("nan") if acc.process_index == 1 else s

try:
    log_likelihood(failing, proc, x, accelerator=acc, **kw)
    outcome = "no error"
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
with open(f"{sys.argv[1]}.rank{acc.process_index}", "w") as f:
    f.write(outcome)
# tear the gloo group down explicitly: leaving it to interpreter exit can abort a rank
# ("terminate called without an active exception")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_real_processes_equal_one_and_do_not_hang(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    out_file = tmp_path / "res.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out_file)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(out_file)
    assert two["world"] == 2
    m, proc = ring_mixture(), VPSDE()
    x = m.sample(10, generator=torch.Generator().manual_seed(0))
    one = log_likelihood(m.score_fn(proc), proc, x, divergence="hutchinson", num_probes=3, batch_size=3, seed=4,
                         return_latent=True)
    assert torch.equal(two["log_prob"], one.log_prob.to(two["log_prob"].dtype))
    # a per-sample standard error is NaN where every probe agreed (never a false 0): compare NaN as equal
    torch.testing.assert_close(two["std_err"], one.std_err, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(two["latent"], one.latent)
    assert two["nfe"] == one.nfe and torch.equal(two["nfe_per_sample"], one.nfe_per_sample)
    outcomes = [(tmp_path / f"res.pt.rank{r}").read_text() for r in (0, 1)]
    assert outcomes[1].startswith("NonFiniteError") and "process 1" in outcomes[1]
    assert outcomes[0].startswith("RuntimeError") and "another process failed" in outcomes[0]


def test_the_benchmarks_score_sde_transcription_agrees_with_ours():
    """benchmarks/bench_likelihood.py's reference (scipy RK45 on flat numpy, one probe) computes what we compute."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_likelihood.py"
    spec = importlib.util.spec_from_file_location("bench_likelihood_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from score_toolkit.likelihood.divergence import _probes

    proc = VPSDE()
    m, x = _ring_data(6)
    from score_toolkit._utils import per_sample_generators

    gens = per_sample_generators(7, range(len(x)))
    probe = _probes("rademacher", 1, x.shape, gens, x.dtype, x.device)[0]
    ref, nfe = bench.score_sde_log_likelihood(m.score_fn(proc), proc, x, probe, rtol=1e-7, atol=1e-7)
    ours = log_likelihood(m.score_fn(proc), proc, x, divergence="hutchinson", num_probes=1, seed=7, rtol=1e-7,
                          atol=1e-7, time_variable="t")
    torch.testing.assert_close(ours.log_prob, ref, rtol=0, atol=1e-4)
    assert nfe > 0 and torch.isnan(ours.std_err).all()  # one probe: no error bar


def test_the_benchmarks_wall_split_and_pairs():
    """benchmarks/bench_likelihood.py's wall-time split times the score's forward and the divergence's backward passes
    of both solvers, puts torch.autograd.grad back, and its pairs give one ours / recipe ratio per pair."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_likelihood.py"
    spec = importlib.util.spec_from_file_location("bench_likelihood_for_test_wall", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    proc = VPSDE(0.1, 20.0, t_min=1e-5)
    m, x = _ring_data(8)
    grad = torch.autograd.grad
    prof = bench._wall_profile(m.score_fn(proc), proc, x, partial(m.log_prob, t=1.0, process=proc), "vp_t")
    assert torch.autograd.grad is grad
    for kind in ("recipe", "ours"):
        fwd, bwd, rest = prof[kind]
        assert fwd > 0 and bwd > 0 and rest > 0, (kind, prof[kind])
    calls = []
    pairs = bench._paired_ratios({"recipe": lambda: calls.append("r") or time.sleep(0.1),
                                  "ours": lambda: calls.append("o") or time.sleep(0.005)}, 3)
    assert calls == ["r", "o", "o", "r", "r", "o"]  # the order alternates
    assert len(pairs["wall"]) == 3 and all(0 < r < 1 for r in pairs["wall"])
