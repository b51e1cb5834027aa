"""Helpers shared by several test files (pytest puts this folder on ``sys.path``: ``from helpers import ...``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def tiny_unet(channels: int = 1):
    """A seeded 8x8 ``UNet2DModel`` of two levels (widths 8, 16), in eval mode: a network small enough for tests."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def vector_pipeline():
    """A seeded 2-D ``ScorePipeline`` (a one-layer ``ScoreMLP`` of width 16 in eval mode, VP, epsilon, time ``t``)."""
    from score_toolkit.models import ScoreMLP
    from score_toolkit.pipeline import ScorePipeline
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import scheduler_for

    torch.manual_seed(0)
    return ScorePipeline(unet=ScoreMLP(2, hidden_dim=16, num_layers=1).eval(),
                         scheduler=scheduler_for(VPSDE(), "epsilon", "t"))


def small_run_config(out, *, num_samples: int, train_defaults: dict, **sections) -> dict:
    """A training run config of a small ScoreMLP on the ring (VP, continuous DSM, no export), with the training
    settings ``train_defaults``; each of ``sections`` updates the section of that name (a dict) or replaces it."""
    cfg = {
        "output_dir": str(out),
        "seed": 0,
        "data": {"name": "ring", "options": {"num_samples": num_samples}},
        "process": {"name": "VPSDE"},
        "model": {"name": "ScoreMLP", "prediction_type": "epsilon", "time_input": "t",
                  "options": {"hidden_dim": 32, "num_layers": 1, "time_embedding": "linear"}},
        "objective": {"name": "continuous_dsm"},
        "train": {"progress": False, "learning_rate": 3e-3, **train_defaults},
        "export": {"enabled": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def fail_shard(monkeypatch, index: int):
    """Make ``sample_to_folder`` fail with a full disk (ENOSPC) when it writes shard ``index``; returns the
    original shard writer (to put back for a re-run)."""
    from score_toolkit import distributed

    original = distributed.write_shard

    def failing(out_dir, s, *args):
        if s == index:
            raise OSError(28, "No space left on device (simulated)")
        return original(out_dir, s, *args)

    monkeypatch.setattr(distributed, "write_shard", failing)
    return original


def affine_law_error(y: torch.Tensor, process, m: float, c: float) -> float:
    """The exact weak error ``|mean error| + |variance error|`` of a sampler's output law on 1-d Gaussian data
    N(m, c) started from the exact marginal at t = 1, from one run on basis inputs: the sampler is affine in its
    initial state and its noise draws, so ``y`` (its outputs) holds, row 0, the offset (x_1 = 0, no noise), row 1,
    offset + gain on x_1, and rows 2 + k, offset + gain on the k-th standard-normal draw."""
    b, gain, noise_gains = y[0], y[1] - y[0], y[2:] - y[0]
    a1, s1 = (float(v) for v in process.marginal(torch.tensor(1.0, dtype=torch.float64)))
    a0, s0 = (float(v) for v in process.marginal(torch.tensor(process.t_min, dtype=torch.float64)))
    var = gain**2 * (a1**2 * c + s1**2) + (noise_gains**2).sum()
    return float(abs(gain * a1 * m + b - a0 * m) + abs(var - (a0**2 * c + s0**2)))


def basis_noise_law_error(sampler, process, n_rows: int, m: float = 0.7, c: float = 0.05) -> float:
    """:func:`affine_law_error` of ``sampler``, its k-th noise draw replaced by the basis vector e_{2+k} (one
    batch of ``n_rows`` >= 2 + the number of draws)."""
    from unittest import mock

    from score_toolkit.analytic import gaussian
    from score_toolkit.samplers.base import SamplingContext

    x0 = torch.zeros(n_rows, 1, dtype=torch.float64)
    x0[1] = 1.0
    calls = [0]

    def basis_noise(like):
        z = torch.zeros_like(like)
        z[2 + calls[0]] = 1.0
        calls[0] += 1
        return z

    with mock.patch.object(SamplingContext, "randn_like", lambda self, x: basis_noise(x)):
        y = sampler.sample(gaussian([m], [[c]]).score_fn(process), process, x_init=x0).samples[:, 0]
    return affine_law_error(y[:2 + calls[0]], process, m, c)


def load_benchmark(name: str):
    """The benchmark script ``benchmarks/<name>.py`` as a module (registered in ``sys.modules`` under ``name``, so
    its dataclasses and pickling work); the caller removes it with ``sys.modules.pop(name, None)`` when done."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def projection_problem():
    """The conformance mixture observed through the projection (0.6, -0.8) with y = 0.7, sigma_y = 0.5: (mixture, A, y,
    sigma_y, exact posterior) -- overlapping modes, where DPS, PiGDM and replacement are biased."""
    from score_toolkit.testing import conformance_mixture

    mix = conformance_mixture()
    a = torch.tensor([[0.6, -0.8]], dtype=torch.float64)
    y, sy = torch.tensor([0.7], dtype=torch.float64), 0.5
    return mix, a, y, sy, mix.condition(a, y, sy)


def recording_bars(monkeypatch, module=None, name: str = "tqdm") -> list:
    """Replace ``module.name`` (default: ``tqdm.auto.tqdm``, the samplers' bar) by a tqdm that writes nowhere and
    appends itself to the returned list, so a test can read each bar's ``total`` and ``n``."""
    import io

    if module is None:
        import tqdm.auto as module
    bars = []
    base = getattr(module, name)

    class RecordingBar(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(module, name, RecordingBar)
    return bars
