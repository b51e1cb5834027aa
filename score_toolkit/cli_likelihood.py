"""The ``likelihood`` command: log-likelihoods (and bits/dim) of data under a score model, through the
probability-flow ODE (:func:`score_toolkit.likelihood.log_likelihood`).

    score-toolkit likelihood --model hub_cards/digits --data digits --levels 17 --num-samples 64
    score-toolkit likelihood --model analytic:ring --process VP --num-samples 256 --output ll.json
    accelerate launch --multi_gpu --num_processes 2 -m score_toolkit.cli likelihood --cpu --model ... # 2 processes

Also runnable as ``python -m score_toolkit.cli_likelihood ...``. Heavy imports happen inside the command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_likelihood_parser", "cmd_likelihood", "main", "load_score_model", "ANALYTIC_MODELS"]

#: ``--model analytic:<name>``: exact scores of the analytic test bed (no network)
ANALYTIC_MODELS = ("ring", "aniso16", "gaussian2d")
ANALYTIC_PROCESSES = ("VE", "VP", "subVP")


class CLIError(ValueError):
    """A usage error reported as ``error: ...`` with exit code 2."""


# ---------------------------------------------------------------------------------------------- shared helpers
def _analytic(name: str):
    from .analytic import anisotropic_mixture, gaussian, ring_mixture

    if name == "ring":
        return ring_mixture(), (-6.0, 6.0, -6.0, 6.0)
    if name == "aniso16":
        return anisotropic_mixture(16), None
    return gaussian([0.0, 0.0], [[1.0, 0.6], [0.6, 0.5]]), (-4.0, 4.0, -4.0, 4.0)


def _process(name: str | None):
    from .processes import VESDE, VPSDE, SubVPSDE

    if name is None:
        raise CLIError(f"--model analytic:... needs --process, one of {ANALYTIC_PROCESSES}")
    table = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE(0.1, 20.0), "subVP": lambda: SubVPSDE(0.1, 20.0)}
    if name not in table:
        raise CLIError(f"expected --process in {ANALYTIC_PROCESSES}, found {name!r}")
    return table[name]()


def load_score_model(spec: str, process_name: str | None, *, device, dtype) -> dict[str, Any]:
    """The model of ``--model``: a pipeline folder (exported by score_toolkit or a plain diffusers DDPM folder) or
    ``analytic:<name>`` (:data:`ANALYTIC_MODELS`, with ``--process``). Returns a dict with ``score_fn``,
    ``process``, ``sample_shape``, ``mixture`` (analytic only), ``extent`` (2-D only) and ``description``."""
    if spec.startswith("analytic:"):
        name = spec.split(":", 1)[1]
        if name not in ANALYTIC_MODELS:
            raise CLIError(f"expected --model analytic:<name> with name in {ANALYTIC_MODELS}, found {name!r}")
        mixture, extent = _analytic(name)
        process = _process(process_name)
        return {"score_fn": mixture.score_fn(process), "process": process, "sample_shape": (mixture.dim,),
                "mixture": mixture, "extent": extent, "description": f"analytic {name} under {process!r}"}
    if process_name is not None:
        raise CLIError("--process applies to --model analytic:... only (a folder's scheduler config names its process)")
    from .hub import load_pipeline_components
    from .scores import ScoreAdapter

    if not os.path.isdir(spec):
        raise CLIError(f"expected --model to be a pipeline folder or analytic:<name>, found no folder at {spec}")
    model, process, prediction_type, time_input = load_pipeline_components(spec)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    model = model.to(device)
    cfg = model.config
    if cfg.get("dim") is not None:
        shape: tuple[int, ...] = (int(cfg["dim"]),)
    elif cfg.get("sample_size") is not None:
        size = cfg["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(cfg["in_channels"]), int(h), int(w))
    else:
        raise CLIError(f"cannot tell the sample shape of {type(model).__name__} in {spec}")
    extent = (-6.0, 6.0, -6.0, 6.0) if shape == (2,) else None
    return {"score_fn": ScoreAdapter(model, process, prediction_type, time_input), "process": process,
            "sample_shape": shape, "mixture": None, "extent": extent,
            "description": f"{type(model).__name__} from {spec} ({prediction_type}, {process!r})"}


def load_data(name: str | None, path: str | None, *, num_samples: int | None, model: dict[str, Any], seed: int, dtype):
    """Data for ``--data NAME`` / ``--data-file PATH``; without either, exact draws of an analytic model."""
    import torch

    if name is not None and path is not None:
        raise CLIError("pass --data or --data-file, not both")
    if name is None and path is None:
        if model["mixture"] is None:
            raise CLIError("pass --data NAME (e.g. digits) or --data-file PATH (.npy or .safetensors)")
        n = num_samples or 256
        return model["mixture"].sample(n, generator=torch.Generator().manual_seed(seed)).to(dtype), \
            f"{n} exact draws of the analytic model (seed {seed})"
    from .data import load_dataset

    ds = load_dataset("vectors", path=path) if path is not None else load_dataset(name)
    x = ds.data
    if num_samples is not None:
        if num_samples > len(x):
            raise CLIError(f"--num-samples {num_samples} exceeds the {len(x)} samples of the data")
        x = x[:num_samples]
    return x.to(dtype), f"{len(x)} samples of {ds.description}" + (" (the first ones)" if num_samples else "")


def _device(name: str | None):
    import torch

    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str | None, model_spec: str):
    import torch

    if name is None:
        return torch.float64 if model_spec.startswith("analytic:") else torch.float32
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _accelerator(cpu: bool):
    """An Accelerator when launched on several processes (accelerate launch / torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=cpu)


