"""Hutchinson's estimator inside bits/dim: dequantization noise and probes from independent streams (so the
estimate is unbiased), standard errors that are never reported as 0, a Student t interval with its measured
coverage, summaries that count the probe noise once, and the likelihood command's default image range."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from helpers import load_benchmark

from score_toolkit._utils import per_sample_generators
from score_toolkit.analytic import anisotropic_mixture, ring_mixture
from score_toolkit.likelihood import dequantize, dequantized_bits_per_dim, log_likelihood
from score_toolkit.likelihood.divergence import _probes
from score_toolkit.likelihood.result import student_t_quantile
from score_toolkit.processes import VPSDE

LEVELS = 17


def test_dequantization_noise_and_probes_come_from_independent_streams():
    """With one seed for both (as dequantized_bits_per_dim uses), the first Rademacher probe was sign(u - 1/2)."""
    n, d = 400, 8
    k = torch.zeros(n, d, dtype=torch.long)
    x = dequantize(k, levels=2, scale=2.0, offset=-1.0, seed=5, dtype=torch.float64)
    u = (x + 1.0) * 2 / 2  # x = 2 (k + u) / 2 - 1
    probes = _probes("rademacher", 1, (n, d), per_sample_generators(5, range(n)), torch.float64, x.device)[0]
    agree = float((torch.sign(u - 0.5) == probes).double().mean())
    # independent: agreement ~ Binomial(n d, 1/2) / (n d), sd 0.009
    assert abs(agree - 0.5) < 0.04, agree


def _quantized_mixture(d: int, n: int):
    """17-level data in [-1, 1] from a mixture whose modes are narrower than a quantization bin (so the score's
    Jacobian varies inside a bin, where a probe correlated with the dequantization noise shows): the construction
    of benchmarks/bench_hutchinson.py, which measures the same estimator at larger N."""
    try:
        return load_benchmark("bench_hutchinson").quantized_mixture(d, n)
    finally:
        sys.modules.pop("bench_hutchinson", None)


@pytest.mark.slow  # about 40 s idle: four bits/dim runs of 600 samples through the ODE with the exact divergence
def test_bits_per_dim_with_hutchinson_probes_is_unbiased_at_1_and_4_probes():
    """Paired with the exact divergence on the same dequantized points (same seed, so the same noise): the mean
    difference is within 3 standard errors of 0. The same test on the code before the fix (one stream for noise and
    probes) measured +0.21 +- 0.06 bits/dim at 1 probe and +0.13 +- 0.03 at 4 (3.5 and 4.2 standard errors);
    benchmarks/results/hutchinson.md has both with more samples."""
    proc = VPSDE()
    mix, k = _quantized_mixture(2, 600)
    sf = mix.score_fn(proc)
    opts = dict(levels=LEVELS, dtype=torch.float64, rtol=1e-6, atol=1e-6, seed=3)
    exact = dequantized_bits_per_dim(sf, proc, k, divergence="exact", **opts)
    for num_probes in (1, 4):
        hutch = dequantized_bits_per_dim(sf, proc, k, divergence="hutchinson", num_probes=num_probes, **opts)
        diff = (hutch.bpd - exact.bpd).double()
        se = float(diff.std()) / math.sqrt(len(diff))
        assert abs(float(diff.mean())) < 3 * se, (num_probes, float(diff.mean()), se)
        assert se < 0.1  # the error bar is small enough for the bias measured before the fix to show


def _coverage(d: int, n: int, num_probes: int):
    proc = VPSDE()
    mix = ring_mixture() if d == 2 else anisotropic_mixture(d)
    x = mix.sample(n, generator=torch.Generator().manual_seed(4))
    sf = mix.score_fn(proc)
    exact = log_likelihood(sf, proc, x, rtol=1e-6, atol=1e-6)
    h = log_likelihood(sf, proc, x, divergence="hutchinson", num_probes=num_probes, seed=9, rtol=1e-6, atol=1e-6)
    return exact, h


def test_standard_errors_are_never_zero_and_the_t_interval_covers():
    exact, h = _coverage(2, 160, 4)
    known = ~torch.isnan(h.std_err)
    assert torch.all(h.std_err[known] > 0)  # never 0 for an estimate
    # in 2-D a Rademacher probe gives one of two values, so all 4 agree with probability 1/8 (then NaN, not 0)
    unknown = int((~known).sum())
    assert abs(unknown - 160 / 8) < 4 * math.sqrt(160 * 1 / 8 * 7 / 8), unknown
    lo, hi = h.interval(0.95)
    inside = ((exact.log_prob >= lo) & (exact.log_prob <= hi))[known]
    assert float(inside.double().mean()) > 0.9
    summary = h.summary()
    assert summary["num_unknown_std_err"] == unknown
    assert summary["hutchinson_std_err_mean_nll"] > 0


def test_summary_counts_the_probe_noise_once():
    _, h = _coverage(16, 64, 4)
    s = h.summary()
    spread = float(h.nll.double().std()) / math.sqrt(64)
    assert s["std_err_mean_nll"] == pytest.approx(spread, rel=1e-12)
    pooled = math.sqrt(float(h.probe_variance.sum()) / 4) / 64
    assert s["hutchinson_std_err_mean_nll"] == pytest.approx(pooled, rel=1e-12)


def test_student_t_quantiles_against_closed_forms():
    # df = 1 is Cauchy: tan(pi (p - 1/2)); df = 2: (2p - 1) sqrt(2 / (4 p (1 - p)))
    for p in (0.9, 0.975, 0.995):
        assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-7)
        assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-7)
    assert student_t_quantile(0.975, 400) == pytest.approx(1.966, abs=1e-3)  # -> the normal 1.960


def test_likelihood_command_refuses_pixels_outside_an_image_models_range(tmp_path, capsys):
    import numpy as np
    from diffusers import DDPMScheduler, UNet2DModel

    from score_toolkit.cli import main
    from score_toolkit.pipeline import ScorePipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    ScorePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "m")
    raw = np.random.default_rng(0).integers(0, 17, size=(2, 1, 8, 8)).astype(np.float32)  # 0..16, not [-1, 1]
    np.save(tmp_path / "raw.npy", raw)
    args = ["likelihood", "--model", str(tmp_path / "m"), "--data-file", str(tmp_path / "raw.npy"), "--divergence",
            "hutchinson", "--num-probes", "2", "--method", "euler", "--num-steps", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "expected data in the model's range [-1, 1]" in err and "--data-range" in err, err
    np.save(tmp_path / "scaled.npy", raw / 8 - 1)
    assert main(args[:4] + [str(tmp_path / "scaled.npy")] + args[5:]) == 0
    # a model trained on another range says so
    assert main(args + ["--data-range", "0", "16"]) == 0


@pytest.mark.slow  # a few small ODE solves: about 20 s on a loaded machine
def test_the_hutchinson_benchmark_runs_and_writes_its_tables(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hutchinson.py"
    spec = importlib.util.spec_from_file_location("bench_hutchinson_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--bias-n", "12", "--coverage-n", "12", "--probes", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "hutchinson.json").read_text())
    assert len(result["bias"]) == 4 and len(result["coverage"]) == 2
    assert all(0 <= r["coverage_t95_known"] <= 1 for r in result["coverage"])
    assert "| streams | probes |" in (tmp_path / "hutchinson.md").read_text()
