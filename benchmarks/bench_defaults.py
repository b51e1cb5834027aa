#!/usr/bin/env python
"""Default settings against the noise floor and against the peers' defaults, with the exact score of the analytic
test bed: ``get_sampler(name, num_steps=n)`` with nothing else (the data-free ``grid="fitted"`` and ``to_zero=True``
of dpmpp_3m, dpmpp_2m and unipc), ours with a grid fitted to the case's own mixture (``optimize_grid``), and the peers at
their defaults, re-implemented as grid + update formula:

* k-diffusion ``sample_dpmpp_2m`` on ``get_sigmas_karras(n, sigma_min, sigma_max, rho=7)`` + a final 0: 2M in its
  midpoint form in (x / alpha, sigma / alpha), first step first order, the last step to 0 is Tweedie's denoiser
  (NFE = n);
* diffusers ``DPMSolverMultistepScheduler()`` defaults (dpmsolver++, order 2, ``solver_type="midpoint"``,
  ``timestep_spacing="linspace"``: timesteps ``linspace(0, 999, n + 1).round()[::-1][:-1]`` read as t = k / 999,
  ``lower_order_final`` below 15 steps, ``final_sigmas_type="zero"``: the last step is Tweedie's denoiser; NFE = n);
* score_sde's ODE sampler: ``scipy.integrate.solve_ivp(RK45, rtol = atol = 1e-5)`` on the flattened state from t = 1
  to ``t_min``, then Tweedie's denoiser (NFE = evaluations + 1).

Cases: the 2-D ring, the 16-D anisotropic mixture, the 64-D mixture of the same construction. Processes: VESDE(0.01, 50)
(and sigma_max 10, 40 on the ring), VPSDE(0.1, 20), SubVPSDE(), DiscreteVP() (the DDPM linear beta table).

Protocol (PROTOCOL_TEXT, printed in every result file): ``--seeds`` independent draw seeds, each with its own initial
draws, its own exact reference set and its own exact control set (N each). Metrics (bench_samplers): within-mode
sliced W2 and |mean-NLL gap| against the seed's reference, each divided by its noise floor (W2: mean over
``--floor-seeds`` pairs of exact sets; NLL: the expected |gap| of two exact sets from the per-point NLL spread). Pass
rule: the seed-mean of both ratios <= 1.5; the smallest NFE that passes and whether every larger budget on the ladder
up to twice that passes too (no relapse). Controls: the exact control set; the converged ODE from the same draws
(dpmpp_3m, 400 uniform log-SNR steps on the ring, 100 in 16-D and 64-D, to t_min, then to_zero's step), which gives
each run's paired solver error; the same trajectories stopped at t_min (a known bias). The result file also gives the
rule's false-fail rate for an exact sampler and its failure rate for a given bias (normal model of the gap). Before
this protocol the benchmark scored one draw against one reference with a 6-pair floor (results/defaults.md,
results/defaults_unipc.md): docs/fast_samplers.md, "Defaults", says why that was miscalibrated.

    OMP_NUM_THREADS=1 python benchmarks/bench_defaults.py --cases ring,aniso16 --processes VE,VP \
        --only "unipc defaults|unipc, lower_order_final" --tag defaults_unipc_seeds      # (results: see the docs)
    OMP_NUM_THREADS=1 python benchmarks/bench_defaults.py --cases aniso64 --processes VE,VP --only "unipc" \
        --ladder 25,30 --paired-seeds 1 --tag defaults_64                                 # the 64-D rows
    python benchmarks/bench_defaults.py --from-log a.log,b.log --tag joined   # tables from the row lines of runs
    python benchmarks/bench_defaults.py --n 1000 --seeds 2 --floor-seeds 2 --cases ring --processes VE  # a quick look
"""

from __future__ import annotations

import argparse
import ast
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_samplers as B  # noqa: E402

