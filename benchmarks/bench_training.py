"""Training throughput: score_toolkit's Accelerate loop vs a minimal hand-written PyTorch loop.

Both train the same network on the same data with the same objective (continuous-time DSM on a VP SDE,
epsilon-parameterised ScoreMLP, which is 1/2 ||eps_theta(x_t, t) - z||^2 per sample) and the same batch,
with AdamW. Two settings:

* ``minimal``: no EMA, no clipping, in both loops;
* ``full``: EMA of the weights and gradient-norm clipping in both loops (the hand-written loop does them
  with ``torch._foreach_lerp_`` and ``clip_grad_norm_``).

The loops run alternately (A B A B ...) so a busy machine slows both alike; each run's first
``--warmup`` steps are excluded from its timing, and the median over ``--repeats`` runs is reported.
The ratio (ours / hand-written steps per second) is the figure of merit (target >= 0.9). Two clocks:
wall time, and this process's CPU time (``time.process_time``), which on a shared machine is not
inflated by time spent waiting for a core (with one thread it is the work done).

    python benchmarks/bench_training.py [--steps 300] [--repeats 3] [--batch 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import git_commit  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from score_toolkit._io import write_text_atomic
from score_toolkit.data import load_dataset  # noqa: E402
from score_toolkit.models import ScoreMLP  # noqa: E402
from score_toolkit.processes import VPSDE  # noqa: E402
from score_toolkit.training import train  # noqa: E402

MODEL = {"hidden_dim": 128, "num_layers": 3, "time_embedding": "log"}
LR = 1e-3


def hand_written(steps: int, warmup: int, batch: int, full: bool, seed: int = 0) -> tuple[float, float]:
    """The minimal loop: sample a batch, perturb, predict eps, MSE, AdamW step. Returns steps/s
    (wall, CPU)."""
    torch.manual_seed(seed)
    data = load_dataset("ring", num_samples=20000).data
    process = VPSDE()
    model = ScoreMLP(2, **MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    shadow = [p.detach().clone() for p in model.parameters()] if full else None
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(data), generator=g), 0
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        if pos + batch > len(data):
            perm, pos = torch.randperm(len(data), generator=g), 0
        x = data[perm[pos:pos + batch]]
        pos += batch
        t = process.t_min + (1 - process.t_min) * torch.rand(batch, generator=g)
        z = torch.randn(x.shape, generator=g)
        alpha, sigma = process.marginal(t)
        xt = alpha[:, None] * x + sigma[:, None] * z
        loss = 0.5 * (model(xt, t) - z).pow(2).sum(1).mean()
        loss.backward()
        if full:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if full:
            torch._foreach_lerp_(shadow, [p.detach() for p in model.parameters()], 1 - 0.999)
    return (steps - warmup) / (time.perf_counter() - t0), (steps - warmup) / (time.process_time() - c0)


def ours(steps: int, warmup: int, batch: int, full: bool, seed: int = 0) -> tuple[float, float]:
    """score_toolkit.training.train with the same model, data, objective, batch and optimizer."""
    marks = {}

    def clock(info):
        if info["step"] == warmup:
            marks["start"] = (time.perf_counter(), time.process_time())
        if info["step"] == steps:
            marks["end"] = (time.perf_counter(), time.process_time())

    with tempfile.TemporaryDirectory() as d:
        cfg = {
            "output_dir": str(Path(d) / "run"),
            "seed": seed,
            "data": {"name": "ring", "options": {"num_samples": 20000}},
            "process": {"name": "VPSDE"},
            "model": {"name": "ScoreMLP", "prediction_type": "epsilon", "time_input": "t", "options": MODEL},
            "objective": {"name": "continuous_dsm"},
            "train": {"steps": steps, "batch_size": batch, "learning_rate": LR, "progress": False,
                      "checkpoint_every": steps, "log_every": steps,
                      "ema_decay": 0.999 if full else None, "max_grad_norm": 1.0 if full else None},
            "export": {"enabled": False},
        }
        train(cfg, callbacks=[clock])
    (w0, c0), (w1, c1) = marks["start"], marks["end"]
    return (steps - warmup) / (w1 - w0), (steps - warmup) / (c1 - c0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "training.md"))
    args = parser.parse_args(argv)
    os.environ["SCORE_TOOLKIT_NUM_THREADS"] = str(args.threads)  # the thread policy (docs/cli.md)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for setting in ("minimal", "full"):
        full = setting == "full"
        a, b = [], []
        for _ in range(args.repeats):
            b.append(hand_written(args.steps, args.warmup, args.batch, full))
            a.append(ours(args.steps, args.warmup, args.batch, full))
        for clock, i in (("wall", 0), ("CPU", 1)):
            ratios = [x[i] / y[i] for x, y in zip(a, b)]
            rows.append((setting, clock, statistics.median(y[i] for y in b), statistics.median(x[i] for x in a),
                         statistics.median(ratios), min(ratios), max(ratios)))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [
        "# Training throughput: score_toolkit loop vs a hand-written PyTorch loop",
        "",
        f"ScoreMLP(2, {MODEL}), batch {args.batch}, AdamW lr {LR}, continuous-time DSM on VPSDE (epsilon), ring data; "
        f"{args.steps} steps per run, first {args.warmup} excluded, {args.repeats} alternating runs per loop, medians. "
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs" + (f", load average (1 min) {load_start[0]:.1f} at the start and {load[0]:.1f} at the end"
                                    if load else "") + f"; commit {git_commit()}.",
        "",
        "| setting | clock | hand-written steps/s | score_toolkit steps/s | ratio (median) | ratio range |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting, clock, hand, our, ratio, lo, hi in rows:
        lines.append(f"| {setting} | {clock} | {hand:.1f} | {our:.1f} | {ratio:.3f} | {lo:.3f} - {hi:.3f} |")
    lines += [
        "",
        "`minimal`: no EMA, no clipping in either loop. `full`: EMA (decay 0.999) and gradient clipping (norm 1) "
        "in both. Target: ratio >= 0.9. `wall`: steps per second of wall time; `CPU`: steps per second of this "
        "process's CPU time, the robust figure when other jobs share the machine (the load average above).",
        "",
        f"Command: `python benchmarks/bench_training.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip() + "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
