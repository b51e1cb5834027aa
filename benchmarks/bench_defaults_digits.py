#!/usr/bin/env python
"""The default samplers on a trained network: the shipped digits model (hub_cards/digits), classifier Frechet
distance (the shipped digits classifier's penultimate features, against the odd half of the real digits; floor:
the even half) against NFE, every run from the same initial noise (per-sample generators seeded by (0, i), as
``score-toolkit evaluate --seed 0``), the converged probability-flow ODE as the target.

    OMP_NUM_THREADS=1 python benchmarks/bench_defaults_digits.py            # 900 samples (the committed results)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from score_toolkit import evaluation as E
from score_toolkit._io import write_text_atomic
from score_toolkit._utils import per_sample_generators
from score_toolkit.cli._common import load_score_model
from score_toolkit.registry import get_sampler

#: (label, sampler, options other than num_steps; NFE = num_steps + the final step's evaluation if any)
RUNS = [  # (label, sampler, options, NFE list)
    ("dpmpp_3m defaults", "dpmpp_3m", {}, (10, 15, 20, 25, 50)),
    ("dpmpp_2m defaults", "dpmpp_2m", {}, (15, 25)),
    ("dpmpp_2m log_sigma, no final step (the default before)", "dpmpp_2m", {"grid": "log_sigma", "to_zero": False}, (15, 25)),
    ("unipc defaults (order 3: UniP-3 + UniC, order-4 density)", "unipc", {}, (10, 15, 20, 25)),
    ("unipc on the order-3 density (dpmpp_3m's grid)", "unipc", {"grid": "_order3"}, (15,)),
]
CONVERGED = ("converged ODE (dpmpp_3m, 150 log_sigma steps, to_zero)", "dpmpp_3m",
             {"num_steps": 150, "grid": "log_sigma", "to_zero": True})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=900)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "defaults_digits"))
    ap.add_argument("--only", default=None,
                    help="run only the rows whose label contains this; keep the converged ODE and the other rows of "
                         "the existing result file (same noise, deterministic)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_score_model("digits", None, device=torch.device("cpu"), dtype=torch.float32)
    shape = (args.num_samples, *model["sample_shape"])
    rows = []

    def measure(label, name, options):
        if options.get("grid") == "_order3":  # explicit times: the order-3 data-free density under the model's process
            from score_toolkit.samplers.fixed_grid import fitted_log_snr

            process = model["process"]
            ts = process.t_from_log_snr(fitted_log_snr(process, options["num_steps"], order=3))
            ts[0], ts[-1] = process.t_max, process.t_min
            options = {k: v for k, v in options.items() if k != "num_steps"} | {"grid": ts.tolist()}
        sampler = get_sampler(name, **options)
        gens = per_sample_generators(0, range(args.num_samples))
        t0 = time.perf_counter()
        report, out = E.sample_and_evaluate(model["score_fn"], model["process"], sampler, shape=shape, kind="digits",
                                           generator=gens, dtype=torch.float32)
        row = {"label": label, "sampler": name, "options": {k: v for k, v in sampler.config.items() if k != "progress"},
               "nfe": out.nfe, "frechet_distance": round(report.metrics["frechet_distance"], 4),
               "floor": round(report.floors["frechet_distance"], 4), "wall_s": round(time.perf_counter() - t0, 2)}
        rows.append(row)
        print(row, flush=True)

    if args.only:  # the converged row of the existing result file (the same noise: deterministic)
        rows.append(json.loads(Path(args.out).with_suffix(".json").read_text())[0])
    else:
        measure(*CONVERGED)
    for label, name, options, nfes in RUNS:
        if args.only and args.only not in label:
            continue
        for nfe in nfes:
            extra = 1 if get_sampler(name, **{k: v for k, v in options.items() if k != "grid"}).config.get("to_zero") else 0
            measure(label, name, {**options, "num_steps": nfe - extra})
    if args.only:
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        rows += [r for r in old[1:] if args.only not in r["label"]]
    write(args, rows)
    return 0


def write(args, rows) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    conv = rows[0]["frechet_distance"]
    labels = [run[0] for run in RUNS]
    nfes = sorted({r["nfe"] for r in rows[1:]})
    lines = [f"# Default samplers on the digits model ({args.num_samples} samples, float32, same initial noise)", "",
             f"Classifier Frechet distance (floor {rows[0]['floor']:.3f}: the two halves of the real digits). The converged "
             f"probability-flow ODE from the same noise reads **{conv:.3f}**; each entry: FD (ratio to the converged ODE's).",
             "", "| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |",
             "| --- | " + " | ".join("---" for _ in nfes) + " |"]
    for label in labels:
        cells = []
        for n in nfes:
            r = [r for r in rows if r["label"] == label and r["nfe"] == n]
            cells.append(f"{r[0]['frechet_distance']:.3f} ({r[0]['frechet_distance'] / conv:.2f})" if r else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Converged ODE: {conv:.3f} at {rows[0]['nfe']} NFE."]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
