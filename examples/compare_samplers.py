"""Load a Hub-style checkpoint and compare three samplers side by side in one matplotlib figure.

    python examples/compare_samplers.py                              # the shipped digits model
    python examples/compare_samplers.py --checkpoint hub_cards/toy2d # a 2-D model: scatter plots
    python examples/compare_samplers.py --quick                      # tiny settings, a few seconds

Every sampler starts from the same noise (one generator per sample, same seeds), so the panels differ only
by the sampler. Each panel's title gives the number of network evaluations (NFE) and the CPU time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from score_toolkit.pipeline import ScorePipeline, shipped_model_path
from score_toolkit.plotting import figure_grid, image_grid, save_png, scatter_panel

# three samplers of three kinds: DDPM ancestral, the reverse SDE, and a second-order ODE solver
SAMPLERS = {
    "ancestral": {"num_steps": 100},
    "euler_maruyama": {"num_steps": 200},
    "dpmpp_2m": {"num_steps": 25},
}
QUICK = {"ancestral": {"num_steps": 4}, "euler_maruyama": {"num_steps": 4}, "dpmpp_2m": {"num_steps": 3}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="pipeline folder or cached Hub id (default: shipped digits)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per sampler (default 64, 2-D: 2000)")
    parser.add_argument("--output", default="compare_samplers.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings (for the test suite)")
    args = parser.parse_args(argv)

    pipe = ScorePipeline.from_pretrained(args.checkpoint or shipped_model_path("digits"))
    shape = pipe.sample_shape
    images = len(shape) == 3
    n = args.num_samples or (4 if args.quick else 64 if images else 2000)
    settings = QUICK if args.quick else SAMPLERS

    results = {}
    for name, options in settings.items():
        generators = [torch.Generator().manual_seed(args.seed * 100_000 + i) for i in range(n)]
        start = time.process_time()
        out = pipe(batch_size=n, sampler=name, sampler_options=options, generator=generators, output_type="pt")
        results[name] = (out.samples, out.nfe, time.process_time() - start)

    fig, axes = figure_grid(len(results))  # one matplotlib figure, one panel per sampler
    if not images:
        pts = torch.cat([x for x, _, _ in results.values()]).double()
        lo, hi = float(pts.quantile(0.005)), float(pts.quantile(0.995))
        pad = 0.1 * (hi - lo)
        extent = (lo - pad, hi + pad, lo - pad, hi + pad)
    for ax, (name, (x, nfe, cpu)) in zip(axes, results.items()):
        title = f"{name}: {nfe} NFE, {cpu:.1f} s CPU"
        if images:
            ax.imshow(np.asarray(image_grid(x, scale=1)), interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(title)
        else:
            scatter_panel(x, extent, title=title, ax=ax)
    save_png(fig, args.output)
    for name, (_, nfe, cpu) in results.items():
        print(f"{name:16s} {nfe:5d} NFE  {cpu:6.2f} s CPU")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
