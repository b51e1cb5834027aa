"""The importance-corrected probability flow (``importance_ode``, score_toolkit/samplers/importance_ode.py): its
log-density along the flow against closed forms, the differentiable DPS / PiGDM scores it needs (double backward),
its cost accounting and its errors. The accuracy check on the exact posterior with DPS, PiGDM and replacement (and the
control without the correction) is in tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch
from helpers import projection_problem

from score_toolkit.conditioning import DPS, MatrixOperator, PiGDM, Replacement
from score_toolkit.likelihood import log_likelihood
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.importance_ode import flow_with_density
from score_toolkit.testing import conformance_processes

D64 = torch.float64


def _problem(cls=None, **kw):
    mix, a, y, sy, post = projection_problem()
    proc = conformance_processes()["vp"]
    fn = mix.score_fn(proc) if cls is None else cls(mix.score_fn(proc), proc, MatrixOperator(a), y, sy, **kw)
    return mix, proc, fn, post


@pytest.mark.parametrize(("method", "kw", "tol"), [("dopri5_per_sample", {}, 0.02),
                                                   ("rk4", {"num_steps": 60, "grid": "log_sigma"}, 0.05)])
def test_the_flow_density_is_the_exact_marginal_for_the_exact_score(method, kw, tol):
    """The exact score's flow carries p_1 to p_{t_min}: its integrated log-density is the mixture's exact one."""
    mix, proc, fn, _ = _problem()
    x1 = proc.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=D64)
    x0, delta = flow_with_density(fn, proc, x1, method=method, **kw)
    log_q = proc.prior_log_prob(x1) + delta
    exact = mix.log_prob(x0, torch.full((64,), proc.t_min, dtype=D64), proc)
    assert (log_q - exact).abs().max() < tol


@pytest.mark.parametrize("cls", [DPS, PiGDM, Replacement])
def test_the_conditional_flow_density_agrees_with_the_likelihood_solved_back(cls):
    """Forward (prior -> data, this module) and backward (data -> prior, log_likelihood) give one log-density."""
    _, proc, fn, _ = _problem(cls)
    x1 = proc.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=D64)
    x0, delta = flow_with_density(fn, proc, x1)
    back = log_likelihood(fn, proc, x0).log_prob
    torch.testing.assert_close(proc.prior_log_prob(x1) + delta, back, atol=0.01, rtol=0)


@pytest.mark.parametrize("cls", [DPS, PiGDM])
def test_gradient_transforms_are_differentiable_when_asked(cls):
    """With an input that carries a graph, DPS's and PiGDM's scores keep theirs (create_graph): the autograd
    divergence matches central differences of the score; without one they return detached tensors as before."""
    _, proc, fn, _ = _problem(cls)
    x = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(2))
    for tt in (0.05, 0.5):
        t = torch.full((5,), tt, dtype=D64)
        xg = x.clone().requires_grad_(True)
        s = fn(xg, t)
        div = sum(torch.autograd.grad(s[:, i].sum(), xg, retain_graph=True)[0][:, i] for i in range(2))
        h, fd = 1e-5, 0.0
        for i in range(2):
            e = torch.zeros(2, dtype=D64)
            e[i] = h
            fd = fd + (fn(x + e, t)[:, i] - fn(x - e, t)[:, i]) / (2 * h)
        torch.testing.assert_close(div, fd, atol=1e-4 * (1 + fd.abs().max().item()), rtol=1e-6)
        torch.testing.assert_close(s.detach(), fn(x, t))
    assert not fn(x, torch.full((5,), 0.5, dtype=D64)).requires_grad


def test_cost_and_statistics_are_reported():
    _, proc, fn, _ = _problem(PiGDM)
    calls = []

    class Counting:  # the transform, counting the calls of its prior score
        def __init__(self, inner):
            self.inner, self.score_fn = inner, self._prior
            self.limit_log_likelihood = inner.limit_log_likelihood

        def _prior(self, x, t):
            calls.append(("prior", x.shape[0]))
            return inner_prior(x, t)

        def __call__(self, x, t):
            calls.append(("conditional", x.shape[0]))
            return self.inner(x, t)

    inner_prior = fn.score_fn
    sampler = get_sampler("importance_ode", num_particles=4, method="rk4", num_steps=5)
    out = sampler.sample(Counting(fn), proc, shape=(3, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    info = out.info
    assert out.nfe == len(calls) == sampler.nfe == info["transport_nfe"] + info["density_nfe"]
    assert info["defensive_particles"] == 2 and info["num_particles"] == 4
    assert info["evaluations_per_sample"] == sum(rows for _, rows in calls) / 3
    assert info["vjps_per_sample"] == 2 * info["evaluations_per_sample"]  # exact divergence in 2-D
    assert 1 <= info["min_final_ess"] <= info["final_ess"] <= 4


def test_unconditional_weights_are_nearly_equal():
    """With nothing observed the target is the score's own law, so p / q is 1 up to the solver's error."""
    _, proc, fn, _ = _problem()
    out = get_sampler("importance_ode", num_particles=8, likelihood="none", prior_density="energy").sample(
        fn, proc, shape=(20, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert out.info["min_final_ess"] > 7.9


def test_bad_input_and_options():
    _, proc, fn, _ = _problem()
    with pytest.raises(ValueError, match="likelihood='none'"):
        get_sampler("importance_ode").sample(fn, proc, shape=(2, 2), dtype=D64)
    for bad in ({"num_particles": 1}, {"defensive": 1.0}, {"num_steps": 10}, {"method": "euler"},
                {"method": "euler", "num_steps": 5, "rtol": 1e-3}, {"num_probes": 2}, {"prior_density": "exact"},
                {"likelihood": "dps"}):
        with pytest.raises(ValueError):
            get_sampler("importance_ode", **bad)
    _, proc, pigdm, _ = _problem(PiGDM)
    pigdm.score_fn = lambda x, t: fn(x, t)  # a prior score without an energy
    with pytest.raises(ValueError, match="prior_density='ode'"):
        get_sampler("importance_ode", prior_density="energy", method="euler", num_steps=2).sample(
            pigdm, proc, shape=(2, 2), dtype=D64)


def test_benchmark_script_writes_its_tables(tmp_path):
    """benchmarks/bench_importance_ode.py on tiny settings: one row per planned run, a markdown table, the merge."""
    import json
    import math
    import sys

    from helpers import load_benchmark

    bench = load_benchmark("bench_importance_ode")
    try:
        assert bench.main(["--cases", "conformance", "--sigma-y", "0.5", "--n", "30", "--particles", "2",
                           "--k-plain", "2", "--methods", "replacement", "--floor-seeds", "2", "--tol", "1e-3",
                           "--tag", "t", "--out", str(tmp_path)]) == 0
        rows = json.loads((tmp_path / "t.json").read_text())["rows"]
        # the exact score with pf_ode, then replacement with pf_ode, K = 2 with and without the defensive share
        assert [(r["method"], r["sampler"], r["defensive"]) for r in rows] == [
            ("exact", "pf_ode", None), ("replacement", "pf_ode", None), ("replacement", "importance_ode", 0.5),
            ("replacement", "importance_ode", 0.0)]
        assert all("error" not in r and math.isfinite(r["wsw_ratio"]) for r in rows)
        assert rows[2]["evaluations_per_sample"] > rows[1]["evaluations_per_sample"]
        assert bench.main(["--merge", "t", "--tag", "merged", "--out", str(tmp_path)]) == 0
        text = (tmp_path / "merged.md").read_text()
        assert "## conformance, sigma_y = 0.5 (N = 30, Pearson limit 18.4)" in text and text.count("| importance_ode |") == 2
    finally:
        sys.modules.pop("bench_importance_ode", None)


def test_hutchinson_points_are_per_sample():
    """With Hutchinson probes and the defensive share, a sample depends only on its own generator (its points, probes
    and resampling draw), not on its batch; the cost counts num_probes products per evaluation."""
    from score_toolkit._utils import per_sample_generators

    _, proc, fn, _ = _problem(PiGDM)
    sampler = get_sampler("importance_ode", num_particles=4, divergence="hutchinson", num_probes=3, rtol=1e-3,
                          atol=1e-3)
    five = sampler.sample(fn, proc, shape=(5, 2), dtype=D64, generator=per_sample_generators(3, range(5)))
    three = sampler.sample(fn, proc, shape=(3, 2), dtype=D64, generator=per_sample_generators(3, range(3)))
    torch.testing.assert_close(five.samples[:3], three.samples, rtol=1e-9, atol=1e-9)
    assert five.info["vjps_per_sample"] == 3 * five.info["evaluations_per_sample"]
