#!/usr/bin/env python
"""The twisted diffusion sampler (``tds``) against exact posteriors (docs/conditioning.md, "Asymptotically exact").

Problems (as in bench_conditioning.py, ``VPSDE()``): ``conformance`` (the 2-D test-bed mixture observed through the
projection (0.6, -0.8), y = 0.7: the conformance accuracy check's problem), ``ring`` (first coordinate of the 8-ring,
y = 2.8) and ``aniso16`` (4 random projections of the 16-D mixture), with noise sigma_y from ``--sigma-y``.
Methods: ``tds`` with the DPS, PiGDM and replacement transforms as proposal and twist, over the number of particles
K (``--particles``) at the largest NFE and over NFE (``--nfe``) at ``--k-nfe`` particles; next to them, K = 1 rows
(the transform alone with the ``ancestral`` sampler: what TDS corrects) and the floor rows (the exact posterior
score with ``ancestral`` on the same grid: the discretisation bias TDS cannot remove). Grid ``log_sigma``.

Scored at t_min against the exact posterior perturbed to t_min, N samples: within-mode sliced W2 over its noise
floor, mean-NLL gap (floor: the standard deviation over exact sets), mode-weight total variation, Pearson's
mode-weight statistic (the conformance check's, limit 18.4 for three components at level 1e-4), the mean ESS of the
final weights and the mean number of resampling events per sample.

    OMP_NUM_THREADS=1 python benchmarks/bench_tds.py --cases conformance,ring --tag tds_2d
    OMP_NUM_THREADS=1 python benchmarks/bench_tds.py --cases aniso16 --n 2000 --tag tds_16d
    python benchmarks/bench_tds.py --merge tds_2d,tds_16d --tag tds      # results/tds.md from the parts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import git_commit  # noqa: E402
from bench_conditioning import data_variance, fmt, posterior_target, problems, score_row  # noqa: E402

from score_toolkit._io import write_json_atomic, write_text_atomic  # noqa: E402
from score_toolkit.conditioning import DPS, MatrixOperator, PiGDM, Replacement  # noqa: E402
from score_toolkit.processes import VPSDE  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402
from score_toolkit.testing import (  # noqa: E402
    MODE_WEIGHT_LEVEL,
    _chi2_critical_value,
    conformance_mixture,
    mode_weight_statistic,
)

D64 = torch.float64


def all_problems():
    out = dict(problems())
    a = torch.tensor([[0.6, -0.8]], dtype=D64)
    out["conformance"] = (conformance_mixture(), a, lambda sy: torch.tensor([0.7], dtype=D64))
    return out


def pearson_limit(target) -> float:
    """The conformance check's limit for the mode-weight statistic: the chi-square critical value at level
    ``MODE_WEIGHT_LEVEL`` with (components - 1) degrees of freedom (none for one component)."""
    k = target.num_components
    return _chi2_critical_value(k - 1, MODE_WEIGHT_LEVEL) if k > 1 else math.inf


def transforms(prior, proc, op, y, sy):
    return {"dps": DPS(prior.score_fn(proc), proc, op, y, sy),
            "pigdm": PiGDM(prior.score_fn(proc), proc, op, y, sy, data_variance=data_variance(prior)),
            "replacement": Replacement(prior.score_fn(proc), proc, op, y, sy)}


def run_case(args, case, rows, log):
    proc = VPSDE()
    alpha, sigma = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=D64)))
    prior, a, make_y = all_problems()[case]
    op = MatrixOperator(a)
    for sy in args.sigma_y:
        y = make_y(sy)
        post, target, ref, fl = posterior_target(prior, a, y, sy, alpha, sigma, args.n, args.floor_seeds)
        nfe_max = max(args.nfe)
        plan = [("exact", "ancestral", nfe, 1) for nfe in args.nfe]
        for method in args.methods:
            plan += [(method, "ancestral", nfe_max, 1)]
            plan += [(method, "tds", nfe_max, k) for k in args.particles]
            plan += [(method, "tds", nfe, args.k_nfe) for nfe in args.nfe if nfe != nfe_max]
        fns = transforms(prior, proc, op, y, sy)
        fns["exact"] = post.score_fn(proc)
        for method, sampler_name, nfe, k in plan:
            opts = {"num_steps": nfe, "grid": "log_sigma"}
            if sampler_name == "tds":
                opts["num_particles"] = k
            row = {"case": case, "sigma_y": sy, "method": method, "sampler": sampler_name, "particles": k, "nfe": nfe}
            sampler = get_sampler(sampler_name, **opts)
            scored_run(row, lambda: sampler.sample(fns[method], proc, shape=(args.n, prior.dim), dtype=D64,  # noqa: B023
                                                   generator=torch.Generator().manual_seed(2024)),
                       target, ref, fl, {"final_ess": "final_ess", "resampling_count": "resampling_count"}, rows, log)


def scored_run(row, run, target, ref, fl, info_fields, rows, log):
    """``run()`` (a SamplerOutput) scored against the exact ``target`` into ``row``, with ``info_fields`` (row key ->
    key of ``out.info``, NaN where absent, or a function of the output) and the wall time; a failing run is a result (its error, infinite scores),
    not a crash. The row is appended to ``rows`` and logged."""
    t0 = time.perf_counter()
    try:
        out = run()
        chi2, _ = mode_weight_statistic(out.samples, target)
        row.update(score_row(out.samples, target, ref, fl))
        row.update({"pearson": chi2, "pearson_limit": pearson_limit(target)})
        row.update({k: v(out) if callable(v) else out.info.get(v, math.nan) for k, v in info_fields.items()})
    except Exception as exc:  # a diverging run is a result, not a crash
        row.update({"error": f"{type(exc).__name__}: {exc}"[:200], "wsw_ratio": math.inf, "nll_gap": math.inf,
                    "nll_floor": fl["nll_sd"], "mode_tv": math.nan, "mode_tv_floor": fl["tv"], "pearson": math.nan,
                    "pearson_limit": pearson_limit(target)})
        row.update({k: math.nan for k in info_fields})
    row["wall_s"] = time.perf_counter() - t0
    rows.append(row)
    log(row)


def run_lines(metas) -> list[str]:
    """The result file's "Run: ..." lines (date, commit, N, load, duration, command), one per run."""
    return [f"Run: {m['date']}, commit `{m['commit']}`, N = {m['n']}, floor seeds = {m['floor_seeds']}, threads = "
            f"{m['threads']}, load average at start {m['load_start']}, duration {m.get('duration_s', 0):.0f} s. "
            f"Command: `{m['command']}`." for m in metas]


