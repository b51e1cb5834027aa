"""The ``sample`` command: ``score-toolkit sample [CHECKPOINT] [options]``.

Without a checkpoint it samples the shipped digits model (``hub_cards/digits``) and writes a PNG grid.
CHECKPOINT is a pipeline folder (score_toolkit export, diffusers DDPM/DDIM folder, a saved ScorePipeline) or
a Hub repository id already in the local Hub cache. Works the same under ``accelerate launch`` (on CPU:
``accelerate launch --multi_gpu --num_processes 2 -m score_toolkit.cli sample ... --cpu``); the output is
identical bit for bit for any number of processes (see :mod:`score_toolkit.distributed`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

# the default sampler and steps are ScorePipeline's (one definition: score_toolkit.pipeline.DEFAULT_SAMPLER)
from .._defaults import DEFAULT_SAMPLER, DEFAULT_STEPS
from ._common import OPTION_HELP, checked_sampler, parse_options, progress_enabled, resolve_model

__all__ = ["add_sample_parser", "cmd_sample", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "parse_options"]

#: grid options that do not fix the number of steps (samplers.grid_store.GRID_KINDS and "reference"; not imported:
#: the command line starts without torch)
_GRID_KINDS = ("fitted", "uniform", "log_sigma", "karras", "reference")
#: --dtype choices (torch dtype names)
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

def add_sample_parser(subparsers) -> None:
    """Declare the ``sample`` subcommand on an argparse ``subparsers`` object (for score_toolkit.cli)."""
    p = subparsers.add_parser(
        "sample",
        help="draw samples from a checkpoint (default: the shipped digits model) and write them with a picture",
        description=(
            "Draw samples from a pipeline folder or a cached Hub repository (default: the shipped digits model "
            "hub_cards/digits) with any registered sampler, and write OUTPUT_DIR/samples.safetensors, "
            "OUTPUT_DIR/samples.png (an image grid, or a scatter plot and histogram for 2-D data) and "
            "OUTPUT_DIR/manifest.json. Runs unchanged under 'accelerate launch'; a re-run skips complete shards."
        ),
    )
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a pipeline folder, a shipped model's name (digits, digits_class_conditional, toy2d; from any directory) or a Hub "
                   "repository id in the local Hub cache (default: digits)")
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same as CHECKPOINT (the spelling of evaluate and likelihood)")
    p.add_argument("--num-samples", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"registered sampler name (default {DEFAULT_SAMPLER}; "
                   "'score-toolkit samplers' lists them)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"the sampler's num_steps (default {DEFAULT_STEPS} for the default sampler, else the "
                   "sampler's own default)")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)
    p.add_argument("--class-label", type=int, default=None,
                   help="generate this class (a network trained with labels; classifier-free guidance, see "
                   "docs/conditioning.md)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale with --class-label (diffusers' convention: 1 = the "
                   "conditional model, larger = sharper; default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i is seeded by (seed, i) (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="samples drawn together (default 32)")
    p.add_argument("--network-batch-size", type=int, default=32,
                   help="rows per network call, fixed so that results do not depend on --batch-size (default 32; "
                   "0: the whole batch)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="samples per shard file, a multiple of --batch-size (default: about 4096)")
    p.add_argument("--output-dir", default="samples", help="output folder (default ./samples)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="the network's dtype (loaded with torch_dtype; default float32). bfloat16/float16 evaluate the "
                   "network in that precision while the sampler keeps float32 states")
    p.add_argument("--image-files", action="store_true",
                   help="also write OUTPUT_DIR/images/ (one PNG per sample) and OUTPUT_DIR/samples.npz (uint8 "
                   "(N, H, W, C) as arr_0): the inputs of FID tools (clean-fid, torch-fidelity, pytorch-fid)")
    p.add_argument("--overwrite", action="store_true", help="replace another run found in the output folder")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="cpu or cuda (default: cuda if available; under accelerate launch each process uses its own "
                   "GPU, and multi-process CPU runs need --device cpu)")
    p.add_argument("--cpu", action="store_true", help="the same as --device cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (-q also turns it off)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"score-toolkit sample: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    options = parse_options(args.options)
    if args.steps is not None:
        if "num_steps" in options:
            raise ValueError("pass --steps or --option num_steps=..., not both")
        options["num_steps"] = args.steps
    elif args.sampler == DEFAULT_SAMPLER and "num_steps" not in options and options.get("grid") in (None, *_GRID_KINDS):
        options["num_steps"] = DEFAULT_STEPS  # (a saved grid or explicit times bring their own number of steps)
    if args.checkpoint is not None and args.model_option is not None and args.checkpoint != args.model_option:
        raise ValueError(f"pass the model once: CHECKPOINT {args.checkpoint!r} and --model {args.model_option!r} "
                         f"disagree")
    if args.network_batch_size < 0:
        raise ValueError(f"expected --network-batch-size >= 0, found {args.network_batch_size}")
    network_batch_size = args.network_batch_size or None
    if args.cpu and args.device not in (None, "cpu"):
        raise ValueError(f"--cpu contradicts --device {args.device}")
    use_cpu = args.cpu or args.device == "cpu"

    # unknown sampler or option, or a step count an adaptive sampler would ignore: fail before loading anything
    checked_sampler(args.sampler, options, steps_flag="--steps" if args.steps is not None else "--option num_steps")

    from accelerate import Accelerator

    from ..distributed import MANIFEST_NAME, sample_to_folder
    from ..pipeline import ScorePipeline, shipped_model_path

    given = args.checkpoint if args.checkpoint is not None else args.model_option
    checkpoint = resolve_model(given) if given is not None else str(shipped_model_path("digits"))
    accelerator = Accelerator(cpu=use_cpu)
    if args.device == "cuda" and accelerator.device.type != "cuda":
        raise ValueError(f"--device cuda: no CUDA device is available (found {accelerator.device})")
    import torch

    # no --dtype: float32, and a checkpoint stored in another type says so (CheckpointDtypeWarning)
    torch_dtype = None if args.dtype is None else getattr(torch, DTYPES[args.dtype])
    pipe = ScorePipeline.from_pretrained(checkpoint, torch_dtype=torch_dtype)
    start = time.perf_counter()
    result = sample_to_folder(
        pipe, args.output_dir, args.num_samples, sampler=args.sampler, sampler_options=options, seed=args.seed,
        batch_size=args.batch_size, network_batch_size=network_batch_size, shard_size=args.shard_size,
        accelerator=accelerator, overwrite=args.overwrite, progress=progress_enabled(args), checkpoint=checkpoint,
        class_labels=args.class_label, guidance_scale=args.guidance_scale,
        image_files=args.image_files,
    )
    if accelerator.is_main_process:
        seconds = time.perf_counter() - start
        what = f"{result.num_samples} samples with {args.sampler} ({_describe(options)})"
        if args.class_label is not None:
            what += f" of class {args.class_label} (guidance scale {args.guidance_scale:g})"
        skipped = f", {result.shards_skipped} shard(s) already complete" if result.shards_skipped else ""
        print(f"wrote {what} on {result.num_processes} process(es) in {seconds:.1f} s{skipped}:")
        print(f"  {result.samples_file}")
        if result.picture is not None:
            print(f"  {result.picture}")
        print(f"  {result.output_dir / MANIFEST_NAME} (the run: checkpoint, sampler, options, seed; a re-run with "
              f"the same settings skips the complete shards)")
        if result.images_dir is not None:
            print(f"  {result.images_dir}/ ({result.num_samples} PNG files) and {result.npz_file}")
        if not result.batch_independent:
            logging.getLogger(__name__).warning(
                "%s with these options couples the samples of a batch: the samples depend on --batch-size (never on "
                "the number of processes)", args.sampler)
    return 0


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"
