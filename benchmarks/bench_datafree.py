#!/usr/bin/env python
"""The data-free reference grid (``grid="reference"``, score_toolkit/samplers/reference_grids.py): fit it on the
reference family, and score it on the analytic test bed as held-out targets, exactly as bench_defaults.py scores
the defaults (N = 10,000, exact scores, the same prior draws, exact reference set and 6-pair noise floors; within
1.5x of the floor in within-mode sliced W2 and in mean NLL).

    python benchmarks/bench_datafree.py fit dpmpp_2m 11 VP            # prints the fitted log-SNR points
    python benchmarks/bench_datafree.py score ring VE,VP "dpmpp_2m:10/12/15:grid=reference" "unipc:12:"

Cases: the 2-D ring and the 16-D / 64-D anisotropic mixtures of the test bed, and ``grid2d``, a further held-out
2-D distribution the grids were not tuned on (a 5 x 5 square lattice of isotropic Gaussians, spacing 1.5, std 0.15,
unequal weights). A setting is ``name:NFE[/NFE...]:opt=value;opt=value`` (NFE = steps + 1 with ``to_zero``);
``lam=[...]`` runs explicit log-SNR points carried over to the process (``transfer_log_snr``). Results:
benchmarks/results/datafree.md.
"""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_defaults as BD  # noqa: E402
import bench_samplers as B  # noqa: E402

from score_toolkit import metrics as M  # noqa: E402
from score_toolkit.analytic import GaussianMixture  # noqa: E402
from score_toolkit.registry import get_sampler  # noqa: E402
from score_toolkit.samplers.grid_store import transfer_log_snr  # noqa: E402
from score_toolkit.samplers.reference_grids import fit_reference_grid, reference_family  # noqa: E402


def lattice_mixture(dtype=torch.float64) -> GaussianMixture:
    """The further held-out case: a 5 x 5 lattice (spacing 1.5) of isotropic Gaussians (std 0.15), weights 1..25."""
    axis = 1.5 * (torch.arange(5, dtype=dtype) - 2)
    means = torch.cartesian_prod(axis, axis)
    return GaussianMixture(means, torch.full((25,), 0.15**2, dtype=dtype), torch.arange(1, 26, dtype=dtype), dtype=dtype)


CASES = {"ring": BD.CASES["ring"][0], "aniso16": BD.CASES["aniso16"][0], "aniso64": BD.CASES["aniso64"][0],
         "grid2d": lattice_mixture}


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
    steps = nfe - (1 if opts.get("to_zero", True) else 0)
    if "lam" in opts:
        lam = transfer_log_snr(torch.tensor(opts.pop("lam"), dtype=torch.float64), process, steps)
        ts = process.t_from_log_snr(lam)
        ts[0], ts[-1] = process.t_max, process.t_min
        return get_sampler(name, grid=ts.tolist(), **opts)
    return get_sampler(name, num_steps=steps, **opts)


def score_cmd(case, pnames, specs, n=10_000, out=None) -> None:
    mix = CASES[case]()
    floors = B.noise_floors(mix, n, 6)
    reference = mix.sample(n, generator=B._gen(B.REF_SEED))
    ref_nll = M.mean_nll(reference, mix)
    for pname in pnames:
        process = BD.PROCESSES[pname]()
        score = mix.score_fn(process)
        x1 = process.prior_sample((n, mix.dim), generator=B._gen(1), dtype=torch.float64)
        for spec in specs:
            name, nfes, opts = parse(spec)
            for nfe in nfes:
                res = build(name, nfe, opts, process).sample(score, process, x_init=x1.clone())
                r = B.score_samples(res.samples, mix, reference, ref_nll)
                w, nl = r["wsw"] / floors["wsw"]["mean"], abs(r["nll_gap"]) / floors["nll"]["mean"]
                line = (f"{case} {pname} {spec} nfe={res.nfe} wsw={w:.2f} nll={nl:.2f} gap={r['nll_gap']:+.4f}"
                        + (" MEETS" if w <= B.CRITERION and nl <= B.CRITERION else ""))
                print(line, flush=True)
                if out is not None:
                    with open(out, "a") as fh:
                        fh.write(line + "\n")


def fit_cmd(name, steps, pname, iterations=80, num_samples=256) -> None:
    process = BD.PROCESSES[pname]()
    sampler = get_sampler(name, num_steps=int(steps))
    start = time.perf_counter()
    lam = fit_reference_grid(sampler, process, reference_family(), num_samples=num_samples, iterations=iterations)
    print(f"fit {name} {steps} {pname} ({time.perf_counter() - start:.0f} s): "
          f"{[round(v, 4) for v in lam.tolist()]}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    if argv and argv[0] == "score" and len(argv) >= 4:
        score_cmd(argv[1], argv[2].split(","), argv[3:])
    elif argv and argv[0] == "fit" and len(argv) >= 4:
        fit_cmd(argv[1], argv[2], argv[3], *(int(v) for v in argv[4:]))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
