#!/usr/bin/env python
"""A shipped model's stored grids (``hub_cards/<model>/grids``, written by ``score-toolkit fit-grid``) against the
built-in grid, sampled through the pipeline as a user does: ``ScorePipeline.from_pretrained(folder)(...)`` with only
``num_inference_steps`` (the stored grid) and with ``grid="fitted"`` added (the built-in grid), from the same noise.

For the 2-D ``toy2d`` model (trained on the ring of 8 Gaussians), N samples per run, float32:
* solver error: the root-mean-square distance of each sample to the converged ODE's output from the same noise
  (``dpmpp_3m``, 400 log-SNR steps, ``to_zero``): the sampler's own error, without the network's;
* sliced W2 to N exact ring draws, with the noise floor (two exact sets of N) and the converged ODE's own value.

    OMP_NUM_THREADS=1 python benchmarks/bench_model_grids.py --n 10000
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

    exact = ring.sample(n, generator=torch.Generator().manual_seed(3)).double()
    floor = sw(ring.sample(n, generator=torch.Generator().manual_seed(4)), exact)
    t0 = time.perf_counter()
    conv = run(sampler="dpmpp_3m", num_steps=400, grid="log_sigma", to_zero=True)
    rows = [{"label": "converged ODE (dpmpp_3m, 400 steps)", "nfe": conv.nfe, "grid": conv.grid, "rms_error": 0.0,
             "sliced_w2": sw(conv.samples, exact)}]
    for steps in (int(s) for s in args.steps.split(",")):
        for label, kw in (("the model's grid", {}), ("built-in grid", {"grid": "fitted"})):
            out = run(num_inference_steps=steps, **kw)
            err = float((out.samples.double() - conv.samples.double()).pow(2).sum(1).mean().sqrt())
            rows.append({"label": f"unipc, {label}", "nfe": out.nfe, "grid": out.grid, "rms_error": err,
                         "sliced_w2": sw(out.samples, exact)})
            print(rows[-1], flush=True)
    seconds = time.perf_counter() - t0
    lines = [f"# {args.model}: the model's stored grids against the built-in grid (N = {n}, float32, one draw)", "",
             f"Sampled through ScorePipeline.from_pretrained({folder.name}) with only num_inference_steps (the stored grid "
             "grids/unipc_<steps>.json) or with grid='fitted' added, from the same noise (seed 0). rms error: the "
             "root-mean-square distance to the converged ODE's sample from the same noise (the solver's own error). "
             f"Sliced W2 to {n} exact ring draws; noise floor (two exact sets) {floor:.4f}. "
             f"Run time {seconds:.0f} s.", "",
             f"| run | NFE | rms error to the converged ODE | sliced W2 (floor {floor:.4f}) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['label']} | {r['nfe']} | {r['rms_error']:.5f} | {r['sliced_w2']:.4f} |" for r in rows]
    out_dir = Path(args.out)
    write_text_atomic(out_dir / f"{args.tag}.md", "\n".join(lines) + "\n")
    write_text_atomic(out_dir / f"{args.tag}.json", json.dumps({"floor": floor, "n": n, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
