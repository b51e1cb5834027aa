#!/usr/bin/env python
"""Final-level MCMC correction of conditional samplers, measured against closed forms (docs/conditioning.md,
"Sampling the tempered target" and "Correcting the approximate inverse-problem methods").

Every run: a sampler driven by a conditional score transform from the prior to t_min, then ``K`` MALA steps at t_min
(:func:`score_toolkit.conditioning.sample_with_final_correction`) targeting the density whose score is the corrector's
score; ``K = 0`` is the sampler alone. ``VPSDE()`` (t_min = 1e-3), float64, the same seeds for every K.

Part ``tempered_1d``: ``p = 0.5 N(-1, 0.6^2) + 0.5 N(1, 0.6^2)``, class c = 1 (the component at +1), classifier guidance
of scale w with the exact noise-conditional classifier (the set-up of bench_guidance_1d.py). The chain targets
``p_t(x) p_t(c | x)^w`` at t_min. Compared with the tempered target ``pi_w = p(x) p(c | x)^w / Z`` perturbed to t_min,
by quadrature on a grid of ``--grid`` (20,001) points: its mean, mean p(c | x), share with p(c | x) > 1/2, and the Kolmogorov-Smirnov
distance of the samples to its CDF (``sqrt(N) KS``: below 1.36 for 95 % of exact sample sets).

Part ``tempered_ring``: a ring of 8 overlapping Gaussians (radius 2, std 0.5; classes alternate, class c = 1), the
same guidance. Exact draws of ``pi_w`` by rejection from exact draws of p (accepted with probability p(c | x)^w), then
perturbed to t_min. Within-mode sliced W2 over its floor (samples split by their most likely ring component), NLL
gap under ``q = p_{t_min}(x) p_{t_min}(c | x)^w / Z`` (Z by Monte Carlo over 10^6 draws) against exact draws, class share,
mode-weight TV; floors from exact sets of the same size.

Part ``inverse``: DPS, PiGDM, replacement (and the exact posterior score, as the control) with the ancestral sampler,
then MALA with :class:`~score_toolkit.conditioning.ObservationLikelihood` (prior score plus the observation's likelihood at
t_min). Problems: the ring of bench_conditioning.py (observe x_1 = 2.8) at sigma_y = 0.05 and 0.5, and the conformance
mixture observed through the projection (0.6, -0.8) at sigma_y = 0.5 (the problem of tests/test_conditioning.py).
Compared with the exact posterior perturbed to t_min with the conformance suite's accuracy statistics
(``score_toolkit.testing.accuracy_statistics``: within-mode sliced W2 over its floor, Pearson's statistic of the mode
weights against its 1e-4 critical value) plus the NLL gap and mode-weight TV of bench_conditioning.py.

    python benchmarks/bench_final_correction.py            # results/final_correction.md and .json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_conditioning as bc  # noqa: E402
import bench_guidance_1d as b1  # noqa: E402
from _provenance import git_commit  # noqa: E402

from score_toolkit.analytic import ClassConditionalMixture, GaussianMixture, ring_mixture  # noqa: E402
from score_toolkit.conditioning import (  # noqa: E402
    DPS,
    ClassifierGuidance,
    MatrixOperator,
    ObservationLikelihood,
    PiGDM,
    Replacement,
    sample_with_final_correction,
)
from score_toolkit.metrics import within_mode_sliced_wasserstein  # noqa: E402
from score_toolkit.processes import VPSDE  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402
from score_toolkit.testing import accuracy_statistics, conformance_mixture  # noqa: E402

D = torch.float64
GUIDED_SAMPLERS = {"pf_ode": {}, "euler_maruyama": {"num_steps": 200}, "predictor_corrector": {"num_steps": 100}}


def ints(s):
    return [int(v) for v in s.split(",")]


# ---------------------------------------------------------------------- tempered target, 1-D
def run_tempered_1d(args, log):
    cc, proc = b1.setup()
    grid = torch.linspace(-10, 10, args.grid, dtype=D)
    rows = []
    for w in args.scales:
        guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=w)
        dens = b1._diffused_density(b1.tempered(cc, w, grid), grid, proc.t_min, proc, grid)
        target = b1.stats_from_density(grid, dens, cc)
        cdf = torch.cumulative_trapezoid(dens, grid)
        cdf = torch.cat([cdf.new_zeros(1), cdf]) / cdf[-1]
        chains = [(True, args.step_1d)] if args.mala else []
        chains += [(False, eps) for eps in args.ula_step_sizes]
        runs = [(seed, name, opts, k, mh, eps) for seed, (name, opts) in enumerate(GUIDED_SAMPLERS.items())
                if name in args.samplers for k in args.corrector_steps for mh, eps in chains if k > 0 or (mh, eps) == chains[0]]
        for seed, name, opts, k, mh, eps in runs:
            t0 = time.perf_counter()
            out = sample_with_final_correction(get_sampler(name, **opts), guided, proc, shape=(args.n, 1), dtype=D,
                                               corrector_steps=k, step_size=eps, metropolis=mh,
                                               generator=torch.Generator().manual_seed(seed))
            x = out.samples.reshape(-1)
            got, se = b1.stats_from_points(x, cc)
            xs = x.sort().values
            f = torch.from_numpy(np.interp(xs.numpy(), grid.numpy(), cdf.numpy()))
            i = torch.arange(1, len(xs) + 1, dtype=D) / len(xs)
            ks = float(torch.maximum(i - f, f - (i - 1 / len(xs))).max())
            row = {"part": "tempered_1d", "scale": w, "sampler": name, "corrector_steps": k, "nfe": out.nfe,
                   "chain": f"{'MALA' if mh else 'ULA'} {eps:g}" if k else "-",
                   "sampler_nfe": out.info["sampler_nfe"], "acceptance": out.info["acceptance"],
                   **{k2: v for k2, v in got.items()}, **{f"{k2}_se": v for k2, v in se.items()},
                   **{f"target_{k2}": v for k2, v in target.items()}, "sqrt_n_ks": math.sqrt(len(xs)) * ks,
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            log(row)
    return rows


# ---------------------------------------------------------------------- tempered target, 2-D ring
def ring_classes() -> ClassConditionalMixture:
    return ClassConditionalMixture(ring_mixture(8, radius=2.0, std=0.5), [0, 1] * 4)


def tempered_draws(cc, label, w, n, seed, alpha, sigma):
    """Exact draws of p(x) p(c | x)^w / Z (rejection from p; p(c | x)^w <= 1), perturbed to (alpha, sigma)."""
    g = torch.Generator().manual_seed(seed)
    out, have = [], 0
    while have < n:
        x = cc.mixture.sample(4 * n, generator=g)
        keep = torch.rand(len(x), generator=g, dtype=D).log() < w * cc.class_log_prob(x)[:, label]
        out.append(x[keep])
        have += int(keep.sum())
    x = torch.cat(out)[:n]
    return alpha * x + sigma * torch.randn(x.shape, generator=g, dtype=D)


def run_tempered_ring(args, log):
    cc, proc, label = ring_classes(), VPSDE(), 1
    alpha, sigma = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=D)))
    split = cc.mixture.perturbed(alpha, sigma)
    rows = []
    for w in args.scales:
        guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), label, scale=w)
        t_min = torch.full((1,), proc.t_min, dtype=D)

        def log_q_unnorm(x, w=w, t_min=t_min):
            tt = t_min.expand(len(x))
            return cc.mixture.log_prob(x, tt, proc) + w * cc.class_log_prob(x, tt, proc)[:, label]

        big = split.sample(args.z_draws, generator=torch.Generator().manual_seed(3))
        tt = t_min.expand(len(big))
        log_z = float(torch.logsumexp(w * cc.class_log_prob(big, tt, proc)[:, label], 0) - math.log(len(big)))

        def stats(x, t_min=t_min, log_z=log_z, log_q_unnorm=log_q_unnorm):
            lp = cc.class_log_prob(x, t_min.expand(len(x)), proc)
            r = split.posterior(x).mean(0)
            return {"nll": float(-(log_q_unnorm(x) - log_z).mean()), "frac_class": float((lp.argmax(1) == label).double().mean()),
                    "mean_p_class": float(lp[:, label].exp().mean()), "weights": r}

        ref = tempered_draws(cc, label, w, args.n, 1, alpha, sigma)
        exact = [tempered_draws(cc, label, w, args.n, 100 + s, alpha, sigma) for s in range(args.floor_seeds)]
        ref_stats = stats(torch.cat(exact))
        ex = [stats(e) for e in exact]
        floor_wsw = sum(within_mode_sliced_wasserstein(e, split, reference=ref) for e in exact) / len(exact)
        nll_sd = float(torch.tensor([e["nll"] for e in ex]).std())
        tv_floor = sum(float(0.5 * (e["weights"] - ref_stats["weights"]).abs().sum()) for e in ex) / len(ex)
        for seed, (name, opts) in enumerate(GUIDED_SAMPLERS.items()):
            for k in args.corrector_steps:
                t0 = time.perf_counter()
                out = sample_with_final_correction(get_sampler(name, **opts), guided, proc, shape=(args.n, 2), dtype=D,
                                                   corrector_steps=k, step_size=args.step_ring,
                                                   generator=torch.Generator().manual_seed(seed))
                x = out.samples
                st = stats(x)
                row = {"part": "tempered_ring", "scale": w, "sampler": name, "corrector_steps": k, "nfe": out.nfe,
                       "sampler_nfe": out.info["sampler_nfe"], "acceptance": out.info["acceptance"],
                       "wsw_ratio": within_mode_sliced_wasserstein(x, split, reference=ref) / floor_wsw,
                       "nll_gap": st["nll"] - ref_stats["nll"], "nll_sd": nll_sd,
                       "frac_class": st["frac_class"], "target_frac_class": ref_stats["frac_class"],
                       "mean_p_class": st["mean_p_class"], "target_mean_p_class": ref_stats["mean_p_class"],
                       "mode_tv": float(0.5 * (st["weights"] - ref_stats["weights"]).abs().sum()), "mode_tv_floor": tv_floor,
                       "wall_s": time.perf_counter() - t0}
                rows.append(row)
                log(row)
    return rows


# ---------------------------------------------------------------------- inverse problems
def inverse_problems():
    ring, a_ring, y_ring = ring_mixture(), torch.tensor([[1.0, 0.0]], dtype=D), torch.tensor([2.8], dtype=D)
    mix, a = conformance_mixture(), torch.tensor([[0.6, -0.8]], dtype=D)
    return [("ring", ring, a_ring, y_ring, 0.05), ("ring", ring, a_ring, y_ring, 0.5),
            ("conformance", mix, a, torch.tensor([0.7], dtype=D), 0.5)]


def min_variance(prior: GaussianMixture) -> float:
    cov = prior.covariances
    ev = torch.linalg.eigvalsh(cov) if cov.ndim == 3 else cov
    return float(ev.min())


def run_inverse(args, log):
    proc = VPSDE()
    alpha, sigma = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=D)))
    rows = []
    for case, prior, a, y, sy in inverse_problems():
        if f"{case}:{sy:g}" not in args.inverse_cases:
            continue
        op = MatrixOperator(a)
        post = prior.condition(a, y, sy)
        negligible = (prior.condition(a, y, sy).weights < 1e-3).tolist()
        post = post.components(post.weights >= 1e-6)
        target = post.perturbed(alpha, sigma)
        ref = target.sample(args.n, generator=torch.Generator().manual_seed(1))
        fl = bc.floors(target, ref, args.n, args.floor_seeds)
        step = args.step_factor * min(sy**2, min_variance(prior))
        corrector = ObservationLikelihood(prior.score_fn(proc), proc, op, y, sy)
        methods = {"exact": post.score_fn(proc), "dps": DPS(prior.score_fn(proc), proc, op, y, sy),
                   "pigdm": PiGDM(prior.score_fn(proc), proc, op, y, sy, data_variance=bc.data_variance(prior)),
                   "replacement": Replacement(prior.score_fn(proc), proc, op, y, sy)}
        for name, fn in methods.items():
            for k in args.inverse_corrector_steps:
                t0 = time.perf_counter()
                try:
                    out = sample_with_final_correction(get_sampler("ancestral", num_steps=args.inverse_steps, grid="log_sigma"),
                                                       fn, proc, shape=(args.n, 2), dtype=D, corrector_steps=k,
                                                       step_size=step, corrector_score_fn=corrector,
                                                       generator=torch.Generator().manual_seed(0))
                except Exception as exc:  # a diverging method is a result, not a crash of the benchmark
                    row = {"part": "inverse", "case": case, "sigma_y": sy, "method": name, "corrector_steps": k,
                           "error": f"{type(exc).__name__}: {exc}"[:200]}
                    rows.append(row)
                    log(row)
                    continue
                acc = accuracy_statistics(out.samples, alpha, sigma, post)
                nearest = prior.perturbed(alpha, sigma).posterior(out.samples).argmax(1)
                stray = float(torch.tensor(negligible)[nearest].double().mean())
                row = {"part": "inverse", "case": case, "sigma_y": sy, "method": name, "corrector_steps": k,
                       "step_size": step, "nfe": out.nfe, "sampler_nfe": out.info["sampler_nfe"],
                       "acceptance": out.info["acceptance"], **bc.score_row(out.samples, target, ref, fl), "stray": stray,
                       "check_wsw_ratio": acc["within_mode_ratio"], "check_chi2": acc["mode_weight_chi2"],
                       "check_chi2_limit": acc["mode_weight_limit"],
                       "passes_check": bool(acc["within_mode_ratio"] <= 2.0 and acc["mode_weight_chi2"] <= acc["mode_weight_limit"]),
                       "wall_s": time.perf_counter() - t0}
                rows.append(row)
                log(row)
    return rows


# ---------------------------------------------------------------------- report
def fmt(v, nd=3):
    return bc.fmt(v, nd)


def write_markdown(path: Path, rows, meta):
    L = ["# Final-level MCMC correction of conditional samplers", "",
         f"Run: {meta['date']}, commit `{meta['commit']}`, N = {meta['n']}, floor sets = {meta['floor_seeds']}, threads = "
         f"{meta['threads']}, load average at start {meta['load_start']}, at end {meta['load_end']}, duration "
         f"{meta['duration_s']:.0f} s. Command: `{meta['command']}`. What each part measures: the script's docstring.", ""]
    t1 = [r for r in rows if r["part"] == "tempered_1d"]
    if t1:
        L += ["## Tempered target, 1-D (closed form by quadrature)", "",
              "Classifier guidance of scale w, then K Langevin steps at t_min (MALA, or ULA where the chain column says so) targeting "
              "`p_t(x) p_t(c|x)^w`. Target: `pi_w = p(x) p(c|x)^w / Z` perturbed to t_min. `sqrt(N) KS` < 1.36 for 95 % "
              "of exact sets. +- one standard error.", "",
              "| w | sampler | K | chain, step | NFE (sampler) | acceptance | mean x (target) | mean p(c\\|x) (target) | share p(c\\|x) > 1/2 (target) | sqrt(N) KS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t1:
            L.append(f"| {r['scale']:g} | {r['sampler']} | {r['corrector_steps']} | {r.get('chain', '')} | {r['nfe']} ({r['sampler_nfe']}) | {fmt(r['acceptance'])} "
                     f"| {r['mean_x']:.4f} +- {r['mean_x_se']:.4f} ({r['target_mean_x']:.4f}) "
                     f"| {r['mean_p_class']:.4f} +- {r['mean_p_class_se']:.4f} ({r['target_mean_p_class']:.4f}) "
                     f"| {r['frac_class']:.4f} +- {r['frac_class_se']:.4f} ({r['target_frac_class']:.4f}) | {r['sqrt_n_ks']:.2f} |")
        L.append("")
    t2 = [r for r in rows if r["part"] == "tempered_ring"]
    if t2:
        L += ["## Tempered target, 2-D ring of 8 overlapping Gaussians (radius 2, std 0.5; classes alternate; c = 1)", "",
              f"Step size {meta['step_ring']}. `wsw_ratio`: within-mode sliced W2 to exact draws of `pi_w` (perturbed to "
              "t_min) over its floor (about 1 for exact sets). `nll_gap`: mean NLL under `q_{t_min}` minus that of exact "
              "draws (sd over exact sets in brackets). Class share: most likely class = c (target in brackets).", "",
              "| w | sampler | K | NFE (sampler) | acceptance | wsw_ratio | nll_gap (sd) | class share (target) | mean p(c\\|x) (target) | mode_tv (floor) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t2:
            L.append(f"| {r['scale']:g} | {r['sampler']} | {r['corrector_steps']} | {r['nfe']} ({r['sampler_nfe']}) | {fmt(r['acceptance'])} "
                     f"| {fmt(r['wsw_ratio'])} | {fmt(r['nll_gap'])} ({fmt(r['nll_sd'])}) | {r['frac_class']:.4f} ({r['target_frac_class']:.4f}) "
                     f"| {r['mean_p_class']:.4f} ({r['target_mean_p_class']:.4f}) | {fmt(r['mode_tv'])} ({fmt(r['mode_tv_floor'])}) |")
        L.append("")
    inv = [r for r in rows if r["part"] == "inverse"]
    if inv:
        L += ["## Inverse problems: ancestral sampler, then K MALA steps targeting prior x observation likelihood at t_min", "",
              f"Ancestral sampler, {meta['inverse_steps']} steps (log-sigma grid). MALA step size {meta['step_factor']} x "
              "min(sigma_y^2, smallest prior variance). `check`: the conformance accuracy statistics at this N (within-mode "
              "ratio <= 2 and Pearson statistic <= its limit). `stray`: share of samples whose most likely prior component "
              "has posterior weight < 1e-3 (exact draws: about 0). Other columns as in conditioning.md.", ""]
        for case, sy in dict.fromkeys((r["case"], r["sigma_y"]) for r in inv):
            L += [f"### {case}, sigma_y = {sy}", "",
                  "| method | K | NFE (sampler) | acceptance | wsw_ratio | nll_gap (sd) | mode_tv (floor) | stray | mean_err (floor) | check: ratio, chi2 (limit) | passes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in inv:
                if (r["case"], r["sigma_y"]) != (case, sy):
                    continue
                if "error" in r:
                    L.append(f"| {r['method']} | {r['corrector_steps']} | | | failed: {r['error']} | | | | | | no |")
                    continue
                L.append(f"| {r['method']} | {r['corrector_steps']} | {r['nfe']} ({r['sampler_nfe']}) | {fmt(r['acceptance'])} "
                         f"| {fmt(r['wsw_ratio'])} | {fmt(r['nll_gap'])} ({fmt(r['nll_floor'])}) | {fmt(r['mode_tv'])} ({fmt(r['mode_tv_floor'])}) "
                         f"| {fmt(r['stray'])} | {fmt(r['mean_err'])} ({fmt(r['mean_err_floor'])}) | {fmt(r['check_wsw_ratio'])}, {fmt(r['check_chi2'])} "
                         f"({fmt(r['check_chi2_limit'])}) | {'yes' if r['passes_check'] else 'no'} |")
            L.append("")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="tempered_1d,tempered_ring,inverse")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--corrector-steps", default="0,30,100,300")
    p.add_argument("--inverse-corrector-steps", default="0,100,1000")
    p.add_argument("--inverse-steps", type=int, default=100)
    p.add_argument("--step-1d", type=float, default=0.1)
    p.add_argument("--no-mala", dest="mala", action="store_false", help="1-D: no MALA rows (with --ula-step-sizes)")
    p.add_argument("--ula-step-sizes", default="", help="1-D: also unadjusted Langevin (no energy needed) at these steps")
    p.add_argument("--samplers", default=",".join(GUIDED_SAMPLERS), help="1-D: the guided samplers")
    p.add_argument("--step-ring", type=float, default=0.1)
    p.add_argument("--step-factor", type=float, default=0.5)
    p.add_argument("--floor-seeds", type=int, default=8)
    p.add_argument("--grid", type=int, default=20001, help="quadrature points of the 1-D target")
    p.add_argument("--z-draws", type=int, default=10**6, help="Monte Carlo draws of the ring's normalising constant")
    p.add_argument("--inverse-cases", default="ring:0.05,ring:0.5,conformance:0.5")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="final_correction")
    args = p.parse_args(argv)
    args.scales = [float(v) for v in args.scales.split(",")]
    args.corrector_steps, args.inverse_corrector_steps = ints(args.corrector_steps), ints(args.inverse_corrector_steps)
    args.inverse_cases = args.inverse_cases.split(",")
    args.ula_step_sizes = [float(v) for v in args.ula_step_sizes.split(",") if v]
    args.samplers = args.samplers.split(",")
    parts = args.parts.split(",")
    torch.set_num_threads(args.threads)
    start, load0 = time.time(), os.getloadavg()[0]

    def log(row):
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    commit = git_commit()  # at the start of the run; "+dirty" if the code differs from it
    rows = []
    for part, fn in (("tempered_1d", run_tempered_1d), ("tempered_ring", run_tempered_ring), ("inverse", run_inverse)):
        if part in parts:
            rows += fn(args, log)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)), "commit": commit, "n": args.n,
            "floor_seeds": args.floor_seeds, "threads": args.threads, "load_start": round(load0, 2),
            "load_end": round(os.getloadavg()[0], 2), "duration_s": time.time() - start,
            "command": "python benchmarks/bench_final_correction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "step_1d": args.step_1d, "step_ring": args.step_ring, "step_factor": args.step_factor,
            "inverse_steps": args.inverse_steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / f"{args.name}.md", rows, meta)
    tmp = out / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    os.replace(tmp, out / f"{args.name}.json")
    print(f"wrote {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
