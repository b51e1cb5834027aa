#!/usr/bin/env python
"""The model-adapted grid (``pilot_grid``, score_toolkit/samplers/pilot_grid.py) against the noise floor, with the
8-seed protocol of bench_defaults.py, and on the digits model.

``analytic``: for each case, process, sampler and budget, one ``pilot_grid`` fit from the exact score (its pilot
draws come from its own generator, seed 271828, independent of every evaluation draw: x_1 of seed s is generator
1 + s, the reference set 999999 + s, the exact control 500000 + s); then the 8 draw seeds of bench_defaults.py
(N = 10,000 each; exact control, converged ODE and paired solver error as there). The pilot's cost (score
evaluations, batched calls, seconds of the pilot and of the fits) is in the result file.

``digits``: classifier Frechet distance of the shipped digits model at the given budgets (900 samples, the same
initial noise as bench_defaults_digits.py), the grid from a pilot with the network's own score. The pilot is
deterministic (its own seeded draws), so the network runs it once: the later budgets' fits replay its recorded score
outputs, after checking that every input is the same as recorded. ``--save-grids DIR`` keeps each fitted grid as a
pilot_grid cache file, DIR/digits_<sampler>_<num_steps>.json (usable as ``grid=<path>``; a file with the same settings
is read instead of fitted). Rows of earlier runs for other sampler/NFE pairs are kept in the result file.

    OMP_NUM_THREADS=1 python benchmarks/bench_pilot_grid.py analytic --cases ring --processes VE,VP \
        --samplers dpmpp_2m,unipc --ladder 10,11,12,15 --tag pilot_grid_ring
    OMP_NUM_THREADS=1 python benchmarks/bench_pilot_grid.py digits --samplers unipc --ladder 15,25 --save-grids DIR
    python benchmarks/bench_pilot_grid.py analytic --n 1000 --seeds 2 --floor-seeds 2 --cases ring  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_defaults as BD  # noqa: E402
import bench_samplers as B  # noqa: E402

from score_toolkit import metrics as M  # noqa: E402
from score_toolkit._io import write_text_atomic  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402
from score_toolkit.samplers.pilot_grid import pilot_grid  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LADDERS = {"ring": "10,11,12,15", "aniso16": "20,25", "aniso64": "30"}


def label(name):
    return f"{name}, pilot grid"


def analytic(args) -> None:
    rows, floors_by_case, costs, t_start = [], {}, [], time.time()
    for case in args.cases.split(","):
        mix = BD.CASES[case][0]()
        conv_steps = BD.CASES[case][4]
        fl = BD.floors_of(mix, case, args.n, args.floor_seeds)
        floors_by_case[case] = fl
        print(f"[floors] {fl}", flush=True)
        ladder = [int(v) for v in (args.ladder or LADDERS[case]).split(",")]
        for pname in args.processes.split(","):
            process = BD.PROCESSES[pname]()
            score = mix.score_fn(process)
            samplers = {}
            for name in args.samplers.split(","):
                for nfe in ladder:
                    pg = pilot_grid(get_sampler(name, num_steps=nfe - 1), score, process, (mix.dim,))
                    v = pg.fit.validation["optimized"]
                    cost = {"case": case, "process": pname, "sampler": name, "nfe": nfe,
                            "score_evaluations": pg.score_evaluations, "score_calls": pg.score_calls,
                            "pilot_s": round(pg.pilot_seconds, 2), "fit_s": round(pg.fit_seconds, 2),
                            "covariance": pg.settings["covariance"], "tail_ok": pg.fit.tail_ok,
                            "retries": pg.fit.retries, "far_off": v.far_off}
                    costs.append(cost)
                    print(f"[cost] {cost}", flush=True)
                    samplers[(name, nfe)] = get_sampler(name, grid=pg.times)
            for seed in range(args.seeds):
                reference = mix.sample(args.n, generator=B._gen(B.REF_SEED + seed))
                ref_nll = M.mean_nll(reference, mix)
                exact = mix.sample(args.n, generator=B._gen(BD.EXACT_SEED + seed))
                x1 = process.prior_sample((args.n, mix.dim), generator=B._gen(1 + seed), dtype=torch.float64)
                t0 = time.perf_counter()
                _, conv = BD.converged_pair(score, process, x1, conv_steps)
                runs = [("exact control", "mix.sample", exact, 0, 0.0),
                        ("converged ODE", f"dpmpp_3m, {conv_steps} log_sigma steps, then to_zero's step", conv,
                         conv_steps + 1, time.perf_counter() - t0)]
                conv_nll = M.mean_nll(conv, mix)
                for (name, nfe), sampler in samplers.items():
                    t0 = time.perf_counter()
                    out = sampler.sample(score, process, x_init=x1.clone())
                    runs.append((label(name), f"num_steps={nfe - 1}", out.samples, out.nfe, time.perf_counter() - t0))
                for lab, opts, samples, nfe, wall in runs:
                    r = B.score_samples(samples, mix, reference, ref_nll)
                    w, nl = r["wsw"] / fl["wsw"], abs(r["nll_gap"]) / fl["nll"]
                    row = {"case": case, "process": pname, "sampler": lab, "options": opts, "nfe": int(nfe),
                           "seed": seed, "wsw_ratio": round(w, 4), "nll_ratio": round(nl, 4),
                           "nll_gap": round(r["nll_gap"], 5),
                           "paired": None if lab == "exact control" else round(M.mean_nll(samples, mix) - conv_nll, 5),
                           "meets": bool(w <= B.CRITERION and nl <= B.CRITERION), "wall_s": round(wall, 3)}
                    rows.append(row)
                    print(row, flush=True)
    note = ("Grids: pilot_grid(get_sampler(name, num_steps=NFE - 1), exact score, process, shape) with its defaults "
            "(2048 pilot draws, 100-step converged ODE, 8-component stand-in mixture, optimize_grid with 2048 "
            "training draws and one refit on a flagged tail), one fit per case, process, sampler and budget; the "
            "pilot's draws are independent of the evaluation draws.")
    BD.write_results(SimpleNamespace(n=args.n, out=args.out, tag=args.tag, note=note), args.cases.split(","), rows,
                     floors_by_case, time.time() - t_start)
    md = Path(args.out) / f"{args.tag}.md"
    lines = ["", "## The pilot's cost (per fit)", "",
             "| case | process | sampler | NFE | score evaluations (calls) | pilot s | fit s | stand-in covariance | "
             "held-out far-off samples (refits) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {c['case']} | {c['process']} | {c['sampler']} | {c['nfe']} | {c['score_evaluations']} "
              f"({c['score_calls']}) | {c['pilot_s']} | {c['fit_s']} | {c['covariance']} | {c['far_off']} "
              f"({c['retries']}) |" for c in costs]
    write_text_atomic(md, md.read_text() + "\n".join(lines) + "\n")
    write_text_atomic(Path(args.out) / f"{args.tag}_cost.json", json.dumps(costs, indent=1) + "\n")
    print("\n".join(lines))


class _ReplayScore:
    """A deterministic score called along the same inputs again (the pilot of each budget): the first pass calls
    ``score_fn`` and records (x, t, output) per call; a later pass (``replay()``) returns the recorded outputs,
    refusing any call whose input differs from the one recorded at that position."""

    def __init__(self, score_fn):
        self.score_fn, self.record, self.position, self.replaying = score_fn, [], 0, False

    def replay(self):
        self.position, self.replaying = 0, True

    def __call__(self, x, t):
        if not self.replaying:
            out = self.score_fn(x, t)
            self.record.append((x.detach().clone(), torch.as_tensor(t).detach().clone(), out.detach().clone()))
            return out
        if self.position >= len(self.record):
            raise RuntimeError("replayed pilot: more score calls than recorded")
        rx, rt, out = self.record[self.position]
        if not (torch.equal(rx, x) and torch.equal(rt, torch.as_tensor(t))):
            raise RuntimeError(f"replayed pilot: call {self.position} differs from the recorded one")
        self.position += 1
        return out.clone()


def digits(args) -> None:
    from score_toolkit import evaluation as E
    from score_toolkit._utils import per_sample_generators
    from score_toolkit.cli._common import load_score_model

    t_start, load_start = time.time(), os.getloadavg()
    model = load_score_model("digits", None, device=torch.device("cpu"), dtype=torch.float32)
    process, shape = model["process"], tuple(model["sample_shape"])
    earlier = json.loads((RESULTS / "defaults_digits.json").read_text())  # same noise: the converged ODE, defaults
    conv = earlier[0]

    def default_fd(name, nfe):
        found = [r["frechet_distance"] for r in earlier[1:]
                 if r["label"].startswith(f"{name} defaults") and r["nfe"] == nfe]
        return found[0] if found else float("nan")

    def fd(sampler):
        gens = per_sample_generators(0, range(args.num_samples))
        report, out = E.sample_and_evaluate(model["score_fn"], process, sampler, shape=(args.num_samples, *shape),
                                           kind="digits", generator=gens, dtype=torch.float32)
        return report.metrics["frechet_distance"], out.nfe

    score = _ReplayScore(model["score_fn"])
    rows, pilot_s = [], None
    for name in args.samplers.split(","):
        for nfe in (int(v) for v in (args.ladder or "15").split(",")):
            cache = None
            if args.save_grids:
                cache = Path(args.save_grids) / f"digits_{name}_{nfe - 1}.json"
                cache.parent.mkdir(parents=True, exist_ok=True)
            replayed = bool(score.record)
            if replayed:
                score.replay()
            pg = pilot_grid(get_sampler(name, num_steps=nfe - 1), score, process, shape,
                            dtype=torch.float32, batch_size=512, cache=cache)
            if not pg.cached and not replayed:
                pilot_s = round(pg.pilot_seconds, 2)
            f, used = fd(get_sampler(name, grid=pg.times))
            f_default = default_fd(name, used)
            row = {"sampler": name, "nfe": used, "frechet_distance": round(f, 4), "default_grid_fd": round(f_default, 4),
                   "converged_fd": conv["frechet_distance"], "ratio": round(f / conv["frechet_distance"], 4),
                   "score_evaluations": 0 if (replayed or pg.cached) else pg.score_evaluations,
                   "score_calls": 0 if (replayed or pg.cached) else pg.score_calls,
                   "pilot_s": round(pg.pilot_seconds, 2), "fit_s": round(pg.fit_seconds, 2),
                   "pilot": "cached grid" if pg.cached else ("replayed" if replayed else "run"),
                   "covariance": pg.settings["covariance"], "grid_file": cache.name if cache else None,
                   "times": [round(float(v), 6) for v in pg.times]}
            rows.append(row)
            print(row, flush=True)
    seconds, load_end = round(time.time() - t_start, 1), os.getloadavg()
    run = {"samplers": args.samplers, "ladder": args.ladder or "15", "seconds": seconds,
           "load_1min_start_end": [round(load_start[0], 2), round(load_end[0], 2)], "shared_pilot_s": pilot_s}
    out = Path(args.out)
    old_rows = []
    if (out / f"{args.tag}.json").exists():  # keep earlier runs' rows for other sampler/NFE pairs
        new_keys = {(r["sampler"], r["nfe"]) for r in rows}
        old_rows = [r for r in json.loads((out / f"{args.tag}.json").read_text())
                    if (r["sampler"], r["nfe"]) not in new_keys]
    for r in rows:
        r["run"] = run
    rows = old_rows + rows

    def pilot_cell(r):
        if r.get("pilot") == "replayed":
            return f"0 (replayed the first budget's pilot), {r['pilot_s']}"
        return f"{r['score_evaluations']} ({r['score_calls']}), {r['pilot_s']}"

    lines = [f"# The pilot grid on the digits model ({args.num_samples} samples, float32, the noise of "
             "bench_defaults_digits.py)", "",
             f"Classifier Frechet distance; the converged ODE from the same noise reads {conv['frechet_distance']:.3f} "
             "(results/defaults_digits.md). The pilot: 2048 draws through the network's 100-step converged ODE "
             "(float32, batches of 512), then the stand-in mixture and optimize_grid. The network runs the pilot once "
             "per run; a run's later budgets replay its recorded score outputs (the same inputs, checked).", "",
             "| sampler | NFE | FD, pilot grid (ratio to converged) | FD, default grid (results/defaults_digits.md) | pilot: score evaluations "
             "(calls), s | fit s | stand-in covariance |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['nfe']} | {r['frechet_distance']:.3f} ({r['ratio']:.2f}) | "
              f"{r['default_grid_fd']:.3f} | {pilot_cell(r)} | "
              f"{r['fit_s']} | {r['covariance']} |" for r in rows]
    runs = []
    for r in rows:
        if "run" in r and r["run"] not in runs:
            runs.append(r["run"])
    if runs:
        lines += ["", "Runs (wall seconds of the whole run: model load, pilot, fits, sampling and FD; 1-minute load "
                  "average at start and end, on a shared 2-core machine):", ""]
        lines += [f"- samplers {u['samplers']}, NFE {u['ladder']}: {u['seconds']} s, load {u['load_1min_start_end'][0]}"
                  f" -> {u['load_1min_start_end'][1]}" for u in runs]
    write_text_atomic(out / f"{args.tag}.json", json.dumps(rows, indent=1) + "\n")
    write_text_atomic(out / f"{args.tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("analytic", "digits"))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--floor-seeds", type=int, default=20)
    ap.add_argument("--cases", default="ring,aniso16")
    ap.add_argument("--processes", default="VE,VP")
    ap.add_argument("--samplers", default="dpmpp_2m")
    ap.add_argument("--ladder", default=None, help="comma-separated NFE budgets (default: per case, LADDERS)")
    ap.add_argument("--num-samples", type=int, default=900, help="digits: samples")
    ap.add_argument("--save-grids", default=None, metavar="DIR",
                    help="digits: keep each fitted grid as a pilot_grid cache file DIR/digits_<sampler>_<num_steps>.json")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    args.tag = args.tag or ("pilot_grid" if args.command == "analytic" else "pilot_grid_digits")
    torch.set_num_threads(1)
    (analytic if args.command == "analytic" else digits)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
