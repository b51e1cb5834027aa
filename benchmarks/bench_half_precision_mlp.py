#!/usr/bin/env python
"""What bfloat16 costs a ScoreMLP: the relative output error of the bfloat16 network against the float32 one, with
the time embedding as the library computes it (float32 time and frequencies, phases in float32), with the phases
computed in bfloat16 (the time and the frequencies rounded to bfloat16 first, as before the change), and the floor:
the float32 network with only its weights rounded to bfloat16. Random networks (no training: the embedding's
precision does not depend on the weights' values), ``hidden_dim=64``, ``num_layers=2``, 4096 points x ~ N(0, I) in
2-D and times t ~ U(0.01, 1); five seeds per setting. The error is ``||out - ref|| / ||ref||`` over all points.

    python benchmarks/bench_half_precision_mlp.py
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
from pathlib import Path

import torch

from score_toolkit._io import write_text_atomic
from score_toolkit.models import ScoreMLP

SEEDS = range(5)
SETTINGS = [(scale, emb) for scale in (1.0, 16.0) for emb in ("log", "linear")]
OUT = Path(__file__).resolve().parent / "results" / "half_precision_mlp.md"


def _bf16_phases(embed):
    """The embedding's forward as it was: time and frequencies rounded to bfloat16, phases in bfloat16."""

    def forward(c):
        w = embed.W.bfloat16()
        proj = c.bfloat16()[:, None] * w[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    return forward


def _errors(seed: int, scale: float, emb: str) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    net = ScoreMLP(2, hidden_dim=64, num_layers=2, fourier_scale=scale, time_embedding=emb).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    x, t = torch.randn(4096, 2, generator=g), torch.rand(4096, generator=g) * 0.99 + 0.01
    half = copy.deepcopy(net).to(torch.bfloat16)
    old = copy.deepcopy(net).to(torch.bfloat16)
    old.time_embed.forward = _bf16_phases(old.time_embed)
    rounded = copy.deepcopy(net)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
        ref = net(x, t)
        rel = lambda out: float((out.float() - ref).norm() / ref.norm())  # noqa: E731
        return rel(half(x.bfloat16(), t)), rel(old(x.bfloat16(), t)), rel(rounded(x, t))


def main() -> int:
    torch.set_num_threads(1)
    lines = ["# bfloat16 ScoreMLP: relative output error against float32", "",
             "`python benchmarks/bench_half_precision_mlp.py` (random networks, hidden 64, 2 layers, 4096 points, "
             f"seeds {SEEDS.start}-{SEEDS.stop - 1}; median [min, max] over seeds, in %).", "",
             "| fourier_scale | time_embedding | bfloat16, phases in float32 (now) | bfloat16, phases in bfloat16 (before) "
             "| weights rounded only (floor) |", "| --- | --- | --- | --- | --- |"]
    for scale, emb in SETTINGS:
        cols = list(zip(*(_errors(seed, scale, emb) for seed in SEEDS)))
        cell = lambda v: f"{100 * statistics.median(v):.2f} [{100 * min(v):.2f}, {100 * max(v):.2f}]"  # noqa: E731
        lines.append(f"| {scale:g} | {emb} | {cell(cols[0])} | {cell(cols[1])} | {cell(cols[2])} |")
        print(lines[-1], flush=True)
    write_text_atomic(OUT, "\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
