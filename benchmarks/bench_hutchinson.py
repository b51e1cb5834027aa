#!/usr/bin/env python
"""Hutchinson's estimator in the ODE log-likelihood: bias of bits/dim and coverage of the standard error.

1. **Bias of bits/dim on 17-level data.** 2-D data on 17 levels in [-1, 1] from a Gaussian mixture whose modes are
   narrower than a quantization bin (so the score's Jacobian varies inside a bin). ``dequantized_bits_per_dim``
   with Hutchinson probes (1 and 4 Rademacher probes) is paired with the exact divergence on the same dequantized
   points (same seed, same noise): the mean difference over ``--bias-n`` samples, with its standard error. Rows
   "shared stream" reproduce the old behaviour (dequantization noise and probes drawn from one generator per
   sample, so that the first probe is sign(u - 1/2)) by dequantizing with the probes' own generators.
2. **Coverage of the per-sample standard error.** For each of ``--coverage-n`` samples (each an independent trial:
   its own probes) of the 2-D ring and a 16-D anisotropic mixture under VP(0.1, 20): the Hutchinson estimate with
   K probes and its standard error ``std(I_k) / sqrt(K)`` against the exact-divergence value of the same ODE
   (rtol = atol = 1e-6, so the solver's error is negligible next to the probe error). Reported: the fraction of
   samples whose standard error is unknown (all K probe estimates equal: NaN, formerly reported as 0), and the
   coverage of +-2 SE and of the Student t interval (``LikelihoodResult.interval``, t with K - 1 degrees of
   freedom) among the others, and of +-2 SE counting the unknown ones as misses (what a 0 standard error gave).

    python benchmarks/bench_hutchinson.py                 # writes benchmarks/results/hutchinson.md and .json
    python benchmarks/bench_hutchinson.py --quick         # small sizes, a minute
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

from score_toolkit._io import write_text_atomic
from score_toolkit._utils import per_sample_generators
from score_toolkit.analytic import GaussianMixture, anisotropic_mixture, ring_mixture
from score_toolkit.likelihood import bits_per_dim, dequantize, dequantized_bits_per_dim, log_likelihood
from score_toolkit.likelihood.result import student_t_quantile
from score_toolkit.processes import VPSDE

LEVELS = 17
TOL = dict(rtol=1e-6, atol=1e-6)


def quantized_mixture(d: int, n: int):
    g = torch.Generator().manual_seed(1)
    means = (torch.randint(0, LEVELS, (6, d), generator=g).double() + 0.5) / LEVELS * 2 - 1
    a = torch.randn(6, d, d, generator=g, dtype=torch.float64) * 0.03
    mix = GaussianMixture(means, a @ a.transpose(1, 2) + 5e-4 * torch.eye(d, dtype=torch.float64))
    x = mix.sample(n, generator=torch.Generator().manual_seed(2)).clamp(-1, 0.9999)
    return mix, ((x + 1) / 2 * LEVELS).floor().long().clamp(0, LEVELS - 1)


def _shared_stream_bpd(sf, proc, k, seed: int, num_probes: int) -> torch.Tensor:
    """The old dequantized_bits_per_dim: dequantization noise and probes from the same per-sample generators."""
    x = dequantize(k, levels=LEVELS, scale=2.0, offset=-1.0, generator=per_sample_generators(seed, range(len(k))),
                   dtype=torch.float64)
    res = log_likelihood(sf, proc, x, divergence="hutchinson", num_probes=num_probes, seed=seed, data_range=(-1, 1),
                         **TOL)
    return bits_per_dim(res.nll.double(), k.shape[1], levels=LEVELS, scale=2.0)


def bias_rows(n: int, seed: int = 3) -> list[dict]:
    proc = VPSDE()
    mix, k = quantized_mixture(2, n)
    sf = mix.score_fn(proc)
    opts = dict(levels=LEVELS, dtype=torch.float64, seed=seed, **TOL)
    exact = dequantized_bits_per_dim(sf, proc, k, divergence="exact", **opts)
    # the exact rows' dequantization noise, drawn the way the shared-stream rows draw theirs
    x_shared = dequantize(k, levels=LEVELS, scale=2.0, offset=-1.0,
                          generator=per_sample_generators(seed, range(n)), dtype=torch.float64)
    exact_shared = bits_per_dim(log_likelihood(sf, proc, x_shared, **TOL).nll.double(), 2, levels=LEVELS, scale=2.0)
    rows = []
    for num_probes in (1, 4):
        new = dequantized_bits_per_dim(sf, proc, k, divergence="hutchinson", num_probes=num_probes, **opts).bpd
        old = _shared_stream_bpd(sf, proc, k, seed, num_probes)
        for label, est, ref in (("independent streams (now)", new, exact.bpd), ("shared stream (before)", old,
                                                                                exact_shared)):
            diff = (est - ref).double()
            se = float(diff.std()) / math.sqrt(n)
            rows.append({"streams": label, "num_probes": num_probes, "n": n, "mean_exact_bpd": float(ref.mean()),
                         "bias_bpd": float(diff.mean()), "std_err": se, "z": float(diff.mean()) / se})
    return rows


def coverage_rows(n: int, probes: list[int]) -> list[dict]:
    proc = VPSDE(0.1, 20.0)
    rows = []
    for d in (2, 16):
        mix = ring_mixture() if d == 2 else anisotropic_mixture(d)
        x = mix.sample(n, generator=torch.Generator().manual_seed(4))
        sf = mix.score_fn(proc)
        exact = log_likelihood(sf, proc, x, **TOL)
        for num_probes in probes:
            h = log_likelihood(sf, proc, x, divergence="hutchinson", num_probes=num_probes, seed=9, **TOL)
            err = (h.log_prob - exact.log_prob).abs()
            known = ~torch.isnan(h.std_err)
            within2 = (err <= 2 * h.std_err) & known
            lo, hi = h.interval(0.95)
            within_t = (exact.log_prob >= lo) & (exact.log_prob <= hi) & known
            kn = int(known.sum())
            rows.append({
                "d": d, "num_probes": num_probes, "n": n, "unknown_std_err": float((~known).double().mean()),
                "coverage_2se_known": float(within2.sum()) / max(kn, 1),
                "coverage_t95_known": float(within_t.sum()) / max(kn, 1),
                "t_quantile": student_t_quantile(0.975, num_probes - 1),
                "coverage_2se_unknown_as_miss": float(within2.double().mean()),
                "mean_abs_error_nats": float(err.mean()),
                "exact_vs_closed_form_nats": float((exact.log_prob - mix.log_prob(x, proc.t_min, proc)).abs().mean()),
            })
    return rows


def _md(result: dict) -> str:
    lines = ["# Hutchinson's estimator: bias of bits/dim and coverage of the standard error", "",
             f"Made by `benchmarks/bench_hutchinson.py` ({result['settings']}), commit {result['commit']}, "
             f"load average {result['load_start']:.1f} -> {result['load_end']:.1f}, {result['duration_s']:.0f} s.", "",
             "## Bias of bits/dim (2-D, 17 levels, paired with the exact divergence)", "",
             "| streams | probes | n | mean exact bpd | bias (bpd) | std. error | z |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["bias"]:
        lines.append(f"| {r['streams']} | {r['num_probes']} | {r['n']} | {r['mean_exact_bpd']:.3f} | "
                     f"{r['bias_bpd']:+.4f} | {r['std_err']:.4f} | {r['z']:+.2f} |")
    lines += ["", "## Coverage of the per-sample standard error (Rademacher probes, VP(0.1, 20))", "",
              "| d | probes | n | SE unknown (all probes equal) | +-2 SE covers (known SE) | t interval covers "
              "(known SE) | t quantile | +-2 SE, unknown counted as miss | mean abs error (nats) | exact divergence vs closed form (nats) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["coverage"]:
        lines.append(f"| {r['d']} | {r['num_probes']} | {r['n']} | {r['unknown_std_err']:.3f} | "
                     f"{r['coverage_2se_known']:.3f} | {r['coverage_t95_known']:.3f} | {r['t_quantile']:.3f} | "
                     f"{r['coverage_2se_unknown_as_miss']:.3f} | {r['mean_abs_error_nats']:.4f} | "
                     f"{r['exact_vs_closed_form_nats']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bias-n", type=int, default=3000)
    p.add_argument("--coverage-n", type=int, default=400)
    p.add_argument("--probes", default="4,16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.bias_n, args.coverage_n = 60, 40
    torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    probes = [int(v) for v in args.probes.split(",")]
    result = {"bias": bias_rows(args.bias_n), "coverage": coverage_rows(args.coverage_n, probes)}
    result.update(settings=f"bias n = {args.bias_n}, coverage n = {args.coverage_n} per dimension, probes {probes}, "
                           f"rtol = atol = 1e-6, float64, {args.threads} thread(s)",
                  commit=git_commit(), load_start=load_start, load_end=os.getloadavg()[0],
                  duration_s=time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic((out / "hutchinson.json"), json.dumps(result, indent=1) + "\n")
    write_text_atomic((out / "hutchinson.md"), _md(result))
    print(_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
