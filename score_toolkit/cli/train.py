"""The ``train`` command: ``score-toolkit train --config FILE [--set KEY=VALUE ...] [--resume]``.

Works the same under ``accelerate launch`` (e.g. ``accelerate launch --multi_gpu --num_processes 2
-m score_toolkit.cli train --config cfg.yaml --set train.cpu=true`` for two CPU processes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from ._common import add_common_options, add_pilot_options, common_options, parse_options, progress_enabled

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
    p.add_argument("--seed", type=int, default=None, help="the run's seed (same as --set seed=N)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu: train on CPU processes even when a GPU is there (same as --set train.cpu=true); cuda: "
                   "the default (GPUs when there are)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (same as --set train.progress=false; "
                   "-q also turns it off)")
    g = p.add_argument_group("the model's grids (fitted after the export, as score-toolkit fit-grid does)")
    g.add_argument("--no-fit-grid", action="store_true",
                   help="do not fit the default sampler's grids into the exported folder (fit them later with "
                   "score-toolkit fit-grid FOLDER)")
    add_pilot_options(g, prefix="grid-")
    g.add_argument("--grid-fit-option", dest="grid_fit_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of optimize_grid for these fits, e.g. --grid-fit-option iterations=20 (repeatable)")
    p.set_defaults(func=cmd_train, num_pilot=None, pilot_steps=None)  # None: not given (fit_model_grids' defaults)


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


_LAUNCHER_MODULES = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch")
_LAUNCHER_PROGRAMS = ("accelerate", "accelerate-launch", "torchrun")


def _parent_command_line() -> list[str] | None:
    """The parent process's argv (Linux ``/proc``), or None where it cannot be read."""
    try:
        raw = open(f"/proc/{os.getppid()}/cmdline", "rb").read()
    except OSError:
        return None
    if not raw:
        return None
    return [a.decode("utf-8", errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def _launcher_command(parent: Sequence[str] | None) -> str | None:
    """The launcher's command as typed, when ``parent`` is ``accelerate launch ...``, ``torchrun ...`` or
    ``python -m accelerate.commands.launch / torch.distributed.run ...`` (they start this process with the
    script part of their own command line, so theirs is the command that was run)."""
    if not parent:
        return None
    argv = list(parent)
    if os.path.basename(argv[0]).startswith("python") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2 and argv[2] in _LAUNCHER_MODULES:
            return " ".join(["python"] + [shlex.quote(a) for a in argv[1:]])
        argv = argv[1:]  # python /path/to/bin/accelerate launch ...
    name = os.path.basename(argv[0])
    if name in ("accelerate-launch", "torchrun") or (name == "accelerate" and argv[1:2] == ["launch"]):
        return " ".join([name] + [shlex.quote(a) for a in argv[1:]])
    return None


def _program_name(default: str) -> str:
    """How this interpreter was started: the console script or ``python -m``."""
    argv0 = sys.argv[0] if sys.argv else ""
    base = os.path.basename(argv0)
    if base in ("score-toolkit", "score-toolkit.exe", "score-toolkit-script.py"):
        return "score-toolkit"
    if argv0.endswith(os.path.join("score_toolkit", "cli", "__main__.py")):
        return "python -m score_toolkit.cli"
    return default


def _command_line(argv: Sequence[str] | None, prog: str = "score-toolkit", *,
                  parent: Sequence[str] | None | bool = True) -> str:
    """The command as it was invoked, for ``commands.txt`` and the model card.

    ``argv``: the arguments after the program name (``train --config ...`` for ``score-toolkit``), or None
    for this process's own command line (then the program is named as it was run: ``score-toolkit``,
    or ``python -m score_toolkit.cli``). Under ``accelerate launch``
    or ``torchrun`` the launcher's whole command line is recorded instead (read from the parent process;
    ``parent=True`` reads it, a list stands for it, None means no launcher)."""
    launched = _launcher_command(_parent_command_line() if parent is True else parent or None)
    if launched is not None:
        return launched
    if argv is None:
        prog, args = _program_name(prog), list(sys.argv[1:])
    else:
        args = list(argv)
    return " ".join([prog] + [shlex.quote(a) for a in args])


def cmd_train(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import json

    from ..training import ConfigError, RunConfig, apply_overrides, prepare_run, train

    problem = _check_args(args)
    if problem is not None:
        print(f"score-toolkit train: error: {problem}", file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device == "cpu":
        overrides.append("train.cpu=true")
    if not progress_enabled(args):
        overrides.append("train.progress=false")
    try:
        from ..training import load_config

        cfg = load_config(args.config, overrides)
        if cfg.export.command is None:
            raw = cfg.to_dict()
            if argv is None and getattr(args, "cli_argv", None) is not None:  # score_toolkit.cli.main(argv)
                argv = args.cli_argv
            raw["export"]["command"] = _command_line(argv, getattr(args, "prog_name", "score-toolkit"))
            cfg = RunConfig.from_dict(apply_overrides(raw, []))
        if args.dry_run:
            made = cfg.output_dir is not None and not os.path.lexists(cfg.output_dir)
            try:
                comps, run_dir, ckpt = prepare_run(cfg, resume=args.resume)
            finally:  # a dry run leaves no folder behind
                if made and os.path.isdir(cfg.output_dir) and not os.listdir(cfg.output_dir):
                    os.rmdir(cfg.output_dir)
            print(json.dumps(cfg.to_dict(), indent=2))
            n_params = sum(p.numel() for p in comps.model.parameters())
            print(f"ok: {comps.dataset.description}; {cfg.model.name} with {n_params:,} parameters; "
                  f"{comps.objective!r}; run folder {run_dir}" + (f"; resumes from {ckpt}" if ckpt else ""))
            return 0
        result = train(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"score-toolkit train: error: {err}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as err:  # a full disk, an unwritable folder, a diverged run: said in full
        print(f"score-toolkit train: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if result.export_folder is not None:
        print(f"trained {result.step} steps on {result.num_processes} process(es); exported {result.export_folder}")
        if result.num_processes == 1 or _is_main_process():  # one process fits (the others are done)
            return _fit_grids(args, result.export_folder, cfg.export.command, cpu=bool(cfg.train.cpu))
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options alone (before reading the config): an option given twice (as its own flag and
    as --set), grid options with --no-fit-grid, bad grid-fit options."""
    keys = {item.partition("=")[0].strip() for item in args.overrides}
    for flag, key, value in (("--seed", "seed", args.seed), ("--output-dir", "output_dir", args.output_dir),
                             ("--device cpu", "train.cpu", args.device == "cpu" or None)):
        if value is not None and key in keys:
            return f"pass {flag} or --set {key}=..., not both"
    if args.seed is not None and args.seed < 0:
        return f"expected --seed to be an integer >= 0, found {args.seed}"
    given = [name for name, v in (("--grid-pilot", args.num_pilot), ("--grid-pilot-steps", args.pilot_steps),
                                  ("--grid-fit-option", args.grid_fit_options or None)) if v is not None]
    if args.no_fit_grid and given:
        return f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to the grid fit that --no-fit-grid turns off"
    for name, v in (("--grid-pilot", args.num_pilot), ("--grid-pilot-steps", args.pilot_steps)):
        if v is not None and v < 2:
            return f"expected {name} to be an integer >= 2, found {v}"
    from ..model_grids import check_fit_options

    try:
        check_fit_options(parse_options(args.grid_fit_options))
    except (ValueError, TypeError) as err:
        return f"--grid-fit-option: {err}"
    return None


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _fit_grids(args: argparse.Namespace, folder, command: str | None, *, cpu: bool) -> int:
    """The default sampler's grids of the exported model (score_toolkit.model_grids.fit_model_grids)."""
    if args.no_fit_grid:
        return 0
    import torch

    from ..model_grids import fit_model_grids
    from ..pipeline import ScorePipeline

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    try:
        pilot = {k: getattr(args, k) for k in ("num_pilot", "pilot_steps") if getattr(args, k) is not None}
        fits = fit_model_grids(ScorePipeline.from_pretrained(folder), device=device, progress=progress_enabled(args),
                               command=command, **pilot, **parse_options(args.grid_fit_options))
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"score-toolkit train: error: the model was exported, but fitting its grids failed ({type(err).__name__}: "
              f"{err}); fit them with score-toolkit fit-grid {folder}", file=sys.stderr)
        return 1
    for f in fits:
        print(f"  {f.path}: the model's {f.sampler} grid for {f.num_steps} steps ({f.status.replace('_', ' ')})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``train`` command on its own, from Python: ``main(["--config", "cfg.yaml"])`` runs
    ``score-toolkit train --config cfg.yaml``."""
    parser = argparse.ArgumentParser(prog="score-toolkit train", description="Train a score network.")
    _configure(parser)
    add_common_options(parser)
    args = parser.parse_args(argv)
    args.prog_name = "score-toolkit train"
    with common_options(args):
        return int(args.func(args, argv) or 0)
