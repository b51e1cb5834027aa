"""The ``likelihood`` command: log-likelihoods (and bits/dim) of data under a score model, through the
probability-flow ODE (:func:`score_toolkit.likelihood.log_likelihood`).

    score-toolkit likelihood --model hub_cards/digits --data digits --levels 17 --num-samples 64
    score-toolkit likelihood --model analytic:ring --process VP --num-samples 256 --output ll.json
    accelerate launch --multi_gpu --num_processes 2 -m score_toolkit.cli likelihood --cpu --model ... # 2 processes

Heavy imports happen inside the command.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import (
    ANALYTIC_MODELS,
    ANALYTIC_PROCESSES,
    DEVICE_HELP,
    DTYPE_HELP,
    CLIError,
    _accelerator,
    _device,
    _dtype,
    check_count,
    check_seed,
    load_data,
    load_score_model,
    progress_enabled,
    run_guarded,
    usage_checks,
    write_json,
)

__all__ = ["add_likelihood_parser", "cmd_likelihood", "load_score_model", "ANALYTIC_MODELS"]


# ---------------------------------------------------------------------------------------------- the command
def _configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="a pipeline folder, a shipped model's name (digits, digits_class_conditional, toy2d; from any directory) or "
                        "analytic:<name> with name in "
                        f"{', '.join(ANALYTIC_MODELS)} (exact scores)")
    g.add_argument("--process", choices=ANALYTIC_PROCESSES, default=None, help="process of an analytic model")
    g.add_argument("--data", default=None, help="a dataset name (digits, ring, moons, ...; see docs/training.md)")
    g.add_argument("--data-file", default=None, help="a .npy or .safetensors file of samples (N, ...)")
    g.add_argument("--num-samples", type=int, default=None, help="use the first N samples (analytic: draw N, default 256)")
    g.add_argument("--data-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the model's data range: data outside it are refused; with --levels/--bits the grid's ends. "
                        "Default: -1 1 for image models (and with --levels/--bits), none for vector models")
    q = p.add_argument_group("bits/dim (uniform dequantization)")
    q.add_argument("--levels", type=int, default=None,
                   help="the data are stored on L levels evenly spaced over --data-range (e.g. 17 for the digits, 256 "
                        "for 8-bit images): report bits/dim")
    q.add_argument("--bits", type=int, default=None, help="same as --levels 2^B")
    q.add_argument("--num-dequant", type=int, default=1, help="dequantization draws per sample (default 1)")
    s = p.add_argument_group("solver")
    s.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact",
                   help="exact: the trace of the Jacobian, one vector-Jacobian product per dimension; hutchinson: "
                        "an unbiased estimate from --num-probes random probes, with its standard error (default exact)")
    s.add_argument("--num-probes", type=int, default=None, help="Hutchinson probes per sample (default 4)")
    s.add_argument("--probe", choices=("rademacher", "gaussian"), default=None,
                   help="distribution of Hutchinson's probes (default rademacher: the lower variance)")
    s.add_argument("--method", default="dopri5_per_sample",
                   help="dopri5_per_sample (default: a step size per sample) or a torchdiffeq method (dopri5, bosh3, "
                        "..., or euler, rk4 with --num-steps)")
    s.add_argument("--rtol", type=float, default=None, help="relative tolerance of adaptive methods (default 1e-5)")
    s.add_argument("--atol", type=float, default=None, help="absolute tolerance of adaptive methods (default 1e-5)")
    s.add_argument("--num-steps", type=int, default=None, help="fixed-grid methods only")
    s.add_argument("--grid", default=None, help="fixed-grid methods only: the grid's kind, uniform (default), log_sigma, "
                   "karras")
    s.add_argument("--max-num-steps", type=int, default=None,
                   help="adaptive methods: give up (an error) after this many steps (default 10000)")
    s.add_argument("--no-per-sample-norm", action="store_true", help="torchdiffeq methods (--method dopri5, ...): one RMS error norm over the whole batch")
    s.add_argument("--t-min", type=float, default=None,
                   help="the time the data sit at (default: the process's t_min)")
    s.add_argument("--batch-size", type=int, default=None, help="samples per solve (default 256)")
    s.add_argument("--seed", type=int, default=0, help="probes and dequantization noise (per sample)")
    r = p.add_argument_group("runtime and output")
    r.add_argument("--dtype", choices=("float32", "float64"), default=None, help=DTYPE_HELP)
    r.add_argument("--device", default=None, help=DEVICE_HELP)
    r.add_argument("--cpu", action="store_true", help="the same as --device cpu (under accelerate launch / torchrun: "
                                                      "CPU processes)")
    r.add_argument("--output", default=None, help="write the summary (and per-sample values) as JSON")
    r.add_argument("--per-sample", action="store_true", help="include per-sample values in --output")
    r.add_argument("--update-card", default=None, metavar="FOLDER",
                   help="with --levels/--bits: write the bits/dim into FOLDER/README.md, the model card (usually the "
                        "--model folder), through huggingface_hub's ModelCard; a bits/dim already there is replaced")
    p.set_defaults(func=cmd_likelihood)


def add_likelihood_parser(subparsers) -> None:
    """Declare the ``likelihood`` subcommand (for score_toolkit.cli)."""
    p = subparsers.add_parser(
        "likelihood",
        help="log-likelihood / bits-per-dim of data under a score model (probability-flow ODE)",
        description=(
            "Compute log p(x) through the probability-flow ODE and the instantaneous change of variables "
            "(torchdiffeq; exact divergence or Hutchinson's estimator with its standard error), and bits/dim with "
            "uniform dequantization for data stored on L levels (docs/likelihood.md). Runs unchanged under "
            "'accelerate launch' or 'torchrun': every process solves its own share, then results are gathered."
        ),
    )
    _configure(p)


#: the range image models are trained on (images scaled to [-1, 1], diffusers' convention)
IMAGE_DATA_RANGE = (-1.0, 1.0)


def cmd_likelihood(args: argparse.Namespace) -> int:
    return run_guarded("likelihood", _run, args)


def _check_args(args: argparse.Namespace) -> None:
    """The options alone, before loading anything (exit code 2)."""
    from ..likelihood.options import _resolve_options

    for name in ("num_samples", "num_dequant", "num_probes", "batch_size", "max_num_steps", "levels", "bits"):
        check_count(f"--{name.replace('_', '-')}", getattr(args, name), minimum=2 if name == "levels" else 1)
    check_seed(args.seed)
    if args.per_sample and not args.output:
        raise CLIError("--per-sample adds per-sample values to the --output file: pass --output FILE")
    with usage_checks():
        _resolve_options(args.divergence, args.num_probes, args.probe, args.method, args.rtol, args.atol,
                         args.num_steps, args.grid, args.max_num_steps)


def _run(args: argparse.Namespace) -> int:
    import math

    from ..likelihood import dequantized_bits_per_dim, log_likelihood, to_levels

    _check_args(args)
    if args.update_card:
        if args.levels is None and args.bits is None:
            raise CLIError("--update-card writes bits/dim: pass --levels or --bits")
        from .evaluate import _check_card

        _check_card(args.update_card)
    if args.cpu and args.device not in (None, "cpu"):
        raise CLIError(f"--cpu contradicts --device {args.device}")
    device_name = "cpu" if args.cpu else args.device
    accelerator = _accelerator(device_name == "cpu")
    device = accelerator.device if accelerator is not None else _device(device_name)
    dtype = _dtype(args.dtype, args.model)
    with usage_checks():  # a missing or damaged model folder, an unknown data set: exit code 2
        model = load_score_model(args.model, args.process, device=device, dtype=dtype)
        x, data_desc = load_data(args.data, args.data_file, num_samples=args.num_samples, model=model, seed=args.seed,
                                 dtype=dtype)
    x = x.to(device)
    options = dict(divergence=args.divergence, num_probes=args.num_probes, probe=args.probe, method=args.method,
                   rtol=args.rtol, atol=args.atol, num_steps=args.num_steps, grid=args.grid,
                   max_num_steps=args.max_num_steps, per_sample_norm=not args.no_per_sample_norm, t_min=args.t_min,
                   batch_size=args.batch_size, sample_shape=model["sample_shape"], accelerator=accelerator,
                   progress=progress_enabled(args))
    data_range = args.data_range
    if data_range is None and len(model["sample_shape"]) == 3:
        data_range = IMAGE_DATA_RANGE  # image models are trained on [-1, 1]: raw [0, 255] pixels must not pass
    summary: dict[str, Any] = {"model": model["description"], "data": data_desc}
    per_sample: dict[str, Any] = {}
    if args.levels is not None or args.bits is not None:
        if args.levels is not None and args.bits is not None:
            raise CLIError("pass --levels or --bits, not both")
        levels = args.levels if args.levels is not None else 2**args.bits
        lo, hi = data_range if data_range is not None else IMAGE_DATA_RANGE
        k = to_levels(x, levels=levels, lo=lo, hi=hi)
        res = dequantized_bits_per_dim(model["score_fn"], model["process"], k, levels=levels, scale=hi - lo, offset=lo,
                                       num_dequant=args.num_dequant, seed=args.seed, dtype=dtype, **options)
        summary.update(res.summary())
        summary["formula"] = f"bpd = NLL_x / (d ln 2) - log2({hi - lo:g}) + log2({levels})"
        first = res.likelihoods[0].summary()
        summary.update({k2: first[k2] for k2 in ("divergence", "num_probes", "probe", "method", "num_processes")})
        per_sample = {"bpd": res.bpd, "bpd_std_err": res.std_err, "nll_nats": res.nll}
    else:
        if args.num_dequant != 1:
            raise CLIError("--num-dequant applies with --levels or --bits only")
        try:
            res = log_likelihood(model["score_fn"], model["process"], x, seed=args.seed, data_range=data_range,
                                 **options)
        except ValueError as err:
            if args.data_range is None and data_range is not None and "model's range" in str(err):
                raise CLIError(f"{err}; image models take data in [-1, 1] (pass --data-range LO HI if this model "
                               f"was trained on another range)") from err
            raise
        summary.update(res.summary())
        per_sample = {"log_prob": res.log_prob, "std_err": res.std_err, "nfe": res.nfe_per_sample}
        if model["mixture"] is not None:
            exact = model["mixture"].log_prob(x.cpu().double(), res.t_min, model["process"])
            summary["mean_abs_error_vs_exact_log_p_tmin"] = float((res.log_prob.cpu().double() - exact).abs().mean())
    if accelerator is not None and not accelerator.is_main_process:
        return 0
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.6g}" if math.isfinite(value) else str(value)
        print(f"{key}: {value}")
    if args.output:
        write_json(args.output, {**summary, **({"per_sample": per_sample} if args.per_sample else {})})
        print(f"wrote {args.output}")
    if args.update_card:
        from ..hub import update_model_card
        from .train import _command_line

        result = {
            "type": "bits_per_dim",
            "name": f"bits/dim of {data_desc} ({summary['levels']} levels, uniform dequantization; standard error "
                    f"{summary['std_err_mean_bpd']:.2g})",
            "value": float(f"{summary['mean_bpd']:.5g}"),
            "settings": {k: summary[k] for k in ("num_samples", "levels", "num_dequant", "divergence", "num_probes",
                                                 "probe", "method", "nfe") if summary.get(k) is not None},
            "command": _command_line(getattr(args, "cli_argv", None)),
        }
        result["settings"]["seed"] = args.seed
        print(f"wrote {update_model_card(args.update_card, [result])}")
    return 0
