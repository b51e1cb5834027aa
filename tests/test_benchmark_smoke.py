"""Smoke test of benchmarks/bench_samplers.py on tiny settings: it runs every registered sampler once per
variant and writes well-formed tables (the numbers themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

from score_toolkit.registry import list_samplers


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("bench_samplers")
    sys.modules.pop("bench_samplers", None)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(bench, out: Path, *extra: str) -> None:
    argv = ["--quick", "--n", "200", "--threads", "1", "--out", str(out), "--cases", "ring", "--no-plot",
            "--speed-cases", "ring", "--speed-n", "100", "--speed-nfe", "4", "--speed-dtype", "float64", *extra]
    assert bench.main(argv) == 0


def test_quick_run_writes_well_formed_tables(bench, tmp_path):
    _run(bench, tmp_path)
    samplers = list_samplers()
    acc = _read(tmp_path / "samplers_accuracy.csv")
    assert list(acc[0]) == bench.ACC_FIELDS
    # every registered sampler, under both processes, at least once
    assert {(r["sampler"], r["process"]) for r in acc} == {(s, p) for s in samplers for p in ("VE", "VP")}
    ok = [r for r in acc if not r["error"]]
    assert ok, "no run succeeded"
    for r in ok:
        assert int(r["nfe"]) >= 1
        for key in ("wsw", "wsw_floor", "nll_floor", "mwe_floor", "sw", "sw_floor", "wall_s"):
            assert math.isfinite(float(r[key])) and float(r[key]) >= 0, (key, r)
        # the ratio columns are the metric over its floor
        assert float(r["wsw_ratio"]) == pytest.approx(float(r["wsw"]) / float(r["wsw_floor"]), rel=1e-4)
        assert float(r["nll_ratio"]) == pytest.approx(abs(float(r["nll_gap"])) / float(r["nll_floor"]), rel=1e-4)
        assert r["meets"] == str(float(r["wsw_ratio"]) <= 1.5 and float(r["nll_ratio"]) <= 1.5)
    # predictor_corrector shows both signal-to-noise scalings (constant by default, and shrinking with the grid)
    pc_variants = {r["variant"] for r in acc if r["sampler"] == "predictor_corrector"}
    assert "defaults" in pc_variants and any("snr_scaling=grid" in v for v in pc_variants), pc_variants
    # dpmpp_2m and dpmpp_3m also run on grids optimised for each budget, ending with to_zero
    for name in ("dpmpp_2m", "dpmpp_3m"):
        opt = [r for r in acc if r["sampler"] == name and r["variant"] == "optimised grid, to_zero=True"]
        assert {r["process"] for r in opt} == {"VE", "VP"}, name
        assert all("grid=optimised" in r["options"] and not r["error"] for r in opt), opt
        assert all(int(r["nfe"]) == int(r["options"].split("num_steps=")[1].split(",")[0]) + 1 for r in opt), opt

    floors = _read(tmp_path / "samplers_floors.csv")
    assert {r["metric"] for r in floors} == set(bench.FLOOR_KEYS)
    assert all(float(r["mean"]) > 0 and int(r["count"]) >= 2 for r in floors)

    crit = _read(tmp_path / "samplers_criterion.csv")
    assert {(r["sampler"], r["process"]) for r in crit} == {(r["sampler"], r["process"]) for r in ok}

    speed = _read(tmp_path / "samplers_speed.csv")
    assert list(speed[0]) == bench.SPEED_FIELDS
    timed = [r for r in speed if r["contender"] != "-"]
    assert {r["sampler"] for r in speed} == set(samplers)
    for name in set(bench.HAND_LOOPS) & set(samplers):
        rows = {r["contender"]: r for r in timed if r["sampler"] == name}
        sampler_row = rows[f"sampler {name}"]
        hand_row = next(r for c, r in rows.items() if c != f"sampler {name}" and float(r["ratio_paired"]) == 1.0)
        # same start, same seed: the hand loop reproduces the sampler (round-off only) at the same NFE
        assert sampler_row["nfe"] == hand_row["nfe"], name
        assert float(sampler_row["max_abs_diff"]) < 1e-6, name
        assert float(sampler_row["ratio_paired"]) > 0 and float(sampler_row["median_s"]) > 0

    md = (tmp_path / "samplers.md").read_text()
    for heading in ("## Accuracy", "### Noise floors", "### Smallest NFE", "## Speed"):
        assert heading in md
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_lines)


def test_append_and_merge_replace_only_the_rows_they_rerun(bench, tmp_path):
    common = ["--quick", "--n", "100", "--threads", "1", "--out", str(tmp_path), "--cases", "ring", "--no-plot",
              "--parts", "accuracy", "--floor-seeds", "2"]

    def rows():
        return {(r["sampler"], r["process"]): r for r in _read(tmp_path / "samplers_accuracy.csv")}

    assert bench.main([*common, "--samplers", "ancestral,langevin"]) == 0
    before = rows()
    # --append: re-run ancestral under VE with another seed; its VP row and langevin's rows are kept as they were
    assert bench.main([*common, "--samplers", "ancestral", "--processes", "VE", "--seed", "1", "--append"]) == 0
    after = rows()
    assert set(after) == set(before)
    assert after["ancestral", "VE"]["wsw"] != before["ancestral", "VE"]["wsw"]
    for key in [("ancestral", "VP"), ("langevin", "VE"), ("langevin", "VP")]:
        assert after[key] == before[key]
    assert "kept from the previous run" in (tmp_path / "samplers.md").read_text()
    # previous rows made with other floors are refused
    with pytest.raises(SystemExit):
        bench.main([*common[:2], "150", *common[3:], "--samplers", "ancestral", "--append"])
    # --merge-from: another run's rows replace the matching rows, nothing is run
    other = tmp_path / "other"
    assert bench.main([*common, "--out", str(other), "--samplers", "langevin", "--processes", "VP", "--denoise"]) == 0
    assert bench.main([*common, "--merge-from", str(other)]) == 0
    merged = rows()
    assert set(merged) == set(before)
    assert "denoise=True" in merged["langevin", "VP"]["options"] and "denoise" not in merged["langevin", "VE"]["options"]
    assert int(merged["langevin", "VP"]["nfe"]) == int(before["langevin", "VP"]["nfe"]) + 1  # the final Tweedie step


def test_bad_arguments_are_rejected(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "accuracy,sped"])
    assert "expected a comma-separated subset" in capsys.readouterr().err
    assert bench.main(["--samplers", "no_such_sampler", "--out", "/nonexistent-unused"]) == 2


@pytest.mark.slow
def test_memory_probe_and_plot(bench, tmp_path):
    pytest.importorskip("matplotlib")
    argv = ["--quick", "--n", "200", "--threads", "1", "--out", str(tmp_path), "--cases", "ring", "--processes", "VE",
            "--samplers", "ancestral", "--speed-cases", "ring", "--speed-n", "2000", "--speed-nfe", "3", "--memory"]
    assert bench.main(argv) == 0
    speed = [r for r in _read(tmp_path / "samplers_speed.csv") if r["contender"] != "-"]
    assert speed and all(float(r["peak_mem_mb"]) >= 0 for r in speed)
    assert (tmp_path / "samplers_ring.png").stat().st_size > 10_000
