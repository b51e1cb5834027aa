"""Command line interface: ``score-toolkit <command> [options]``.

Each command is two functions: ``_add_<command>(subparsers)`` declares its parser and sets
``func=<command function>``; the command function takes the parsed ``argparse.Namespace`` and returns
the exit code. To add a command, write both and append the first to :data:`COMMANDS`. Commands
import what they need inside their function, so ``score-toolkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "build_parser", "COMMANDS"]


# ---------------------------------------------------------------------- samplers
def _add_samplers(subparsers) -> None:
    p = subparsers.add_parser(
        "samplers",
        help="list the registered samplers (built-in, plugins, in-process)",
        description=(
            "List every sampler found in the entry-point group 'score_toolkit.samplers': its origin "
            "(built-in or the plugin distribution), description, declared properties and load status. "
            "Broken plugins are listed with their error; the exit code is 0 unless --strict is given "
            "(or SCORE_TOOLKIT_STRICT_PLUGINS=1 is set) and a plugin is broken."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of a table")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit code 1) at the first broken plugin (same as SCORE_TOOLKIT_STRICT_PLUGINS=1)",
    )
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(args: argparse.Namespace) -> int:
    from .registry import PluginLoadError, SamplerPluginWarning, sampler_info

    with warnings.catch_warnings(record=True) as caught:
        # broken plugins and duplicate names are shown in the table itself
        warnings.simplefilter("always", SamplerPluginWarning)
        try:
            records = sampler_info(strict=True if args.strict else None)
        except (PluginLoadError, RuntimeError) as exc:
            print(f"score-toolkit samplers: error: {exc}", file=sys.stderr)
            return 1
    for w in caught:
        if not issubclass(w.category, SamplerPluginWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.json:
        print(json.dumps(records, indent=2, default=repr))
    else:
        print(_samplers_table(records))
    return 0


def _properties_summary(props: dict[str, Any] | None) -> str:
    if props is None:
        return "-"
    parts = ["stochastic" if props.get("stochastic") else "deterministic"]
    order = props.get("order")
    parts.append(f"order {order:g}" if order is not None else "no order")
    if props.get("adaptive"):
        parts.append("adaptive")
    if props.get("fixed_grid"):
        parts.append("fixed grid")
    if not props.get("per_sample", True):
        parts.append("couples samples")
    if props.get("needs_energy"):
        parts.append("needs energy")
    if props.get("final_time", "t_min") != "t_min":
        parts.append(f"ends at {props['final_time']} t")
    return ", ".join(parts)


def _samplers_table(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no samplers registered"
    header = ("NAME", "ORIGIN", "STATUS", "PROPERTIES", "DESCRIPTION")
    rows = [
        (
            r["name"],
            r["origin"],
            "ok" if r["status"] == "ok" else "ERROR",
            _properties_summary(r["properties"]),
            r["description"] or "-",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []

    def fmt(row) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1])

    lines.append(fmt(header))
    for r, row in zip(records, rows):
        lines.append(fmt(row).rstrip())
        if r["status"] != "ok":
            lines.append(f"    error: {r['status']}")
        for other in r.get("shadows", []):
            lines.append(f"    note: also declared by {other}, which is not used")
    broken = sum(r["status"] != "ok" for r in records)
    lines.append(f"\n{len(records)} samplers, {broken} broken")
    return "\n".join(lines)


# ---------------------------------------------------------------------- entry point
#: Parser builders, one per command, called in order by :func:`build_parser`.
# ---------------------------------------------------------------------- demo
def _add_demo(subparsers) -> None:
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
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.steps < 1 or args.num_samples < 1:
        print("score-toolkit demo: error: --steps and --num-samples must be positive", file=sys.stderr)
        return 2
    run_demo(args.output, steps=args.steps, num_samples=args.num_samples, sampler=args.sampler, seed=args.seed)
    return 0


from .cli_evaluate import add_evaluate_parser as _add_evaluate  # noqa: E402  (argparse-only module)
from .cli_evaluate import add_plot_parser as _add_plot  # noqa: E402  (argparse-only module)
from .cli_likelihood import add_likelihood_parser as _add_likelihood  # noqa: E402  (argparse-only module)
from .cli_sample import add_sample_parser as _add_sample  # noqa: E402  (argparse-only module: --help stays fast)
from .cli_train import add_train_parser as _add_train  # noqa: E402  (argparse-only module)

COMMANDS: list[Callable[[Any], None]] = [_add_samplers, _add_demo, _add_train, _add_sample, _add_likelihood,
                                         _add_evaluate, _add_plot]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="score-toolkit",
        description="Score-based generative models on the diffusers ecosystem.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.cli_argv = None if argv is None else list(argv)  # the arguments when called from Python (for records)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    ok = False
    try:
        code = int(args.func(args) or 0)
        ok = True
        return code
    finally:
        _close_process_group(synchronize=ok)


def _close_process_group(synchronize: bool) -> None:
    """Tear down a ``torch.distributed`` group a command created (under ``accelerate launch``).

    Leaving the gloo/NCCL group to interpreter exit can abort a rank ("terminate called without an
    active exception"). After a successful command every rank waits for the others first; after an
    error the group is destroyed without a barrier, which could otherwise hang.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
