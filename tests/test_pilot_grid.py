"""The model-adapted grid (score_toolkit.samplers.pilot_grid): the pilot is the converged PF-ODE of the user's score
(checked against the exact law), its cost is what the score saw, the fitted grid beats the uniform log-SNR grid on
held-out draws, and the cache is explicit, keyed by the settings, and never replaces a file it did not write."""

from __future__ import annotations

import json

import pytest
import torch

from score_toolkit.analytic import GaussianMixture, gaussian, ring_mixture
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.pilot_grid import pilot_grid, pilot_samples

FAST = {"iterations": 15, "num_samples": 128, "num_validation": 64, "reference_steps": 60, "tail_retries": 0}


class Counting:
    """A score that counts its batched calls and the sample rows it was evaluated on."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        return self.fn(x, t)


@pytest.mark.parametrize("process", [VPSDE(0.1, 20.0), VESDE(0.01, 50.0)], ids=["VP", "VE"])
def test_pilot_samples_follow_the_exact_law_and_count_every_evaluation(process):
    """A Gaussian's PF-ODE map is exact in the limit: the pilot's mean and covariance match the closed form within
    sampling error, and the reported cost equals what the score saw (batches included)."""
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = gaussian(mean, cov)
    score = Counting(g.score_fn(process))
    x, evals, calls = pilot_samples(score, process, (2,), num_pilot=3000, pilot_steps=60, batch_size=1000)
    assert x.shape == (3000, 2)
    assert (evals, calls) == (score.rows, score.calls) == (3000 * 61, 3 * 61)
    se = (cov.diagonal() / 3000).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se).all()
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05)


def test_pilot_draws_are_seeded_and_independent_of_the_global_generator():
    process = VPSDE(0.1, 20.0)
    g = gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.3)
    a, _, _ = pilot_samples(g.score_fn(process), process, (2,), num_pilot=16, pilot_steps=10)
    torch.manual_seed(123)
    b, _, _ = pilot_samples(g.score_fn(process), process, (2,), num_pilot=16, pilot_steps=10)
    c, _, _ = pilot_samples(g.score_fn(process), process, (2,), num_pilot=16, pilot_steps=10, seed=5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def _held_out_error(sampler, mix, process, n=2000):
    """Mean |x - x_ref| of ``sampler`` against the converged ODE (500 log-SNR steps) on draws no fit has seen."""
    x1 = process.prior_sample((n, mix.dim), generator=torch.Generator().manual_seed(4242), dtype=torch.float64)
    score = mix.score_fn(process)
    ref = get_sampler("dpmpp_3m", num_steps=500, grid="log_sigma", to_zero=True).sample(score, process, x_init=x1.clone())
    out = sampler.sample(score, process, x_init=x1.clone())
    return float((out.samples - ref.samples).norm(dim=1).mean())


@pytest.mark.slow
def test_pilot_grid_beats_the_uniform_log_snr_grid_and_costs_only_the_pilot():
    """On the 2-D ring (narrow modes far out) the grid fitted through the pilot has a smaller held-out error than
    the uniform log-SNR grid of the same budget; the user's score is evaluated only by the pilot."""
    mix, process = ring_mixture(), VPSDE(0.1, 20.0)
    score = Counting(mix.score_fn(process))
    res = pilot_grid(get_sampler("dpmpp_2m", num_steps=9), score, process, (2,), num_pilot=1024, pilot_steps=80,
                     **FAST)
    assert (res.score_evaluations, res.score_calls) == (score.rows, score.calls) == (1024 * 81, 81)
    assert res.times.shape == (10,) and res.times[0] == 1.0 and abs(float(res.times[-1]) - process.t_min) < 1e-12
    assert bool((res.times[1:] < res.times[:-1]).all())
    assert torch.allclose(res.log_snr, process.log_snr(res.times))
    # the stand-in found the ring: every pilot mode is near one of the 8 true means
    d = torch.cdist(res.mixture.means, mix.means).min(dim=1).values
    assert float(d.max()) < 0.5
    ours = _held_out_error(get_sampler("dpmpp_2m", grid=res.times), mix, process)
    uniform = _held_out_error(get_sampler("dpmpp_2m", num_steps=9, grid="log_sigma"), mix, process)
    assert ours < 0.7 * uniform, (ours, uniform)


