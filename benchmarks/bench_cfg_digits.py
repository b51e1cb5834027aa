#!/usr/bin/env python
"""Classifier-free guidance on a class-conditional digits UNet: does the shipped digits classifier assign the
requested class to the guided samples? (docs/conditioning.md)

Train the model first (not shipped): ``score-toolkit train --config benchmarks/configs/digits_class_conditional.yaml``
(exports to runs/digits_class_conditional/pipeline). For each guidance scale and each class 0..9, ``--per-class``
samples with ``dpmpp_2m`` at 25 steps (25 network calls on a doubled batch with guidance), classified by
``hub_cards/digits_classifier``; reported: the fraction classified as the requested class, overall and worst class.

    python benchmarks/bench_cfg_digits.py --model runs/digits_class_conditional/pipeline
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from score_toolkit._io import write_text_atomic
from score_toolkit.digits_classifier import load_digits_classifier
from score_toolkit.pipeline import ScorePipeline


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/digits_class_conditional/pipeline")
    p.add_argument("--scales", default="1,2,3,5")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load0 = time.time(), os.getloadavg()[0]
    pipe = ScorePipeline.from_pretrained(args.model)
    clf = load_digits_classifier()
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        per_class = []
        for c in range(10):
            gens = [torch.Generator().manual_seed(1000 * c + i) for i in range(args.per_class)]
            out = pipe(args.per_class, class_labels=c, guidance_scale=scale, sampler="dpmpp_2m", num_steps=args.steps,
                       generator=gens, output_type="pt")
            pred = clf.predict(out.samples.clamp(-1, 1))[0]
            per_class.append(float((pred == c).float().mean()))
        rows.append((scale, sum(per_class) / 10, min(per_class), per_class, out.nfe))
        print(scale, rows[-1][1], rows[-1][2], flush=True)
    lines = ["# Classifier-free guidance on a class-conditional digits UNet", "",
             f"Model `{args.model}` (trained with `score-toolkit train --config "
             "benchmarks/configs/digits_class_conditional.yaml`, not shipped), dpmpp_2m with "
             f"{args.steps} steps, {args.per_class} samples per class, classified by hub_cards/digits_classifier. Load average "
             f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, {time.time() - start:.0f} s. Command: "
             f"`python benchmarks/bench_cfg_digits.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", "",
             "| guidance_scale | NFE (network calls) | requested class, all | worst class | per class 0..9 |", "|---|---|---|---|---|"]
    for scale, mean, worst, per, nfe in rows:
        lines.append(f"| {scale:g} | {nfe} | {mean:.3f} | {worst:.2f} | {' '.join(f'{v:.2f}' for v in per)} |")
    write_text_atomic(Path(args.out) / "cfg_digits.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
