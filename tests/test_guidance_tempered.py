"""Classifier guidance of scale w in closed form (benchmarks/bench_guidance_1d.py, docs/conditioning.md): at w = 1
the guided probability-flow ODE ends at p(x | c); at w = 2 its guided score is not the score of the tempered target
p(x) p(c | x)^w / Z carried forward by the noise, and the ODE overshoots that target."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_guidance_1d.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_guidance_1d", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_guidance_1d"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("bench_guidance_1d", None)
    return module


def test_guided_score_is_not_the_diffused_tempered_score_and_the_ode_overshoots():
    from score_toolkit.conditioning import ClassifierGuidance

    b = _bench()
    cc, process = b.setup()
    grid = torch.linspace(-10, 10, 8001, dtype=torch.float64)
    exact = b.score_mismatch(cc, 1.0, process, grid, (0.3,))["0.3"]
    tempered = b.score_mismatch(cc, 2.0, process, grid, (0.3,))["0.3"]
    assert exact["rms_difference"] < 1e-8 * exact["rms_score"]
    assert tempered["rms_difference"] > 0.3 * tempered["rms_score"]
    means = {}
    for w in (1.0, 2.0):
        guided = ClassifierGuidance(cc.mixture.score_fn(process), cc.classifier(process), 1, scale=w)
        means[w] = float(b.ode_terminal(guided, process, 400, 60).mean())
    target2 = b.stats_from_density(grid, b.tempered(cc, 2.0, grid).exp(), cc)["mean_x"]
    assert abs(means[1.0] - 1.0) < 0.01  # p(x | c) has mean 1
    assert abs(target2 - 1.0766) < 1e-3 and means[2.0] > target2 + 0.2  # the ODE ends near 1.38, not at 1.08