from score_toolkit import metrics as M  # noqa: E402
from score_toolkit.analytic import anisotropic_mixture, ring_mixture  # noqa: E402
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP, SubVPSDE  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402
from score_toolkit.samplers.dpm_solver import DPMSolverPP3M  # noqa: E402
from score_toolkit.samplers.grids import optimize_grid  # noqa: E402
from score_toolkit.samplers.unipc import AUTO_LOWER_ORDER_FINAL, UniPC  # noqa: E402

CASES = {  # mixture, NFE ladder of ours, of the fixed-grid peers, budget of the fitted grid, converged steps
    "ring": (ring_mixture, (8, 10, 12, 15, 20, 25, 30), (10, 15, 20, 30, 50), 12, 400),
    "aniso16": (anisotropic_mixture, (20, 25, 30, 40, 60), (20, 30, 50), 20, 100),
    "aniso64": (lambda: anisotropic_mixture(dim=64), (25, 30, 40, 60), (30,), None, 100),
}
PROCESSES = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE(0.1, 20.0), "subVP": lambda: SubVPSDE(),
             "DDPM": lambda: DiscreteVP(), "VE10": lambda: VESDE(0.01, 10.0), "VE40": lambda: VESDE(0.01, 40.0)}
DEFAULT_PROCESSES = {"ring": "VE,VP,subVP,DDPM,VE10,VE40", "aniso16": "VE,VP,subVP,DDPM", "aniso64": "VE,VP"}
#: the full set of contenders on these processes; the others: ours only (the transfer rows)
FULL = ("VE", "VP")
#: budgets of dpmpp_2m (the others run the whole ladder)
SECOND = {"ring": None, "aniso16": (20, 30), "aniso64": (30,)}
OURS = ("dpmpp_3m", "dpmpp_2m", "unipc")
FIELDS = ["case", "process", "sampler", "options", "nfe", "seed", "wsw_ratio", "nll_ratio", "nll_gap", "paired", "meets",
          "wall_s"]
EXACT_SEED = 500_000  # the exact control set of seed s: EXACT_SEED + s (its reference: REF_SEED + s)
PROTOCOL_TEXT = (
    "Protocol: for each draw seed s, the initial draws x_1 (prior, generator 1 + s), the exact reference set (generator "
    "999999 + s) and the exact control set (generator 500000 + s) are independent sets of N; seed 0 is the single draw "
    "the benchmark used before. Each run is scored against its seed's reference: within-mode sliced W2 and |mean-NLL "
    "gap|, each divided by its noise floor: the same metric between two independent exact sets, for W2 the mean over "
    "the floor pairs, for the NLL its expectation 2 sd(NLL(x)) / sqrt(pi N) from the per-point NLL spread of 100,000 "
    "exact points (the gap of two exact sets is normal with variance 2 Var(NLL(x)) / N; precise to ~1 %, where a "
    "6-pair mean is +-31 %; the pair mean is shown beside it). **Pass rule: the seed-mean of each ratio <= 1.5** (the criterion with the draw noise averaged over the "
    "seeds; one draw's NLL ratio of an exact sampler has a standard deviation of ~0.75). 'exact control': exact samples "
    "scored the same way (its seed-mean ratios should read ~1). 'paired solver error': mean NLL of the run minus that "
    "of the converged ODE from the same x_1 (dpmpp_3m on uniform log-SNR steps to t_min, then to_zero's step to noise "
    "level 0), mean +- standard error over seeds: the draw noise cancels, so it measures the solver's own NLL bias. "
    "'converged ODE stopped at t_min': the same trajectories without the final step (the law at t_min, biased by "
    "about sigma_min^2 J / 2 nats, J the Fisher information of p_0: ~0.10 nats in 64-D), a known bias the rule must "
    "see. 'no relapse': every budget from the first one meeting it up to twice that meets it too. 'single draws "
    "meeting it': the share of seeds whose one draw meets the old single-draw criterion.")
CONTROLS = ("exact control", "converged ODE", "converged ODE stopped at t_min (no final step)")


