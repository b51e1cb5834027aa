"""Smoke test of benchmarks/bench_overhead.py: without k-diffusion it says so and exits 0; with it (an optional
install, not in the test extra) a tiny run writes well-formed tables, and both sides evaluate the score as often."""

from __future__ import annotations

import csv
import math
import sys

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("bench_overhead")
    sys.modules.pop("bench_overhead", None)


def test_without_k_diffusion_it_skips_with_a_message(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "load_k_sampling", lambda: None)
    assert bench.main(["--parts", "overhead", "--out", str(tmp_path)]) == 0
    assert "pip install --no-deps k-diffusion" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_the_mixture_score_is_exact(bench):
    """The benchmark's score is the exact score of its mixture: compare with autograd of the log-density."""
    import torch

    mix = bench.Mixture(3, torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    sigma = torch.full((5,), 0.7, dtype=torch.float64)
    var = mix.var0 + 0.49
    logp = torch.logsumexp(mix.logw - 0.5 * ((x[:, None] - mix.mu) ** 2).sum(-1) / var - 1.5 * torch.log(var), 1)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), sigma), grad)


def test_tiny_run_writes_tables(bench, tmp_path):
    if bench.load_k_sampling() is None:
        pytest.skip("k-diffusion is not installed (optional: pip install --no-deps k-diffusion)")
    argv = ["--parts", "overhead", "--dims", "2", "--batches", "8", "--dtypes", "float64", "--nfe", "4", "--repeats", "1",
            "--min-run", "0", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    with open(tmp_path / "overhead.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["sampler"] for r in rows} == set(bench.k_callers(bench.load_k_sampling()))
    for r in rows:
        for key in ("ours_overhead_ms", "k_overhead_ms", "ratio_median", "score_ms"):
            assert math.isfinite(float(r[key])), (key, r)
    assert "| dpmpp_2m |" in (tmp_path / "overhead.md").read_text()


def test_tdtype_part_writes_its_table(bench, tmp_path):
    """The float32-time comparison runs without k-diffusion; every float32 run stays close to the float64 run."""
    assert bench.main(["--parts", "tdtype", "--tdtype-n", "200", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "overhead_tdtype.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12  # 2 processes x 2 budgets x 3 score functions
    for r in rows:
        assert 0 <= float(r["median"]) < 1e-3, r  # float32 rounding, not a different solution
    assert "ScoreAdapter (t rounded to float32)" in (tmp_path / "overhead.md").read_text()
