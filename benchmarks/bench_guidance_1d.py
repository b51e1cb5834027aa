#!/usr/bin/env python
"""Does classifier guidance of scale w sample the tempered distribution ``p(x) p(c | x)^w / Z``? A closed-form check
in one dimension (docs/conditioning.md).

Prior: ``p = 0.5 N(-1, 0.6^2) + 0.5 N(1, 0.6^2)``, the class c = 1 being the component at +1, ``VPSDE()``; the guided
score is :class:`~score_toolkit.conditioning.ClassifierGuidance` with the exact noise-conditional classifier
(``ClassConditionalMixture.classifier``), i.e. ``s_w = grad log p_t + w grad log p_t(c | x)``, which is exactly the
score of ``p_t^{1 - w} p_t(x | c)^w / Z_t``. At t -> 0 that is the tempered target, but for t > 0 it is not the
tempered target diffused by the forward process, so no sampler that follows it needs to end at the target.

Computed (float64):

* the tempered target ``pi_w`` on a fine grid (x in [-10, 10], ``--grid`` points, trapezoid rule);
* the terminal law of the guided probability-flow ODE, exactly up to the solver's tolerance: in one dimension the
  ODE flow is monotone, so the quantiles of the start law (N(0, 1), the VP prior the samplers start from) map to
  the quantiles of the terminal law; ``--quantiles`` points ``u_i = (i - 1/2) / n`` carried by RK4 on a geometric
  grid of ``--ode-steps`` steps from t = 1 to t_min = 1e-3 (and again with half the steps, to state the solver's
  error), and the terminal law compared with ``pi_w`` perturbed to t_min;
* the guided reverse SDE (Euler-Maruyama, ``--sde-steps`` steps, ``--sde-samples`` samples; Monte Carlo standard errors given);
* the score mismatch: the guided score against the score of the diffused target ``pi_w * N(alpha x0, sigma^2)``
  (numerical convolution), the RMS difference under the diffused target at a few times, relative to the RMS score.

At w = 1 the guided score is the exact class-conditional score: the ODE ends at ``p(x | c)`` (a check of the
machinery). Results: ``benchmarks/results/guidance_1d.md`` and ``.json``.

    python benchmarks/bench_guidance_1d.py
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
from torchdiffeq import odeint

from score_toolkit.analytic import ClassConditionalMixture, GaussianMixture
from score_toolkit.conditioning import ClassifierGuidance
from score_toolkit.processes import VPSDE
from score_toolkit.registry import get_sampler

D = torch.float64
T_MIN = 1e-3


def setup():
    cc = ClassConditionalMixture(GaussianMixture([[-1.0], [1.0]], 0.36, dtype=D), [0, 1])
    return cc, VPSDE(t_min=T_MIN)


def _diffused_density(log_target, grid, t, process, x):
    """Density of the target (log-density ``log_target`` on ``grid``) diffused to time t, at the points x."""
    a, s = (float(v) for v in process.marginal(torch.tensor(t, dtype=D)))
    w = torch.exp(log_target - log_target.max())
    w = w / torch.trapezoid(w, grid)
    dx = grid[1] - grid[0]
    out = torch.zeros_like(x)
    for chunk in range(0, len(x), 256):
        xs = x[chunk:chunk + 256, None]
        k = torch.exp(-0.5 * ((xs - a * grid[None]) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        out[chunk:chunk + 256] = (k * w[None]).sum(1) * dx
    return out


def stats_from_density(x, density, cc):
    density = density / torch.trapezoid(density, x)
    pc = cc.class_log_prob(x[:, None])[:, 1].exp()
    return {"mean_x": float(torch.trapezoid(x * density, x)), "mean_p_class": float(torch.trapezoid(pc * density, x)),
            "frac_class": float(torch.trapezoid((pc > 0.5).to(D) * density, x))}


def stats_from_points(x, cc, weights=None):
    pc = cc.class_log_prob(x[:, None])[:, 1].exp()
    vals = {"mean_x": x, "mean_p_class": pc, "frac_class": (pc > 0.5).to(D)}
    n = len(x)
    return {k: float(v.mean()) for k, v in vals.items()}, {k: float(v.std() / math.sqrt(n)) for k, v in vals.items()}


def tempered(cc, w, x):
    """log of ``p(x) p(c = 1 | x)^w`` (unnormalised) on the points x."""
    return cc.mixture.log_prob(x[:, None]) + w * cc.class_log_prob(x[:, None])[:, 1]


def ode_terminal(score, process, n, steps):
    u = (torch.arange(n, dtype=D) + 0.5) / n
    x1 = math.sqrt(2.0) * torch.erfinv(2 * u - 1)  # quantiles of N(0, 1)

    def rhs(t, x):
        f, g = process.sde(x[:, None], t)
        return (f - 0.5 * g ** 2 * score(x[:, None], t.expand(len(x)))).reshape(-1)

    # fixed-step RK4 on a geometric time grid (an adaptive solver's trial steps would pass t_min and reach t < 0)
    ts = torch.logspace(0.0, math.log10(T_MIN), steps + 1, dtype=D)
    return odeint(rhs, x1, ts, method="rk4")[-1]


def perturbed_target_stats(cc, w, process, grid):
    """Stats of pi_w perturbed to t_min (what the samplers' t_min endpoints are compared with)."""
    return stats_from_density(grid, _diffused_density(tempered(cc, w, grid), grid, T_MIN, process, grid), cc)


def score_mismatch(cc, w, process, grid, times):
    """RMS over the diffused target of (guided score - score of the diffused target), over the RMS score."""
    guided = ClassifierGuidance(cc.mixture.score_fn(process), cc.classifier(process), 1, scale=w)
    log_t = tempered(cc, w, grid)
    out = {}
    for t in times:
        x = torch.linspace(-6, 6, 2001, dtype=D)
        q = _diffused_density(log_t, grid, t, process, x)
        true = torch.gradient(q.log(), spacing=(x,))[0]
        got = guided(x[:, None], torch.full((len(x),), t, dtype=D)).reshape(-1)
        q = q / torch.trapezoid(q, x)
        sl = slice(5, -5)  # finite differences at the ends
        rms = float(torch.trapezoid((got - true)[sl] ** 2 * q[sl], x[sl]).sqrt())
        out[f"{t:g}"] = {"rms_difference": rms, "rms_score": float(torch.trapezoid(true[sl] ** 2 * q[sl], x[sl]).sqrt())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,2,4")
    p.add_argument("--quantiles", type=int, default=4000)
    p.add_argument("--ode-steps", type=int, default=200)
    p.add_argument("--sde-samples", type=int, default=20000)
    p.add_argument("--sde-steps", type=int, default=500)
    p.add_argument("--grid", type=int, default=20001)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load0 = time.time(), os.getloadavg()[0]
    cc, process = setup()
    grid = torch.linspace(-10, 10, args.grid, dtype=D)
    rows = []
    for w in [float(s) for s in args.scales.split(",")]:
        guided = ClassifierGuidance(cc.mixture.score_fn(process), cc.classifier(process), 1, scale=w)
        target = stats_from_density(grid, tempered(cc, w, grid).exp(), cc)
        target_tmin = perturbed_target_stats(cc, w, process, grid)
        xo = ode_terminal(guided, process, args.quantiles, args.ode_steps)
        ode = stats_from_points(xo, cc)[0]  # quantile points: a deterministic quadrature, no sampling error
        half = stats_from_points(ode_terminal(guided, process, args.quantiles, args.ode_steps // 2), cc)[0]
        ode_error = {k: abs(ode[k] - half[k]) for k in ode}  # the change from halving the steps
        sampler = get_sampler("euler_maruyama", num_steps=args.sde_steps)
        xs = sampler.sample(guided, process, shape=(args.sde_samples, 1), dtype=D,
                            generator=torch.Generator().manual_seed(0)).samples.reshape(-1)
        sde, sde_se = stats_from_points(xs, cc)
        row = {"w": w, "target": target, "target_at_t_min": target_tmin, "ode": ode, "ode_change_at_half_steps": ode_error, "sde": sde, "sde_se": sde_se,
               "score_mismatch": score_mismatch(cc, w, process, grid, (0.01, 0.1, 0.3, 0.6))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"setup": "p = 0.5 N(-1, 0.6^2) + 0.5 N(1, 0.6^2), class c = 1 the component at +1, VPSDE(t_min=1e-3)",
           "quantiles": args.quantiles, "ode_steps": args.ode_steps,
           "ode_max_change": max(v for r in rows for v in r["ode_change_at_half_steps"].values()), "sde_samples": args.sde_samples, "sde_steps": args.sde_steps,
           "grid": args.grid, "rows": rows, "seconds": time.time() - start, "load": [load0, os.getloadavg()[0]],
           "command": "python benchmarks/bench_guidance_1d.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "guidance_1d.json", json.dumps(res, indent=1) + "\n")
    _write(out / "guidance_1d.md", markdown(res))
    return 0


def markdown(res) -> str:
    lines = ["# Classifier guidance vs the tempered target, in closed form (1-D)", "",
             f"{res['setup']}; exact noise-conditional classifier. Target `pi_w = p(x) p(c|x)^w / Z` on a grid of "
             f"{res['grid']} points (at t_min: perturbed to t_min); guided PF-ODE: {res['quantiles']} quantiles of "
             f"N(0, 1) carried by RK4 on a geometric grid of {res['ode_steps']} steps from t = 1 to t_min (in one "
             f"dimension the flow keeps the order, so these are the terminal law's quantiles; halving the steps "
             f"changes no entry by more than {res['ode_max_change']:.1e}); "
             f"guided SDE: Euler-Maruyama, {res['sde_steps']} steps, {res['sde_samples']} samples (+- one standard "
             f"error). Command: `{res['command']}` ({res['seconds']:.0f} s, load {res['load'][0]:.1f}).", "",
             "| w | quantity | tempered target (at t_min) | guided PF-ODE | guided SDE |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        for k, name in (("mean_x", "mean x"), ("mean_p_class", "mean p(c|x)"), ("frac_class", "share with p(c|x) > 1/2")):
            lines.append(f"| {r['w']:g} | {name} | {r['target'][k]:.4f} ({r['target_at_t_min'][k]:.4f}) | "
                         f"{r['ode'][k]:.4f} | {r['sde'][k]:.4f} +- {r['sde_se'][k]:.4f} |")
    lines += ["", "Guided score vs the score of the diffused target, RMS difference / RMS score under the diffused "
                  "target:", "", "| w | " + " | ".join(f"t = {t}" for t in res["rows"][0]["score_mismatch"]) + " |",
              "|---|" + "---|" * len(res["rows"][0]["score_mismatch"])]
    for r in res["rows"]:
        lines.append(f"| {r['w']:g} | " + " | ".join(f"{v['rms_difference']:.3g} / {v['rms_score']:.3g}"
                                                   for v in r["score_mismatch"].values()) + " |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
