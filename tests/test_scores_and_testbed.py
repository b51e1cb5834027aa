"""Score adapters and the analytic test bed, checked against autograd, finite differences and sampling."""

import math

import pytest
import torch

from score_toolkit import (
    VESDE,
    VPSDE,
    DiscreteVP,
    GaussianMixture,
    ScoreAdapter,
    SubVPSDE,
    anisotropic_mixture,
    gaussian,
    ring_mixture,
)
from score_toolkit.metrics import (
    energy_distance,
    mean_nll,
    mmd,
    mode_weight_error,
    noise_floor,
    sliced_wasserstein,
    within_mode_sliced_wasserstein,
)
from score_toolkit.scores import PREDICTION_TYPES, denoiser_from_score, epsilon_from_score

PROCESSES = [VESDE(0.01, 50.0), VPSDE(), SubVPSDE(), DiscreteVP()]
PIDS = ["ve", "vp", "subvp", "ddpm"]


def _mixtures():
    full2 = GaussianMixture(
        torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.5, -0.5]]),
        torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]], [[0.1, 0.0], [0.0, 0.6]]]),
        torch.tensor([0.2, 0.5, 0.3]),
    )
    return {"ring": ring_mixture(), "aniso16": anisotropic_mixture(), "full2": full2}


def _batch(mix, p, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, generator=g)
    t = p.t_min + (1 - p.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    return p.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64)), t


@pytest.mark.parametrize("name", ["ring", "aniso16", "full2"])
@pytest.mark.parametrize("p", PROCESSES, ids=PIDS)
def test_exact_score_is_grad_log_density(name, p):
    mix = _mixtures()[name]
    x, t = _batch(mix, p)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mix.log_prob(xg, t, p).sum(), xg)
    s = mix.score(x, t, p)
    assert torch.allclose(s, g, rtol=1e-10, atol=1e-10)
    # and central finite differences of the log-density, coordinate by coordinate
    h = 1e-5
    fd = torch.zeros_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        fd[:, j] = (mix.log_prob(x + e, t, p) - mix.log_prob(x - e, t, p)) / (2 * h)
    assert torch.allclose(s, fd, rtol=1e-5, atol=1e-5 * s.abs().max().item())


def test_log_density_against_torch_distributions():
    mix = _mixtures()["full2"]
    p = VPSDE()
    t = torch.full((50,), 0.3, dtype=torch.float64)
    x, _ = _batch(mix, p, n=50)
    a, s = p.marginal(torch.tensor(0.3, dtype=torch.float64))
    comps = torch.distributions.MultivariateNormal(a * mix.means, a**2 * mix.covariances + s**2 * torch.eye(2, dtype=torch.float64))
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(mix.weights), comps).log_prob(x)
    assert torch.allclose(mix.log_prob(x, t, p), ref, rtol=1e-10)
    # the clean density too, and `perturbed` agrees with the per-sample formula
    assert torch.allclose(mix.perturbed(float(a), float(s)).log_prob(x), ref, rtol=1e-10)


def test_exact_sampling_moments():
    mix = _mixtures()["full2"]
    x, labels = mix.sample(40000, generator=torch.Generator().manual_seed(0), return_labels=True)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    second = sum(mix.weights[k] * (mix.covariances[k] + torch.outer(mix.means[k], mix.means[k])) for k in range(3))
    cov = second - torch.outer(mean, mean)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05)
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    assert torch.allclose(freq, mix.weights, atol=0.01)


