#!/usr/bin/env python
"""Why the mean-NLL gap of a fixed-grid sampler stays above the noise floor in 16-D and 64-D: the exact within-mode
spread error on Gaussian data, no sampling noise.

On N(0, C) (one direction of variance C) every sampler of the DPM-Solver++ family is linear in its initial state,
so running it on ``x_1 = 1`` gives its gain G; the exact probability-flow map has gain sqrt(C / (alpha_1^2 C +
sigma_1^2)). The samples' variance is off by the factor r = (G / G_exact)^2 and their mean NLL under the true law by
exactly (r - 1) / 2 nats per direction. The table gives that bias at C = 0.01, 0.04 (the ring's modes), 0.25, 1, and
summed over the 16-D mixture's 160 component eigenvalues weighted by the component weights (the within-mode part of
the mixture's NLL gap in 16-D; in 64-D it is about four times as large while the NLL noise floor only doubles).
NLL floors at N = 10,000 (benchmarks/results/defaults_16.md): 16-D 0.027 nats, 64-D 0.082.

    python benchmarks/bench_defaults_gain.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from score_toolkit._io import write_text_atomic
from score_toolkit.analytic import anisotropic_mixture
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler

VARIANTS = [  # label, sampler, options (besides num_steps = NFE - final evaluation), dtype
    ("dpmpp_3m defaults (fitted order-3 grid, to_zero)", "dpmpp_3m", {}, torch.float64),
    ("dpmpp_3m, log_sigma, to_zero", "dpmpp_3m", {"grid": "log_sigma"}, torch.float64),
    ("dpmpp_3m, fitted order-2 grid, to_zero", "dpmpp_3m", {"grid": "log_sigma", "_order2": True}, torch.float64),
    ("dpmpp_2m defaults (fitted order-2 grid, to_zero)", "dpmpp_2m", {}, torch.float64),
    ("dpmpp_2m defaults, float32", "dpmpp_2m", {}, torch.float32),
    ("dpmpp_2m, fitted, no final step", "dpmpp_2m", {"to_zero": False}, torch.float64),
    ("dpmpp_2m, fitted, denoise", "dpmpp_2m", {"denoise": True}, torch.float64),
    ("dpmpp_2m, fitted, lower_order_final=False", "dpmpp_2m", {"lower_order_final": False}, torch.float64),
    ("dpmpp_2m, log_sigma, to_zero", "dpmpp_2m", {"grid": "log_sigma"}, torch.float64),
    ("dpmpp_2m, karras rho 7, to_zero", "dpmpp_2m", {"grid": "karras"}, torch.float64),
]
SHOWN_C = (0.01, 0.04, 0.25, 1.0)
NFES = (15, 20, 25, 30, 40)


def bias_per_direction(sampler, process, variances: torch.Tensor, dtype) -> torch.Tensor:
    """(r - 1) / 2 for each variance, r the sampler's output variance over C (exact: the sampler is linear)."""
    def score(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        a, s = process.marginal(t)
        return (-x.double() / (a**2 * variances + s**2)).to(x.dtype)

    a1, s1 = process.marginal(torch.tensor([1.0], dtype=torch.float64))
    gain = sampler.sample(score, process, x_init=torch.ones(1, variances.numel(), dtype=dtype)).samples[0].double()
    exact = torch.sqrt(variances / (a1**2 * variances + s1**2))
    return ((gain / exact) ** 2 - 1) / 2


def main() -> int:
    torch.set_num_threads(1)
    mix = anisotropic_mixture()
    eig = mix.eigvals.reshape(-1).to(torch.float64)
    wts = (mix.weights / mix.weights.sum()).repeat_interleave(mix.dim).to(torch.float64)
    cs = torch.cat([torch.tensor(SHOWN_C, dtype=torch.float64), eig])
    lines = ["# The within-mode spread error of the fixed-grid samplers on Gaussian data (exact)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| process | sampler | NFE | " + " | ".join(f"C = {c:g}" for c in SHOWN_C) + " | 16-D mixture (sum) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in SHOWN_C) + " | --- |"]
    from score_toolkit.samplers.fixed_grid import fitted_log_snr

    for pname, process in (("VE", VESDE(0.01, 50.0)), ("VP", VPSDE(0.1, 20.0))):
        for label, name, options, dtype in VARIANTS:
            for nfe in NFES:
                opts = dict(options)
                order2 = opts.pop("_order2", False)
                final = 0 if opts.get("to_zero") is False else 1
                if order2:  # dpmpp_3m on the order-2 density: explicit times
                    ts = process.t_from_log_snr(fitted_log_snr(process, nfe - final, order=2))
                    ts[0], ts[-1] = process.t_max, process.t_min
                    opts = {"grid": ts.tolist()}
                else:
                    opts["num_steps"] = nfe - final
                b = bias_per_direction(get_sampler(name, **opts), process, cs, dtype)
                shown, rest = b[: len(SHOWN_C)], b[len(SHOWN_C):]
                total = float((rest * wts).sum())
                lines.append(f"| {pname} | {label} | {nfe} | " + " | ".join(f"{v:+.4f}" for v in shown.tolist())
                             + f" | {total:+.3f} |")
    out = Path(__file__).resolve().parent / "results" / "defaults_gain.md"
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
