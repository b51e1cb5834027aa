#!/usr/bin/env python
"""Default settings against the noise floor: ``get_sampler(name, num_steps=n)`` with nothing else (the data-free
``grid="fitted"`` and ``to_zero=True`` of dpmpp_2m), with the exact score of the analytic test bed.

For each case (the 2-D ring, the 16-D anisotropic mixture, the 64-D mixture of the same construction) and process
(``VESDE(0.01, 50)``, ``VPSDE(0.1, 20)``; for the transfer table VESDE with sigma_max 10 and 40 as well), every
budget on a ladder is scored with bench_samplers' metrics (within-mode sliced W2 and the mean-NLL gap, each divided
by its noise floor: the same metric between two independent exact sets of size N, averaged over ``--floor-seeds``
pairs). A run meets the criterion when both ratios are <= 1.5. The summary gives the smallest NFE that meets it
and whether every larger budget on the ladder meets it too (no relapse).

    OMP_NUM_THREADS=1 python benchmarks/bench_defaults.py            # N = 10000 (the committed results)
    python benchmarks/bench_defaults.py --n 1000 --floor-seeds 2     # a quick look
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_samplers as B  # noqa: E402

from score_toolkit import metrics as M  # noqa: E402
from score_toolkit.analytic import anisotropic_mixture, ring_mixture  # noqa: E402
from score_toolkit.processes import VESDE, VPSDE  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402

CASES = {
    "ring": (ring_mixture, (6, 8, 10, 12, 13, 15, 20, 25, 30)),
    "aniso16": (anisotropic_mixture, (10, 12, 15, 20, 25, 30, 40)),
    "aniso64": (lambda: anisotropic_mixture(dim=64), (12, 15, 20, 25, 30, 40)),
}
PROCESSES = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE(0.1, 20.0),
             "VE10": lambda: VESDE(0.01, 10.0), "VE40": lambda: VESDE(0.01, 40.0)}
RUNS = [  # (case, process, sampler): what is measured
    *[(c, p, "dpmpp_2m") for c in ("ring", "aniso16", "aniso64") for p in ("VE", "VP")],
    ("ring", "VE10", "dpmpp_2m"), ("ring", "VE40", "dpmpp_2m"),
]
FIELDS = ["case", "process", "sampler", "options", "nfe", "wsw_ratio", "nll_ratio", "meets", "wall_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--floor-seeds", type=int, default=6)
    ap.add_argument("--cases", default="ring,aniso16,aniso64")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="defaults")
    ap.add_argument("--from-log", default=None,
                    help="run nothing: write the tables from the row lines a (possibly stopped) run printed")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = args.cases.split(",")
    rows, t_start = [], time.time()
    if args.from_log:
        import ast

        rows = [ast.literal_eval(line) for line in Path(args.from_log).read_text().splitlines() if line.startswith("{")]
        cases = [c for c in cases if any(r["case"] == c for r in rows)]
        write_results(args, cases, rows, None)
        return 0
    for case in cases:
        make, ladder = CASES[case]
        mix = make()
        floors = B.noise_floors(mix, args.n, args.floor_seeds)
        reference = mix.sample(args.n, generator=B._gen(B.REF_SEED))
        ref_nll = M.mean_nll(reference, mix)
        print(f"[floors] {case}: wsw {floors['wsw']['mean']:.4g}, nll {floors['nll']['mean']:.4g}", flush=True)
        for c, pname, name in RUNS:
            if c != case:
                continue
            process = PROCESSES[pname]()
            score = mix.score_fn(process)
            for nfe in (*ladder, "converged"):
                if nfe == "converged":  # the converged ODE from the same draws: what no step count can beat
                    sampler = get_sampler("dpmpp_3m", num_steps=400, grid="log_sigma", to_zero=True)
                else:
                    sampler = get_sampler(name, num_steps=nfe - 1)  # defaults: grid="fitted", to_zero=True
                t0 = time.perf_counter()
                out = sampler.sample(score, process, shape=(args.n, mix.dim), dtype=torch.float64,
                                     generator=B._gen(1))
                wall = time.perf_counter() - t0
                r = B.score_samples(out.samples, mix, reference, ref_nll)
                w, nl = r["wsw"] / floors["wsw"]["mean"], abs(r["nll_gap"]) / floors["nll"]["mean"]
                label = "dpmpp_3m, 400 log_sigma steps" if nfe == "converged" else f"num_steps={nfe - 1}"
                row = {"case": case, "process": pname, "sampler": name if nfe != "converged" else "converged ODE",
                       "options": label,
                       "nfe": out.nfe, "wsw_ratio": round(w, 4), "nll_ratio": round(nl, 4),
                       "meets": bool(w <= B.CRITERION and nl <= B.CRITERION), "wall_s": round(wall, 3)}
                rows.append(row)
                print(row, flush=True)
    write_results(args, cases, rows, time.time() - t_start)
    return 0


def write_results(args, cases, rows, elapsed) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{args.tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Default settings vs the noise floor (N = {args.n}, {args.floor_seeds} floor pairs, exact scores, float64)",
             "", (f"Run time {elapsed:.0f} s. " if elapsed is not None else "") + (f"{args.note} " if args.note else "")
             + "Criterion: within-mode sliced W2 and |mean-NLL gap| both "
             f"<= {B.CRITERION}x their noise floors. Sampler called with `num_steps` only (NFE = num_steps + 1: "
             "the default `to_zero=True`; the default `grid=\"fitted\"`).", "",
             "The last entry of each row is the converged probability-flow ODE from the same initial draws (dpmpp_3m, "
             "400 steps): its ratios are the sampling noise of this one draw, which no step count removes.", "",
             "| case | process | sampler | smallest NFE meeting it | every larger budget too | NFE: wsw / nll ratios |",
             "| --- | --- | --- | --- | --- | --- |"]
    for case in cases:
        for c, pname, name in RUNS:
            if c != case:
                continue
            rs = [r for r in rows if r["case"] == case and r["process"] == pname and r["sampler"] == name]
            conv = [r for r in rows if r["case"] == case and r["process"] == pname and r["sampler"] == "converged ODE"]
            if not rs:
                continue
            ok = [r["nfe"] for r in rs if r["meets"]]
            first = min(ok) if ok else None
            stays = first is not None and all(r["meets"] for r in rs if r["nfe"] >= first)
            detail = ", ".join(f"{r['nfe']}: {r['wsw_ratio']:.2f} / {r['nll_ratio']:.2f}" for r in rs)
            if conv:
                detail += f"; converged ODE: {conv[0]['wsw_ratio']:.2f} / {conv[0]['nll_ratio']:.2f}"
            lines.append(f"| {case} | {pname} | {name} | {first if first else '-'} | {'yes' if stays else 'no'} | {detail} |")
    (out_dir / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
