#!/usr/bin/env python
"""Conditioning benchmark: conditional samplers against exact posteriors (docs/conditioning.md).

Part 1, inverse problems. Prior: the 2-D ring of 8 Gaussians (observe the first coordinate, y = 2.8) and the 16-D
anisotropic mixture of 10 full-covariance components (observe 4 random unit projections of a prior draw); noise
sigma_y in {0.05, 0.5}. The exact posterior is the Gaussian mixture of ``GaussianMixture.condition``. Methods, all
as score transforms sampled with the ancestral sampler (``grid="log_sigma"``) under ``VPSDE()`` at several NFE
(the exact and unconditional scores also with ``pf_ode``, dopri5 at rtol = atol = 1e-5): the exact posterior score,
DPS (Gaussian weighting, scale 1), PiGDM (``data_variance`` = the prior's mean per-coordinate variance), replacement;
plus the unconditional reference (prior score against the prior) at the same NFE. Samples end at t_min and are
compared with the exact target perturbed to t_min (as the conformance accuracy check does): within-mode sliced W2
over its noise floor (exact sets of N against the same reference, averaged over ``--floor-seeds``), mean NLL under
the (perturbed) target minus that of exact draws (``nll_gap``; its floor is the standard deviation of that number
over exact sets), the mode-weight total-variation error, and the distance of the sample mean to the exact mean.

Part 2, class guidance. An overlapping two-class 2-D mixture: classifier guidance with the exact noise-conditional
classifier at scales 1, 2, 4 (and classifier-free guidance with exact scores at the same guidance_scale), compared
with the tempered target ``p(x) p(c | x)^w / Z`` at t -> 0, computed by importance weighting 10^6 exact prior draws:
mean of the first coordinate, mean ``p(c | x)`` and the fraction classified as ``c`` (classifier-free guidance with
exact scores gives the same scores as classifier guidance; it is run at scale 2 as a check). Scale 1 is also checked
against the exact class-conditional mixture with the within-mode sliced W2.

    python benchmarks/bench_conditioning.py                # N = 10000 (about 30 min on a loaded 2-core machine)
    python benchmarks/bench_conditioning.py --quick --n 300
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

from score_toolkit.analytic import ClassConditionalMixture, GaussianMixture, anisotropic_mixture, ring_mixture
from score_toolkit.conditioning import (
    DPS,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    MatrixOperator,
    PiGDM,
    Replacement,
)
from score_toolkit.metrics import mean_nll, mode_weight_error, within_mode_sliced_wasserstein
from score_toolkit.processes import VPSDE
from score_toolkit.registry import get_sampler

D64 = torch.float64
FIELDS = ["case", "sigma_y", "method", "sampler", "nfe", "wsw", "wsw_floor", "wsw_ratio", "nll_gap", "nll_floor",
          "mode_tv", "mode_tv_floor", "mean_err", "mean_err_floor", "wall_s"]


def problems():
    ring = ring_mixture()
    a_ring = torch.tensor([[1.0, 0.0]], dtype=D64)
    y_ring = torch.tensor([2.8], dtype=D64)
    aniso = anisotropic_mixture(16, 10)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 16, generator=g, dtype=D64)
    a = a / a.norm(dim=1, keepdim=True)
    x_true = aniso.sample(1, generator=g)[0]
    z = torch.randn(4, generator=g, dtype=D64)
    return {"ring": (ring, a_ring, lambda sy: y_ring), "aniso16": (aniso, a, lambda sy: a @ x_true + sy * z)}


def data_variance(prior: GaussianMixture) -> float:
    mean = (prior.weights[:, None] * prior.means).sum(0)
    second = (prior.weights[:, None, None] * (prior.covariances + prior.means[:, :, None] * prior.means[:, None, :])).sum(0)
    return float(torch.diagonal(second - mean[:, None] * mean[None]).mean())


def floors(target: GaussianMixture, reference: torch.Tensor, n: int, seeds: int):
    ws, nll, tv, me = [], [], [], []
    exact_mean = (target.weights[:, None] * target.means).sum(0)
    for k in range(seeds):
        s = target.sample(n, generator=torch.Generator().manual_seed(100 + k))
        ws.append(within_mode_sliced_wasserstein(s, target, reference=reference))
        nll.append(mean_nll(s, target))
        tv.append(mode_weight_error(s, target))
        me.append(float((s.mean(0) - exact_mean).norm()))
    mean_nll_exact = sum(nll) / seeds
    nll_sd = math.sqrt(sum((v - mean_nll_exact) ** 2 for v in nll) / max(seeds - 1, 1))
    return {"wsw": sum(ws) / seeds, "nll": mean_nll_exact, "nll_sd": nll_sd, "tv": sum(tv) / seeds, "mean": sum(me) / seeds}


def score_row(samples, target, reference, fl):
    exact_mean = (target.weights[:, None] * target.means).sum(0)
    wsw = within_mode_sliced_wasserstein(samples, target, reference=reference)
    return {"wsw": wsw, "wsw_floor": fl["wsw"], "wsw_ratio": wsw / fl["wsw"],
            "nll_gap": mean_nll(samples, target) - fl["nll"], "nll_floor": fl["nll_sd"],
            "mode_tv": mode_weight_error(samples, target), "mode_tv_floor": fl["tv"],
            "mean_err": float((samples.mean(0) - exact_mean).norm()), "mean_err_floor": fl["mean"]}


def posterior_target(prior, a, y, sy, alpha, sigma, n, floor_seeds):
    """The exact posterior of ``prior`` given ``y = a x + sy n`` (components of weight >= 1e-6), it perturbed to
    (alpha, sigma), an exact reference set of ``n`` draws from that (seed 1) and its noise floors."""
    post = prior.condition(a, y, sy)
    post = post.components(post.weights >= 1e-6)
    target = post.perturbed(alpha, sigma)
    ref = target.sample(n, generator=torch.Generator().manual_seed(1))
    return post, target, ref, floors(target, ref, n, floor_seeds)


def run_inverse(args, rows, log):
    proc = VPSDE()
    alpha, sigma = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=D64)))
    for case, (prior, a, make_y) in problems().items():
        if case not in args.cases:
            continue
        op = MatrixOperator(a)
        v = data_variance(prior)
        prior_t = prior.perturbed(alpha, sigma)
        prior_ref = prior_t.sample(args.n, generator=torch.Generator().manual_seed(1))
        prior_fl = floors(prior_t, prior_ref, args.n, args.floor_seeds)
        for sy in args.sigma_y:
            y = make_y(sy)
            post, target, ref, fl = posterior_target(prior, a, y, sy, alpha, sigma, args.n, args.floor_seeds)
            methods = {
                "unconditional": prior.score_fn(proc),
                "exact": post.score_fn(proc),
                "dps": DPS(prior.score_fn(proc), proc, op, y, sy),
                "pigdm": PiGDM(prior.score_fn(proc), proc, op, y, sy, data_variance=v),
                "replacement": Replacement(prior.score_fn(proc), proc, op, y, sy),
            }
            for name, fn in methods.items():
                if name not in args.methods or (name == "unconditional" and sy != args.sigma_y[0]):
                    continue  # the unconditional reference does not depend on sigma_y: run it once per case
                runs = [("ancestral", {"num_steps": nfe, "grid": "log_sigma"})
                        for nfe in (args.nfe if name in ("unconditional", "exact") else args.nfe_approx)]
                if name in ("unconditional", "exact"):
                    runs.append(("pf_ode", {}))
                for sampler_name, opts in runs:
                    sampler = get_sampler(sampler_name, **opts)
                    nfe = opts.get("num_steps", 0)
                    t0 = time.perf_counter()
                    try:
                        out = sampler.sample(fn, proc, shape=(args.n, prior.dim), dtype=D64,
                                             generator=torch.Generator().manual_seed(2024))
                        tgt, rf, f = (prior_t, prior_ref, prior_fl) if name == "unconditional" else (target, ref, fl)
                        row = {"case": case, "sigma_y": sy, "method": name, "sampler": sampler_name, "nfe": out.nfe,
                               **score_row(out.samples, tgt, rf, f), "wall_s": time.perf_counter() - t0}
                    except Exception as exc:  # a diverging method is a result, not a crash
                        row = {"case": case, "sigma_y": sy, "method": name, "sampler": sampler_name, "nfe": nfe,
                               "wsw": math.inf, "wsw_floor": fl["wsw"], "wsw_ratio": math.inf, "nll_gap": math.inf,
                               "nll_floor": fl["nll_sd"], "mode_tv": math.nan, "mode_tv_floor": fl["tv"],
                               "mean_err": math.inf, "mean_err_floor": fl["mean"], "wall_s": time.perf_counter() - t0,
                               "error": f"{type(exc).__name__}: {exc}"[:200]}
                    rows.append(row)
                    log(row)


def guidance_mixture() -> ClassConditionalMixture:
    mix = GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [1.5, -1.0]], [[0.6, 0.5], [0.5, 0.4], [0.3, 0.3]], [0.5, 0.3, 0.2])
    return ClassConditionalMixture(mix, [0, 1, 1])


def run_guidance(args, rows, log):
    cc, proc = guidance_mixture(), VPSDE()
    label = 1
    big = cc.mixture.sample(10**6, generator=torch.Generator().manual_seed(5))
    logp_big = cc.class_log_prob(big)[:, label]
    out_rows = []
    for scale in args.scales:
        w = torch.softmax(scale * logp_big, 0)
        ess = float(1 / (w**2).sum())
        predicted = {"mean_x0": float((w * big[:, 0]).sum()), "mean_p_class": float((w * logp_big.exp()).sum()),
                     "frac_class": float((w * (cc.class_log_prob(big).argmax(1) == label)).sum())}
        for method in ("classifier_guidance", "cfg") if scale == 2.0 else ("classifier_guidance",):
            if method == "classifier_guidance":
                fn = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), label, scale=scale)
            else:
                fn = ClassifierFreeGuidance(cc.score_fn(proc), label, guidance_scale=scale)
            for sampler_name, opts in (("ancestral", {"num_steps": 500, "denoise": True}), ("pf_ode", {})):
                out = get_sampler(sampler_name, **opts).sample(fn, proc, shape=(args.n, 2), dtype=D64,
                                                               generator=torch.Generator().manual_seed(11))
                x = out.samples
                lp = cc.class_log_prob(x)
                got = {"mean_x0": float(x[:, 0].mean()), "mean_p_class": float(lp[:, label].exp().mean()),
                       "frac_class": float((lp.argmax(1) == label).double().mean())}
                row = {"part": "guidance", "method": method, "sampler": sampler_name, "scale": scale, "nfe": out.nfe,
                       "tempered_ess": ess, **{f"{k}": v for k, v in got.items()},
                       **{f"tempered_{k}": v for k, v in predicted.items()},
                       "mean_x0_se": float(x[:, 0].std() / math.sqrt(args.n))}
                if scale == 1.0:
                    target = cc.class_mixture(label)
                    ref = target.sample(args.n, generator=torch.Generator().manual_seed(1))
                    fl = sum(within_mode_sliced_wasserstein(target.sample(args.n, generator=torch.Generator().manual_seed(100 + k)),
                                                            target, reference=ref) for k in range(args.floor_seeds)) / args.floor_seeds
                    row["wsw_ratio_vs_class_mixture"] = within_mode_sliced_wasserstein(x, target, reference=ref) / fl
                    row["mode_tv_vs_class_mixture"] = mode_weight_error(x, target)
                out_rows.append(row)
                log(row)
    rows.extend(out_rows)


def fmt(v, nd=3):
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def write_markdown(path: Path, inverse, guidance, meta):
    lines = ["# Conditioning benchmark", "",
             f"Run: {meta['date']}, commit `{meta['commit']}`, N = {meta['n']}, floor seeds = {meta['floor_seeds']}, "
             f"threads = {meta['threads']}, load average at start {meta['load_start']}, at end {meta['load_end']}, "
             f"duration {meta['duration_s']:.0f} s. Command: `{meta['command']}`.", "",
             "## Inverse problems: ancestral sampler (log-sigma grid) and pf_ode under VPSDE(), samples at t_min vs the exact target at t_min", "",
             "`wsw_ratio`: within-mode sliced W2 / its floor (exact sets: about 1). `nll_gap`: mean NLL under the exact "
             "target minus that of exact draws (floor: the standard deviation of the exact value, `nll_sd`). `mode_tv`: "
             "mode-weight total variation (floor in brackets). `mean_err`: |sample mean - exact mean| (floor in brackets).", ""]
    for case in dict.fromkeys(r["case"] for r in inverse):
        for sy in dict.fromkeys(r["sigma_y"] for r in inverse if r["case"] == case):
            sub = [r for r in inverse if r["case"] == case and r["sigma_y"] == sy]
            lines += [f"### {case}, sigma_y = {sy}", "",
                      "| method | sampler | NFE | wsw_ratio | nll_gap (sd) | mode_tv (floor) | mean_err (floor) |",
                      "|---|---|---|---|---|---|---|"]
            for r in sub:
                lines.append(f"| {r['method']} | {r['sampler']} | {r['nfe']} | {fmt(r['wsw_ratio'])} | {fmt(r['nll_gap'])} ({fmt(r['nll_floor'])}) "
                             f"| {fmt(r['mode_tv'])} ({fmt(r['mode_tv_floor'])}) | {fmt(r['mean_err'])} ({fmt(r['mean_err_floor'])}) |")
            lines.append("")
    if guidance:
        lines += ["## Class guidance (overlapping 2-class 2-D mixture, class 1, VPSDE())", "",
                  "Tempered target `p(x) p(c|x)^w / Z` at t -> 0 by importance weighting 10^6 exact prior draws. "
                  "ancestral: 500 steps + Tweedie denoise; pf_ode: dopri5.", "",
                  "| method | sampler | w | NFE | mean x_0 (tempered) | mean p(c|x) (tempered) | frac class c (tempered) | wsw_ratio vs p(x|c) | mode_tv vs p(x|c) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in guidance:
            lines.append(f"| {r['method']} | {r['sampler']} | {r['scale']:g} | {r['nfe']} | {fmt(r['mean_x0'])} ({fmt(r['tempered_mean_x0'])}) "
                         f"| {fmt(r['mean_p_class'])} ({fmt(r['tempered_mean_p_class'])}) | {fmt(r['frac_class'])} ({fmt(r['tempered_frac_class'])}) "
                         f"| {fmt(r.get('wsw_ratio_vs_class_mixture', ''))} | {fmt(r.get('mode_tv_vs_class_mixture', ''))} |")
        lines.append("")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--nfe", default="25,50,100,200", help="NFE of the exact and unconditional runs")
    p.add_argument("--nfe-approx", default="25,100", help="NFE of the DPS, PiGDM and replacement runs")
    p.add_argument("--sigma-y", default="0.05,0.5")
    p.add_argument("--cases", default="ring,aniso16")
    p.add_argument("--methods", default="unconditional,exact,dps,pigdm,replacement")
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--parts", default="inverse,guidance")
    p.add_argument("--floor-seeds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="NFE 25,100 and 3 floor seeds")
    args = p.parse_args(argv)
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.nfe_approx = [int(v) for v in args.nfe_approx.split(",")]
    args.sigma_y = [float(v) for v in args.sigma_y.split(",")]
    args.cases, args.methods = args.cases.split(","), args.methods.split(",")
    args.scales = [float(v) for v in args.scales.split(",")]
    if args.quick:
        args.nfe, args.nfe_approx, args.floor_seeds = [25, 100], [25], 3
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, load_start = time.time(), os.getloadavg()[0]
    commit = git_commit()  # the commit the run starts from ("+dirty" if the code differs from it)
    inverse, guidance = [], []

    def log(row):
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    if "inverse" in args.parts:
        run_inverse(args, inverse, log)
    if "guidance" in args.parts:
        run_guidance(args, guidance, log)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "n": args.n,
            "floor_seeds": args.floor_seeds, "threads": args.threads, "load_start": round(load_start, 2),
            "load_end": round(os.getloadavg()[0], 2), "duration_s": time.time() - start,
            "command": " ".join(["python", "benchmarks/bench_conditioning.py", *(argv if argv is not None else sys.argv[1:])])}
    tmp = out / "conditioning.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "inverse": inverse, "guidance": guidance}, indent=1, default=str))
    os.replace(tmp, out / "conditioning.json")
    write_markdown(out / "conditioning.md", inverse, guidance, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
