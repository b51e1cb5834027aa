"""The interpolated transfer rule (``_grid_family``): one grid for a family of processes as a function of where each
process starts; in closed form on a hand-made pair, its refusals, the saved file (version 5) and the family fit."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from score_toolkit.analytic import ring_mixture
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers._grid_family import FamilyGrid, family_extremes, interpolated_log_snr
from score_toolkit.samplers.dpm_solver import DPMSolverPP2M
from score_toolkit.samplers.grids import GridTailWarning, load_grid, optimize_grid, save_grid

G0 = (0.0, 0.2, 0.5, 0.7, 1.0)  # the grid of the widest member (sigma_max 50, the lowest start)
G1 = (0.0, 0.3, 0.6, 0.8, 1.0)  # the grid of the narrowest (sigma_max 10)


def _ends(process):
    return [float(v) for v in process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))]


def _family_grid():
    return FamilyGrid.of(torch.tensor([G0, G1], dtype=torch.float64), [VESDE(0.01, 10.0), VESDE(0.01, 50.0)])


def _times(process, lam):
    ts = process.t_from_log_snr(lam)
    ts[0], ts[-1] = process.t_max, process.t_min
    return ts


def test_the_rule_in_closed_form_on_a_hand_made_pair():
    """Starts: -ln 50 and -ln 10 (lambda(1) = -ln sigma_max under VE). The extremes run on their own grids; sigma_max
    sqrt(500) starts half-way (w = 1/2): u = (0, .25, .55, .75, 1); sigma_max 20 at w = ln(50/20) / ln 5."""
    fg = _family_grid()
    assert fg.starts == pytest.approx((-math.log(50.0), -math.log(10.0)), abs=1e-12) and fg.kind == "VESDE"
    for sigma_max, u in ((50.0, G0), (10.0, G1), (math.sqrt(500.0), (0.0, 0.25, 0.55, 0.75, 1.0))):
        proc = VESDE(0.01, sigma_max)
        a, b = _ends(proc)
        torch.testing.assert_close(fg.log_snr(proc), torch.tensor([a + v * (b - a) for v in u], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    proc = VESDE(0.01, 20.0)
    a, b = _ends(proc)
    w = math.log(50.0 / 20.0) / math.log(5.0)
    expected = [a + ((1 - w) * p + w * q) * (b - a) for p, q in zip(G0, G1)]
    torch.testing.assert_close(fg.log_snr(proc), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_every_member_gets_an_increasing_grid_with_its_own_ends_exact():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        steps = torch.rand(2, 7, generator=gen, dtype=torch.float64) + 0.01
        u = torch.cat([torch.zeros(2, 1, dtype=torch.float64), torch.cumsum(steps, 1) / steps.sum(1, keepdim=True)], 1)
        u[:, -1] = 1.0
        fg = FamilyGrid.of(u, [VESDE(0.01, 10.0), VESDE(0.01, 50.0)])
        for sigma_max in (10.0, 10.5, 17.0, 33.3, 49.9, 50.0):
            proc = VESDE(0.01, sigma_max)
            lam = fg.log_snr(proc)
            assert lam.numel() == 8 and bool((torch.diff(lam) > 0).all())
            assert [float(lam[0]), float(lam[-1])] == _ends(proc)  # exact, not rounded


def test_refusals_say_why():
    fg = _family_grid()
    for sigma_max in (55.0, 9.0):
        with pytest.raises(ValueError, match=r"outside the family's fitted range .* does not extrapolate"):
            fg.log_snr(VESDE(0.01, sigma_max))
    with pytest.raises(ValueError, match="family of VESDE processes, not VPSDE"):
        fg.log_snr(VPSDE(0.1, 20.0))
    with pytest.raises(ValueError, match=r"ends at log-SNR .* \(another sigma_min or t_min\): not a member"):
        fg.log_snr(VESDE(0.02, 20.0))
    g = torch.tensor([G0, G1], dtype=torch.float64)
    for bad, match in ((g[:1], r"shape \(2, n \+ 1\)"), (g.flip(1), "strictly increasing"),
                       (g * 0.9 + 0.05, "from 0 to 1")):
        with pytest.raises(ValueError, match=match):
            interpolated_log_snr(bad, fg.starts, fg.end, VESDE(0.01, 20.0))
    with pytest.raises(ValueError, match="one process kind"):
        family_extremes([VESDE(0.01, 10.0), VPSDE(0.1, 20.0)])
    with pytest.raises(ValueError, match="sharing its low-noise end"):
        family_extremes([VESDE(0.01, 10.0), VESDE(0.05, 50.0)])
    with pytest.raises(ValueError, match="two different log-SNRs"):
        family_extremes([VESDE(0.01, 10.0), VESDE(0.01, 10.0)])


def test_the_rule_is_differentiable_in_both_grids():
    """d lambda_i / d g0_i = (1 - w)(b - a) and d lambda_i / d g1_i = w (b - a) at the inner points; the ends are
    fixed (no gradient)."""
    fg = _family_grid()
    g = torch.tensor([G0, G1], dtype=torch.float64, requires_grad=True)
    proc = VESDE(0.01, 20.0)
    a, b = _ends(proc)
    w = math.log(50.0 / 20.0) / math.log(5.0)
    interpolated_log_snr(g, fg.starts, fg.end, proc).sum().backward()
    expected = torch.tensor([[0.0, *([(1 - w) * (b - a)] * 3), 0.0], [0.0, *([w * (b - a)] * 3), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(g.grad, expected, rtol=1e-12, atol=1e-12)


def test_saved_family_grid_round_trip_and_version(tmp_path):
    """transfer='interpolated' writes version 5 with the pair; it loads under every member as the rule gives it and
    refuses a process outside the range; a newer version is refused by name; mismatched options are refused."""
    fg = _family_grid()
    src = VESDE(0.01, 10.0)
    times = _times(src, fg.log_snr(src))
    path = save_grid("fam", times, src, directory=tmp_path, transfer="interpolated", family_grid=fg)
    record = json.loads(path.read_text())
    assert record["version"] == 5 and record["transfer"]["rule"] == "log_snr_interpolated"
    assert record["transfer"]["grids"] == [list(G0), list(G1)]
    for sigma_max in (10.0, 20.0, 37.0, 50.0):
        proc = VESDE(0.01, sigma_max)
        torch.testing.assert_close(load_grid(path, proc), _times(proc, fg.log_snr(proc)), rtol=0, atol=1e-12)
        smp = get_sampler("dpmpp_2m", grid=str(path))
        torch.testing.assert_close(smp.time_grid(proc), load_grid(path, proc), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"grid 'fam' .*outside the family's fitted range"):
        load_grid(path, VESDE(0.01, 55.0))
    (tmp_path / "v6.json").write_text(json.dumps(record | {"version": 6}))
    with pytest.raises(ValueError, match=r"version 6 is newer than this score_toolkit reads \(1 to 5\)"):
        load_grid(tmp_path / "v6.json", src)
    (tmp_path / "bad.json").write_text(json.dumps(record | {"transfer": record["transfer"] | {"grids": [list(G0)]}}))
    with pytest.raises(ValueError, match="malformed interpolated transfer rule"):
        load_grid(tmp_path / "bad.json", src)
    with pytest.raises(ValueError, match="family_grid .* exactly with transfer='interpolated'"):
        save_grid("x", times, src, directory=tmp_path, transfer="interpolated")
    with pytest.raises(ValueError, match="family_grid .* exactly with transfer='interpolated'"):
        save_grid("x", times, src, directory=tmp_path, family_grid=fg)
    with pytest.raises(ValueError, match="the family grid's own"):
        save_grid("x", src.time_grid(4, "log_sigma", dtype=torch.float64), src, directory=tmp_path,
                  transfer="interpolated", family_grid=fg)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_sde", "heun", "unipc"])
def test_nfe_counts_score_calls_under_every_member(name, tmp_path):
    fg = _family_grid()
    src = VESDE(0.01, 10.0)
    path = save_grid("fam", _times(src, fg.log_snr(src)), src, directory=tmp_path, transfer="interpolated",
                     family_grid=fg)
    smp = get_sampler(name, grid=str(path), to_zero=True)
    for sigma_max in (10.0, 20.0, 50.0):
        process = VESDE(0.01, sigma_max)
        score = ring_mixture().score_fn(process)
        calls = []

        def counting(x, t, score=score, calls=calls):
            calls.append(1)
            return score(x, t)

        out = smp.sample(counting, process, shape=(4, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        assert out.nfe == len(calls) == smp.nfe_under(process) == smp.nfe
        assert out.info["num_steps"] == 4


def test_family_fit_through_the_interpolated_rule(tmp_path):
    """optimize_grid(transfer='interpolated') under sigma_max 10 for the family 20, 50, started from a pair of grids
    (no iteration): each member's objective is the single-process objective of the grid the rule gives it (on the
    member's own draws), the family objective their mean; the result holds the pair and the saved file loads under a
    member as the rule says."""
    main, members = VESDE(0.01, 10.0), [VESDE(0.01, 20.0), VESDE(0.01, 50.0)]
    kw = {"mixture": ring_mixture(), "num_samples": 64, "iterations": 0, "num_validation": 64, "reference_steps": 60,
          "tail_rounds": 0}
    fg = _family_grid()
    pair = (_times(members[1], fg.log_snr(members[1])), _times(main, fg.log_snr(main)))  # the lowest start first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        res = optimize_grid(DPMSolverPP2M(num_steps=4), main, family=members, transfer="interpolated", init=pair,
                            save_as="fam", directory=tmp_path, **kw)
        alone = [optimize_grid(DPMSolverPP2M(num_steps=4), p, init=_times(p, fg.log_snr(p)), seed=104_711 * k, **kw)
                 for k, p in enumerate([main, *members])]
    for got, p in zip(res.family_grid.grids, (G0, G1)):
        assert got == pytest.approx(p, abs=1e-9)
    values = [res.family_losses[repr(p)] for p in (main, *members)]
    assert values == pytest.approx([r.loss for r in alone], rel=1e-7)
    assert res.loss == pytest.approx(sum(values) / 3, rel=1e-9)
    torch.testing.assert_close(res.log_snr, fg.log_snr(main), rtol=0, atol=1e-9)
    record = json.loads(res.path.read_text())
    assert record["version"] == 5 and record["info"]["transfer"] == "interpolated"
    torch.testing.assert_close(load_grid(res.path, members[0]), _times(members[0], fg.log_snr(members[0])), rtol=0,
                               atol=1e-9)
    with pytest.raises(ValueError, match="pass family="):
        optimize_grid(DPMSolverPP2M(num_steps=4), main, transfer="interpolated", **kw)
    with pytest.raises(ValueError, match="one process kind"):
        optimize_grid(DPMSolverPP2M(num_steps=4), main, family=[VPSDE(0.1, 20.0)], transfer="interpolated", **kw)
    with pytest.raises(ValueError, match="transfer='interpolated' has none"):
        optimize_grid(DPMSolverPP2M(num_steps=4), main, family=members, transfer="interpolated", transfer_head=1, **kw)


def test_family_fit_lowers_the_family_objective():
    """A few iterations from the log_sigma pair lower the family objective (the fit moves both grids)."""
    main, members = VESDE(0.01, 10.0), [VESDE(0.01, 50.0)]
    kw = {"mixture": ring_mixture(), "num_samples": 64, "num_validation": 64, "reference_steps": 60, "tail_rounds": 0,
          "init": "log_sigma", "transfer": "interpolated", "family": members}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GridTailWarning)
        start = optimize_grid(DPMSolverPP2M(num_steps=4), main, iterations=0, **kw)
        fitted = optimize_grid(DPMSolverPP2M(num_steps=4), main, iterations=15, **kw)
    assert fitted.loss < 0.9 * start.loss
    assert fitted.family_grid.grids[0] != fitted.family_grid.grids[1]
