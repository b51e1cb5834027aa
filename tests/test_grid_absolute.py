"""The absolute transfer rule of saved grids (``absolute_log_snr``, "clip / extend"): its points under each process
in closed form, honest step counts, the saved-file rule and the family fit through it."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from helpers import recording_bars

from score_toolkit.analytic import ring_mixture
from score_toolkit.processes import VESDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.dpm_solver import DPMSolverPP2M
from score_toolkit.samplers.grids import (
    ABSOLUTE_MERGE,
    GridTailWarning,
    absolute_log_snr,
    load_grid,
    optimize_grid,
    save_grid,
    transfer_log_snr,
)


def _ends(process):
    return [float(v) for v in process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))]


def _hand_grid():
    """A hand-made grid on VE sigma_max 10's range: inner points -1.5, -0.5, 0.5, 1.5, 3."""
    a, b = _ends(VESDE(0.01, 10.0))
    return torch.tensor([a, -1.5, -0.5, 0.5, 1.5, 3.0, b], dtype=torch.float64)


def test_absolute_rule_clips_and_extends_in_closed_form():
    """Own process: the grid itself. Narrower (sigma_max 4, start -1.386): the points inside its range and its start,
    one step fewer. Wider (sigma_max 40): one extension step from its start to the grid's first point, one step more;
    with extend='first', equal steps no longer than the grid's first step. A process end within ABSOLUTE_MERGE of a
    step from a grid point takes that point's place (no tiny step)."""
    lam = _hand_grid()
    own = VESDE(0.01, 10.0)
    assert torch.equal(absolute_log_snr(lam, own), lam)
    narrow = VESDE(0.01, 4.0)
    a, b = _ends(narrow)
    out = absolute_log_snr(lam, narrow)
    torch.testing.assert_close(out, torch.tensor([a, -0.5, 0.5, 1.5, 3.0, b], dtype=torch.float64), rtol=0, atol=0)
    wide = VESDE(0.01, 40.0)
    a, b = _ends(wide)
    out = absolute_log_snr(lam, wide)
    torch.testing.assert_close(out, torch.cat([torch.tensor([a], dtype=torch.float64), lam[:-1],
                                               torch.tensor([b], dtype=torch.float64)]), rtol=0, atol=0)
    first = absolute_log_snr(lam, wide, extend="first")  # the grid's first step is 0.80: ceil(1.386 / 0.80) = 2 steps
    k = math.ceil((float(lam[0]) - a) / float(lam[1] - lam[0]))
    assert k == 2 and first.numel() == lam.numel() + k
    torch.testing.assert_close(first[: k + 1], torch.linspace(a, float(lam[0]), k + 1, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    # merge: a start 5 % of the step (-1.5 -> -0.5) below -0.5 drops -0.5; at 15 % it stays
    for frac, kept in ((0.5 * ABSOLUTE_MERGE, False), (1.5 * ABSOLUTE_MERGE, True)):
        proc = VESDE(0.01, math.exp(0.5 + frac))  # start: -0.5 - frac
        out = absolute_log_snr(lam, proc)
        assert (out.numel() == 6) is kept and float(out[0]) == pytest.approx(-0.5 - frac, abs=1e-12)
        assert bool((out[1:-1] == -0.5).any()) is kept
    # the low-noise end likewise: sigma_min 0.005 ends 0.69 beyond the grid (one extension step), sigma_min 0.0105
    # 0.05 before it (within ABSOLUTE_MERGE of the last step 1.6: its end takes the grid's last point's place)
    for sigma_min, extra in ((0.005, True), (0.01 * math.exp(0.05), False)):
        proc = VESDE(sigma_min, 10.0)
        a, b = _ends(proc)
        expected = torch.cat([torch.tensor([a], dtype=torch.float64), lam[1:-1],
                              torch.tensor([float(lam[-1]), b] if extra else [b], dtype=torch.float64)])
        torch.testing.assert_close(absolute_log_snr(lam, proc), expected, rtol=0, atol=0)


def test_absolute_rule_refusals_say_why():
    lam = _hand_grid()
    with pytest.raises(ValueError, match=r"cannot be carried over.*more than 0.25 of its span"):
        absolute_log_snr(lam, VESDE(0.01, 1e4))
    few = torch.tensor([_ends(VESDE(0.01, 10.0))[0], -2.0, _ends(VESDE(0.01, 10.0))[1]], dtype=torch.float64)
    with pytest.raises(ValueError, match="all lie outside.*no point of the grid to use"):
        absolute_log_snr(few, VESDE(0.01, 5.0))  # starts at -1.6: above the grid's only inner point
    with pytest.raises(ValueError, match="extend 'one' or 'first', found 'two'"):
        absolute_log_snr(lam, VESDE(0.01, 40.0), extend="two")
    with pytest.raises(ValueError, match="increasing"):
        absolute_log_snr(lam.flip(0), VESDE(0.01, 40.0))


def test_absolute_rule_is_differentiable_in_the_points_it_keeps():
    lam = _hand_grid().requires_grad_(True)
    out = absolute_log_snr(lam, VESDE(0.01, 4.0))
    out.sum().backward()
    assert lam.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_saved_absolute_grid_round_trip_and_old_files_unchanged(tmp_path):
    """transfer='absolute' writes version 4 with the rule; it loads under its own process as saved and under others
    by the rule; version 2 (density) and 3 (anchored) files load exactly as before; a rule with other settings and
    the rule together with a head are refused."""
    src = VESDE(0.01, 10.0)
    times = src.t_from_log_snr(_hand_grid())
    times[0], times[-1] = src.t_max, src.t_min
    path = save_grid("abs", times, src, directory=tmp_path, transfer="absolute")
    record = json.loads(path.read_text())
    assert record["version"] == 4
    assert record["transfer"] == {"rule": "log_snr_absolute", "extend": "one", "merge": 0.1, "max_extension": 0.25}
    torch.testing.assert_close(load_grid(path, src), times, rtol=0, atol=1e-12)
    for sigma_max in (4.0, 40.0):
        target = VESDE(0.01, sigma_max)
        torch.testing.assert_close(target.log_snr(load_grid(path, target)), absolute_log_snr(src.log_snr(times), target),
                                   rtol=0, atol=1e-9)
    lam = src.log_snr(times)
    target = VESDE(0.01, 40.0)
    for version, rule, expected in ((2, {"rule": "log_snr_density", "max_extension": 0.25}, transfer_log_snr(lam, target)),
                                    (3, {"rule": "log_snr_anchored", "head": 2, "max_extension": 0.25},
                                     transfer_log_snr(lam, target, head=2))):
        (tmp_path / f"v{version}.json").write_text(json.dumps(record | {"version": version, "transfer": rule}))
        loaded = load_grid(tmp_path / f"v{version}.json", target)
        assert loaded.numel() == lam.numel()
        torch.testing.assert_close(target.log_snr(loaded), expected, rtol=0, atol=1e-9)
    (tmp_path / "other.json").write_text(json.dumps(record | {"transfer": record["transfer"] | {"extend": "first"}}))
    with pytest.raises(ValueError, match="absolute rule's settings"):
        load_grid(tmp_path / "other.json", target)
    with pytest.raises(ValueError, match="the absolute rule has none"):
        save_grid("x", times, src, directory=tmp_path, transfer="absolute", transfer_head=2)
    with pytest.raises(ValueError, match="expected transfer 'density', 'absolute' or 'interpolated', found 'clip'"):
        save_grid("x", times, src, directory=tmp_path, transfer="clip")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "dpmpp_3s", "dpmpp_sde", "heun", "unipc"])
