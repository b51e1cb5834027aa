"""Processes: marginals against closed forms, the SDE identity, time grids, diffusers round trips."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ScoreSdeVeScheduler

from score_toolkit import VESDE, VPSDE, DiscreteVP, SubVPSDE, process_from_config, process_from_scheduler_config

PROCESSES = [
    VESDE(0.01, 50.0),
    VPSDE(0.1, 20.0),
    SubVPSDE(0.1, 20.0),
    DiscreteVP(),
    DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    DiscreteVP(beta_schedule="squaredcos_cap_v2"),
]
IDS = ["ve", "vp", "subvp", "ddpm-linear", "ddpm-scaled", "ddpm-cosine"]


def _times(p, n=41):
    return torch.linspace(p.t_min, 1.0, n, dtype=torch.float64)


def test_ve_closed_form():
    p = VESDE(0.01, 50.0)
    t = _times(p)
    assert torch.allclose(p.sigma(t), 0.01 * (50.0 / 0.01) ** t, rtol=1e-12)
    assert torch.all(p.alpha(t) == 1)
    g2 = 2 * math.log(50.0 / 0.01) * (0.01 * (50.0 / 0.01) ** t) ** 2
    assert torch.allclose(p.diffusion_squared(t), g2, rtol=1e-12)
    assert p.prior_std == 50.0


def test_vp_closed_form():
    p = VPSDE(0.1, 20.0)
    t = _times(p)
    log_alpha = -(t**2) * (20.0 - 0.1) / 4 - t * 0.1 / 2
    assert torch.allclose(p.alpha(t), torch.exp(log_alpha), rtol=1e-12)
    assert torch.allclose(p.sigma(t) ** 2 + p.alpha(t) ** 2, torch.ones_like(t), atol=1e-12)
    assert torch.allclose(p.drift_coef(t), -(0.1 + t * 19.9) / 2, rtol=1e-12)
    assert torch.allclose(p.diffusion(t), torch.sqrt(0.1 + t * 19.9), rtol=1e-12)


def test_subvp_closed_form():
    p = SubVPSDE(0.1, 20.0)
    t = _times(p)
    a = torch.exp(-(t**2) * 19.9 / 4 - t * 0.05)
    assert torch.allclose(p.sigma(t), 1 - a**2, rtol=1e-12)  # not a square root
    integral = 0.1 * t + 19.9 * t**2 / 2
    assert torch.allclose(p.diffusion_squared(t), (0.1 + 19.9 * t) * (1 - torch.exp(-2 * integral)), rtol=1e-10)


def test_discrete_vp_matches_diffusers_table():
    for kw in [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {"beta_schedule": "squaredcos_cap_v2"}]:
        p = DiscreteVP(**kw)
        sched = DDPMScheduler(**kw)
        n = sched.config.num_train_timesteps
        t = (torch.arange(n, dtype=torch.float64) + 1) / n
        assert torch.allclose(p.alpha(t) ** 2, sched.alphas_cumprod.double(), rtol=1e-12, atol=0)


def test_discrete_linear_table_agrees_with_vpsde():
    """For the DDPM linear table, the discrete VP and VPSDE(0.1, 20) agree to 1e-3."""
    d, c = DiscreteVP(), VPSDE(0.1, 20.0)
    t = torch.linspace(d.t_min, 1.0, 2001, dtype=torch.float64)
    assert (d.alpha(t) ** 2 - c.alpha(t) ** 2).abs().max() < 1e-3
    assert (d.alpha(t) - c.alpha(t)).abs().max() < 1e-3


@pytest.mark.parametrize("p", PROCESSES, ids=IDS)
def test_sigma_squared_evolves_as_the_sde_says(p):
    """d sigma^2 / dt = 2 f sigma^2 + g^2 and d ln(alpha) / dt = f, by central differences (float64).
    For the piecewise-linear discrete tables, evaluate inside segments (mid-points)."""
    n = 37
    if isinstance(p, DiscreteVP):
        N = p.num_train_timesteps
        idx = torch.linspace(1, N - 2, n).round().to(torch.float64)
        t = (idx + 1.5) / N
        h = 1e-4 / N
    else:
        t = torch.linspace(max(p.t_min, 0.02), 0.98, n, dtype=torch.float64)
        h = 1e-5
    s2 = lambda u: p.sigma(u) ** 2  # noqa: E731
    lhs = (s2(t + h) - s2(t - h)) / (2 * h)
    rhs = 2 * p.drift_coef(t) * s2(t) + p.diffusion_squared(t)
    assert torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-9)
    dla = (p.log_alpha(t + h) - p.log_alpha(t - h)) / (2 * h)
    assert torch.allclose(dla, p.drift_coef(t), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", PROCESSES, ids=IDS)
def test_marginal_by_simulating_the_forward_sde(p):
    """Simulate the forward SDE from a point mass with fine Euler-Maruyama steps: the empirical mean and
    std at t = 1/2 match alpha(1/2) x0 and sigma(1/2) (up to sigma(t_min) for VE, whose marginal std
    does not subtract it: see VESDE)."""
    g = torch.Generator().manual_seed(0)
    n, steps = 20000, 400
    t0 = p.t_min
    x0 = 1.5
    x = torch.full((n,), x0, dtype=torch.float64)
    # start from the exact marginal at t_min so that VE's sigma_min convention is respected
    x = p.alpha(torch.tensor(t0)) * x + p.sigma(torch.tensor(t0)) * torch.randn(n, generator=g, dtype=torch.float64)
    ts = torch.linspace(t0, 0.5, steps + 1, dtype=torch.float64)
    for a, b in zip(ts[:-1], ts[1:]):
        dt = b - a
        x = x + p.drift_coef(a) * x * dt + p.diffusion(a) * dt.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    a_half, s_half = p.marginal(torch.tensor(0.5, dtype=torch.float64))
    se = s_half / math.sqrt(n)
    assert abs(x.mean() - a_half * x0) < 5 * se + 1e-3
    assert abs(x.std() - s_half) < 0.02 * s_half


@pytest.mark.parametrize("p", PROCESSES, ids=IDS)
@pytest.mark.parametrize("shape", [(5, 2), (5, 1, 3, 3)], ids=["points", "images"])
def test_sde_is_per_sample_and_broadcast_against_x(p, shape):
    """sde(x, t): drift f(t) x and g(t) = sqrt(g^2(t)) of shape (B, 1, ..., 1) for a float, a 0-dim and
    a (B,) t, so that ``f - 0.5 * g**2 * score`` is the probability-flow drift as written."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_sample = torch.linspace(0.2, 0.9, shape[0], dtype=torch.float64)
    bshape = (shape[0],) + (1,) * (len(shape) - 1)
    for t, tt in ((0.5, torch.full((shape[0],), 0.5, dtype=torch.float64)),
                  (torch.tensor(0.5, dtype=torch.float64), torch.full((shape[0],), 0.5, dtype=torch.float64)),
                  (per_sample, per_sample)):
        f, g = p.sde(x, t)
        assert f.shape == x.shape and g.shape == bshape and g.dtype == x.dtype
        assert torch.allclose(g.reshape(-1), p.diffusion_squared(tt).sqrt(), rtol=1e-12)
        assert torch.allclose(f, p.drift_coef(tt).reshape(bshape) * x, rtol=1e-12)
        assert (f - 0.5 * g**2 * x).shape == x.shape
    with pytest.raises(ValueError, match="t a scalar or of shape"):
        p.sde(x, torch.rand(shape[0] + 1, dtype=torch.float64))