def write_markdown(path: Path, rows, metas):
    lines = ["# Twisted diffusion sampler (tds) against exact posteriors", "", *run_lines(metas)]
    lines += ["", "VPSDE(), grid log_sigma, samples at t_min against the exact posterior at t_min. `K`: particles per "
              "sample (K = 1: the transform alone with `ancestral`). `exact`: the exact posterior score with "
              "`ancestral` (the floor TDS converges to at that NFE). `wsw_ratio`: within-mode sliced W2 over its floor "
              "(exact sets: about 1; the conformance check accepts 2). `nll_gap`: mean NLL minus that of exact draws "
              "(floor: its standard deviation). `mode_tv`: mode-weight total variation (floor). `pearson`: the "
              "conformance check's mode-weight statistic (its limit: the chi-square level-1e-4 critical value, in each "
              "heading; posterior components of weight >= 1e-6 are kept). `ess`: mean effective "
              "sample size of the final weights (in particles). `resampled`: mean resampling events per sample. "
              "`wall`: seconds on a shared 2-core machine (one thread).", ""]
    columns = ("method | sampler | K | NFE | wsw_ratio | nll_gap (sd) | mode_tv (floor) | pearson | ess | resampled | "
               "wall s")
    write_tables(path, lines, rows, columns, lambda r: (
        f"{r['method']} | {r['sampler']} | {r['particles']} | {r['nfe']} | {fmt(r['wsw_ratio'])}{error_note(r)} "
        f"| {fmt(r['nll_gap'])} ({fmt(r['nll_floor'])}) | {fmt(r['mode_tv'])} ({fmt(r['mode_tv_floor'])}) "
        f"| {fmt(r['pearson'])} | {fmt(r['final_ess'])} | {fmt(r['resampling_count'])} | {fmt(r['wall_s'])}"))


