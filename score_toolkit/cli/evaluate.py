"""The ``evaluate`` and ``plot`` commands.

``score-toolkit evaluate``: draw samples from a model with a registered sampler, time the draw, and judge the
samples (:mod:`score_toolkit.evaluation`): sliced W2, energy distance, MMD and mode coverage for vector data
(against a reference data set or the analytic distribution), the classifier Frechet distance, confidence and
class histogram for the digits. Every report gives the NFE and wall time of the sampling. ``--pictures DIR``
writes PNGs: samples (an image grid, or a 2-D scatter over the true density's contours or the reference's
histogram), trajectories of a few samples, and, for 2-D models, the score field as arrows.

    score-toolkit evaluate --model hub_cards/digits --sampler ancestral --option num_steps=500 --num-samples 900
    score-toolkit evaluate --model analytic:ring --process VP --sampler pf_ode --pictures out/

``score-toolkit plot error-vs-nfe --csv benchmarks/results/samplers_accuracy.csv --output nfe.png``: error-vs-NFE
curves from the sampler benchmark.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import (
    ANALYTIC_MODELS,
    ANALYTIC_PROCESSES,
    DEVICE_HELP,
    DTYPE_HELP,
    OPTION_HELP,
    CLIError,
    check_count,
    check_seed,
    checked_sampler,
    load_data,
    load_score_model,
    parse_options,
    progress_enabled,
    run_guarded,
    usage_checks,
    write_json,
)

__all__ = ["add_evaluate_parser", "add_plot_parser", "cmd_evaluate", "cmd_plot"]

#: the files ``--pictures DIR`` writes (score_field.png for 2-D models only)
PICTURES = ("samples.png", "trajectories.png", "score_field.png")


# ---------------------------------------------------------------------------------------------- evaluate
def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"a pipeline folder, a shipped model's name (digits, digits_class_conditional, toy2d; from any directory) or "
                        f"analytic:<name> ({', '.join(ANALYTIC_MODELS)}) with --process")
    p.add_argument("--process", choices=ANALYTIC_PROCESSES, default=None, help="process of an analytic model")
    p.add_argument("--sampler", default="pf_ode", help="a registered sampler (score-toolkit samplers lists them)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples to draw (default 900 for the digits, comparable with the two-halves floor; 1000 else)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses a generator seeded by (seed, i)")
    p.add_argument("--class-label", default=None, metavar="C|each",
                   help="digits models trained with labels: generate class C, or 'each' class 0..9 (classifier-free "
                        "guidance), and report per class the share the shipped classifier labels as requested and "
                        "the Frechet distance to the real digits of the class, next to their floors; --num-samples "
                        "is then per class (default: the size of the class's floor sets, about 90)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale with --class-label (diffusers' convention: 1 = the "
                        "conditional model; default 1)")
    p.add_argument("--kind", choices=("auto", "vectors", "digits"), default="auto",
                   help="auto: digits for (1, 8, 8) samples, vectors otherwise")
    p.add_argument("--reference", default=None,
                   help="vectors: a dataset name or a .npy/.safetensors file to judge against (default for analytic "
                        "models: the exact distribution)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help=DTYPE_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--output", default=None, help="write the report as JSON")
    p.add_argument("--markdown", default=None, help="write the report as a Markdown table")
    p.add_argument("--pictures", default=None, metavar="DIR", help="write samples.png, trajectories.png and (2-D) "
                                                                    "score_field.png there")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {', '.join(PICTURES)} already in the --pictures folder (nothing else is touched)")
    p.add_argument("--update-card", default=None, metavar="FOLDER",
                   help="write the measurements into FOLDER/README.md, the model card (usually the --model folder): "
                        "its model-index and results table, through huggingface_hub's ModelCard; a metric already "
                        "there is replaced, the others are kept")
    p.set_defaults(func=cmd_evaluate)


def add_evaluate_parser(subparsers) -> None:
    """Declare the ``evaluate`` subcommand (for score_toolkit.cli)."""
    p = subparsers.add_parser(
        "evaluate",
        help="sample a model and judge the samples (SW2, energy distance, MMD, modes; digits Frechet distance)",
        description=(
            "Draw samples from a model with a registered sampler, time the draw, and judge the samples: sliced "
            "Wasserstein-2, energy distance, MMD and mode coverage for vector data (against a reference data set or "
            "the analytic distribution); the classifier Frechet distance, confidence and class histogram for the "
            "digits. Every report gives the NFE and wall time of the sampling. --pictures DIR writes PNGs of the "
            "samples, of the trajectories of a few samples and, for 2-D models, of the score field "
            "(docs/evaluation.md)."),
    )
    _configure_evaluate(p)


def cmd_evaluate(args: argparse.Namespace) -> int:
    return run_guarded("evaluate", _evaluate, args)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from .. import evaluation as E
    from .._utils import per_sample_generators
    from ..registry import get_sampler
    from ._common import _device, _dtype

    check_count("--num-samples", args.num_samples, minimum=2)
    check_seed(args.seed)
    if args.update_card:
        _check_card(args.update_card)
    if args.pictures:
        import os

        from ..plotting import require_matplotlib

        if os.path.exists(args.pictures) and not os.path.isdir(args.pictures):
            raise CLIError(f"expected --pictures to name a folder, found the file {args.pictures}")
        found = [name for name in PICTURES if os.path.lexists(os.path.join(args.pictures, name))]
        if found and not args.overwrite:
            raise CLIError(f"the --pictures folder {args.pictures} already holds {', '.join(found)}: choose another "
                           f"folder or pass --overwrite to replace {', '.join(PICTURES)} (nothing else)")
        require_matplotlib("evaluate --pictures draws with matplotlib")  # before the sampling
    elif args.overwrite:
        raise CLIError("--overwrite applies to the files of --pictures DIR: pass --pictures")
    with usage_checks():  # a missing or damaged model folder, an unknown sampler or option: exit code 2
        device, dtype = _device(args.device), _dtype(args.dtype, args.model)
        model = load_score_model(args.model, args.process, device=device, dtype=dtype)
        options = parse_options(args.option)
        checked_sampler(args.sampler, options)
    shape = tuple(model["sample_shape"])
    kind = args.kind if args.kind != "auto" else ("digits" if shape == (1, 8, 8) else "vectors")
    if kind == "digits" and shape != (1, 8, 8):
        raise CLIError(f"--kind digits needs a model of 8x8 grey images, found sample shape {shape}")
    if kind == "digits" and args.reference is not None:
        raise CLIError("--reference applies to vector data (the digits are judged against the real digits)")
    if args.class_label is not None or args.guidance_scale != 1.0:
        return _evaluate_classes(args, model, kind, device, dtype)
    n = args.num_samples if args.num_samples is not None else (900 if kind == "digits" else 1000)
    sampler = get_sampler(args.sampler, **{"progress": progress_enabled(args), **options})
    reference = None
    if kind == "vectors":
        if args.reference is not None:
            import os

            is_file = os.path.splitext(args.reference)[1] in (".npy", ".safetensors")
            with usage_checks():
                reference, _ = load_data(None if is_file else args.reference, args.reference if is_file else None,
                                         num_samples=None, model=model, seed=args.seed, dtype=torch.float64)
            if tuple(reference.shape[1:]) != shape:
                raise CLIError(f"expected --reference samples of the model's shape {shape}, found "
                               f"{tuple(reference.shape[1:])} ({args.reference})")
        elif model["mixture"] is None:
            raise CLIError("vector models need --reference (a dataset name or a file) to be judged against")
    gens = per_sample_generators(args.seed, range(n), device=device)
    report, out = E.sample_and_evaluate(model["score_fn"], model["process"], sampler, shape=(n, *shape), kind=kind,
                                       generator=gens, reference=reference, mixture=model["mixture"], dtype=dtype,
                                       device=device)
    report.details["model"] = model["description"]
    _write_report(args, report)
    if args.pictures:
        for path in write_pictures(args.pictures, model, sampler, out.samples, reference, seed=args.seed,
                                   device=device, dtype=dtype):
            print(f"wrote {path}")
    return 0


def _write_report(args: argparse.Namespace, report) -> None:
    """Print a report (:class:`~score_toolkit.evaluation.EvaluationReport` or a per-class report) and write it where
    --output, --markdown and --update-card ask."""
    markdown = report.to_markdown()
    print(markdown)
    if args.output:
        write_json(args.output, report.to_dict())
        print(f"wrote {args.output}")
    if args.markdown:
        from .._io import write_text_atomic

        write_text_atomic(args.markdown, markdown + "\n")
        print(f"wrote {args.markdown}")
    if args.update_card:
        from ..hub import update_model_card
        from .train import _command_line

        command = _command_line(getattr(args, "cli_argv", None))  # as invoked (score_toolkit.cli.main(argv): argv)
        results = report.card_results(settings={"seed": args.seed}, command=command)
        print(f"wrote {update_model_card(args.update_card, results)}")


def _evaluate_classes(args: argparse.Namespace, model: dict[str, Any], kind: str, device, dtype) -> int:
    """``evaluate --class-label C|each``: classifier-free-guided digits, judged per class
    (:mod:`score_toolkit.conditioning.class_metrics`)."""
    import time

    import torch

    from .._utils import per_sample_generators
    from ..conditioning import conditional_score
    from ..conditioning.class_metrics import class_sample_counts, evaluate_digits_classes
    from ..registry import get_sampler

    if args.class_label is None:
        raise CLIError("--guidance-scale needs --class-label (the class to generate, or 'each')")
    if kind != "digits" or model["mixture"] is not None:
        raise CLIError(f"--class-label: the per-class evaluation judges digits models (the shipped classifier "
                       f"labels the samples), found sample shape {tuple(model['sample_shape'])}")
    if args.class_label == "each":
        classes = list(range(10))
    else:
        try:
            classes = [int(args.class_label)]
        except ValueError:
            raise CLIError(f"expected --class-label to be a class 0..9 or 'each', found {args.class_label!r}") from None
        if not 0 <= classes[0] <= 9:
            raise CLIError(f"expected --class-label to be a class 0..9 or 'each', found {args.class_label!r}")
    if args.num_samples is not None and args.num_samples < 2:
        raise CLIError(f"expected --num-samples >= 2 (per class), found {args.num_samples}")
    counts = class_sample_counts()
    requested = torch.cat([torch.full((args.num_samples or counts[c],), c, dtype=torch.long) for c in classes])
    adapter = model["score_fn"]
    score_fn = conditional_score(adapter, model["process"], model=adapter.model,
                                 prediction_type=adapter.prediction_type, time_input=adapter.time_input,
                                 class_labels=requested.to(device), guidance_scale=args.guidance_scale)
    sampler = get_sampler(args.sampler, **{"progress": progress_enabled(args), **parse_options(args.option)})
    n = len(requested)
    start = time.perf_counter()
    out = sampler.sample(score_fn, model["process"], shape=(n, *model["sample_shape"]), dtype=dtype, device=device,
                         generator=per_sample_generators(args.seed, range(n), device=device))
    wall = time.perf_counter() - start
    info = {"sampler": sampler.name, "sampler_options": {k: v for k, v in sampler.config.items() if k != "progress"},
            "guidance_scale": args.guidance_scale, "model": model["description"]}
    report = evaluate_digits_classes(out.samples, requested, nfe=out.nfe, wall_time_s=wall, details=info)
    _write_report(args, report)
    if args.pictures:
        from pathlib import Path

        from .. import plotting as P

        order = torch.cat([torch.nonzero(requested == c).flatten()[:8] for c in classes])  # a row of 8 per class
        grid = P.image_grid(out.samples[order].clamp(-1, 1), nrow=min(8, len(order)), scale=8)
        print(f"wrote {P.save_png(grid, Path(args.pictures) / 'samples.png')}")
    return 0


def _check_card(folder: str) -> None:
    """Before any sampling: --update-card FOLDER must hold a model card that huggingface_hub can load."""
    from pathlib import Path

    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    if not path.is_file():
        raise CLIError(f"--update-card: expected a model card at {path}, found nothing there")
    try:
        ModelCard.load(path)
    except Exception as err:  # noqa: BLE001 - any parse failure is the same user error
        raise CLIError(f"--update-card: {path} is not a model card huggingface_hub can read: {err}") from err


def write_pictures(folder, model: dict[str, Any], sampler, samples, reference=None, *, seed: int = 0, device=None,
                   dtype=None, num_paths: int = 16) -> list:
    """Pictures of a model's samples into ``folder``: ``samples.png``, ``trajectories.png`` (a re-run of the first
    ``num_paths`` samples with ``return_trajectory=True``) and, for 2-D models, ``score_field.png`` at three times.
    Returns the written paths."""
    from pathlib import Path

    import torch

    from .. import plotting as P
    from .._utils import per_sample_generators

    folder = Path(folder)
    written = []
    shape = tuple(model["sample_shape"])
    process = model["process"]
    is_image = len(shape) == 3 and shape[0] in (1, 3)
    mixture, extent = model["mixture"], model["extent"]
    k = min(num_paths, len(samples))
    traj = sampler.sample(model["score_fn"], process, shape=(k, *shape), return_trajectory=True, dtype=dtype,
                          device=device, generator=per_sample_generators(seed, range(k), device=device))
    times = traj.times if traj.times is not None and len(traj.times) == len(traj.trajectory) else None
    if is_image:
        n = min(len(samples), 64)
        written.append(P.save_png(P.image_grid(samples[:n].clamp(-1, 1), scale=4 if shape[-1] >= 16 else 8),
                                  folder / "samples.png"))
        written.append(P.save_png(P.trajectory_grid(traj.trajectory, num_samples=min(k, 8), times=times,
                                                    scale=4 if shape[-1] >= 16 else 6,
                                                    title=f"{min(k, 8)} trajectories ({sampler.name})"),
                                  folder / "trajectories.png"))
    elif shape == (2,):
        ext = extent or _extent_of(samples)
        pts = samples.detach().double().cpu()
        bg = mixture.log_prob if mixture is not None else None  # contour lines under trajectories and arrows
        if mixture is not None:
            panel = P.contour_panel(mixture.log_prob, ext, pts, title=f"{len(pts)} samples over the true density")
        else:
            fig, axes = P.figure_grid(2)
            ref = reference if reference is not None else pts
            P.histogram_panel(ref.double(), ext, title="reference", ax=axes[0])
            P.scatter_panel(pts, ext, title="samples", ax=axes[1])
            panel = fig
        written.append(P.save_png(panel, folder / "samples.png"))
        written.append(P.save_png(P.trajectory_panel([s.double().cpu() for s in traj.trajectory], ext, background=bg,
                                                     times=times, title=f"{k} trajectories ({sampler.name})"),
                                  folder / "trajectories.png"))
        fig, axes = P.figure_grid(3)
        for ax, t in zip(axes, (max(process.t_min, 0.05), 0.3, 0.7)):
            def score(x, tt, _f=model["score_fn"]):
                return _f(x.to(device=device, dtype=dtype), tt.to(device=device, dtype=dtype)).double().cpu()

            P.score_field_panel(score, ext, t, background=bg, title=f"score at t = {t:g}", ax=ax)
        written.append(P.save_png(fig, folder / "score_field.png"))
    else:
        # no picture of high-dimensional vectors but the first two coordinates
        pts = samples.reshape(len(samples), -1)[:, :2].detach().double().cpu()
        ext = _extent_of(pts)
        written.append(P.save_png(P.scatter_panel(pts, ext, title="samples: first two coordinates"),
                                  folder / "samples.png"))
        path2d = [s.reshape(k, -1)[:, :2].double().cpu() for s in traj.trajectory]
        written.append(P.save_png(P.trajectory_panel(path2d, _extent_of(torch.cat(path2d)), times=times,
                                                     title="trajectories: first two coordinates"),
                                  folder / "trajectories.png"))
    return written


def _extent_of(points) -> tuple[float, float, float, float]:
    lo = points.min(0).values
    hi = points.max(0).values
    pad = 0.05 * (hi - lo).clamp_min(1e-6)
    return (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1]))


# ---------------------------------------------------------------------------------------------- plot
def _configure_plot(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plot_kind", metavar="KIND", help="what to draw: error-vs-nfe")
    e = sub.add_parser("error-vs-nfe", help="error-vs-NFE curves from a sampler benchmark CSV",
                       description="Error-vs-NFE curves from the sampler benchmark's CSV "
                                   "(benchmarks/results/samplers_accuracy.csv): one panel per case and process, one "
                                   "curve per sampler (and variant), the noise floor dashed when a <metric>_floor "
                                   "column exists.")
    e.add_argument("--csv", required=True, help="the CSV file (columns: nfe, the metric, optionally sampler, "
                                                 "variant, case, process, <metric>_floor)")
    e.add_argument("--metric", default=None, help="the error column (default: the first of wsw, sw, nll_gap, mwe, "
                                                  "error, mmd, energy_distance present)")
    e.add_argument("--linear-y", action="store_true", help="linear y axis (default log)")
    e.add_argument("--output", default=None, metavar="PNG", help="the PNG to write (required)")
    e.add_argument("--out", dest="deprecated_out", default=None, help=argparse.SUPPRESS)  # the old spelling
    p.set_defaults(func=cmd_plot)


def add_plot_parser(subparsers) -> None:
    """Declare the ``plot`` subcommand (for score_toolkit.cli)."""
    p = subparsers.add_parser("plot", help="pictures from benchmark results (error-vs-NFE curves)",
                              description="Pictures from files: 'plot error-vs-nfe'. Pictures of a model's samples, "
                                          "trajectories and score field come from 'evaluate --pictures DIR'.")
    _configure_plot(p)


def cmd_plot(args: argparse.Namespace) -> int:
    if getattr(args, "plot_kind", None) != "error-vs-nfe":
        print("score-toolkit plot: error: expected a kind: error-vs-nfe", file=sys.stderr)
        return 2
    from .. import plotting as P

    if args.deprecated_out is not None:
        import logging

        logging.getLogger(__name__).warning("plot: --out is deprecated, use --output (the same in every command)")
        if args.output is not None and args.output != args.deprecated_out:
            print("score-toolkit plot: error: --out and --output disagree", file=sys.stderr)
            return 2
        args.output = args.deprecated_out
    if args.output is None:
        print("score-toolkit plot: error: the following arguments are required: --output", file=sys.stderr)
        return 2
    try:
        img = P.error_vs_nfe_chart(args.csv, args.metric, log_y=not args.linear_y)
    except (ValueError, OSError) as err:  # a missing or unreadable CSV, a missing column: a usage error
        print(f"score-toolkit plot: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"score-toolkit plot: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {P.save_png(img, args.output)}")
    return 0
