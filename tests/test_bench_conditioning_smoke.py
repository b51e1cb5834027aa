"""Smoke test of benchmarks/bench_conditioning.py on tiny settings: it runs and writes well-formed tables (the
numbers are the benchmark's business; the closed-form checks live in tests/test_conditioning.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_conditioning.py"


def test_quick_run_writes_well_formed_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_conditioning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_conditioning"] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--quick", "--n", "200", "--threads", "1", "--out", str(tmp_path), "--cases", "ring",
                            "--sigma-y", "0.5", "--methods", "unconditional,exact,pigdm", "--parts", "inverse"]) == 0
    finally:
        sys.modules.pop("bench_conditioning", None)
    res = json.loads((tmp_path / "conditioning.json").read_text())
    rows = res["inverse"]
    assert {(r["method"], r["sampler"]) for r in rows} == {
        ("unconditional", "ancestral"), ("unconditional", "pf_ode"), ("exact", "ancestral"), ("exact", "pf_ode"),
        ("pigdm", "ancestral")}
    for r in rows:
        assert r["wsw_ratio"] == r["wsw"] / r["wsw_floor"] and math.isfinite(r["wsw"]) and r["nfe"] >= 1
    assert "| exact | pf_ode |" in (tmp_path / "conditioning.md").read_text()


@pytest.mark.slow
def test_final_correction_quick_run_writes_well_formed_results(tmp_path):
    """benchmarks/bench_final_correction.py on tiny settings (its numbers: benchmarks/results/final_correction_*.md)."""
    from helpers import load_benchmark

    module = load_benchmark("bench_final_correction")
    try:
        assert module.main(["--n", "200", "--floor-seeds", "2", "--scales", "2", "--corrector-steps", "0,5",
                            "--inverse-corrector-steps", "0,5", "--inverse-steps", "20", "--out", str(tmp_path),
                            "--name", "fc", "--z-draws", "10000", "--grid", "2001", "--inverse-cases", "conformance:0.5"]) == 0
    finally:
        sys.modules.pop("bench_final_correction", None)
    rows = json.loads((tmp_path / "fc.json").read_text())["rows"]
    assert {r["part"] for r in rows} == {"tempered_1d", "tempered_ring", "inverse"}
    for r in rows:
        if "error" not in r:
            assert r["nfe"] >= r["sampler_nfe"] >= 1 and (r["corrector_steps"] == 0) == (r["nfe"] == r["sampler_nfe"])
    text = (tmp_path / "fc.md").read_text()
    assert "## Tempered target, 1-D" in text and "### conformance, sigma_y = 0.5" in text
