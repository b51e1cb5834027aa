#!/usr/bin/env python
"""A shipped model's stored grids (``hub_cards/<model>/grids``, written by ``score-toolkit fit-grid``) against the
built-in grid, sampled through the pipeline as a user does: ``ScorePipeline.from_pretrained(folder)(...)`` with only
``num_inference_steps`` (the stored grid) and with ``grid="fitted"`` added (the built-in grid), from the same noise.

N samples per run, float32, one draw of noise:
* solver error: the distance of each sample to the converged ODE's output from the same noise (``dpmpp_3m``,
  ``--converged`` log-SNR steps, ``to_zero``), per coordinate (divided by sqrt(dim)): the sampler's own error, without
  the network's; its root mean square, median and 90 / 99 % quantiles;
* ``toy2d`` (trained on the ring of 8 Gaussians): sliced W2 to N exact ring draws, with the noise floor (two exact
  sets of N) and the converged ODE's own value. The digits model's Frechet distances on the same grids are in
  results/pilot_grid_digits.md (bench_pilot_grid.py).

    OMP_NUM_THREADS=1 python benchmarks/bench_model_grids.py --model toy2d --n 10000
    OMP_NUM_THREADS=1 python benchmarks/bench_model_grids.py --model digits --n 512 --converged 200 --tag model_grids_digits
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from score_toolkit._io import write_text_atomic
from score_toolkit.analytic import ring_mixture
from score_toolkit.metrics import sliced_wasserstein
from score_toolkit.pipeline import ScorePipeline, shipped_model_path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy2d")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--steps", default="14,24")
    ap.add_argument("--converged", type=int, default=400, help="steps of the converged ODE")
    ap.add_argument("--tag", default="model_grids_toy2d")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    folder = shipped_model_path(args.model)
    pipe = ScorePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ring = ring_mixture()
    n = args.n

    def run(**kw):
        with torch.no_grad():
            out = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
        return out

    def sw(x, y):
        return sliced_wasserstein(x.double(), y.double(), generator=torch.Generator().manual_seed(1))

    ring_model = args.model == "toy2d"
    if ring_model:
        exact = ring.sample(n, generator=torch.Generator().manual_seed(3)).double()
        floor = sw(ring.sample(n, generator=torch.Generator().manual_seed(4)), exact)
    t0 = time.perf_counter()
    conv = run(sampler="dpmpp_3m", num_steps=args.converged, grid="log_sigma", to_zero=True)
    ref = conv.samples.double().reshape(n, -1)
    dim = ref.shape[1]
    half = run(sampler="dpmpp_3m", num_steps=args.converged // 2, grid="log_sigma", to_zero=True)

    def row(label, out):
        d = (out.samples.double().reshape(n, -1) - ref).norm(dim=1) / dim ** 0.5
        q = torch.quantile(d, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
        r = {"label": label, "nfe": out.nfe, "grid": out.grid, "rms_error": float(d.pow(2).mean().sqrt()),
             "median": q[0], "q90": q[1], "q99": q[2]}
        if ring_model:
            r["sliced_w2"] = sw(out.samples, exact)
        print(r, flush=True)
        return r

    rows = [row(f"converged ODE with half the steps ({args.converged // 2}): its own error", half)]
    if ring_model:
        rows.append({"label": f"converged ODE (dpmpp_3m, {args.converged} steps)", "nfe": conv.nfe, "grid": conv.grid,
                     "rms_error": 0.0, "median": 0.0, "q90": 0.0, "q99": 0.0, "sliced_w2": sw(conv.samples, exact)})
    for steps in (int(s) for s in args.steps.split(",")):
        for label, kw in (("the model's grid", {}), ("built-in grid", {"grid": "fitted"})):
            rows.append(row(f"unipc, {label}", run(num_inference_steps=steps, **kw)))
    seconds = time.perf_counter() - t0
    w2 = f" Sliced W2 to {n} exact ring draws; noise floor (two exact sets) {floor:.4f}." if ring_model else ""
    lines = [f"# {args.model}: the model's stored grids against the built-in grid (N = {n}, float32, one draw)", "",
             f"Sampled through ScorePipeline.from_pretrained({folder.name}) with only num_inference_steps (the stored grid "
             "grids/unipc_<steps>.json) or with grid='fitted' added, from the same noise (seed 0). Solver error: the "
             f"distance of each sample to the converged ODE's sample from the same noise (dpmpp_3m, {args.converged} "
             f"log-SNR steps, to_zero), divided by sqrt(dim) = sqrt({dim}).{w2} Run time {seconds:.0f} s.", "",
             "| run | NFE | solver error: rms | median | 90 % | 99 % |" + (" sliced W2 |" if ring_model else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if ring_model else "")]
    lines += [f"| {r['label']} | {r['nfe']} | {r['rms_error']:.5f} | {r['median']:.5f} | {r['q90']:.5f} | "
              f"{r['q99']:.5f} |" + (f" {r['sliced_w2']:.4f} |" if ring_model else "") for r in rows]
    out_dir = Path(args.out)
    write_text_atomic(out_dir / f"{args.tag}.md", "\n".join(lines) + "\n")
    write_text_atomic(out_dir / f"{args.tag}.json", json.dumps({"floor": floor if ring_model else None, "n": n, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
