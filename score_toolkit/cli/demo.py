"""The ``demo`` command: ``score-toolkit demo [--output demo.png]`` trains a small 2-D model and draws it
(:func:`score_toolkit.demo.run_demo`)."""

from __future__ import annotations

import argparse
import sys

from ._common import progress_enabled

__all__ = ["add_demo_parser", "cmd_demo"]


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small 2-D score model and write a PNG of its samples next to the true density",
        description=(
            "Train a ScoreMLP with continuous-time DSM on a VP SDE on the 2-D ring of 8 Gaussians, sample it "
            "with a registered sampler and write a PNG: true density | model samples | exact samples. Prints "
            "sliced Wasserstein-2 and mode-weight error next to their noise floors."
        ),
    )
    p.add_argument("--output", default="demo.png", help="PNG file to write (default: demo.png)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default: 3000)")
    p.add_argument("--num-samples", type=int, default=4000, help="samples to draw (default: 4000)")
    p.add_argument("--sampler", default="euler_maruyama", help="registered sampler name (default: euler_maruyama)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training data, noise and sampling (default: 0)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    for option, value in (("--steps", args.steps), ("--num-samples", args.num_samples)):
        if value < 1:
            print(f"score-toolkit demo: error: expected {option} to be an integer >= 1, found {value}", file=sys.stderr)
            return 2
    if args.seed < 0:
        print(f"score-toolkit demo: error: expected --seed to be an integer >= 0, found {args.seed}", file=sys.stderr)
        return 2
    from ..registry import get_sampler

    try:
        get_sampler(args.sampler)  # an unknown sampler: before training
    except (ValueError, KeyError) as err:
        print(f"score-toolkit demo: error: {err}", file=sys.stderr)
        return 2
    try:
        run_demo(args.output, steps=args.steps, num_samples=args.num_samples, sampler=args.sampler, seed=args.seed,
                 log=print, progress=progress_enabled(args))
    except ImportError as err:  # the picture needs matplotlib (checked before training)
        print(f"score-toolkit demo: error: {err}", file=sys.stderr)
        return 1
    return 0