def test_nfe_counts_the_steps_the_absolute_rule_gives_each_process(name, tmp_path, monkeypatch):
    """A grid saved under sigma_max 10 with the absolute rule runs 6 steps there, 7 under sigma_max 40 and 5 under
    sigma_max 4: the reported nfe and nfe_under equal the counted score calls, and the progress bar's total (the
    sampler's own and the one a pipeline sets up front) equals the steps recorded, the final one included."""
    bars = recording_bars(monkeypatch)
    src = VESDE(0.01, 10.0)
    times = src.t_from_log_snr(_hand_grid())
    times[0], times[-1] = src.t_max, src.t_min
    path = save_grid("abs", times, src, directory=tmp_path, transfer="absolute")
    smp = get_sampler(name, grid=str(path), to_zero=True, progress=True)
    for sigma_max, steps in ((10.0, 6), (40.0, 7), (4.0, 5)):
        process = VESDE(0.01, sigma_max)
        score = ring_mixture().score_fn(process)
        calls = []

        def counting(x, t, score=score, calls=calls):
            calls.append(1)
            return score(x, t)

        assert smp.time_grid(process).numel() == steps + 1
        recorded = []
        out = smp.sample(counting, process, shape=(4, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                         callback=recorded.append)
        assert out.nfe == len(calls) == smp.nfe_under(process)
        (bar,) = bars
        bars.clear()
        assert bar.n == bar.total == len(recorded) == smp._progress_total(process), (bar.n, bar.total, len(recorded))
        assert out.info["num_steps"] == steps  # the steps run under this process, not the saved grid's
        if sigma_max == 10.0:
            assert smp.nfe == out.nfe


def test_family_fit_through_the_absolute_rule(tmp_path):
    """optimize_grid(transfer='absolute') under sigma_max 10 for the family sigma_max 40: the member's objective is
    the single-process objective of the grid the rule gives it (one step more, on the member's own draws), the
    family objective their mean; the saved file records the rule and loads under the member as the rule says."""
    main, member = VESDE(0.01, 10.0), VESDE(0.01, 40.0)
    kw = {"mixture": ring_mixture(), "num_samples": 64, "iterations": 0, "num_validation": 64, "reference_steps": 60,
          "tail_rounds": 0}
    start = main.time_grid(6, "log_sigma", dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=6), main, family=[member], transfer="absolute", init=start,
                            save_as="fam", directory=tmp_path, **kw)
        alone = optimize_grid(DPMSolverPP2M(num_steps=6), main, init=start, **kw)
        carried = member.t_from_log_snr(absolute_log_snr(main.log_snr(start), member))
        carried[0], carried[-1] = member.t_max, member.t_min
        assert carried.numel() == 8
        other = optimize_grid(DPMSolverPP2M(num_steps=7), member, init=carried, seed=104_711, **kw)
    own, theirs = res.family_losses[repr(main)], res.family_losses[repr(member)]
    assert own == pytest.approx(alone.loss, rel=1e-9) and theirs == pytest.approx(other.loss, rel=1e-9)
    assert res.loss == pytest.approx((own + theirs) / 2, rel=1e-9)
    record = json.loads(res.path.read_text())
    assert record["transfer"]["rule"] == "log_snr_absolute" and record["info"]["transfer"] == "absolute"
    torch.testing.assert_close(load_grid(res.path, member), carried, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="transfer='absolute' has none"):
        optimize_grid(DPMSolverPP2M(num_steps=6), main, family=[member], transfer="absolute", transfer_head=2, **kw)
    with pytest.raises(ValueError, match="expected transfer 'density', 'absolute' or 'interpolated', found 'clip'"):
        optimize_grid(DPMSolverPP2M(num_steps=6), main, transfer="clip", **kw)
    with pytest.raises(ValueError, match="cannot be carried over"):
        optimize_grid(DPMSolverPP2M(num_steps=6), main, family=[VESDE(0.01, 1e4)], transfer="absolute", **kw)
    # a narrower member holding none of a 3-point stand-in's inner points is still a valid member (the reach decides)
    narrow = VESDE(0.5, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=6), main, family=[narrow], transfer="absolute", init=start, **kw)
    assert set(res.family_losses) == {repr(main), repr(narrow)}
