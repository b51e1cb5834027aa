"""The grid optimiser's pieces: the exact mixture score it uses, the held-out tail report and its flag, early
stopping, grid transfer across processes (closed forms of the step-density rule) and the saved-grid format."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from score_toolkit.analytic import GaussianMixture, anisotropic_mixture, ring_mixture
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.samplers._grid_reference import MixtureScore, OffData
from score_toolkit.samplers.dpm_solver import DPMSolverPP2M, DPMSolverPP3M
from score_toolkit.samplers.grids import (
    MAX_TRANSFER_EXTENSION,
    GridTailError,
    GridTailWarning,
    load_grid,
    optimize_grid,
    save_grid,
    transfer_log_snr,
)


def _mixtures():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    full = GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), a @ a.transpose(1, 2) + 0.1 * torch.eye(4),
                           torch.tensor([0.2, 0.3, 0.5]))
    return [ring_mixture(), anisotropic_mixture(dim=6, num_components=4), full]


@pytest.mark.parametrize("process", [VESDE(), VPSDE()], ids=["VE", "VP"])
def test_mixture_score_equals_the_exact_score(process):
    """The optimiser's score (one time per batch, matrix products) equals GaussianMixture's exact score, also for a
    batch of different times (passed on) and in its gradient with respect to t."""
    for mix in _mixtures():
        fast, exact = MixtureScore(mix, process), mix.score_fn(process)
        x = 3 * torch.randn(64, mix.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for t in (1e-3, 0.2, 0.7, 1.0):
            tt = torch.full((64,), t, dtype=torch.float64)
            torch.testing.assert_close(fast(x, tt), exact(x, tt), rtol=1e-11, atol=1e-11)
        mixed = torch.linspace(0.05, 1.0, 64, dtype=torch.float64)
        torch.testing.assert_close(fast(x, mixed), exact(x, mixed), rtol=1e-11, atol=1e-11)
        t1 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        t2 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        (g1,) = torch.autograd.grad(fast(x, t1.expand(64)).sum(), t1)
        (g2,) = torch.autograd.grad(exact(x, t2.expand(64)).sum(), t2)
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)


def test_off_data_separates_flips_from_blow_ups():
    """A sample moved to another mode scores below zero (it lands on the data); one thrown off the ring scores far
    above (its negative log-density, minus the largest of the reference's)."""
    mix = ring_mixture()
    ref = mix.sample(2000, generator=torch.Generator().manual_seed(0))
    off = OffData(ref, mix, level=1.0)
    flipped = mix.means[:4] + 0.1
    thrown = mix.means[:4] * 1.7  # radius 6.8
    assert bool((off(flipped) < 0).all()) and bool((off(thrown) > 50).all())
    plain = OffData(ref, None, scale=0.04, level=1.0)  # the score_fn form: distance to the reference cloud
    assert bool((plain(flipped) < 0).all()) and bool((plain(thrown) > 50).all())


def _planted(steps, kind, **kw):
    kw = {"iterations": 0, **kw}
    return optimize_grid(DPMSolverPP2M(num_steps=steps), VPSDE(), mixture=ring_mixture(), init=kind,
                         num_samples=64, num_validation=1024, reference_steps=150, tail_rounds=0, **kw)


@pytest.mark.slow  # 5-30 s depending on the machine's load
def test_tail_flag_fires_on_a_bad_grid_and_not_on_a_good_one(tmp_path):
    """A planted bad grid (6 Karras steps of 2M on the ring) throws held-out samples far off the data: the report
    shows it, the optimiser warns (GridTailWarning, tail_ok False) or refuses (GridTailError, nothing saved). A good
    one (40 log-SNR steps) is not flagged."""
    with pytest.warns(GridTailWarning, match="far off the data") as rec:
        bad = _planted(6, "karras")
    assert {w.filename for w in rec if issubclass(w.category, GridTailWarning)} == {__file__}  # the caller's line
    v = bad.validation["optimized"]
    assert not bad.tail_ok and v.far_off > 0 and v.max_error > 1.0 and v.meets is False
    assert "tail: BAD" in str(bad) and all(k in str(bad) for k in ("optimized", "karras", "log_sigma", "fitted"))
    with pytest.raises(GridTailError):
        _planted(6, "karras", on_bad_tail="error", save_as="bad", directory=tmp_path)
    assert not (tmp_path / "bad.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridTailWarning)
        good = _planted(40, "log_sigma")
    g = good.validation["optimized"]
    assert good.tail_ok and g.far_off == 0 and g.max_error < v.max_error and "tail: ok" in str(good)
    assert g.wsw_ratio < v.wsw_ratio and g.q999_error < v.q999_error


def test_early_stop_and_hard_examples():
    """With a loose relative tolerance the optimiser stops long before its budget; the best objective never rises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP3M(num_steps=8), VESDE(), mixture=ring_mixture(), num_samples=128,
                            iterations=60, patience=3, rel_tol=0.5, num_validation=512, reference_steps=120)
    assert res.evaluations < 30 and res.loss <= min(res.history[: res.evaluations]) + 1e-15
    assert res.fit_seconds > 0 and res.mined >= 0


# ---------------------------------------------------------------------------------------------- transfer
def test_transfer_is_the_identity_on_the_grids_own_process():
    process = VESDE(0.01, 50.0)
    lam = process.log_snr(process.time_grid(9, "karras", dtype=torch.float64))
    assert torch.equal(transfer_log_snr(lam, process), lam)


def test_transfer_splits_the_step_density_into_equal_masses():
    """Closed forms: an even log-SNR grid carried to a narrower range stays even; a grid of two step sizes carries
    its density (each new step holds 1/n of the mass of the piecewise-constant density)."""
    source, target = VESDE(0.01, 50.0), VESDE(0.01, 10.0)
    even = source.log_snr(source.time_grid(12, "log_sigma", dtype=torch.float64))
    ends = target.log_snr(torch.tensor([1.0, target.t_min], dtype=torch.float64))
    torch.testing.assert_close(transfer_log_snr(even, target), torch.linspace(float(ends[0]), float(ends[1]), 13,
                                                                           dtype=torch.float64), rtol=0, atol=1e-12)
    a, m, b = float(even[0]), 0.0, float(even[-1])  # 4 steps on [a, 0], 8 steps on [0, b]
    two = torch.cat([torch.linspace(a, m, 5, dtype=torch.float64), torch.linspace(m, b, 9, dtype=torch.float64)[1:]])
    out = transfer_log_snr(two, target)
    lo, hi = float(ends[0]), float(ends[1])  # hi: t_min of sigma_max 10 lies a hair past the source's end
    mass_total = (m - lo) / (12 * (m - a) / 4) + (hi - m) / (12 * (b - m) / 8)
    mass = torch.tensor([((min(r, m) - max(le, lo)) if le < m else 0) / (12 * (m - a) / 4) +
                         ((r - max(le, m)) if r > m else 0) / (12 * (b - m) / 8) for le, r in zip(out[:-1].tolist(), out[1:].tolist())],
                        dtype=torch.float64)
    torch.testing.assert_close(mass, torch.full((12,), mass_total / 12, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert out.numel() == 13 and float(out[0]) == lo and float(out[-1]) == hi


def test_saved_grid_transfers_or_says_why_not(tmp_path):
    """Round trip: saved under VE sigma_max 50, loaded under sigma_max 10 and 40 (carried over, every fixed-grid
    sampler runs on it), under its own process exactly as saved; a process reaching far beyond is refused, naming
    both ranges and the reason."""
    source = VESDE(0.01, 50.0)
    times = source.time_grid(10, "karras", dtype=torch.float64)
    path = save_grid("src", times, source, sampler="dpmpp_2m", directory=tmp_path)
    torch.testing.assert_close(load_grid(path, source), times, rtol=0, atol=1e-12)
    lam = source.log_snr(times)
    for sigma_max in (10.0, 40.0):
        target = VESDE(0.01, sigma_max)
        loaded = load_grid(path, target)
        torch.testing.assert_close(target.log_snr(loaded), transfer_log_snr(lam, target), rtol=0, atol=1e-9)
        out = DPMSolverPP2M(grid=str(path)).sample(ring_mixture().score_fn(target), target, shape=(8, 2),
                                                   dtype=torch.float64)
        assert out.nfe == 11 and bool(torch.isfinite(out.samples).all())
    far = VESDE(0.01, 1e4)  # reaches 2.3 below the grid's lowest log-SNR: more than a quarter of its span (8.5)
    with pytest.raises(ValueError, match=r"cannot be carried over.*\[-9.21, 4.605\].*more than 0.25"):
        load_grid(path, far)
    assert MAX_TRANSFER_EXTENSION == 0.25


def test_anchored_transfer_maps_the_head_per_process_and_keeps_the_rest():
    """head=k: the first k steps split [lambda(1), lambda_k] of the new process in the grid's own proportions, the
    points from lambda_k on keep their log-SNR (same low-noise end); where the low-noise end differs, the rest is
    carried by the density rule; identity under the grid's own process; bad heads are refused."""
    source, target = VESDE(0.01, 50.0), VESDE(0.01, 10.0)
    lam = source.log_snr(source.time_grid(8, "log_sigma", dtype=torch.float64))
    a = float(target.log_snr(torch.tensor([1.0], dtype=torch.float64)))
    for k in (2, 3):
        out = transfer_log_snr(lam, target, head=k)
        assert out.numel() == lam.numel() and float(out[0]) == a
        # (sigma_max 10's t_min has a log-SNR 1.6e-5 above sigma_max 50's: the rest is carried that hair further)
        torch.testing.assert_close(out[k:], lam[k:], rtol=0, atol=2e-5)
        assert float(out[k]) == float(lam[k])
        frac_src = (lam[: k + 1] - lam[0]) / (lam[k] - lam[0])
        torch.testing.assert_close((out[: k + 1] - a) / (lam[k] - a), frac_src, rtol=0, atol=1e-12)
        assert torch.equal(transfer_log_snr(lam, source, head=k), lam)
    vp = VPSDE(0.1, 20.0)  # both ends differ: the head as above, the rest (an even density) by the density rule
    lam_vp = vp.log_snr(vp.time_grid(8, "log_sigma", dtype=torch.float64))
    ve = VESDE(0.01, 20.0)
    ve_start, ve_end = (float(v) for v in ve.log_snr(torch.tensor([1.0, ve.t_min], dtype=torch.float64)))
    assert abs(float(lam_vp[-1]) - ve_end) > 1e-3 and ve_start < float(lam_vp[3])
    out = transfer_log_snr(lam_vp, ve, head=3)
    torch.testing.assert_close(out[3:], torch.linspace(float(lam_vp[3]), ve_end, 6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:4], torch.linspace(ve_start, float(lam_vp[3]), 4, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    with pytest.raises(ValueError, match="0 <= head < the grid's 8 steps"):
        transfer_log_snr(lam, target, head=8)
    with pytest.raises(ValueError, match="maps the grid's own steps"):
        transfer_log_snr(lam, target, 6, head=2)
    with pytest.raises(ValueError, match="must lie inside"):  # lambda_1 of this grid lies below sigma_max 10's start
        transfer_log_snr(lam, target, head=1)


def test_saved_anchored_grid_is_carried_by_its_rule(tmp_path):
    """A grid saved with transfer_head records the anchored rule (format version 3, which older readers refuse
    rather than carry by the density rule) and loads under another process carried by it; an unknown rule is
    refused."""
    source, target = VESDE(0.01, 50.0), VESDE(0.01, 10.0)
    times = source.time_grid(8, "log_sigma", dtype=torch.float64)
    path = save_grid("anch", times, source, directory=tmp_path, transfer_head=2)
    record = json.loads(path.read_text())
    assert record["version"] == 3 and record["transfer"] == {"rule": "log_snr_anchored", "head": 2, "max_extension": 0.25}
    torch.testing.assert_close(target.log_snr(load_grid(path, target)),
                               transfer_log_snr(source.log_snr(times), target, head=2), rtol=0, atol=1e-9)
    assert not torch.allclose(target.log_snr(load_grid(path, target)), transfer_log_snr(source.log_snr(times), target))
    smp = DPMSolverPP2M(grid=str(path))  # a sampler carries it the same way
    torch.testing.assert_close(smp.time_grid(target), load_grid(path, target), rtol=0, atol=0)
    out = smp.sample(ring_mixture().score_fn(target), target, shape=(8, 2), dtype=torch.float64)
    assert out.nfe == 9 and bool(torch.isfinite(out.samples).all())
    (tmp_path / "bad.json").write_text(json.dumps(record | {"transfer": {"rule": "affine"}}))
    with pytest.raises(ValueError, match="unknown transfer rule"):
        load_grid(tmp_path / "bad.json", target)
    with pytest.raises(ValueError, match="transfer_head"):
        save_grid("x", times, source, directory=tmp_path, transfer_head=8)


def test_saved_grid_format(tmp_path):
    """Version 2 records what a transfer needs and the optimiser's report; version 1 files still load; newer
    versions are refused with a clear message."""
    res = optimize_grid(DPMSolverPP2M(num_steps=6), VESDE(), mixture=ring_mixture(), num_samples=64, iterations=3,
                        num_validation=256, reference_steps=100, save_as="g", directory=tmp_path)
    record = json.loads(res.path.read_text())
    assert record["version"] == 2 and record["transfer"] == {"rule": "log_snr_density", "max_extension": 0.25}
    assert record["process"]["class"] == "VESDE" and len(record["log_snr"]) == 7
    info = record["info"]
    assert set(info["validation"]) == {"optimized", "fitted", "log_sigma", "karras", "uniform"}
    assert {"far_off", "max_error", "q999_error", "wsw_ratio", "nll_ratio"} <= set(info["validation"]["optimized"])
    assert isinstance(info["tail_ok"], bool) and info["fit_seconds"] > 0
    old = {k: v for k, v in record.items() if k != "transfer"} | {"version": 1}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    torch.testing.assert_close(load_grid(tmp_path / "v1.json", VESDE()), res.times, rtol=0, atol=1e-12)
    (tmp_path / "v9.json").write_text(json.dumps(record | {"version": 9}))
    with pytest.raises(ValueError, match="version 9 is newer"):
        load_grid(tmp_path / "v9.json", VESDE())


# ---------------------------------------------------------------------------------------------- one grid, a family
def test_family_fit_reports_each_member_and_its_grid_is_what_they_load(tmp_path):
    """optimize_grid(family=...): one grid for VE sigma_max 50 and 10; the report has a row for the grid carried to
    sigma_max 10 (on that process's own held-out draws), the saved file records the family, and loading the saved
    grid under sigma_max 10 gives exactly the carried grid that was fitted and validated there."""
    main, member = VESDE(0.01, 50.0), VESDE(0.01, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=6), main, mixture=ring_mixture(), family=[member], num_samples=64,
                            iterations=4, num_validation=256, reference_steps=100, save_as="fam", directory=tmp_path)
        alone = optimize_grid(DPMSolverPP2M(num_steps=6), main, mixture=ring_mixture(), num_samples=64,
                              iterations=4, num_validation=256, reference_steps=100)
    assert list(res.family_validation) == [repr(member)] and alone.family_validation == {}
    v = res.family_validation[repr(member)]
    assert v.far_off >= 0 and v.wsw_ratio > 0 and v.nll_ratio >= 0 and 0 <= v.median_error <= v.max_error
    assert f"carried to {member!r}" in str(res) and "carried to" not in str(alone)
    # the member's objective counts: the family fit's training objective is not the single-process one
    assert res.history[0] != alone.history[0]
    info = json.loads(res.path.read_text())["info"]
    assert info["family"] == [{"class": "VESDE", "config": {k: v for k, v in dict(member.config).items()
                                                            if not k.startswith("_")}}]
    assert set(info["family_validation"]) == {repr(member)}
    loaded = load_grid(res.path, member)
    torch.testing.assert_close(member.log_snr(loaded), transfer_log_snr(res.log_snr, member), rtol=0, atol=1e-9)


def test_family_fit_with_the_anchored_rule_is_what_members_load(tmp_path):
    """optimize_grid(family=..., transfer_head=2) fits through the anchored rule: the member's report row is the
    grid carried by it, the saved file records it, and loading under the member gives that carried grid."""
    main, member = VESDE(0.01, 50.0), VESDE(0.01, 10.0)
    kw = {"mixture": ring_mixture(), "family": [member], "num_samples": 64, "iterations": 4, "num_validation": 256,
          "reference_steps": 100}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=6), main, transfer_head=2, save_as="fam", directory=tmp_path, **kw)
        density = optimize_grid(DPMSolverPP2M(num_steps=6), main, **kw)
    assert res.history[0] != density.history[0]  # the member runs another grid under the other rule
    record = json.loads(res.path.read_text())
    assert record["transfer"]["head"] == 2 and record["info"]["transfer_head"] == 2
    carried = transfer_log_snr(res.log_snr, member, head=2)
    torch.testing.assert_close(member.log_snr(load_grid(res.path, member)), carried, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="transfer_head to be an int with 0 <= transfer_head < num_steps = 6"):
        optimize_grid(DPMSolverPP2M(num_steps=6), main, transfer_head=6, **kw)
    with pytest.raises(ValueError, match="does not lie above every family member's starting log-SNR"):
        optimize_grid(DPMSolverPP2M(num_steps=6), main, transfer_head=1, init="log_sigma", **kw)


@pytest.mark.parametrize("combine", ["mean", "max", "geometric"])
def test_family_objective_is_the_combination_of_each_process_objective(combine):
    """optimize_grid(family=..., family_combine=...): the family's training objective is the mean / the worst / the
    geometric mean of each process's objective, and each of those equals the single-process fit's objective of the
    same grid on the same draws (the member's draws are those of seed + 104711; its grid the carried one)."""
    main, member = VESDE(0.01, 50.0), VESDE(0.01, 10.0)
    kw = {"mixture": ring_mixture(), "num_samples": 64, "iterations": 0, "num_validation": 64, "reference_steps": 60,
          "tail_rounds": 0}
    start = main.time_grid(6, "log_sigma", dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=6), main, family=[member], family_combine=combine, init=start, **kw)
        alone = optimize_grid(DPMSolverPP2M(num_steps=6), main, init=start, **kw)
        carried = member.t_from_log_snr(transfer_log_snr(main.log_snr(start), member))
        carried[0], carried[-1] = member.t_max, member.t_min
        other = optimize_grid(DPMSolverPP2M(num_steps=6), member, init=carried, seed=104_711, **kw)
    own, theirs = res.family_losses[repr(main)], res.family_losses[repr(member)]
    assert own == pytest.approx(alone.loss, rel=1e-9) and theirs == pytest.approx(other.loss, rel=1e-9)
    assert own != pytest.approx(theirs, rel=1e-3)  # (else every combination would agree)
    expected = {"mean": (own + theirs) / 2, "max": max(own, theirs), "geometric": (own * theirs) ** 0.5}[combine]
    assert res.loss == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match=r"family_combine one of \('mean', 'max', 'geometric'\), found 'worst'"):
        optimize_grid(DPMSolverPP2M(num_steps=6), main, family=[member], family_combine="worst", **kw)


