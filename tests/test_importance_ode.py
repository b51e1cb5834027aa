"""The importance-corrected probability flow (``importance_ode``, score_toolkit/samplers/importance_ode.py): its
log-density along the flow against closed forms, the differentiable DPS / PiGDM scores it needs (double backward),
its cost accounting and its errors. The accuracy check on the exact posterior with DPS, PiGDM and replacement (and the
control without the correction) is in tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch
from helpers import projection_problem

from score_toolkit.conditioning import DPS, MatrixOperator, ObservationLikelihood, PiGDM, Replacement
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


@pytest.mark.parametrize("process_key", ["vp", "ve"])
@pytest.mark.parametrize(("method", "kw", "tol"), [("dopri5_per_sample", {}, 1e-3),
                                                   ("rk4", {"num_steps": 60, "grid": "log_sigma"}, 0.05)])
def test_the_flow_density_is_the_exact_marginal_for_the_exact_score(method, kw, tol, process_key):
    """The exact score's flow carries p_{t_max} to p_{t_min}: started from the mixture's exact log-density at t_max,
    its integrated log-density is the exact one at t_min up to the solver's error. Started from the process's prior
    p_1 (as the sampler does), it is off by p_1's mismatch with the mixture's marginal at t_max, the floor of
    log q (VP: below 0.01 nats, VE: below 0.035 on these points)."""
    mix, _, _, _, _ = projection_problem()
    proc = conformance_processes()[process_key]
    fn = mix.score_fn(proc)
    x1 = proc.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=D64)
    x0, delta = flow_with_density(fn, proc, x1, method=method, **kw)
    exact = mix.log_prob(x0, torch.full((64,), proc.t_min, dtype=D64), proc)
    start = mix.log_prob(x1, torch.full((64,), proc.t_max, dtype=D64), proc)
    assert (start + delta - exact).abs().max() < tol
    mismatch = (proc.prior_log_prob(x1) - start).abs().max()
    assert mismatch < {"vp": 0.01, "ve": 0.035}[process_key]
    assert (proc.prior_log_prob(x1) + delta - exact).abs().max() < mismatch + tol


@pytest.mark.parametrize(("cls", "tol"), [(DPS, 1e-5), (PiGDM, 1e-5), (Replacement, 1e-5),
                                         (ObservationLikelihood, 1e-7)])
def test_the_conditional_flow_density_agrees_with_the_likelihood_solved_back(cls, tol):
    """Forward (prior -> data, this module) and backward (data -> prior, log_likelihood) give one log-density.
    ObservationLikelihood's flow is stiffer: at the default 1e-5 the two differ by up to 0.08 nats, at 1e-7 by 2e-4
    (solver error, shrinking with the tolerance)."""
    _, proc, fn, _ = _problem(cls)
    x1 = proc.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=D64)
    x0, delta = flow_with_density(fn, proc, x1, rtol=tol, atol=tol)
    back = log_likelihood(fn, proc, x0, rtol=tol, atol=tol).log_prob
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


class _Counting:
    """A transform whose prior score and own score count their calls, the rows evaluated and the vector-Jacobian
    products actually taken through their outputs (a gradient hook fires once per backward pass through them)."""

    def __init__(self, inner):
        self.inner, self.score_fn = inner, _CountingPrior(self)
        self.limit_log_likelihood = inner.limit_log_likelihood
        self.calls, self.vjps = [], 0

    def _count(self, which, out):
        self.calls.append((which, out.shape[0]))
        if out.requires_grad:
            out.register_hook(self._hook)
        return out

    def _hook(self, grad):
        self.vjps += grad.shape[0]

    def __call__(self, x, t):
        return self._count("conditional", self.inner(x, t))


class _CountingPrior:
    """The prior score of :class:`_Counting` (its energy, if any, counted apart)."""

    def __init__(self, owner):
        self.owner, self.energy_rows, self.energy_calls = owner, 0, 0

    def __call__(self, x, t):
        return self.owner._count("prior", self.owner.inner.score_fn(x, t))

    def energy(self, x, t):
        self.energy_rows += x.shape[0]
        self.energy_calls += 1
        return self.owner.inner.score_fn.energy(x, t)


@pytest.mark.parametrize(("options", "per_eval"), [({"method": "rk4", "num_steps": 5}, 2),
                                                   ({"method": "rk4", "num_steps": 5, "batch_size": 3}, 2),
                                                   ({"method": "euler", "num_steps": 4, "prior_density": "energy"}, 2),
                                                   ({"rtol": 1e-3, "atol": 1e-3, "divergence": "hutchinson",
                                                     "num_probes": 3}, 3)])
def test_cost_and_statistics_are_reported(options, per_eval):
    """nfe, evaluations and vector-Jacobian products against the calls, rows and backward passes counted outside."""
    _, proc, fn, _ = _problem(PiGDM)
    counting = _Counting(fn)
    sampler = get_sampler("importance_ode", num_particles=4, **options)
    out = sampler.sample(counting, proc, shape=(3, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    info, calls = out.info, counting.calls
    energy_calls = 2 if options.get("prior_density") == "energy" else 0  # one at each flow's points, not counted here
    assert out.nfe == len(calls) + energy_calls == info["transport_nfe"] + info["density_nfe"]
    assert sampler.nfe in (None, out.nfe)
    assert info["defensive_particles"] == 2 and info["num_particles"] == 4
    rows = sum(r for _, r in calls)
    assert counting.score_fn.energy_rows == (3 * 4 if energy_calls else 0)
    assert info["evaluations_per_sample"] == (rows + counting.score_fn.energy_rows) / 3
    # every score evaluation with its divergence: d products (exact, 2-D) or num_probes (Hutchinson)
    assert counting.vjps == per_eval * rows
    assert info["vjps_per_sample"] == counting.vjps / 3
    assert 1 <= info["min_final_ess"] <= info["final_ess"] <= 4


def test_unconditional_weights_are_nearly_equal():
    """With nothing observed the target is the score's own law, so p / q is 1 up to the solver's error."""
    _, proc, fn, _ = _problem()
    out = get_sampler("importance_ode", num_particles=8, likelihood="none", prior_density="energy").sample(
        fn, proc, shape=(20, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert out.info["min_final_ess"] > 7.9


def test_bad_input_and_options():
    _, proc, fn, _ = _problem()
    with pytest.raises(ValueError, match="without score_fn .* and limit_log_likelihood.*likelihood='none'"):
        get_sampler("importance_ode").sample(fn, proc, shape=(2, 2), dtype=D64)
    for bad, message in (({"num_particles": 1}, "num_particles to be an int >= 2.*found 1"),
                         ({"defensive": 1.0}, r"defensive to be a number in \[0, 1\), found 1.0"),
                         ({"num_steps": 10}, "num_steps apply to the fixed-grid methods"),
                         ({"method": "euler"}, "'euler' needs option num_steps"),
                         ({"method": "euler", "num_steps": 5, "rtol": 1e-3}, "rtol only apply to adaptive methods"),
                         ({"num_probes": 2}, "num_probes applies to divergence='hutchinson'"),
                         ({"prior_density": "exact"}, "prior_density.*'exact'"),
                         ({"likelihood": "dps"}, "likelihood.*'dps'"),
                         ({"batch_size": 0}, r"batch_size \(points per solve\) to be an int >= 1 or None .*found 0"),
                         ({"batch_size": -4}, "batch_size .*found -4"),
                         ({"batch_size": 2.0}, "batch_size .*found 2.0"),
                         ({"batch_size": True}, "batch_size .*found True")):
        with pytest.raises(ValueError, match=message):
            get_sampler("importance_ode", **bad)
    # a prior score without an energy: refused before any solve (nothing evaluated)
    _, proc, pigdm, _ = _problem(PiGDM)
    pigdm.score_fn = lambda x, t: fn(x, t)  # a prior score without an energy
    counting = _Counting(pigdm)
    counting.score_fn = counting.__call__
    with pytest.raises(ValueError, match="prior_density='energy' needs a prior score with an energy.*found .* "
                                         "without one; use prior_density='ode'"):
        get_sampler("importance_ode", prior_density="energy").sample(counting, proc, shape=(2, 2), dtype=D64)
    assert counting.calls == []
    with pytest.raises(ValueError, match="expected a CPU or CUDA device .*float64.*found mps"):
        get_sampler("importance_ode")._parts(None, torch.device("mps"))


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


@pytest.mark.parametrize("options", [{"divergence": "hutchinson", "num_probes": 3},
                                     {"prior_density": "energy"}])
def test_samples_are_per_sample_on_the_defensive_path(options):
    """With the defensive share (Hutchinson probes, or an energy whose constant is estimated per group), a sample
    depends only on its own generator (its points, probes and resampling draw), not on its batch."""
    from score_toolkit._utils import per_sample_generators

    _, proc, fn, _ = _problem(PiGDM)
    sampler = get_sampler("importance_ode", num_particles=4, rtol=1e-3, atol=1e-3, **options)
    five = sampler.sample(fn, proc, shape=(5, 2), dtype=D64, generator=per_sample_generators(3, range(5)))
    three = sampler.sample(fn, proc, shape=(3, 2), dtype=D64, generator=per_sample_generators(3, range(3)))
    torch.testing.assert_close(five.samples[:3], three.samples, rtol=1e-9, atol=1e-9)
    assert five.info["defensive_particles"] == 2


@pytest.mark.parametrize("defensive", [0.5, 0.0])
def test_x_init_is_point_0_of_every_group(monkeypatch, defensive):
    """x_init starts point 0 of each group: in the prior flow's slice with the defensive share, else the conditional's."""
    import score_toolkit.samplers.importance_ode as module

    _, proc, fn, _ = _problem(Replacement)
    pushed = []

    def spy(score_fn, process, x1, **kw):
        pushed.append((score_fn.fn, x1.clone()))
        return flow_with_density(score_fn, process, x1, **kw)

    monkeypatch.setattr(module, "flow_with_density", spy)
    x_init = torch.tensor([[5.0, -5.0], [7.0, 3.0], [-6.0, 1.0]], dtype=D64)
    get_sampler("importance_ode", num_particles=4, defensive=defensive, method="euler", num_steps=2).sample(
        fn, proc, x_init=x_init, generator=torch.Generator().manual_seed(0))
    first = pushed[-1] if defensive else pushed[0]  # the conditional flow is pushed first
    assert first[0] is (fn.score_fn if defensive else fn)
    per_group = 2 if defensive else 4
    torch.testing.assert_close(first[1][::per_group], x_init, rtol=0, atol=0)
    others = torch.cat([x1 for _, x1 in pushed]).reshape(-1, 2)
    assert sum(bool((row == x_init).all(1).any()) for row in others) == 3  # only point 0 is x_init


def test_hutchinson_flow_density_of_a_transform_uses_its_probes():
    """Through a transform (DPS: a double backward), in 2-D: the Rademacher probes (1, 1) and (1, -1) give
    v^T J v = tr J +- (J_12 + J_21), so their mean is the exact divergence at every step (the same log-density as
    divergence="exact"), while the probe (1, 1) alone differs from it."""
    _, proc, fn, _ = _problem(DPS)
    x1 = proc.prior_sample((8, 2), generator=torch.Generator().manual_seed(3), dtype=D64)
    pair = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=D64)[:, None].expand(2, 8, 2)
    x_e, delta_e = flow_with_density(fn, proc, x1, rtol=1e-6, atol=1e-6)
    x_h, delta_h = flow_with_density(fn, proc, x1, divergence="hutchinson", probes=pair, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_h, x_e, rtol=0, atol=1e-4)  # the trajectory does not depend on the probes
    torch.testing.assert_close(delta_h, delta_e, rtol=0, atol=1e-4)
    _, delta_one = flow_with_density(fn, proc, x1, divergence="hutchinson", probes=pair[:1], rtol=1e-6, atol=1e-6)
    assert (delta_one - delta_e).abs().max() > 0.01


def test_the_docs_example_runs():
    """The code block of docs/conditioning.md's importance_ode section runs as written."""
    from pathlib import Path

    from test_readme import markdown_blocks

    page = Path(__file__).resolve().parents[1] / "docs" / "conditioning.md"
    blocks = [b for b in markdown_blocks(page) if b.language == "python"
              and any("(`importance_ode`)" in h for h in b.headings)]
    assert len(blocks) == 1
    scope: dict = {}
    exec(compile(blocks[0].text, f"{page}:{blocks[0].line}", "exec"), scope)
    out = scope["out"]
    assert out.samples.shape == (20, 2) and 1 <= out.info["final_ess"] <= 16


