"""Command line interface: ``score-toolkit <command> [options]``.

One module per command (:mod:`.sample`, :mod:`.train`, :mod:`.likelihood`, :mod:`.evaluate` with ``plot``,
:mod:`.samplers`, :mod:`.demo`, :mod:`.fit_grid`), helpers they share in :mod:`._common`. Each command is two functions:
``add_<command>_parser(subparsers)`` declares its parser and sets ``func=<command function>``; the command
function takes the parsed ``argparse.Namespace`` and returns the exit code. To add a command, write both
and append the first to :data:`COMMANDS`. Commands import what they need inside their function, so
``score-toolkit --help`` stays fast. ``python -m score_toolkit.cli`` runs :func:`main` (``__main__.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

# the command modules import only argparse at module level (heavy imports live in the commands): --help stays fast
from ._common import add_common_options, common_options
from .demo import add_demo_parser as _add_demo
from .evaluate import add_evaluate_parser as _add_evaluate
from .evaluate import add_plot_parser as _add_plot
from .fit_grid import add_fit_grid_parser as _add_fit_grid
from .likelihood import add_likelihood_parser as _add_likelihood
from .restore import add_restore_parser as _add_restore
from .sample import add_sample_parser as _add_sample
from .samplers import add_samplers_parser as _add_samplers
from .train import add_train_parser as _add_train

__all__ = ["main", "build_parser", "COMMANDS"]


#: Parser builders, one per command, called in order by :func:`build_parser`.
COMMANDS: list[Callable[[Any], None]] = [_add_samplers, _add_demo, _add_train, _add_sample, _add_likelihood,
                                         _add_evaluate, _add_plot, _add_restore, _add_fit_grid]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="score-toolkit",
        description="Score-based generative models on the diffusers ecosystem.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for leaf in ([p for a in nested for p in a.choices.values()] if nested else [sub]):  # plot KIND ...
            add_common_options(leaf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    args.cli_argv = None if argv is None else list(argv)  # the arguments when called from Python (for records)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    name = " ".join(filter(None, (args.command, getattr(args, "plot_kind", None))))
    problem = _bad_common_values(args)
    if problem is not None:
        print(f"score-toolkit {name}: error: {problem}", file=sys.stderr)
        return 2
    ok = False
    # run as the command (argv from the shell): a warning names the command, not the console script's line that
    # called main(); called from Python, warnings keep Python's format (callers may record them)
    with warnings.catch_warnings() if argv is None else contextlib.nullcontext():
        if argv is None:
            warnings.showwarning = _command_warning(name, shown=getattr(args, "quiet", 0) < 2)
        try:
            with common_options(args):
                code = int(args.func(args) or 0)
            ok = True
            return code
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
            resume = " (score-toolkit train --resume continues from its latest complete checkpoint)" \
                if args.command == "train" else ""
            print(f"score-toolkit {name}: interrupted{resume}", file=sys.stderr)
            return 130
        finally:
            _close_process_group(synchronize=ok)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the errors of a newcomer's first typos said in the command's own terms: an
    unknown command or option names the closest ones (``--output_dir``: did you mean ``--output-dir``?), and an
    unknown option is reported by the command's parser (its usage line), not by the top-level one."""
    import difflib

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], list(commands), n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        parser.error(f"unknown command {argv[0]!r}{hint} (the commands: {', '.join(commands)})")
    args, extras = parser.parse_known_args(argv)
    if extras:
        leaf = commands[args.command] if getattr(args, "command", None) in commands else parser
        nested = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
        if nested and getattr(args, "plot_kind", None) in nested[0].choices:
            leaf = nested[0].choices[args.plot_kind]
        hints = _option_hints(leaf, extras)
        leaf.error(f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
                   + (f" ({'; '.join(hints)})" if hints else "") + f"; see {leaf.prog} --help")
    return args


def _option_hints(parser: argparse.ArgumentParser, extras: list[str]) -> list[str]:
    """'--output_dir: did you mean --output-dir?' for each unknown option close to one of ``parser``'s (an underscore
    read as a dash, else the closest spellings)."""
    import difflib

    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    hints = []
    for item in extras:
        if not item.startswith("--"):
            continue
        name = item.split("=", 1)[0]
        dashed = name.replace("_", "-")
        close = [dashed] if dashed in known else difflib.get_close_matches(dashed, known, n=2, cutoff=0.75)
        if close:
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return hints


def _command_warning(name: str, shown: bool):
    """A ``warnings.showwarning`` for the command line: ``score-toolkit NAME: warning: MESSAGE (Category)``, or
    nothing under ``-qq`` (errors only)."""

    def show(message, category, filename, lineno, file=None, line=None):
        if shown:
            print(f"score-toolkit {name}: warning: {message} ({category.__name__})",
                  file=sys.stderr if file is None else file)

    return show


def _bad_common_values(args: argparse.Namespace) -> str | None:
    """What every command refuses before any work: a non-finite float option (``nan``, ``inf``) and a thread count
    (``--threads`` or ``$SCORE_TOOLKIT_NUM_THREADS``) that is not an integer >= 0."""
    import math

    from ..threads import policy_threads

    for key, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"expected --{key.replace('_', '-')} to be a finite number, found {value}"
    if getattr(args, "quiet", 0) and getattr(args, "verbose", 0):
        return "pass -q (fewer messages) or -v (more), not both"
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 0:
        return f"expected --threads to be an integer >= 0, found {threads}"
    try:
        policy_threads(threads)
    except ValueError as err:
        return str(err)
    return None


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