# ---------------------------------------------------------------------------------------------- the peers
def _tilde(process, t):
    alpha, sigma = process.marginal(torch.as_tensor(t, dtype=torch.float64).reshape(1))
    return float(alpha), float(sigma)


def _denoiser(score, process, x, t):
    alpha, sigma = _tilde(process, t)
    return (x + sigma**2 * score(x, t)) / alpha


def peer_2m_midpoint(score, process, x, times, lower_order_final_last: bool):
    """DPM-Solver++(2M) in its midpoint form (k-diffusion ``sample_dpmpp_2m``, diffusers ``solver_type="midpoint"``) on
    the decreasing ``times`` (one evaluation each), then Tweedie's denoiser at the last time (the step to sigma 0)."""
    old, h_old = None, None
    for i, t in enumerate(times):
        d = _denoiser(score, process, x, t)
        if i == len(times) - 1:
            return d  # the step to sigma = 0 (first order): x_0 = D
        a0, s0 = _tilde(process, t)
        a1, s1 = _tilde(process, times[i + 1])
        h = np.log(a1 / s1) - np.log(a0 / s0)
        last_lower = lower_order_final_last and i == len(times) - 2
        if old is None or last_lower:
            dd = d
        else:
            r = h_old / h
            dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        x = (s1 / s0) * x - a1 * np.expm1(-h) * dd
        old, h_old = d, h
    return x


def kdiffusion_times(process, n):
    """Karras et al.'s rho = 7 sigmas between the process's sigma~ = sigma / alpha at t_min and at t = 1, as times."""
    lo, hi = (process.log_snr(torch.tensor([t], dtype=torch.float64)) for t in (process.t_min, process.t_max))
    smin, smax = float(torch.exp(-lo)), float(torch.exp(-hi))
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    ts = process.t_from_log_snr(-torch.log(sig))
    ts[0], ts[-1] = process.t_max, process.t_min
    return ts.tolist()


def diffusers_times(process, n):
    k = np.linspace(0, 999, n + 1).round()[::-1][:-1]
    return [max(float(v) / 999.0, process.t_min) for v in k]


def rk45_score_sde(score, process, x0, rtol=1e-5, atol=1e-5):
    from scipy import integrate

    shape = x0.shape
    nfe = [0]

    def f(t, y):
        nfe[0] += 1
        x = torch.as_tensor(y, dtype=torch.float64).reshape(shape)
        tt = torch.tensor([t], dtype=torch.float64)
        drift, g = process.sde(x, tt.expand(shape[0]))
        v = drift - 0.5 * g**2 * score(x, float(t))
        return v.reshape(-1).numpy()

    sol = integrate.solve_ivp(f, (process.t_max, process.t_min), x0.reshape(-1).numpy(), rtol=rtol, atol=atol,
                              method="RK45")
    x = torch.as_tensor(sol.y[:, -1], dtype=torch.float64).reshape(shape)
    return _denoiser(score, process, x, process.t_min), nfe[0] + 1