def test_warm_start_resumes_a_fit():
    """init= a fitted grid of the same budget (a GridOptimizationResult, or its times): the fit starts exactly there
    (its logits invert the parametrisation), so it stops after its patience with a training objective at least as
    good as the cold fit's, in fewer evaluations; from a grid of another budget it is carried and resampled first."""
    process, mix = VPSDE(), ring_mixture()
    kw = {"mixture": mix, "num_samples": 128, "num_validation": 512, "reference_steps": 100, "iterations": 60,
          "patience": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        cold = optimize_grid(DPMSolverPP2M(num_steps=7), process, **kw)
        warm = optimize_grid(DPMSolverPP2M(num_steps=7), process, init=cold, **kw)
        planted = optimize_grid(DPMSolverPP2M(num_steps=7), process, init=cold.times, **{**kw, "iterations": 0})
        other = optimize_grid(DPMSolverPP2M(num_steps=5), process, init=cold, **{**kw, "iterations": 0})
    torch.testing.assert_close(planted.times, cold.times, rtol=0, atol=1e-12)
    assert planted.loss == pytest.approx(cold.loss, rel=1e-9)
    assert warm.history[0] == pytest.approx(cold.loss, rel=1e-9)  # the warm fit's first evaluation is the cold result
    assert warm.evaluations < cold.evaluations and warm.loss <= cold.loss
    # held out: as good within 1 % (the resumed fit lowers the training objective of 128 draws further, which moves
    # the held-out one by +0.2 % here; from another budget it ends worse about as often as better, measured in
    # docs/fast_samplers.md, "Fitting time")
    assert warm.validation["optimized"].objective <= cold.validation["optimized"].objective * 1.01
    torch.testing.assert_close(other.log_snr, transfer_log_snr(cold.log_snr, process, num_steps=5), rtol=0, atol=1e-9)


def test_warm_start_from_a_saved_grid_and_refusals(tmp_path):
    """init= a saved grid's name (with directory=None the store's default, here via its path) is carried over from its
    own process; bad warm starts are refused with what was expected."""
    source = VESDE(0.01, 50.0)
    kw = {"mixture": ring_mixture(), "num_samples": 32, "num_validation": 32, "reference_steps": 30, "iterations": 0}
    save_grid("src", source.time_grid(8, "karras", dtype=torch.float64), source, directory=tmp_path)
    target = VESDE(0.01, 40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=6), target, init=tmp_path / "src.json", save_as="warm",
                            directory=tmp_path, family=[VESDE(0.01, 10.0)], family_combine="max", **kw)
    expected = transfer_log_snr(source.log_snr(source.time_grid(8, "karras", dtype=torch.float64)), target, num_steps=6)
    torch.testing.assert_close(res.log_snr, expected, rtol=0, atol=1e-9)
    info = json.loads(res.path.read_text())["info"]  # the new fields round-trip; the file loads as before
    assert info["init"] == f"warm start: {tmp_path / 'src.json'}" and info["family_combine"] == "max"
    assert info["family_losses"] == pytest.approx(res.family_losses) and len(info["family_losses"]) == 2
    torch.testing.assert_close(load_grid("warm", target, directory=tmp_path), res.times, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected init 'best', a grid kind .*no saved grid 'nope'"):
        optimize_grid(DPMSolverPP2M(num_steps=6), target, init="nope", **kw)
    with pytest.raises(TypeError, match="a GridOptimizationResult, found int"):
        optimize_grid(DPMSolverPP2M(num_steps=6), target, init=3, **kw)
    with pytest.raises(ValueError, match="start at t_max"):
        optimize_grid(DPMSolverPP2M(num_steps=6), target, init=[0.9, 0.5, 0.01], **kw)


def test_family_refusals():
    """A family needs a mixture reference (a score_fn is tied to one process), Processes in a list or tuple, and
    members whose range the grid can be carried to (else the transfer's reason, before any fitting)."""
    kw = {"num_samples": 16, "iterations": 0, "num_validation": 16, "reference_steps": 20}
    smp = DPMSolverPP2M(num_steps=4)
    with pytest.raises(TypeError, match="list or tuple of Processes"):
        optimize_grid(smp, VESDE(), mixture=ring_mixture(), family=VESDE(0.01, 10.0), **kw)
    with pytest.raises(TypeError, match="every family member to be a Process"):
        optimize_grid(smp, VESDE(), mixture=ring_mixture(), family=["VE10"], **kw)
    with pytest.raises(ValueError, match="needs a mixture reference"):
        optimize_grid(smp, VESDE(), score_fn=ring_mixture().score_fn(VESDE()), shape=(2,), family=[VESDE(0.01, 10.0)],
                      **kw)
    with pytest.raises(ValueError, match="cannot be carried over"):
        optimize_grid(smp, VESDE(0.01, 10.0), mixture=ring_mixture(), family=[VESDE(0.01, 1e4)], **kw)


def test_nll_weight_without_the_nll_loss_is_refused():
    kw = {"num_samples": 16, "iterations": 0, "num_validation": 16, "reference_steps": 20}
    with pytest.raises(ValueError, match="nll_weight weighs the term of loss='nll', found loss='mse'"):
        optimize_grid(DPMSolverPP2M(num_steps=4), VESDE(), mixture=ring_mixture(), loss="mse", nll_weight=5.0, **kw)
    with pytest.raises(ValueError, match="which a score_fn reference has not"):  # the default loss without a mixture
        optimize_grid(DPMSolverPP2M(num_steps=4), VESDE(), score_fn=ring_mixture().score_fn(VESDE()), shape=(2,),
                      nll_weight=5.0, **kw)


def test_default_loss_is_nll_with_a_mixture_and_mse_with_a_score_fn(tmp_path):
    """loss="auto" (the default) fits with the NLL term when there is a mixture: the same objective as loss="nll"
    (and not loss="mse"); with a score_fn it is the plain objective. The saved grid records which."""
    kw = {"num_samples": 32, "iterations": 0, "num_validation": 64, "reference_steps": 30, "init": "karras"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        auto = optimize_grid(DPMSolverPP2M(num_steps=5), VESDE(), mixture=ring_mixture(), save_as="a", directory=tmp_path,
                             **kw)
        nll = optimize_grid(DPMSolverPP2M(num_steps=5), VESDE(), mixture=ring_mixture(), loss="nll", **kw)
        mse = optimize_grid(DPMSolverPP2M(num_steps=5), VESDE(), mixture=ring_mixture(), loss="mse", **kw)
        fn = optimize_grid(DPMSolverPP2M(num_steps=5), VESDE(), score_fn=ring_mixture().score_fn(VESDE()), shape=(2,),
                           save_as="b", directory=tmp_path, **kw)
    assert auto.loss == nll.loss and auto.loss > mse.loss
    assert json.loads(auto.path.read_text())["info"]["loss_kind"] == "nll"
    assert json.loads(fn.path.read_text())["info"]["loss_kind"] == "mse"


def test_far_off_flag_false_alarm_rate_on_exact_sets_matches_the_closed_form():
    """Calibration of the report's far-off count on exact sets: for a 2-D standard Gaussian the negative
    log-density minus its minimum is Exp(1), so for two independent exact sets of n the chance that some sample of
    one lands more than m nats beyond the least likely of the other is
    1 - int F(y + m) dF(y), F(x) = (1 - e^-x)^n (about 1 / (1 + e^m) for large n)."""
    mix = GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None],
                          torch.ones(1, dtype=torch.float64))
    n, m, trials = 64, 1.0, 1500
    g = torch.Generator().manual_seed(3)
    fired = sum(bool((OffData(mix.sample(n, generator=g), mix, level=1.0)(mix.sample(n, generator=g)) > m).any())
                for _ in range(trials))
    y = torch.linspace(0.0, 60.0, 200_001, dtype=torch.float64)
    density = n * (1 - torch.exp(-y)) ** (n - 1) * torch.exp(-y)
    exact = 1.0 - float(torch.trapezoid((1 - torch.exp(-(y + m))) ** n * density, y))
    sd = (exact * (1 - exact) / trials) ** 0.5
    assert abs(fired / trials - exact) < 4 * sd, (fired / trials, exact)
    assert abs(exact - 1 / (1 + torch.e)) < 0.02


