"""Smoke test of benchmarks/bench_conditioning.py on tiny settings: it runs and writes well-formed tables (the
numbers are the benchmark's business; the closed-form checks live in tests/test_conditioning.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

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