# ---------------------------------------------------------------------------------------------- the runs
def contenders(case, pname, process, mix, score, ladder, peer_ladder, fit_nfe, conv_steps, n):
    """(sampler label, options label, run()) for one case and process; run(x1) -> (samples, nfe)."""
    out = []

    def ours(name, steps, **extra):
        s = get_sampler(name, num_steps=steps, **extra)
        return lambda x1: (lambda o: (o.samples, o.nfe))(s.sample(score, process, x_init=x1.clone()))

    for name in OURS:
        for nfe in (ladder if name != "dpmpp_2m" or SECOND[case] is None else SECOND[case]):
            out.append((f"{name} defaults", f"num_steps={nfe - 1}", ours(name, nfe - 1)))
    for nfe in peer_ladder:
        ts = kdiffusion_times(process, nfe)
        out.append(("k-diffusion dpmpp_2m (Karras rho 7)", f"n={nfe}",
                    lambda x1, ts=ts: (peer_2m_midpoint(score, process, x1.clone(), ts, False), len(ts))))
        ts2 = diffusers_times(process, nfe)
        out.append(("diffusers DPMSolverMultistep defaults", f"num_inference_steps={nfe}",
                    lambda x1, ts2=ts2, nfe=nfe: (peer_2m_midpoint(score, process, x1.clone(), ts2, nfe < 15), len(ts2))))
    if case != "aniso64":  # (the 64-D rows: its cost)
        out.append(("score_sde RK45 (rtol=atol=1e-5)", "solve_ivp + denoise",
                    lambda x1: rk45_score_sde(score, process, x1.clone())))
    if fit_nfe is not None and pname in ("VE", "VP"):
        def fitted(x1, k=fit_nfe):
            res = optimize_grid(DPMSolverPP3M(num_steps=k - 1), process, mixture=mix, num_samples=512, iterations=60)
            o = get_sampler("dpmpp_3m", grid=res.times, to_zero=True).sample(score, process, x_init=x1.clone())
            return o.samples, o.nfe
        out.append(("dpmpp_3m, grid fitted to the mixture (optimize_grid)", f"num_steps={fit_nfe - 1}", fitted))
    for nfe in ladder:  # the alternatives of unipc's default (docs/fast_samplers.md, "Defaults"): the other value of
        # lower_order_final at each budget ("auto" switches it on from AUTO_LOWER_ORDER_FINAL steps), the end rule
        if nfe - 1 >= AUTO_LOWER_ORDER_FINAL:
            out.append(("unipc, lower_order_final=False (the default before)", f"num_steps={nfe - 1}",
                        ours("unipc", nfe - 1, lower_order_final=False)))
        else:
            out.append(("unipc, lower_order_final=True", f"num_steps={nfe - 1}",
                        ours("unipc", nfe - 1, lower_order_final=True)))
        out.append(("unipc, end rule 'corrected'", f"num_steps={nfe - 1}", corrected_unipc(score, process, nfe - 1)))
    return out


class _CorrectedEndUniPC(UniPC):
    """unipc whose step to zero applies to_zero's displacement, made at the predicted point x~_n, to the corrected x_n:
    x_n / alpha + (D(x~_n) - x~_n / alpha) / 2 (the default, (x_n / alpha + D(x~_n)) / 2, undoes half the last
    correction)."""

    @staticmethod
    def _step_to_zero(x, x_pred, d, inv_alpha):
        return inv_alpha * x + 0.5 * d - 0.5 * inv_alpha * x_pred


def corrected_unipc(score, process, steps):
    s = _CorrectedEndUniPC(num_steps=steps)
    return lambda x1: (lambda o: (o.samples, o.nfe))(s.sample(score, process, x_init=x1.clone()))


def converged_pair(score, process, x1, steps):
    """The converged PF-ODE from ``x1``: dpmpp_3m on ``steps`` uniform log-SNR steps to ``t_min`` (no final step),
    then ``to_zero``'s exact step to noise level 0 with one more evaluation. Returns (state at t_min, at level 0)."""
    at_tmin = get_sampler("dpmpp_3m", num_steps=steps, grid="log_sigma", to_zero=False).sample(
        score, process, x_init=x1.clone()).samples
    alpha, sigma = _tilde(process, process.t_min)
    return at_tmin, (at_tmin + 0.5 * (alpha * sigma) ** 2 * score(at_tmin, process.t_min)) / alpha


def nll_floor_from_spread(mix, n, pool=100_000):
    """E|mean_nll(A) - mean_nll(B)| for two independent exact sets of ``n`` from the per-point NLL spread of one
    large exact set (CLT: the gap is normal with variance 2 Var(NLL) / n): a check of the pair-averaged floor."""
    v = float((-mix.log_prob(mix.sample(pool, generator=B._gen(EXACT_SEED - 1)))).var())
    return 2.0 * (v / (np.pi * n)) ** 0.5, v


