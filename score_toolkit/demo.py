"""The 2-D demo: train a small score network on a Gaussian-mixture data set (through
:func:`score_toolkit.training.train`, the loop of ``score-toolkit train``) and picture its samples next to
the true density.

    score-toolkit demo --output demo.png
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .analytic import ring_mixture
from .metrics import mode_weight_error, noise_floor, sliced_wasserstein
from .processes import VPSDE
from .scores import ScoreAdapter
from .threads import cpu_threads

__all__ = ["DemoResult", "run_demo", "demo_config"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    output: Path
    train_seconds: float
    sample_seconds: float
    final_loss: float
    sliced_w2: float
    sliced_w2_floor: float
    mode_weight_error: float
    mode_weight_floor: float
    nfe: int

    def summary(self) -> str:
        return (
            f"wrote {self.output}\n"
            f"trained in {self.train_seconds:.1f} s (final loss {self.final_loss:.4f}); "
            f"sampled in {self.sample_seconds:.1f} s with {self.nfe} score evaluations\n"
            f"sliced W2 to exact samples {self.sliced_w2:.3f} (noise floor {self.sliced_w2_floor:.3f}); "
            f"mode-weight error {self.mode_weight_error:.3f} (floor {self.mode_weight_floor:.3f})"
        )


def demo_config(output_dir: str | Path, *, steps: int = 3000, batch_size: int = 512, seed: int = 0,
                learning_rate: float = 2e-3, progress: bool = True):
    """The demo's training run as a :class:`~score_toolkit.training.RunConfig`: a ScoreMLP (linear time
    embedding) trained with continuous-time DSM on a VP SDE, on 200,000 draws of the 2-D ring of 8 Gaussians,
    on the CPU, with 5 % linear warm-up, gradient clipping and an EMA of the weights; one checkpoint at the end,
    no export."""
    from .training import RunConfig

    return RunConfig.from_dict({
        "output_dir": str(output_dir),
        "seed": seed,
        "data": {"name": "ring", "options": {"num_samples": 200_000, "seed": seed}},
        "process": {"name": "VPSDE"},
        "model": {"name": "ScoreMLP", "prediction_type": "epsilon", "time_input": "t",
                  "options": {"time_embedding": "linear"}},
        "objective": {"name": "continuous_dsm"},
        "train": {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                  "warmup_steps": max(1, steps // 20), "ema_decay": 0.999, "checkpoint_every": steps,
                  "keep_checkpoints": 1, "log_every": max(1, min(100, steps)), "progress": progress, "cpu": True},
        "export": {"enabled": False},
    })


@cpu_threads()
def run_demo(
    output: str | Path = "demo.png",
    *,
    steps: int = 3000,
    batch_size: int = 512,
    num_samples: int = 4000,
    sampler: str = "euler_maruyama",
    sampler_options: dict | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> DemoResult:
    """Train a :class:`~score_toolkit.models.ScoreMLP` with continuous-time DSM on a VP SDE on the
    2-D ring of 8 Gaussians (through :func:`score_toolkit.training.train`, with :func:`demo_config`, in a
    temporary run folder removed afterwards), sample it with a registered sampler, and write a PNG with the
    true density, the model's samples and exact samples side by side.

    The start message goes to the ``score_toolkit.demo`` logger; the closing summary to ``log`` (default: the
    same logger at INFO level). ``progress``: tqdm bars over the training steps and the sampler's steps.
    Runs under the thread policy (:mod:`score_toolkit.threads`)."""
    log = logger.info if log is None else log
    from .plotting import density_panel, figure_grid, histogram_panel, require_matplotlib, save_png
    from .registry import get_sampler
    from .training import train

    require_matplotlib("score-toolkit demo draws its picture with matplotlib")  # before minutes of training
    opts = {"num_steps": 500, "progress": progress} if sampler == "euler_maruyama" else {"progress": progress}
    opts.update(sampler_options or {})
    chosen = get_sampler(sampler, **opts)  # an unknown sampler or option fails before the training
    data = ring_mixture()
    t0 = time.perf_counter()
    logger.info("training a score network on the 2-D ring of 8 Gaussians (%d steps), then drawing %d samples with %s",
                steps, num_samples, sampler)
    with tempfile.TemporaryDirectory(prefix="score-toolkit-demo-") as run_dir:
        run = train(demo_config(run_dir, steps=steps, batch_size=batch_size, seed=seed, progress=progress))
    model, process = run.model, VPSDE()
    final_loss = run.history[-1]["loss"]
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    score_fn = ScoreAdapter(model, process, prediction_type="epsilon", time_input="t")
    out = chosen.sample(score_fn, process, shape=(num_samples, 2), generator=torch.Generator().manual_seed(seed + 1))
    sample_s = time.perf_counter() - t1
    samples = out.samples.double()

    exact = data.sample(num_samples, generator=torch.Generator().manual_seed(seed + 2))
    sw = sliced_wasserstein(samples, exact)
    floor = noise_floor(data, num_samples)
    mwe = mode_weight_error(samples, data)
    mwe_floor = noise_floor(data, num_samples, lambda s, r: mode_weight_error(s, data))
    extent = (-6.0, 6.0, -6.0, 6.0)
    fig, axes = figure_grid(3)
    density_panel(data.log_prob, extent, title="true density", ax=axes[0])
    histogram_panel(samples, extent, title=f"model samples ({sampler}, {out.nfe} NFE)", ax=axes[1])
    histogram_panel(exact, extent, title="exact samples", ax=axes[2])
    path = save_png(fig, output)
    result = DemoResult(path, train_s, sample_s, final_loss, sw, floor, mwe, mwe_floor, out.nfe)
    log(result.summary())
    return result