def error_note(r) -> str:
    return f" ({r['error'][:60]})" if "error" in r else ""


def write_tables(path: Path, lines, rows, columns: str, cells) -> None:
    """``lines`` (title, runs, legend), then one table per (case, sigma_y) with ``columns`` ("a | b | ...") and one
    line ``cells(row)`` per row, written atomically to ``path``."""
    lines = list(lines)
    for case in dict.fromkeys(r["case"] for r in rows):
        for sy in dict.fromkeys(r["sigma_y"] for r in rows if r["case"] == case):
            first = next(r for r in rows if r["case"] == case and r["sigma_y"] == sy)
            lines += [f"## {case}, sigma_y = {sy} (N = {first.get('n')}, Pearson limit {fmt(first.get('pearson_limit'))})",
                      "", f"| {columns} |", "|" + "---|" * (columns.count("|") + 1)]
            lines += [f"| {cells(r)} |" for r in rows if r["case"] == case and r["sigma_y"] == sy]
            lines.append("")
    write_text_atomic(path, "\n".join(lines))


def common_arguments(p: argparse.ArgumentParser, tag: str) -> None:
    """The options both exact-posterior benchmarks share (problems, sizes, output)."""
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--cases", default="conformance,ring,aniso16")
    p.add_argument("--sigma-y", default="0.05,0.5")
    p.add_argument("--methods", default="dps,pigdm,replacement")
    p.add_argument("--particles", default="4,16,64")
    p.add_argument("--floor-seeds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=tag)
    p.add_argument("--merge", default=None, help="comma-separated tags: write results/TAG.md from their json files")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))


def parse_common(p: argparse.ArgumentParser, argv):
    args = p.parse_args(argv)
    args.sigma_y = [float(v) for v in args.sigma_y.split(",")]
    args.methods = args.methods.split(",")
    args.particles = [int(v) for v in args.particles.split(",")]
    return args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(p, "tds")
    p.add_argument("--nfe", default="100,200")
    p.add_argument("--k-nfe", type=int, default=16, help="particles of the NFE sweep")
    args = parse_common(p, argv)
    args.nfe = [int(v) for v in args.nfe.split(",")]
    return run_meta(args, argv, "bench_tds.py", run_case, write_markdown,
                    ("case", "sigma_y", "method", "sampler", "particles", "nfe"))


def run_meta(args, argv, script: str, run_case, write_markdown, key_fields) -> int:
    """The run of a benchmark over ``args.cases`` (or ``--merge`` of earlier runs): results/TAG.json and .md written
    after every row (with the run's date, commit, load and command), rows identified by ``key_fields``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows, metas, seen = [], [], set()
        for tag in args.merge.split(","):
            data = json.loads((out / f"{tag}.json").read_text())
            for r in data["rows"]:  # a run repeated in two parts (same seed, same numbers) is listed once
                key = tuple(r[k] for k in key_fields)
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
            metas.append(data["meta"])
        write_markdown(out / f"{args.tag}.md", rows, metas)
        return 0
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()[0]
    commit = git_commit()
    rows = []
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "n": args.n,
            "floor_seeds": args.floor_seeds, "threads": args.threads, "load_start": round(load_start, 2),
            "command": " ".join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])}

    def log(row):
        row["n"] = args.n
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        meta["duration_s"] = time.time() - start
        # after every row: a partial run keeps what it measured
        write_json_atomic(out / f"{args.tag}.json", {"meta": meta, "rows": rows}, indent=1, default=str)
        write_markdown(out / f"{args.tag}.md", rows, [meta])

    for case in args.cases.split(","):
        run_case(args, case, rows, log)
    return 0

if __name__ == "__main__":
    sys.exit(main())