@pytest.mark.parametrize("p", PROCESSES, ids=IDS)
def test_log_snr_inverse(p):
    t = _times(p)
    assert torch.allclose(p.t_from_log_snr(p.log_snr(t)), t, atol=1e-9)
    assert torch.all(p.log_snr(t)[1:] < p.log_snr(t)[:-1])  # decreasing in t


@pytest.mark.parametrize("p", PROCESSES, ids=IDS)
@pytest.mark.parametrize("kind", ["uniform", "log_sigma", "karras"])
def test_time_grids(p, kind):
    ts = p.time_grid(10, kind)
    assert ts.shape == (11,)
    assert ts[0] == 1.0 and ts[-1] == pytest.approx(p.t_min)
    assert torch.all(ts[1:] < ts[:-1])
    s = p.noise_to_signal(ts)
    if kind == "log_sigma":
        steps = torch.diff(torch.log(s))
        assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6)
    if kind == "karras":
        r = s ** (1 / 7)
        assert torch.allclose(torch.diff(r), torch.diff(r).mean().expand(10), rtol=1e-6)
    if kind == "uniform":
        assert torch.allclose(torch.diff(ts), torch.diff(ts).mean().expand(10), rtol=1e-9)


def test_prior():
    p = VESDE(0.01, 50.0)
    x = p.prior_sample((4000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(x.std() - 50.0) < 1.0
    lp = p.prior_log_prob(x[:5])
    ref = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 50.0).log_prob(x[:5]).sum(1)
    assert torch.allclose(lp, ref, rtol=1e-10)
    q = VPSDE()
    y = q.prior_sample((7, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    assert y.shape == (7, 1, 2, 2) and q.prior_log_prob(y).shape == (7,)


@pytest.mark.parametrize("p", PROCESSES, ids=IDS)
def test_config_round_trip(p, tmp_path):
    p.save_config(tmp_path)
    q = process_from_config(type(p).load_config(tmp_path))
    assert q == p
    t = _times(p)
    assert torch.equal(q.sigma(t), p.sigma(t))


def test_diffusers_round_trips():
    # DDPM family -> DiscreteVP (exact table) -> DDPM config -> the same scheduler table
    for kw in [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {"beta_schedule": "squaredcos_cap_v2"}]:
        for cls in (DDPMScheduler, DDIMScheduler):
            sched = cls(**kw)
            p = process_from_scheduler_config(sched.config)
            assert isinstance(p, DiscreteVP)
            cfg = p.to_scheduler_config()
            back = DDPMScheduler.from_config(cfg)
            assert torch.equal(back.alphas_cumprod, sched.alphas_cumprod)
            assert process_from_scheduler_config(cfg) == p
    # a raw table round-trips through trained_betas
    table = DiscreteVP(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    p = DiscreteVP.from_alphas_cumprod(table)
    q = process_from_scheduler_config(DDPMScheduler.from_config(p.to_scheduler_config()).config)
    assert torch.allclose(q.alphas_cumprod, table, rtol=1e-6)
    # VE <-> ScoreSdeVeScheduler, exactly
    ve = VESDE(0.01, 348.0, t_min=1e-5, num_train_timesteps=2000)
    sched = ScoreSdeVeScheduler.from_config(ve.to_scheduler_config())
    assert process_from_scheduler_config(sched.config) == ve
    assert process_from_scheduler_config(ScoreSdeVeScheduler().config) == VESDE(0.01, 1348.0, t_min=1e-5, num_train_timesteps=2000)
    # VPSDE -> DDPM linear config -> back to the same VPSDE with continuous=True
    vp = VPSDE(0.1, 20.0)
    cfg = vp.to_scheduler_config()
    assert cfg["beta_start"] == pytest.approx(1e-4) and cfg["beta_end"] == pytest.approx(0.02)
    assert process_from_scheduler_config(DDPMScheduler.from_config(cfg).config, continuous=True) == vp


def test_bad_input():
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(-1.0, 50.0)
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        VESDE(1.0, 0.5)
    with pytest.raises(TypeError, match="beta_min"):
        VPSDE("a", 20.0)
    with pytest.raises(ValueError, match="beta_max >= beta_min"):
        VPSDE(5.0, 1.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteVP(beta_schedule="sigmoid-ish")
    with pytest.raises(ValueError, match="expected t in"):
        VPSDE().check_t(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="num_steps"):
        VPSDE().time_grid(0)
    with pytest.raises(ValueError, match="kind"):
        VPSDE().time_grid(5, "cosine")
    with pytest.raises(ValueError, match="sub-VP"):
        SubVPSDE().to_scheduler_config()
    with pytest.raises(ValueError, match="cannot map scheduler config"):
        process_from_scheduler_config({"_class_name": "EulerDiscreteScheduler_x", "foo": 1})
    zero_snr = process_from_scheduler_config(DDPMScheduler(rescale_betas_zero_snr=True).config)
    assert zero_snr.zero_terminal_snr and float(zero_snr.alpha(torch.tensor(1.0, dtype=torch.float64))) == 0.0
    with pytest.raises(ValueError, match="prediction_type"):
        VPSDE().to_scheduler_config(prediction_type="energy")