@pytest.mark.parametrize("p", PROCESSES, ids=PIDS)
def test_denoiser_is_posterior_mean(p):
    """Tweedie's denoiser equals E[x0 | x_t] computed directly from the Gaussian posterior of each
    component (a one-component mixture: exact linear regression formula)."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    g = gaussian(mean, cov)
    t = torch.full((8,), 0.4, dtype=torch.float64)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, s = p.marginal(torch.tensor(0.4, dtype=torch.float64))
    # E[x0 | xt] = mu + a C (a^2 C + s^2 I)^{-1} (xt - a mu)
    k = a * cov @ torch.linalg.inv(a**2 * cov + s**2 * torch.eye(2, dtype=torch.float64))
    ref = mean + (x - a * mean) @ k.T
    assert torch.allclose(g.denoiser(x, t, p), ref, rtol=1e-10)


@pytest.mark.parametrize("p", PROCESSES, ids=PIDS)
@pytest.mark.parametrize("time_input", ["t", "sigma"])
def test_all_prediction_types_give_the_same_score(p, time_input):
    mix = _mixtures()["full2"]
    x, t = _batch(mix, p, n=32)
    exact = mix.score(x, t, p)
    for pt in PREDICTION_TYPES:
        adapter = ScoreAdapter(mix.as_network(p, pt, time_input), p, pt, time_input)
        s = adapter(x, t)
        assert torch.allclose(s, exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item()), pt
        # derived views
        a, sig = p.marginal(t)
        assert torch.allclose(adapter.denoiser(x, t), mix.denoiser(x, t, p), rtol=1e-6, atol=1e-6)
        assert torch.allclose(adapter.epsilon(x, t), -sig[:, None] * exact, rtol=1e-6, atol=1e-6)


def test_any_rank_and_index_time_input():
    """Images (B, C, H, W) go through the adapter; the 'index' time input feeds t * (N - 1)
    (t * N - 1 for the discrete table)."""
    mix = anisotropic_mixture(dim=16)
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x, time):
            seen["time"] = time
            flat = x.reshape(x.shape[0], -1)
            t = (time + 1) / 1000 if isinstance(p, DiscreteVP) else time / 999
            a, s = p.marginal(t)
            return (-s[:, None] * mix.score(flat, t, p)).reshape(x.shape)

    for p in (VPSDE(), DiscreteVP()):
        x, t = _batch(mix, p, n=6)
        img = x.reshape(6, 1, 4, 4)
        adapter = ScoreAdapter(Net(), p, "epsilon", "index")
        s = adapter(img, t)
        assert s.shape == img.shape
        assert torch.allclose(s.reshape(6, -1), mix.score(x, t, p), rtol=1e-8)
        expected = t * 1000 - 1 if isinstance(p, DiscreteVP) else t * 999
        assert torch.allclose(seen["time"], expected)
    # a user-given time map
    adapter = ScoreAdapter(mix.as_network(VESDE(), "score", "sigma"), VESDE(), "score", lambda t: VESDE().sigma(t))
    x, t = _batch(mix, VESDE(), n=4)
    assert torch.allclose(adapter(x, t), mix.score(x, t, VESDE()), rtol=1e-6)


def test_views_of_plain_score_functions():
    p = VPSDE()
    mix = _mixtures()["full2"]
    x, t = _batch(mix, p, n=10)
    f = mix.score_fn(p)
    assert torch.allclose(denoiser_from_score(f, p)(x, t), mix.denoiser(x, t, p), rtol=1e-10)
    assert torch.allclose(epsilon_from_score(f, p)(x, t), -p.sigma(t)[:, None] * mix.score(x, t, p), rtol=1e-10)


def test_energy_adapter_keeps_graph_for_training():
    p = VESDE()
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    class Energy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, time):
            return self.net(x).squeeze(1) * time

    adapter = ScoreAdapter(Energy(), p, "energy", "sigma")
    x = torch.randn(5, 2)
    t = torch.full((5,), 0.5)
    s = adapter(x, t)
    loss = s.pow(2).sum()
    loss.backward()  # the score is differentiable w.r.t. the parameters (create_graph)
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        s2 = adapter(x, t)  # works under no_grad too (sampling)
    assert torch.allclose(s.detach(), s2)


def test_adapter_bad_input():
    p = VPSDE()
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        ScoreAdapter(lambda x, t: x, p, "noise")
    with pytest.raises(ValueError, match="time_input"):
        ScoreAdapter(lambda x, t: x, p, "epsilon", "timestep")
    with pytest.raises(TypeError, match="Process"):
        ScoreAdapter(lambda x, t: x, "vp")
    adapter = ScoreAdapter(lambda x, t: net(x), p, "epsilon")
    with pytest.raises(TypeError, match="floating-point"):
        adapter(torch.ones(3, 2, dtype=torch.long), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="expected t in"):
        adapter(torch.ones(3, 2), torch.tensor([0.5, 0.5, 1.5]))
    with pytest.raises(ValueError, match="shape"):
        adapter(torch.ones(3, 2), torch.full((4,), 0.5))
    bad = ScoreAdapter(lambda x, t: x[:, :1], p, "epsilon")
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*found shape \(3, 1\)"):
        bad(torch.ones(3, 2), 0.5)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="positive weights"):
        GaussianMixture(torch.zeros(2, 2), None, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="features"):
        ring_mixture().score(torch.ones(3, 5), 0.5, p)


def test_metrics_detect_differences_and_floor():
    mix = ring_mixture()
    n = 1500
    ref = mix.sample(n, generator=torch.Generator().manual_seed(7))
    good = mix.sample(n, generator=torch.Generator().manual_seed(8))
    wide = mix.perturbed(1.0, 0.3).sample(n, generator=torch.Generator().manual_seed(9))
    lopsided = GaussianMixture(mix.means, mix.covariances, torch.arange(1.0, 9.0)).sample(n, generator=torch.Generator().manual_seed(10))
    floor = noise_floor(mix, n)
    assert sliced_wasserstein(good, ref) < 1.6 * floor
    assert sliced_wasserstein(lopsided, ref) > 2 * floor
    assert within_mode_sliced_wasserstein(wide, mix) > 3 * within_mode_sliced_wasserstein(good, mix)
    assert mode_weight_error(lopsided, mix) > 5 * mode_weight_error(good, mix)
    assert energy_distance(wide, ref) > 3 * energy_distance(good, ref)
    assert mmd(wide, ref) > 3 * mmd(good, ref)
    # NLL of exact samples is the entropy: H of an isotropic Gaussian (well-separated modes) plus log 8
    h = 0.5 * 2 * math.log(2 * math.pi * math.e * 0.04) + math.log(8)
    assert abs(mean_nll(good, mix) - h) < 0.1
    # identical sets: distance zero
    assert sliced_wasserstein(ref, ref) == 0.0
    with pytest.raises(ValueError, match="same number of features"):
        sliced_wasserstein(ref, torch.zeros(5, 3, dtype=torch.float64))