def test_cache_is_keyed_by_the_settings_and_never_replaces_a_foreign_file(tmp_path):
    mix = GaussianMixture(torch.tensor([[-1.0], [1.0]], dtype=torch.float64),
                          torch.tensor([0.05, 0.05], dtype=torch.float64), None, dtype=torch.float64)
    process = VPSDE(0.1, 20.0)
    sampler = get_sampler("dpmpp_2m", num_steps=5)
    path = tmp_path / "grids" / "model_a.json"
    kw = {"num_pilot": 256, "pilot_steps": 20, "num_components": 2, **FAST}
    first = pilot_grid(sampler, mix.score_fn(process), process, (1,), cache=path, **kw)
    assert path.is_file() and not first.cached and first.score_evaluations == 256 * 21
    score = Counting(mix.score_fn(process))
    again = pilot_grid(sampler, score, process, (1,), cache=path, **kw)
    assert again.cached and score.calls == 0 and again.score_evaluations == 0
    assert torch.allclose(again.times, first.times, rtol=0, atol=1e-12)
    # the cache file is a saved grid: usable as grid=<path> by the sampler it was made for
    out = get_sampler("dpmpp_2m", grid=str(path)).sample(mix.score_fn(process), process, shape=(8, 1))
    assert out.nfe == 6
    # other settings: refused unless overwrite=True
    with pytest.raises(FileExistsError, match="other settings"):
        pilot_grid(sampler, score, process, (1,), cache=path, **{**kw, "seed": 1})
    assert score.calls == 0
    third = pilot_grid(sampler, score, process, (1,), cache=path, overwrite=True, **{**kw, "seed": 1})
    assert not third.cached and json.loads(path.read_text())["info"]["pilot_grid"]["seed"] == 1
    # a file pilot_grid did not write is left alone, even with overwrite=True
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a pilot-grid cache file"):
        pilot_grid(sampler, score, process, (1,), cache=foreign, overwrite=True, **kw)
    assert foreign.read_text() == '{"hello": 1}'
    with pytest.raises(ValueError, match="ending in .json"):
        pilot_grid(sampler, score, process, (1,), cache=tmp_path / "grid.txt", **kw)


def test_bad_input_is_refused_at_the_boundary():
    mix = gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    process = VPSDE(0.1, 20.0)
    score = mix.score_fn(process)
    ok = get_sampler("dpmpp_2m", num_steps=5)
    with pytest.raises(TypeError, match="deterministic fixed-grid sampler"):
        pilot_grid(get_sampler("dpmpp_2m_sde", num_steps=5), score, process, (2,))
    with pytest.raises(TypeError, match="deterministic fixed-grid sampler"):
        pilot_grid(get_sampler("pf_ode"), score, process, (2,))
    with pytest.raises(TypeError, match="Process"):
        pilot_grid(ok, score, "VP", (2,))
    with pytest.raises(TypeError, match="callable"):
        pilot_grid(ok, None, process, (2,))
    with pytest.raises(ValueError, match="shape"):
        pilot_grid(ok, score, process, (0,))
    with pytest.raises(TypeError, match="set by pilot_grid"):
        pilot_grid(ok, score, process, (2,), mixture=mix)
    with pytest.raises(ValueError, match="covariance"):
        pilot_grid(ok, score, process, (2,), covariance="spherical")
    with pytest.raises(ValueError, match="num_pilot"):
        pilot_grid(ok, score, process, (2,), num_pilot=1)
    with pytest.raises(ValueError, match="pilot_steps"):
        pilot_samples(score, process, (2,), pilot_steps=1.5)