def write_json(path: str, obj) -> None:
    from ._io import write_json_atomic

    write_json_atomic(path, obj, default=_jsonable)


def _jsonable(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return repr(v)


# ---------------------------------------------------------------------------------------------- the command
def _configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="a pipeline folder (e.g. hub_cards/digits) or analytic:<name> with name in "
                        f"{', '.join(ANALYTIC_MODELS)} (exact scores)")
    g.add_argument("--process", choices=ANALYTIC_PROCESSES, default=None, help="process of an analytic model")
    g.add_argument("--data", default=None, help="a dataset name (digits, ring, moons, ...; see docs/training.md)")
    g.add_argument("--data-file", default=None, help="a .npy or .safetensors file of samples (N, ...)")
    g.add_argument("--num-samples", type=int, default=None, help="use the first N samples (analytic: draw N, default 256)")
    g.add_argument("--data-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="the model's data range: data outside it are refused; with --levels/--bits the grid's ends "
                        "(default -1 1 then)")
    q = p.add_argument_group("bits/dim (uniform dequantization)")
    q.add_argument("--levels", type=int, default=None,
                   help="the data are stored on L levels evenly spaced over --data-range (e.g. 17 for the digits, 256 "
                        "for 8-bit images): report bits/dim")
    q.add_argument("--bits", type=int, default=None, help="same as --levels 2^B")
    q.add_argument("--num-dequant", type=int, default=1, help="dequantization draws per sample (default 1)")
    s = p.add_argument_group("solver")
    s.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact")
    s.add_argument("--num-probes", type=int, default=None, help="Hutchinson probes per sample (default 4)")
    s.add_argument("--probe", choices=("rademacher", "gaussian"), default=None)
    s.add_argument("--method", default="dopri5", help="torchdiffeq method (dopri5, bosh3, ..., or euler, rk4 with "
                                                      "--num-steps)")
    s.add_argument("--rtol", type=float, default=None)
    s.add_argument("--atol", type=float, default=None)
    s.add_argument("--num-steps", type=int, default=None, help="fixed-grid methods only")
    s.add_argument("--grid", default="uniform", help="fixed-grid kind: uniform, log_sigma, karras")
    s.add_argument("--max-num-steps", type=int, default=None)
    s.add_argument("--no-per-sample-norm", action="store_true", help="one RMS error norm over the whole batch")
    s.add_argument("--t-min", type=float, default=None)
    s.add_argument("--batch-size", type=int, default=None, help="samples per solve (default 256)")
    s.add_argument("--seed", type=int, default=0, help="probes and dequantization noise (per sample)")
    r = p.add_argument_group("runtime and output")
    r.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="default float32 for networks, float64 for analytic models")
    r.add_argument("--device", default=None, help="default cuda if available, else cpu (ignored on several processes)")
    r.add_argument("--cpu", action="store_true", help="under accelerate launch / torchrun: run on CPU processes")
    r.add_argument("--output", default=None, help="write the summary (and per-sample values) as JSON")
    r.add_argument("--per-sample", action="store_true", help="include per-sample values in --output")
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


def run_guarded(command: str, fn, args: argparse.Namespace) -> int:
    """Run a subcommand's body; report a bad input (exit 2) or a failure (exit 1) in one line on stderr."""
    try:
        return fn(args)
    except CLIError as err:
        print(f"score-toolkit {command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as err:
        print(f"score-toolkit {command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def cmd_likelihood(args: argparse.Namespace) -> int:
    return run_guarded("likelihood", _run, args)


def _run(args: argparse.Namespace) -> int:
    import math

    from .likelihood import dequantized_bits_per_dim, log_likelihood, to_levels

    accelerator = _accelerator(args.cpu)
    device = accelerator.device if accelerator is not None else _device(args.device)
    dtype = _dtype(args.dtype, args.model)
    model = load_score_model(args.model, args.process, device=device, dtype=dtype)
    x, data_desc = load_data(args.data, args.data_file, num_samples=args.num_samples, model=model, seed=args.seed,
                             dtype=dtype)
    x = x.to(device)
    options = dict(divergence=args.divergence, num_probes=args.num_probes, probe=args.probe, method=args.method,
                   rtol=args.rtol, atol=args.atol, num_steps=args.num_steps, grid=args.grid,
                   max_num_steps=args.max_num_steps, per_sample_norm=not args.no_per_sample_norm, t_min=args.t_min,
                   batch_size=args.batch_size, sample_shape=model["sample_shape"], accelerator=accelerator)
    summary: dict[str, Any] = {"model": model["description"], "data": data_desc}
    per_sample: dict[str, Any] = {}
    if args.levels is not None or args.bits is not None:
        if args.levels is not None and args.bits is not None:
            raise CLIError("pass --levels or --bits, not both")
        levels = args.levels if args.levels is not None else 2**args.bits
        lo, hi = args.data_range if args.data_range is not None else (-1.0, 1.0)
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
        res = log_likelihood(model["score_fn"], model["process"], x, seed=args.seed, data_range=args.data_range,
                             **options)
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m score_toolkit.cli_likelihood ...`` (the same options as ``score-toolkit likelihood``)."""
    parser = argparse.ArgumentParser(prog="score-toolkit likelihood", description=__doc__.split("\n")[0])
    _configure(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
