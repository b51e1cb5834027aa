"""The ``fit-grid`` command: ``score-toolkit fit-grid MODEL_DIR [--sampler unipc] [--steps 24 14] [--device ...]``.

Fits the model's own time grids once (one pilot of the model, then one grid fit per budget) and stores them in
``MODEL_DIR/grids/<sampler>_<steps>.json``, where :class:`~score_toolkit.pipeline.ScorePipeline` and
``score-toolkit sample`` find and use them by default (:mod:`score_toolkit.model_grids`; docs/fast_samplers.md,
"The model's grid").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# argparse only at module level (score-toolkit --help stays fast); defaults without importing torch
from .._defaults import DEFAULT_SAMPLER, DEFAULT_STEPS
from ._common import (
    OPTION_HELP,
    CLIError,
    _device,
    add_pilot_options,
    check_count,
    check_seed,
    missing_model,
    parse_options,
    progress_enabled,
    resolve_model,
    run_guarded,
    usage_checks,
)

__all__ = ["add_fit_grid_parser", "cmd_fit_grid"]

#: the budgets fitted by default (score_toolkit.model_grids.DEFAULT_GRID_STEPS, without importing it)
DEFAULT_BUDGETS = (DEFAULT_STEPS, 14)


def add_fit_grid_parser(subparsers) -> None:
    """Declare the ``fit-grid`` subcommand on an argparse ``subparsers`` object (for score_toolkit.cli)."""
    p = subparsers.add_parser(
        "fit-grid",
        help="fit a model's own time grids once and store them in its folder (the pipeline's default grid)",
        description=(
            "Run one pilot of the model's score (no data: prior draws through its converged ODE), fit the sampler's "
            "time grid for each budget on a mixture fitted to the pilot, and write MODEL_DIR/grids/<sampler>_<steps>"
            ".json. ScorePipeline and 'score-toolkit sample' then use it by default for that sampler and budget. "
            "A budget already fitted with the same settings for the same weights is kept; a file this command did "
            "not write is never replaced."
        ),
    )
    p.add_argument("model", metavar="MODEL_DIR", help="a pipeline folder or a shipped model's name (digits, toy2d, ...)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"a deterministic fixed-grid sampler (default {DEFAULT_SAMPLER}, the pipeline's default)")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_BUDGETS), metavar="N",
                   help=f"the budgets (num_steps; default {' '.join(map(str, DEFAULT_BUDGETS))}: "
                   f"{DEFAULT_BUDGETS[0] + 1} and {DEFAULT_BUDGETS[1] + 1} NFE with {DEFAULT_SAMPLER})")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help=OPTION_HELP + "; the grid is used only with the same options")
    add_pilot_options(p)
    p.add_argument("--batch-size", type=int, default=512, help="pilot draws per network call (default 512)")
    p.add_argument("--seed", type=int, default=271_828, help="seed of the pilot's draws and of the fits (default 271828)")
    p.add_argument("--fit-option", dest="fit_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of optimize_grid, e.g. --fit-option iterations=20 (repeatable; default: "
                   "pilot_grid's settings)")
    p.add_argument("--validation-draws", type=int, default=256, metavar="N",
                   help="held-out prior draws on which each fitted grid is checked against the built-in grid (through "
                   "the model's converged ODE); the pipeline uses the winner (default 256)")
    p.add_argument("--validation-seed", type=int, default=314_159,
                   help="seed of the validation's draws, other than --seed (default 314159)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (-q also turns it off)")
    p.set_defaults(func=cmd_fit_grid)


def cmd_fit_grid(args: argparse.Namespace) -> int:
    return run_guarded("fit-grid", _run, args)


def _run(args: argparse.Namespace) -> int:
    import os

    from ..model_grids import _fmt, fit_model_grids
    from ..pipeline import ScorePipeline
    from .train import _command_line

    folder = resolve_model(args.model)
    if not os.path.isdir(folder):
        raise CLIError(f"expected MODEL_DIR to be a pipeline folder or a shipped model's name, found no folder at "
                       f"{args.model} ({missing_model(args.model)})")
    for name in ("num_pilot", "pilot_steps", "batch_size"):
        if getattr(args, name) < (2 if name != "batch_size" else 1):
            raise CLIError(f"expected --{name.replace('_', '-')} to be a positive integer (>= 2 for the pilot), found "
                           f"{getattr(args, name)}")
    for n in args.steps:
        check_count("--steps", n)
    check_count("--validation-draws", args.validation_draws, minimum=2)
    check_seed(args.seed)
    check_seed(args.validation_seed, "--validation-seed")
    argv: Sequence[str] | None = getattr(args, "cli_argv", None)
    with usage_checks():  # a damaged model folder, a malformed option, an unknown sampler or device: exit code 2
        sampler_options, fit_options = parse_options(args.options), parse_options(args.fit_options)
        _check_sampler_and_device(args.sampler, sampler_options, fit_options, args.device)
        pipe = ScorePipeline.from_pretrained(folder)
    try:
        fits = fit_model_grids(pipe, sampler=args.sampler, steps=args.steps,
                               sampler_options=sampler_options, num_pilot=args.num_pilot,
                               pilot_steps=args.pilot_steps, batch_size=args.batch_size, seed=args.seed,
                               device=args.device, progress=progress_enabled(args),
                               command=_command_line(argv, parent=None), validation_draws=args.validation_draws,
                               validation_seed=args.validation_seed, **fit_options)
    except FileExistsError as err:  # a file the command did not write: left alone
        raise CLIError(str(err)) from None
    for f in fits:
        what = {"fitted": "fitted", "validated": "kept (same settings and weights), validated now"}.get(
            f.status, "up to date (same settings and weights), kept")
        v = f.validation or {}
        used = "this grid" if v.get("winner") == "model_grid" else f"the built-in grid {v['settings']['built_in_grid']!r}"
        print(f"{f.path}: {f.sampler} with {f.num_steps} steps, {what}; validation rms error "
              f"{_fmt(v['model_grid']['rms'])} vs {_fmt(v['built_in']['rms'])} (built-in): the pipeline uses {used}")
    return 0


def _check_sampler_and_device(name: str, sampler_options: dict, fit_options: dict, device: str | None) -> None:
    """The sampler, its options, the fit options and the device, before the model is loaded: what
    :func:`~score_toolkit.model_grids.fit_model_grids` would refuse, refused as a usage error (exit code 2)."""
    from ..model_grids import _NOT_METHOD, check_fit_options
    from ..registry import get_sampler
    from ..samplers.fixed_grid import GridSampler

    taken = sorted(set(sampler_options) & set(_NOT_METHOD))
    if taken:
        raise CLIError(f"--option {', '.join(taken)}: not an option here (the budgets are --steps; the grid is what is "
                       "fitted)")
    sampler = get_sampler(name, **sampler_options)  # an unknown sampler or option: the registry's message
    if not isinstance(sampler, GridSampler) or sampler.properties.stochastic:
        raise CLIError(f"expected --sampler to be a deterministic fixed-grid sampler (e.g. {DEFAULT_SAMPLER!r}), "
                       f"found {name!r}")
    check_fit_options(fit_options)
    if device is not None:
        _device(device)  # a name torch does not know, a CUDA device this machine does not have
