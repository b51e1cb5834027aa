"""The ``train`` command: ``score-toolkit train --config FILE [--set KEY=VALUE ...] [--resume]``.

Works the same under ``accelerate launch`` (e.g. ``accelerate launch --multi_gpu --num_processes 2
-m score_toolkit.cli train --config cfg.yaml --set train.cpu=true`` for two CPU processes). Also
runnable on its own as ``python -m score_toolkit.cli_train --config ...``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

__all__ = ["add_train_parser", "cmd_train", "main"]


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="run config (.yaml, .yml or .json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 --set model.options.hidden_dim=64 "
        "(values are parsed as YAML; repeatable)",
    )
    p.add_argument("--output-dir", default=None, help="the run folder (same as --set output_dir=DIR)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its latest complete checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, the data, the network and the output folder, print the resolved "
                   "config, and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (same as --set train.progress=false)")
    p.set_defaults(func=cmd_train)


def add_train_parser(subparsers) -> None:
    """Declare the ``train`` subcommand on an argparse ``subparsers`` object (for score_toolkit.cli)."""
    p = subparsers.add_parser(
        "train",
        help="train a score network with Accelerate and export a Hub-style folder",
        description=(
            "Train a score network from a YAML/JSON run config (see docs/training.md) with one loop on "
            "Accelerate for every objective, crash-safe checkpoints in <output_dir>/checkpoints, and export "
            "of the EMA weights with a model card to <output_dir>/pipeline. Runs unchanged under "
            "'accelerate launch' or 'torchrun'."
        ),
    )
    _configure(p)


def _command_line(argv: Sequence[str] | None, prog: str = "score-toolkit train") -> str:
    """The command as typed, for the model card."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "train":
        args = args[1:]
    return prog + " " + " ".join(shlex.quote(a) for a in args)


def cmd_train(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import json

    from .training import ConfigError, RunConfig, apply_overrides, prepare_run, train

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.no_progress:
        overrides.append("train.progress=false")
    try:
        from .training import load_config

        cfg = load_config(args.config, overrides)
        if cfg.export.command is None:
            raw = cfg.to_dict()
            raw["export"]["command"] = _command_line(argv, getattr(args, "prog_name", "score-toolkit train"))
            cfg = RunConfig.from_dict(apply_overrides(raw, []))
        if args.dry_run:
            comps, run_dir, ckpt = prepare_run(cfg, resume=args.resume)
            print(json.dumps(cfg.to_dict(), indent=2))
            n_params = sum(p.numel() for p in comps.model.parameters())
            print(f"ok: {comps.dataset.description}; {cfg.model.name} with {n_params:,} parameters; "
                  f"{comps.objective!r}; run folder {run_dir}" + (f"; resumes from {ckpt}" if ckpt else ""))
            return 0
        result = train(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"score-toolkit train: error: {err}", file=sys.stderr)
        return 2
    if result.export_folder is not None:
        print(f"trained {result.step} steps on {result.num_processes} process(es); exported {result.export_folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m score_toolkit.cli_train --config ...`` (the same options as ``score-toolkit train``)."""
    parser = argparse.ArgumentParser(prog="score-toolkit train", description="Train a score network.")
    _configure(parser)
    args = parser.parse_args(argv)
    args.prog_name = "python -m score_toolkit.cli_train"
    return int(args.func(args, argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
