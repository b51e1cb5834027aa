#!/usr/bin/env python
"""Classifier-free guidance on the shipped class-conditional digits model: per class, does the shipped digits
classifier assign the requested class to the guided samples, and how far are they from the real digits of that
class (Frechet distance in the classifier's features, next to the real-vs-real floor)? (docs/conditioning.md)

For each guidance scale, ``score-toolkit evaluate --model digits_class_conditional --class-label each
--guidance-scale S`` with the given sampler options: per class as many samples as the class's floor sets hold
(86 to 93; 899 in all), the same seeds at every scale. Writes ``benchmarks/results/cfg_digits.md`` and ``.json``.

    python benchmarks/bench_cfg_digits.py                         # scales 1, 2, 3; dpmpp_2m, 24 steps = 25 NFE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from score_toolkit.cli import main as cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits_class_conditional")
    p.add_argument("--scales", default="1,2,3")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--option", action="append", default=None, help="sampler options (default num_steps=24)")
    p.add_argument("--num-samples", type=int, default=None, help="per class (default: the floor sets' size)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    options = args.option or ["num_steps=24"]
    start, load0 = time.time(), os.getloadavg()[0]
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales.split(","):
            cmd = ["evaluate", "--model", args.model, "--sampler", args.sampler]
            for o in options:
                cmd += ["--option", o]
            cmd += ["--class-label", "each", "--guidance-scale", scale, "--output", f"{tmp}/r.json", "-q"]
            if args.num_samples:
                cmd += ["--num-samples", str(args.num_samples)]
            if cli(cmd) != 0:
                return 1
            rep = json.loads(Path(f"{tmp}/r.json").read_text())
            rep["command"] = "score-toolkit " + " ".join(c for c in cmd if c not in ("--output", f"{tmp}/r.json"))
            reports.append(rep)
    lines = ["# Classifier-free guidance on the shipped class-conditional digits model", "",
             f"Model `{args.model}`" + (f" (hub_cards/{args.model}, trained with the command its card records)"
                                         if "/" not in args.model else "") + ". Per class "
             f"as many samples as the class's floor sets hold ({reports[0]['num_samples']} in all), the same seeds at "
             f"every scale; classified by hub_cards/digits_classifier; Frechet distance in its penultimate features "
             f"to the odd half of the real digits of the class; floors: the even half of the class against the odd "
             f"half (two disjoint real sets of the same size), and the classifier's accuracy on that even half. "
             f"Load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, {time.time() - start:.0f} s. "
             f"Command: `python benchmarks/bench_cfg_digits.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
             "", "| guidance scale | sampler (NFE) | classified as requested, all | worst class |", "|---|---|---|---|"]
    for r in reports:
        worst = min(r["rows"], key=lambda row: row["accuracy"])
        lines.append(f"| {r['details']['guidance_scale']:g} | {r['details']['sampler']} ({r['nfe']}) | "
                     f"{r['accuracy']:.4f} | {worst['accuracy']:.3f} (class {worst['class']}) |")
    head = "| class | samples | " + " | ".join(f"classified, scale {r['details']['guidance_scale']:g}" for r in reports) \
        + " | accuracy floor | " + " | ".join(f"FD, scale {r['details']['guidance_scale']:g}" for r in reports) \
        + " | FD floor |"
    lines += ["", "Per class (FD: Frechet distance):", "", head, "|" + "---|" * (2 * len(reports) + 4)]
    for i, row in enumerate(reports[0]["rows"]):
        acc = " | ".join(f"{r['rows'][i]['accuracy']:.3f}" for r in reports)
        fd = " | ".join(f"{r['rows'][i]['frechet_distance']:.2f}" for r in reports)
        lines.append(f"| {row['class']} | {row['num_samples']} | {acc} | {row['accuracy_floor']:.3f} | {fd} | "
                     f"{row['frechet_floor']:.2f} |")
    lines += ["", "Commands (one per scale):", ""] + [f"* `{r['command']}`" for r in reports]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("cfg_digits.md", "\n".join(lines) + "\n"), ("cfg_digits.json", json.dumps(reports, indent=1))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