def test_transfer_is_differentiable_in_the_grid():
    """optimize_grid(family=...) fits through transfer_log_snr: its gradient matches finite differences."""
    target = VESDE(0.01, 10.0)
    lam = VESDE(0.01, 50.0).log_snr(VESDE(0.01, 50.0).time_grid(7, "karras", dtype=torch.float64))
    inner = lam[1:-1].clone().requires_grad_(True)
    weights = torch.linspace(1.0, 2.0, 8, dtype=torch.float64)

    def f(v):
        return (transfer_log_snr(torch.cat([lam[:1], v, lam[-1:]]), target) * weights).sum()

    (grad,) = torch.autograd.grad(f(inner), inner)
    eps = 1e-6
    fd = torch.stack([(f(inner.detach() + eps * e) - f(inner.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(inner.numel(), dtype=torch.float64)])
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-7)


def test_tail_retries_judge_every_fit_on_one_held_out_set():
    """tail_retries=1: a flagged fit is refitted from other training draws (seed + 1) and both fits are judged on
    the same held-out draws (the built-in grids' rows, which no fit changes, are identical), so the kept fit has the
    fewest far-off samples of the two on that set (the first of equals); it says which seed and how many refits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        first = _planted(6, "karras", seed=5, iterations=2)
        kept = _planted(6, "karras", seed=5, tail_retries=1, iterations=2)
        planted = _planted(6, "karras", seed=5)
        planted_kept = _planted(6, "karras", seed=5, tail_retries=1)
    assert not first.tail_ok and first.retries == 0 and first.seed == 5
    assert kept.retries == 1 and kept.seed in (5, 6)
    assert kept.validation["optimized"].far_off <= first.validation["optimized"].far_off
    for kind in ("karras", "log_sigma", "uniform", "fitted"):
        assert kept.validation[kind] == first.validation[kind]  # one common held-out set
    if kept.seed == 5:
        torch.testing.assert_close(kept.times, first.times, rtol=0, atol=0)
    # iterations=0: both fits are the planted grid, equal on the common set: the first is kept
    assert planted_kept.retries == 1 and planted_kept.seed == 5 and planted_kept.validation == planted.validation
    with pytest.raises(ValueError, match="tail_retries"):
        _planted(6, "karras", tail_retries=-1)


@pytest.mark.parametrize("name", ["unipc", "dpmpp_3m"])
def test_report_judges_the_sampler_as_it_runs(name):
    """The report's errors are those of ``sampler.sample`` itself (its own end: unipc's final corrector and step to
    zero, dpmpp_3m's to_zero step) against the reference run ending the same way, on the held-out draws; the
    "fitted" row is the data-free grid the sampler runs by default (unipc: its own order-4 density)."""
    from score_toolkit.registry import get_sampler

    process, mix, n, seed = VPSDE(), ring_mixture(), 7, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(get_sampler(name, num_steps=n, to_zero=True), process, mixture=mix, iterations=2,
                            num_samples=64, num_validation=256, reference_steps=100, seed=seed)
    x_val = process.prior_sample((256, 2), generator=torch.Generator().manual_seed(seed + 7919), dtype=torch.float64)
    ref = DPMSolverPP3M(num_steps=100, grid="log_sigma", lower_order_final=False, to_zero=True).sample(
        mix.score_fn(process), process, x_init=x_val.clone()).samples
    for key, grid in (("optimized", res.times.tolist()), ("fitted", "fitted")):
        out = get_sampler(name, num_steps=n, grid=grid, to_zero=True).sample(mix.score_fn(process), process,
                                                                              x_init=x_val.clone()).samples
        err = (out - ref).norm(dim=1)
        torch.testing.assert_close(res.validation[key].median_error, float(torch.quantile(err, 0.5)), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(res.validation[key].max_error, float(err.max()), rtol=1e-6, atol=1e-9)


def test_fit_dtype_trains_in_float32_and_validates_in_float64():
    """fit_dtype=torch.float32 changes only the training runs: the held-out report of the built-in grids (float64,
    the same draws) is identical to a float64 fit's, and the optimised grid is float64 times; a non-dtype is refused."""
    kw = {"num_samples": 64, "iterations": 3, "num_validation": 256, "reference_steps": 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        f32 = optimize_grid(DPMSolverPP3M(num_steps=6), VPSDE(), mixture=ring_mixture(), fit_dtype=torch.float32, **kw)
        f64 = optimize_grid(DPMSolverPP3M(num_steps=6), VPSDE(), mixture=ring_mixture(), **kw)
    assert f32.times.dtype == torch.float64 and bool((torch.diff(f32.times) < 0).all())
    for kind in ("karras", "log_sigma", "uniform", "fitted"):
        assert f32.validation[kind] == f64.validation[kind]
    assert not torch.equal(f32.times, f64.times)  # the training did run in another dtype (rounding moves the fit)
    for bad in ("float32", torch.float16, torch.bfloat16, torch.int64):
        with pytest.raises(TypeError, match="fit_dtype"):
            optimize_grid(DPMSolverPP3M(num_steps=6), VPSDE(), mixture=ring_mixture(), fit_dtype=bad, **kw)
