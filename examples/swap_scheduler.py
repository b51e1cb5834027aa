"""Use a score_toolkit sampler inside a diffusers pipeline, as its scheduler.

    python examples/swap_scheduler.py                        # the shipped digits model (a DDPMPipeline folder)
    python examples/swap_scheduler.py --checkpoint FOLDER    # any DDPM/DDIM-style diffusers folder
    python examples/swap_scheduler.py --quick

diffusers' own DDPMPipeline loop runs unchanged: ``set_timesteps``, ``unet(x, t)``, ``scheduler.step``. The
pipeline with the swapped scheduler is then saved, loaded back with ``DiffusionPipeline.from_pretrained``
and gives the same images.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from diffusers import DDPMPipeline, DiffusionPipeline

# importing the module registers our scheduler classes for DiffusionPipeline.from_pretrained
from score_toolkit.diffusers_schedulers import ScoreDPMSolverScheduler
from score_toolkit.pipeline import shipped_model_path
from score_toolkit.plotting import image_grid, save_png
from score_toolkit.threads import cpu_threads


@cpu_threads()  # diffusers' own pipeline: apply the thread policy of score_toolkit's entry points (docs/cli.md)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a diffusers DDPM-style folder (default: shipped digits)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--output", default="swap_scheduler.png")
    parser.add_argument("--quick", action="store_true", help="tiny settings (for the test suite)")
    args = parser.parse_args(argv)
    steps, n = (3, 2) if args.quick else (args.steps, args.num_images)

    pipe = DDPMPipeline.from_pretrained(args.checkpoint or shipped_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ScoreDPMSolverScheduler.from_config(pipe.scheduler.config)  # DPM-Solver++(2M)
    images = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    print(f"{type(pipe.scheduler).__name__}: {n} images in {steps} steps; process {pipe.scheduler.process!r}, "
          f"prediction {pipe.scheduler.prediction_type}")

    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        again = DiffusionPipeline.from_pretrained(tmp)
        again.set_progress_bar_config(disable=True)
        same = again(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    if not np.array_equal(images, same):
        raise SystemExit("the reloaded pipeline gave other images")
    print(f"saved and reloaded as {type(again).__name__} with {type(again.scheduler).__name__}: identical images")

    grid = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # back to [-1, 1] for image_grid
    save_png(image_grid(grid), args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