def test_info_reports_the_effective_solver_settings():
    _, proc, fn, _ = _problem(Replacement)
    out = get_sampler("importance_ode", num_particles=2, divergence="hutchinson").sample(
        fn, proc, shape=(2, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert (out.info["rtol"], out.info["atol"], out.info["max_num_steps"], out.info["num_probes"]) == (
        1e-5, 1e-5, 10_000, 4)
    out = get_sampler("importance_ode", num_particles=2, method="euler", num_steps=3).sample(
        fn, proc, shape=(2, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert (out.info["rtol"], out.info["num_steps"], out.info["num_probes"]) == (None, 3, None)


def test_a_transform_with_likelihood_none_is_refused():
    """likelihood='none' would weight a transform's flow to its own law, ignoring the observation: refused."""
    _, proc, fn, _ = _problem(DPS)
    counting = _Counting(fn)
    with pytest.raises(ValueError, match="likelihood='none' expects a plain score function, found the conditional "
                                         "transform .* use likelihood='transform'"):
        get_sampler("importance_ode", likelihood="none").sample(counting, proc, shape=(2, 2), dtype=D64)
    assert counting.calls == []


def test_zero_likelihood_weights_are_allowed():
    """An observation likelihood of 0 (log -inf) at some points is a legitimate zero weight, not a failure: those
    points are never returned (only a group without any finite weight is an error)."""
    _, proc, fn, _ = _problem(Replacement)

    class HalfPlane(_Counting):  # the transform, with the constraint x_0 >= 0 added to its observation
        def __init__(self, inner):
            super().__init__(inner)
            self.limit_log_likelihood = lambda x, t: inner.limit_log_likelihood(x, t).masked_fill(x[:, 0] < 0,
                                                                                                  float("-inf"))

    out = get_sampler("importance_ode", num_particles=16, method="euler", num_steps=8).sample(
        HalfPlane(fn), proc, shape=(30, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert (out.samples[:, 0] >= 0).all() and out.info["min_final_ess"] < 16


# batch sizes below a group's share of 3 points per flow, of one group, of one group and a part, of two groups
@pytest.mark.parametrize(("options", "generators", "sizes"), [
    ({"method": "euler", "num_steps": 3}, "one", (1, 2, 4, 7)),
    ({"rtol": 1e-3, "atol": 1e-3, "divergence": "hutchinson", "num_probes": 2}, "one", (2, 7)),
    ({"rtol": 1e-3, "atol": 1e-3, "divergence": "hutchinson", "num_probes": 2}, "per_sample", (2, 7)),
    ({"method": "euler", "num_steps": 3, "prior_density": "energy"}, "per_sample", (1, 4)),
    ({"method": "euler", "num_steps": 3, "prior_density": "ode", "defensive": 0.0}, "one", (4, 7))])
def test_batch_size_bounds_the_points_per_call_and_keeps_the_result(options, generators, sizes):
    """batch_size splits the solves into chunks of whole output samples (a group larger than batch_size: into pieces of
    it), every random draw made before the solves: the samples are those of the unchunked run with the same
    generator(s) (to float noise; bit-for-bit here), the reported costs per sample are the same, every score call
    evaluates at most batch_size points (the unchunked run's largest call evaluates more), and ``nfe`` counts the
    batched calls actually made (more of them, smaller)."""
    from score_toolkit._utils import per_sample_generators

    _, proc, fn, _ = _problem(PiGDM)

    def run(batch_size):
        gen = torch.Generator().manual_seed(0) if generators == "one" else per_sample_generators(3, range(5))
        counting = _Counting(fn)
        out = get_sampler("importance_ode", num_particles=6, batch_size=batch_size, **options).sample(
            counting, proc, shape=(5, 2), dtype=D64, generator=gen)
        assert out.nfe == len(counting.calls) + counting.score_fn.energy_calls == (out.info["transport_nfe"]
                                                                                   + out.info["density_nfe"])
        return out, max(r for _, r in counting.calls), counting.vjps

    ref, ref_rows, ref_vjps = run(None)
    assert ref_rows > 2
    for batch_size in sizes:
        out, rows, vjps = run(batch_size)
        assert rows <= batch_size and out.info["batch_size"] == batch_size
        torch.testing.assert_close(out.samples, ref.samples, rtol=0, atol=1e-12)
        assert out.info["evaluations_per_sample"] == ref.info["evaluations_per_sample"]
        assert out.info["vjps_per_sample"] == ref.info["vjps_per_sample"] == vjps / 5 == ref_vjps / 5
        assert out.info["final_ess"] == pytest.approx(ref.info["final_ess"], rel=1e-12)
        assert out.info["solves"] > ref.info["solves"] and out.nfe > ref.nfe


def test_batch_size_through_the_pipeline_on_an_image_unet(monkeypatch):
    """ScorePipeline, a tiny image UNet (rank 4, with attention in its middle block), a mask and PiGDM (the pipeline's
    default inverse method: the divergence is a double backward through the network): with ``batch_size`` no score
    call sees more than that many points, with ``network_batch_size`` the network sees exactly that many rows, and
    with both the samples equal the unchunked run's bit for bit (the network's batch size fixed)."""
    from diffusers import DDPMScheduler
    from helpers import tiny_unet

    from score_toolkit import pipeline as pipeline_module
    from score_toolkit.pipeline import ScorePipeline

    pipe = ScorePipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100, beta_end=0.2))
    network_rows, score_rows = [], []
    pipe.unet.register_forward_pre_hook(lambda module, args: network_rows.append(args[0].shape[0]))
    fixed_call = pipeline_module._FixedBatchNetwork.__call__

    def counted(self, x, t, **kw):  # the rows one score call hands to the network (before its fixed-size chunks)
        score_rows.append(x.shape[0])
        return fixed_call(self, x, t, **kw)

    monkeypatch.setattr(pipeline_module._FixedBatchNetwork, "__call__", counted)
    mask = torch.zeros(1, 8, 8)
    mask[..., :4] = 1
    image = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    options = {"num_particles": 4, "method": "euler", "num_steps": 2, "divergence": "hutchinson", "num_probes": 1}

    def run(batch_size, network_batch_size):
        network_rows.clear()
        score_rows.clear()
        out = pipe(3, mask=mask, observation=image, noise_std=0.1, sampler="importance_ode", output_type="pt",
                   network_batch_size=network_batch_size, sampler_options={**options, "batch_size": batch_size},
                   generator=torch.Generator().manual_seed(0))
        assert out.samples.shape == (3, 1, 8, 8) and bool(torch.isfinite(out.samples).all())
        return out, list(network_rows), list(score_rows)

    whole, rows, _ = run(None, None)
    assert max(rows) == 6  # 3 samples x 2 points of each flow in one call
    chunked, rows, _ = run(2, None)
    assert max(rows) <= 2 and chunked.nfe > whole.nfe
    fixed, rows, calls = run(None, 4)
    assert set(rows) == {4} and max(calls) == 6
    both, rows, calls = run(2, 4)
    assert set(rows) == {4} and max(calls) <= 2
    assert torch.equal(both.samples, fixed.samples)
