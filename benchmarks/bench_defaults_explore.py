#!/usr/bin/env python
"""Single runs behind the choice of ``unipc``'s data-free density (docs/fast_samplers.md, "Defaults"): score one
sampler setting exactly as bench_defaults.py does (same draws, exact reference set and 6-pair noise floors, N = 10,000),
or its exact within-mode spread bias on Gaussian data (bench_defaults_gain.py's linear-gain method, summed over the
16-D and 64-D mixtures' component eigenvalues), with the shipped density of ``unipc`` (order 4) re-weighted.

    python benchmarks/bench_defaults_explore.py score ring VE,VP "unipc:15:W=(7,4,8)" "unipc:12/15/20:"
    python benchmarks/bench_defaults_explore.py gain "unipc:30:W=(12,4,8,0,(3,4.7,2))" "unipc:30:lower_order_final=True"

A setting is ``name:NFE[/NFE...]:opt=value;opt=value``. ``W=(a, b, c[, U[, (lam0, lam1, w)]])`` re-weights the
order-4 density: a, b, c on the second-order fits, the ring's third-order fits and the 16-D third-order fits (shipped:
12, 4, 8; dpmpp_3m's order-3 density is 7, 4, 8), U on a constant density (1 / 9.6 per unit log-SNR) and w on a
constant density over [lam0, lam1]. ``lam=[...]`` runs on explicit log-SNR points. Results of the runs quoted in the
docs: results/defaults_unipc_explore.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_defaults as BD  # noqa: E402
import bench_samplers as B  # noqa: E402
from bench_defaults_gain import bias_per_direction  # noqa: E402

import score_toolkit.samplers.fixed_grid as FG  # noqa: E402
from score_toolkit import metrics as M  # noqa: E402
from score_toolkit.analytic import anisotropic_mixture  # noqa: E402
from score_toolkit.processes import VESDE, VPSDE  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402

_SHIPPED = FG._FITTED[4]
_density = FG._fitted_density


def set_density(w=None) -> None:
    """Re-weight the order-4 density (None: the shipped one)."""
    FG._FITTED[4] = _SHIPPED
    FG._fitted_density = _density
    if w is None:
        return
    a, b, c, *rest = w
    u = rest[0] if rest else 0.0
    band = rest[1] if len(rest) > 1 else None
    FG._FITTED[4] = (FG._FITTED_2M + FG._FITTED_3M, (a / 4,) * 4 + (b / 4,) * 4 + (c / 3,) * 3)
    total = a + b + c

    def dens(lam, order=2):
        d = _density(lam, order)
        if order != 4:
            return d
        d = d * total + u / 9.6
        extra = 0.0
        if band is not None:
            d = d + band[2] / (band[1] - band[0]) * ((lam >= band[0]) & (lam <= band[1])).to(d.dtype)
            extra = band[2]
        return d / (total + u + extra)

    FG._fitted_density = dens


def parse(spec: str):
    name, nfes, *rest = spec.split(":")
    opts = {}
    for kv in (rest[0].split(";") if rest and rest[0] else []):
        k, v = kv.split("=", 1)
        try:
            opts[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k] = v
    return name, [int(v) for v in nfes.split("/")], opts


def build(name, nfe, opts, process):
    opts = dict(opts)
    if "lam" in opts:
        ts = process.t_from_log_snr(torch.tensor(opts.pop("lam"), dtype=torch.float64))
        ts[0], ts[-1] = process.t_max, process.t_min
        return get_sampler(name, grid=ts.tolist(), **opts)
    return get_sampler(name, num_steps=nfe - (1 if opts.get("to_zero", True) else 0), **opts)


def score_cmd(case, pnames, specs, n=10_000, mix=None, build_fn=None) -> None:
    """Score each setting on ``case`` (or the mixture ``mix``), built by ``build_fn`` (default :func:`build`)."""
    mix = BD.CASES[case][0]() if mix is None else mix
    build_fn = build if build_fn is None else build_fn
    floors = B.noise_floors(mix, n, 6)
    reference = mix.sample(n, generator=B._gen(B.REF_SEED))
    ref_nll = M.mean_nll(reference, mix)
    for pname in pnames:
        process = BD.PROCESSES[pname]()
        score = mix.score_fn(process)
        x1 = process.prior_sample((n, mix.dim), generator=B._gen(1), dtype=torch.float64)
        for spec in specs:
            name, nfes, opts = parse(spec)
            set_density(opts.pop("W", None))
            for nfe in nfes:
                out = build_fn(name, nfe, opts, process).sample(score, process, x_init=x1.clone())
                r = B.score_samples(out.samples, mix, reference, ref_nll)
                w, nl = r["wsw"] / floors["wsw"]["mean"], abs(r["nll_gap"]) / floors["nll"]["mean"]
                print(f"{case} {pname} {spec} nfe={out.nfe} wsw={w:.2f} nll={nl:.2f} gap={r['nll_gap']:+.4f}"
                      + (" MEETS" if w <= B.CRITERION and nl <= B.CRITERION else ""), flush=True)
    set_density(None)


def gain_cmd(specs) -> None:
    sums = {}
    for dim in (16, 64):
        mix = anisotropic_mixture(dim=dim)
        sums[dim] = (mix.eigvals.reshape(-1).to(torch.float64),
                     (mix.weights / mix.weights.sum()).repeat_interleave(mix.dim).to(torch.float64))
    for spec in specs:
        name, nfes, opts = parse(spec)
        set_density(opts.pop("W", None))
        for nfe in nfes:
            cells = []
            for pname, process in (("VE", VESDE(0.01, 50.0)), ("VP", VPSDE(0.1, 20.0))):
                for dim, (eig, wts) in sums.items():
                    b = bias_per_direction(build(name, nfe, opts, process), process, eig, torch.float64)
                    cells.append(f"{pname} {dim}-D {float((b * wts).sum()):+.3f}")
            print(f"{spec} nfe={nfe}: " + ", ".join(cells), flush=True)
    set_density(None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    if argv and argv[0] == "score" and len(argv) >= 4:
        score_cmd(argv[1], argv[2].split(","), argv[3:])
    elif argv and argv[0] == "gain" and len(argv) >= 2:
        gain_cmd(argv[1:])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
