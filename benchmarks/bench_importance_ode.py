#!/usr/bin/env python
"""The importance-corrected probability flow (``importance_ode``) against exact posteriors: its bias vs the number of
points K (docs/conditioning.md, "Asymptotically exact with a deterministic transport").

Problems as in bench_tds.py (``VPSDE()``): ``conformance`` (the conformance check's 2-D problem), ``ring`` (first
coordinate of the 8-ring observed) and ``aniso16`` (4 random projections of the 16-D mixture), noise sigma_y from
``--sigma-y``. For DPS, PiGDM and replacement: the transform's own probability-flow ODE (``pf_ode``, K = 1: what the
correction corrects), ``importance_ode`` over K (``--particles``, defensive share 0.5) and, at ``--k-plain`` points,
without the defensive share (``defensive=0``); the floor row is the exact posterior score with ``pf_ode``. All solves:
the per-sample dopri5 at rtol = atol = ``--tol`` (pf_ode: torchdiffeq's dopri5 at the same tolerance); the prior's
density at t_min is the analytic mixture's energy (``prior_density="energy"``, its constant estimated from the
defensive points) unless ``--prior-density ode``;
``--divergence hutchinson`` (with ``--num-probes``) replaces the exact divergence by Hutchinson's estimate;
``--batch-size`` bounds the points per solve (importance_ode's ``batch_size``; the results do not depend on it).

Scored at t_min against the exact posterior perturbed to t_min, N samples (bench_tds.py's statistics): within-mode
sliced W2 over its noise floor, mean-NLL gap (floor: its sd over exact sets), mode-weight total variation, Pearson's
mode-weight statistic (the conformance check's), the mean ESS of the final weights, and the cost per output sample:
score evaluations of points (both solves) and vector-Jacobian products of the divergences.

    OMP_NUM_THREADS=1 python benchmarks/bench_importance_ode.py --cases conformance,ring --tag importance_ode_2d
    OMP_NUM_THREADS=1 python benchmarks/bench_importance_ode.py --cases aniso16 --n 500 --particles 4,16 --tag importance_ode_16d
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conditioning import fmt, posterior_target  # noqa: E402
from bench_tds import (  # noqa: E402
    all_problems,
    common_arguments,
    error_note,
    parse_common,
    run_lines,
    run_meta,
    scored_run,
    transforms,
    write_tables,
)

from score_toolkit.conditioning import MatrixOperator  # noqa: E402
from score_toolkit.processes import VPSDE  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402

D64 = torch.float64
#: the row's cost fields (pf_ode: its batched calls are its evaluations per sample, no divergence)
COST_FIELDS = {"nfe": lambda out: out.nfe, "final_ess": "final_ess",
               "evaluations_per_sample": lambda out: out.info.get("evaluations_per_sample", out.nfe),
               "vjps_per_sample": lambda out: out.info.get("vjps_per_sample", 0)}


def run_case(args, case, rows, log):
    proc = VPSDE()
    alpha, sigma = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=D64)))
    prior, a, make_y = all_problems()[case]
    for sy in args.sigma_y:
        y = make_y(sy)
        post, target, ref, fl = posterior_target(prior, a, y, sy, alpha, sigma, args.n, args.floor_seeds)
        fns = transforms(prior, proc, MatrixOperator(a), y, sy)
        fns["exact"] = post.score_fn(proc)
        plan = [("exact", "pf_ode", 1, None)]
        for method in args.methods:
            plan += [(method, "pf_ode", 1, None)]
            plan += [(method, "importance_ode", k, 0.5) for k in args.particles]
            plan += [(method, "importance_ode", args.k_plain, 0.0)] if args.k_plain else []
        for method, sampler_name, k, defensive in plan:
            opts = {"rtol": args.tol, "atol": args.tol}
            if sampler_name == "importance_ode":
                opts.update(num_particles=k, defensive=defensive, prior_density=args.prior_density,
                            divergence=args.divergence, batch_size=args.batch_size)
                if args.divergence == "hutchinson":
                    opts["num_probes"] = args.num_probes
            row = {"case": case, "sigma_y": sy, "method": method, "sampler": sampler_name, "particles": k,
                   "defensive": defensive}
            sampler = get_sampler(sampler_name, **opts)
            scored_run(row, lambda: sampler.sample(fns[method], proc, shape=(args.n, prior.dim), dtype=D64,  # noqa: B023
                                                   generator=torch.Generator().manual_seed(2024)),
                       target, ref, fl, COST_FIELDS, rows, log)


def write_markdown(path: Path, rows, metas):
    lines = ["# Importance-corrected probability flow (importance_ode) against exact posteriors", "", *run_lines(metas)]
    lines += ["", "VPSDE(), samples at t_min against the exact posterior at t_min. `sampler pf_ode` (K = 1): the "
              "transform's own probability-flow ODE, no correction; `exact`: the exact posterior score with `pf_ode` "
              "(the floor). `K`: points per output sample; `def.`: the share moved by the prior's flow (0: the "
              "conditional flow alone). `wsw_ratio`: within-mode sliced W2 over its floor (the conformance check "
              "accepts 2). `nll_gap`: mean NLL minus that of exact draws (its sd). `mode_tv`: mode-weight total "
              "variation (floor). `pearson`: the conformance check's mode-weight statistic (limit in each heading). "
              "`ess`: mean effective sample size of the final weights (points). `evals`: score (and energy) "
              "evaluations of points per output sample, both solves; `vjps`: vector-Jacobian products of the "
              "divergences per output sample (through DPS and PiGDM each is a double backward). `wall`: seconds on a "
              "shared 2-core machine (one thread).", ""]
    columns = "method | sampler | K | def. | wsw_ratio | nll_gap (sd) | mode_tv (floor) | pearson | ess | evals | vjps | wall s"
    write_tables(path, lines, rows, columns, lambda r: (
        f"{r['method']} | {r['sampler']} | {r['particles']} | {fmt(r['defensive'])} | {fmt(r['wsw_ratio'])}"
        f"{error_note(r)} | {fmt(r['nll_gap'])} ({fmt(r['nll_floor'])}) | {fmt(r['mode_tv'])} ({fmt(r['mode_tv_floor'])}) "
        f"| {fmt(r['pearson'])} | {fmt(r['final_ess'])} | {fmt(r['evaluations_per_sample'], 4)} "
        f"| {fmt(r['vjps_per_sample'], 4)} | {fmt(r['wall_s'])}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(p, "importance_ode")
    p.add_argument("--k-plain", type=int, default=16, help="points of the row without the defensive share (0: no such row)")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--prior-density", default="energy", choices=("energy", "ode"))
    p.add_argument("--divergence", default="exact", choices=("exact", "hutchinson"))
    p.add_argument("--num-probes", type=int, default=4, help="Hutchinson probes per point")
    p.add_argument("--batch-size", type=int, default=None,
                   help="importance_ode's batch_size: points per solve (default: all points of a stage at once)")
    args = parse_common(p, argv)
    return run_meta(args, argv, "bench_importance_ode.py", run_case, write_markdown,
                    ("case", "sigma_y", "method", "sampler", "particles", "defensive"))


if __name__ == "__main__":
    sys.exit(main())