def false_fail(nll_sd_gap, floor, seeds, bias=0.0, reps=20_000):
    """Probability that a sampler whose mean NLL is off by ``bias`` (nats; 0: an exact sampler) fails the pass rule on
    NLL (seed-mean of |gap_s| / floor > CRITERION), the gaps normal with standard deviation ``nll_sd_gap``."""
    g = torch.Generator().manual_seed(12345)
    gaps = bias + nll_sd_gap * torch.randn(reps, seeds, generator=g, dtype=torch.float64)
    return float((gaps.abs().mean(dim=1) / floor > B.CRITERION).double().mean())


def floors_of(mix, case, n, pairs):
    """The noise floors of one case (see PROTOCOL_TEXT) and the spread of one NLL gap between two exact sets."""
    floors = B.noise_floors(mix, n, pairs)
    spread_floor, nll_var = nll_floor_from_spread(mix, n)
    return {"case": case, "wsw": floors["wsw"]["mean"], "wsw_sd": floors["wsw"]["std"], "nll": spread_floor,
            "nll_pairs": floors["nll"]["mean"], "nll_sd": floors["nll"]["std"], "pairs": pairs,
            "nll_sd_gap": (2 * nll_var / n) ** 0.5, "n": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=8,
                    help="independent draw seeds (each: its own initial draws and its own exact reference set)")
    ap.add_argument("--first-seed", type=int, default=0, help="continue a stopped run from this seed (--from-log joins)")
    ap.add_argument("--paired-seeds", type=int, default=None,
                    help="run the converged ODE (paired error, its two control rows) on the first this many seeds "
                         "only (default: all); the pass rule needs only each run's own gap")
    ap.add_argument("--floor-seeds", type=int, default=20)
    ap.add_argument("--floors-from", default=None, help="take the floors from the [floors] line of an earlier run's log")
    ap.add_argument("--cases", default="ring,aniso16")
    ap.add_argument("--processes", default=None, help="comma-separated (default: per case, see DEFAULT_PROCESSES)")
    ap.add_argument("--only", default=None,
                    help="run only the contenders whose label contains one of these ('|'-separated; the controls run always)")
    ap.add_argument("--ladder", default=None, help="comma-separated NFE budgets of ours (default: the case's)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="defaults")
    ap.add_argument("--from-log", default=None,
                    help="run nothing: write the tables from the row lines a (possibly stopped) run printed")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = args.cases.split(",")
    rows, floors_by_case, t_start = [], {}, time.time()
    if args.from_log:
        for log in args.from_log.split(","):
            for line in Path(log).read_text().splitlines():
                if line.startswith("{"):
                    rows.append(ast.literal_eval(line))
                elif line.startswith("[floors] "):
                    d = ast.literal_eval(line[len("[floors] "):])
                    floors_by_case[d["case"]] = d
        cases = [c for c in CASES if any(r["case"] == c for r in rows)]
        write_results(args, cases, rows, floors_by_case, None)
        return 0
    for case in cases:
        make, ladder, peer_ladder, fit_nfe, conv_steps = CASES[case]
        if args.ladder:
            ladder = tuple(int(v) for v in args.ladder.split(","))
        mix = make()
        earlier = [ast.literal_eval(line[len("[floors] "):]) for line in
                   (Path(args.floors_from).read_text().splitlines() if args.floors_from else [])
                   if line.startswith("[floors] ")]
        earlier = [d for d in earlier if d["case"] == case and d["n"] == args.n]
        if earlier:
            fl = earlier[0]
        else:
            fl = floors_of(mix, case, args.n, args.floor_seeds)
        floors_by_case[case] = fl
        print(f"[floors] {fl}", flush=True)
        for seed in range(args.first_seed, args.seeds):
            paired_here = args.paired_seeds is None or seed < args.paired_seeds
            reference = mix.sample(args.n, generator=B._gen(B.REF_SEED + seed))
            ref_nll = M.mean_nll(reference, mix)
            exact = mix.sample(args.n, generator=B._gen(EXACT_SEED + seed))
            for pname in (args.processes or DEFAULT_PROCESSES[case]).split(","):
                process = PROCESSES[pname]()
                score = mix.score_fn(process)
                x1 = process.prior_sample((args.n, mix.dim), generator=B._gen(1 + seed), dtype=torch.float64)
                runs = [("exact control", "mix.sample (independent of the reference)", (exact, 0), 0.0)]
                conv_nll = None
                if paired_here:
                    t0 = time.perf_counter()
                    at_tmin, conv = converged_pair(score, process, x1, conv_steps)
                    conv_wall = time.perf_counter() - t0
                    conv_nll = M.mean_nll(conv, mix)
                    runs += [("converged ODE", f"dpmpp_3m, {conv_steps} log_sigma steps, then to_zero's step",
                              (conv, conv_steps + 1), conv_wall),
                             ("converged ODE stopped at t_min (no final step)",
                              f"dpmpp_3m, {conv_steps} log_sigma steps", (at_tmin, conv_steps), conv_wall)]
                runs += [(label, opts, run, None) for label, opts, run in contenders(
                    case, pname, process, mix, score, ladder, peer_ladder, fit_nfe, None, args.n)]
                for label, opts, run, wall in runs:
                    if args.only and not any(o in label for o in args.only.split("|")) and label not in CONTROLS:
                        continue
                    if pname not in FULL and not label.startswith(OURS) and label not in CONTROLS:
                        continue  # the transfer rows: ours only
                    t0 = time.perf_counter()
                    samples, nfe = run(x1) if callable(run) else run
                    wall = time.perf_counter() - t0 if wall is None else wall
                    r = B.score_samples(samples, mix, reference, ref_nll)
                    w, nl = r["wsw"] / fl["wsw"], abs(r["nll_gap"]) / fl["nll"]
                    row = {"case": case, "process": pname, "sampler": label, "options": opts, "nfe": int(nfe),
                           "seed": seed, "wsw_ratio": round(w, 4), "nll_ratio": round(nl, 4),
                           "nll_gap": round(r["nll_gap"], 5),
                           "paired": None if label == "exact control" or conv_nll is None
                           else round(M.mean_nll(samples, mix) - conv_nll, 5),
                           "meets": bool(w <= B.CRITERION and nl <= B.CRITERION), "wall_s": round(wall, 3)}
                    rows.append(row)
                    print(row, flush=True)
    write_results(args, cases, rows, floors_by_case, time.time() - t_start)
    return 0


def aggregate(rs):
    """One (case, process, sampler, NFE) over its seeds: seed-mean ratios, the pass rule, the mean signed gap and the
    paired solver error (mean and standard error over seeds)."""
    k = len(rs)
    w = statistics.fmean(r["wsw_ratio"] for r in rs)
    nl = statistics.fmean(r["nll_ratio"] for r in rs)
    gaps = [r["nll_gap"] for r in rs]
    paired = [r["paired"] for r in rs if r.get("paired") is not None] or [float("nan")]

    def se(v):
        return statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")

    return {"nfe": rs[0]["nfe"], "seeds": k, "wsw": w, "nll": nl, "meets": w <= B.CRITERION and nl <= B.CRITERION,
            "per_seed_nll": [r["nll_ratio"] for r in rs], "gap": statistics.fmean(gaps), "gap_se": se(gaps),
            "paired": statistics.fmean(paired), "paired_se": se(paired), "paired_n": sum(
                r.get("paired") is not None for r in rs),
            "single_draw_meets": sum(r["meets"] for r in rs) / k}


def summary(rs):
    """Smallest NFE meeting the criterion, and whether every budget on the ladder from there up to twice it meets it
    too ('yes (to M)': M the largest budget measured in that range)."""
    ok = [r["nfe"] for r in rs if r["meets"]]
    if not ok:
        return None, "no"
    first = min(ok)
    span = [r for r in rs if first <= r["nfe"] <= 2 * first]
    return first, (f"yes (to {max(r['nfe'] for r in span)})" if all(r["meets"] for r in span) else "no")


def write_results(args, cases, rows, floors_by_case, elapsed) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{args.tag}.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out_dir / f"{args.tag}.csv")
    seeds = len({r["seed"] for r in rows})
    lines = [f"# Default settings vs the noise floor, over {seeds} independent draw seeds (N = {args.n} each, exact "
             "scores, float64)", "",
             (f"Run time {elapsed:.0f} s. " if elapsed is not None else "") + (f"{args.note} " if args.note else "")
             + PROTOCOL_TEXT, "", "Noise floors and the pass rule's error rates (NLL; gaps modelled as normal with the "
             "measured spread):", "",
             "| case | floor pairs | wsw floor: pair mean (sd of one pair) | NLL floor: from the per-point spread (used) | "
             "NLL floor: pair mean (sd of one pair) | sd of one gap | exact sampler fails (1 seed / this run's seeds) | "
             "a bias of 1 / 1.5 / 2 floors fails |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in cases:
        fl = floors_by_case.get(case)
        if fl is None:
            continue
        ff = [false_fail(fl["nll_sd_gap"], fl["nll"], k) for k in (1, seeds)]
        det = [false_fail(fl["nll_sd_gap"], fl["nll"], seeds, bias=b * fl["nll"]) for b in (1.0, 1.5, 2.0)]
        lines.append(f"| {case} | {fl['pairs']} | {fl['wsw']:.4g} ({fl['wsw_sd']:.2g}) | {fl['nll']:.4g} | "
                     f"{fl['nll_pairs']:.4g} ({fl['nll_sd']:.2g}) | {fl['nll_sd_gap']:.4g} | "
                     f"{ff[0]:.1%} / {ff[1]:.1%} | " + " / ".join(f"{v:.0%}" for v in det) + " |")
    lines += ["", "| case | process | sampler | smallest NFE meeting it (seed-mean) | no relapse (up to 2x) | "
              "NFE: seed-mean wsw / NLL ratio [per-seed NLL ratios] | mean NLL gap +- se (nats) | paired solver error "
              "+- se (nats) | single draws meeting it |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in cases:
        procs = list(dict.fromkeys(r["process"] for r in rows if r["case"] == case))
        for pname in procs:
            labels = list(dict.fromkeys(r["sampler"] for r in rows if r["case"] == case and r["process"] == pname))
            for label in labels:
                sel = [r for r in rows if r["case"] == case and r["process"] == pname and r["sampler"] == label]
                aggs = [aggregate([r for r in sel if r["nfe"] == nfe])
                        for nfe in sorted({r["nfe"] for r in sel})]
                first, stays = summary(aggs)
                detail = "; ".join(f"{a['nfe']}: {a['wsw']:.2f} / **{a['nll']:.2f}** ["
                                   + ", ".join(f"{v:.1f}" for v in a["per_seed_nll"]) + "]" for a in aggs)
                gaps = "; ".join(f"{a['nfe']}: {a['gap']:+.3f} +- {a['gap_se']:.3f}" for a in aggs)
                paired = "; ".join((f"{a['nfe']}: {a['paired']:+.4f} +- {a['paired_se']:.4f}" if a["paired_n"] > 1 else
                                    f"{a['nfe']}: {a['paired']:+.4f}") + (f" ({a['paired_n']} seeds)" if a["paired_n"]
                                                                          < a["seeds"] else "")
                                   for a in aggs if a["paired_n"])
                single = "; ".join(f"{a['nfe']}: {a['single_draw_meets']:.0%}" for a in aggs)
                lines.append(f"| {case} | {pname} | {label} | {first if first else '-'} | {stays} | {detail} | "
                             f"{gaps} | {paired} | {single} |")
    tmp = out_dir / f".{args.tag}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_dir / f"{args.tag}.md")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
