#!/usr/bin/env python
"""The data-free reference grid (``grid="reference"``, score_toolkit/samplers/reference_grids.py): fit it on the
reference family, and score it on the analytic test bed as held-out targets, exactly as bench_defaults.py scores
the defaults (N = 10,000, exact scores, the same prior draws, exact reference set and 6-pair noise floors; within
1.5x of the floor in within-mode sliced W2 and in mean NLL).

    python benchmarks/bench_datafree.py fit unipc 11 VP 150           # prints the fitted log-SNR points (150 L-BFGS evals)
    python benchmarks/bench_datafree.py score ring VE,VP "unipc:12/15/20/25:grid='reference'" "unipc:12/15/20:"

Cases: the 2-D ring and the 16-D / 64-D anisotropic mixtures of the test bed, and ``grid2d``, a further held-out
2-D distribution the grids were not tuned on (a 5 x 5 square lattice of isotropic Gaussians, spacing 1.5, std 0.15,
unequal weights). A setting is ``name:NFE[/NFE...]:opt=value;opt=value`` (NFE = steps + 1 with ``to_zero``);
``lam=[...]`` runs explicit log-SNR points carried over to the process (``transfer_log_snr``). Results:
benchmarks/results/datafree.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_defaults as BD  # noqa: E402
import bench_defaults_explore as E  # noqa: E402

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


def build(name, nfe, opts, process):
    opts = dict(opts)
    steps = nfe - (1 if opts.get("to_zero", True) else 0)
    if "lam" in opts:
        lam = transfer_log_snr(torch.tensor(opts.pop("lam"), dtype=torch.float64), process, steps)
        ts = process.t_from_log_snr(lam)
        ts[0], ts[-1] = process.t_max, process.t_min
        return get_sampler(name, grid=ts.tolist(), **opts)
    return get_sampler(name, num_steps=steps, **opts)


def score_cmd(case, pnames, specs, n=10_000) -> None:
    """bench_defaults_explore's scoring (same draws, reference set, floors, output lines) on ``case``."""
    E.score_cmd(case, pnames, specs, n, mix=CASES[case](), build_fn=build)


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
