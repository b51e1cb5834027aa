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
(and sigma_max 10, 40 on the ring), VPSDE(0.1, 20), SubVPSDE(), DiscreteVP() (the DDPM linear beta table). Metrics
(bench_samplers): within-mode sliced W2 and |mean-NLL gap| against an exact reference set, each divided by its noise
floor (the same metric between two independent exact sets, mean over ``--floor-seeds`` pairs). A run meets the
criterion when both ratios are <= 1.5; the summary gives the smallest NFE that meets it and whether every larger
budget on the ladder up to twice that meets it too (no relapse). The converged ODE from the same draws (dpmpp_3m,
400 uniform log-SNR steps on the ring, 100 in 16-D, 150 in 64-D) shows the sampling noise of this one draw.

    OMP_NUM_THREADS=1 python benchmarks/bench_defaults.py --cases ring,aniso16 --tag defaults
    OMP_NUM_THREADS=1 python benchmarks/bench_defaults.py --cases aniso64 --tag defaults_64
    python benchmarks/bench_defaults.py --n 1000 --floor-seeds 2 --cases ring --processes VE   # a quick look
"""

from __future__ import annotations

import argparse
import ast
import csv
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

CASES = {  # mixture, NFE ladder of ours, of the fixed-grid peers, budget of the fitted grid, converged steps
    "ring": (ring_mixture, (8, 10, 12, 15, 20, 25, 30), (10, 15, 20, 30, 50), 12, 400),
    "aniso16": (anisotropic_mixture, (20, 25, 30, 40, 60), (20, 30, 50), 20, 100),
    "aniso64": (lambda: anisotropic_mixture(dim=64), (25, 30, 40, 60), (30,), None, 150),
}
PROCESSES = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE(0.1, 20.0), "subVP": lambda: SubVPSDE(),
             "DDPM": lambda: DiscreteVP(), "VE10": lambda: VESDE(0.01, 10.0), "VE40": lambda: VESDE(0.01, 40.0)}
DEFAULT_PROCESSES = {"ring": "VE,VP,subVP,DDPM,VE10,VE40", "aniso16": "VE,VP,subVP,DDPM", "aniso64": "VE,VP"}
#: the full set of contenders on these processes; the others: ours only (the transfer rows)
FULL = ("VE", "VP")
#: budgets of dpmpp_2m (the others run the whole ladder)
SECOND = {"ring": None, "aniso16": (20, 30), "aniso64": (30,)}
OURS = ("dpmpp_3m", "dpmpp_2m", "unipc")
FIELDS = ["case", "process", "sampler", "options", "nfe", "wsw_ratio", "nll_ratio", "nll_gap", "meets", "wall_s"]


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
    if conv_steps is not None:
        out.append(("converged ODE", f"dpmpp_3m, {conv_steps} log_sigma steps",
                    ours("dpmpp_3m", conv_steps, grid="log_sigma")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--floor-seeds", type=int, default=6)
    ap.add_argument("--cases", default="ring,aniso16")
    ap.add_argument("--processes", default=None, help="comma-separated (default: per case, see DEFAULT_PROCESSES)")
    ap.add_argument("--only", default=None, help="run only the contenders whose label contains this")
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
        for log in args.from_log.split(","):
            rows += [ast.literal_eval(line) for line in Path(log).read_text().splitlines() if line.startswith("{")]
        cases = [c for c in CASES if any(r["case"] == c for r in rows)]
        write_results(args, cases, rows, None)
        return 0
    for case in cases:
        make, ladder, peer_ladder, fit_nfe, conv_steps = CASES[case]
        mix = make()
        floors = B.noise_floors(mix, args.n, args.floor_seeds)
        reference = mix.sample(args.n, generator=B._gen(B.REF_SEED))
        ref_nll = M.mean_nll(reference, mix)
        print(f"[floors] {case}: wsw {floors['wsw']['mean']:.4g}, nll {floors['nll']['mean']:.4g}", flush=True)
        for pname in (args.processes or DEFAULT_PROCESSES[case]).split(","):
            process = PROCESSES[pname]()
            score = mix.score_fn(process)
            x1 = process.prior_sample((args.n, mix.dim), generator=B._gen(1), dtype=torch.float64)
            for label, opts, run in contenders(case, pname, process, mix, score, ladder, peer_ladder, fit_nfe,
                                               conv_steps, args.n):
                if args.only and args.only not in label:
                    continue
                if pname not in FULL and not label.startswith(OURS) and label != "converged ODE":
                    continue  # the transfer rows: ours only
                t0 = time.perf_counter()
                samples, nfe = run(x1)
                wall = time.perf_counter() - t0
                r = B.score_samples(samples, mix, reference, ref_nll)
                w, nl = r["wsw"] / floors["wsw"]["mean"], abs(r["nll_gap"]) / floors["nll"]["mean"]
                row = {"case": case, "process": pname, "sampler": label, "options": opts, "nfe": int(nfe),
                       "wsw_ratio": round(w, 4), "nll_ratio": round(nl, 4), "nll_gap": round(r["nll_gap"], 5),
                       "meets": bool(w <= B.CRITERION and nl <= B.CRITERION), "wall_s": round(wall, 3)}
                rows.append(row)
                print(row, flush=True)
    write_results(args, cases, rows, time.time() - t_start)
    return 0


def summary(rs):
    """Smallest NFE meeting the criterion, and whether every budget on the ladder from there up to twice it meets it
    too ('yes (to M)': M the largest budget measured in that range)."""
    ok = [r["nfe"] for r in rs if r["meets"]]
    if not ok:
        return None, "no"
    first = min(ok)
    span = [r for r in rs if first <= r["nfe"] <= 2 * first]
    return first, (f"yes (to {max(r['nfe'] for r in span)})" if all(r["meets"] for r in span) else "no")


def write_results(args, cases, rows, elapsed) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{args.tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Default settings vs the noise floor and the peers' defaults (N = {args.n}, {args.floor_seeds} floor "
             "pairs, exact scores, float64)", "",
             (f"Run time {elapsed:.0f} s. " if elapsed is not None else "") + (f"{args.note} " if args.note else "")
             + f"Criterion: within-mode sliced W2 and |mean-NLL gap| both <= {B.CRITERION}x their noise floors. "
             "'ours defaults': the sampler called with `num_steps` only (NFE = num_steps + 1: the default `to_zero`). "
             "'no relapse': every budget from the first one meeting it up to twice that meets it too. The converged "
             "ODE row is the sampling noise of this one draw (what no step count removes). Peers: see "
             "benchmarks/bench_defaults.py.", "",
             "| case | process | sampler | smallest NFE meeting it | no relapse (up to 2x) | NFE: wsw / nll ratios |",
             "| --- | --- | --- | --- | --- | --- |"]
    for case in cases:
        procs = list(dict.fromkeys(r["process"] for r in rows if r["case"] == case))
        for pname in procs:
            labels = list(dict.fromkeys(r["sampler"] for r in rows if r["case"] == case and r["process"] == pname))
            for label in labels:
                rs = sorted((r for r in rows if r["case"] == case and r["process"] == pname and r["sampler"] == label),
                            key=lambda r: r["nfe"])
                first, stays = summary(rs)
                detail = ", ".join(f"{r['nfe']}: {r['wsw_ratio']:.2f} / {r['nll_ratio']:.2f}" for r in rs)
                lines.append(f"| {case} | {pname} | {label} | {first if first else '-'} | "
                             f"{stays} | {detail} |")
    (out_dir / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
