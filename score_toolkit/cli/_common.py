"""Helpers shared by the commands: usage errors and their exit codes, device and dtype choice, the
Accelerator under a launcher, ``--option KEY=VALUE`` parsing, JSON output, and the models and data that
``likelihood`` and ``evaluate`` read (``--model``, ``--data``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["CLIError", "run_guarded", "usage_checks", "check_count", "check_seed", "add_common_options", "common_options", "progress_enabled", "parse_value",
           "resolve_model", "missing_model", "add_pilot_options", "OPTION_HELP", "DTYPE_HELP", "DEVICE_HELP", "parse_options", "checked_sampler", "parse_yaml_option", "write_json", "load_score_model",
           "load_data", "ANALYTIC_MODELS", "ANALYTIC_PROCESSES"]

#: ``--model analytic:<name>``: exact scores of the analytic test bed (no network)
ANALYTIC_MODELS = ("ring", "aniso16", "gaussian2d")
ANALYTIC_PROCESSES = ("VE", "VP", "subVP")


LOG_FORMAT = "%(name)s: %(message)s"


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options every command has: ``-v``/``-q`` (log level and progress bars) and ``--threads``."""
    from ..threads import DEFAULT_THREADS, ENV_VAR

    g = p.add_argument_group("common options")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more messages on stderr: -v shows debug messages of score_toolkit, -vv of every library")
    g.add_argument("-q", "--quiet", action="count", default=0,
                   help="only results and errors: no progress bars and no informational messages (-qq: errors only)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"torch CPU threads (default: ${ENV_VAR} if set, else {DEFAULT_THREADS}; 0: torch's own "
                   "choice, one per core). More threads rarely help the small networks of this project and slow "
                   "everything down on a busy machine; use processes instead (docs/cli.md, 'Threads')")


def progress_enabled(args: argparse.Namespace) -> bool:
    """Whether a command shows progress bars: not with ``-q`` nor with its own ``--no-progress``."""
    return not getattr(args, "quiet", 0) and not getattr(args, "no_progress", False)


@contextlib.contextmanager
def common_options(args: argparse.Namespace) -> Iterator[None]:
    """Apply the common options around a command: the log level of the ``score_toolkit`` loggers (INFO,
    ``-v`` DEBUG, ``-q`` WARNING, ``-qq`` ERROR) with one stderr handler, and the thread policy
    (:func:`score_toolkit.threads.cpu_threads` with ``--threads``). Everything is restored afterwards. Progress
    bars are each command's own: it passes :func:`progress_enabled` to the work it starts (tqdm reads its
    ``TQDM_*`` environment variables once, at import, so they cannot be switched here)."""
    from ..threads import cpu_threads

    verbose, quiet = getattr(args, "verbose", 0), getattr(args, "quiet", 0)
    level = (logging.DEBUG if verbose else logging.INFO) if not quiet else (logging.WARNING if quiet == 1 else
                                                                           logging.ERROR)
    package = logging.getLogger("score_toolkit")
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved = (package.level, root.level)
    owner = root if verbose >= 2 else package  # -vv: the handler sits on the root logger and shows every library
    owner.addHandler(handler)
    package.setLevel(level)
    if verbose >= 2:
        root.setLevel(logging.DEBUG)
    try:
        with cpu_threads(getattr(args, "threads", None)):
            yield
    finally:
        owner.removeHandler(handler)
        package.setLevel(saved[0])
        root.setLevel(saved[1])


class CLIError(ValueError):
    """A usage error reported as ``error: ...`` with exit code 2."""


@contextlib.contextmanager
def usage_checks() -> Iterator[None]:
    """The checks of a command's inputs, before any work: a ValueError, TypeError, KeyError or OSError raised
    inside (a bad option value refused by the library's own check, a missing or damaged model folder or data file)
    becomes a :class:`CLIError`, a usage error with exit code 2. Work (sampling, solving, training) stays
    outside, where an error is a failure (exit code 1)."""
    try:
        yield
    except CLIError:
        raise
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise CLIError(f"{type(err).__name__}: {err}" if isinstance(err, KeyError) or not str(err) else str(err)) \
            from err


def check_count(name: str, value: int | None, minimum: int = 1) -> None:
    """``--name N`` must be an integer >= ``minimum`` (None: not given, the default applies)."""
    if value is not None and value < minimum:
        raise CLIError(f"expected {name} to be an integer >= {minimum}, found {value}")


def check_seed(value: int | None, name: str = "--seed") -> None:
    """Seeds are non-negative integers (torch.Generator.manual_seed's range) in every command."""
    check_count(name, value, minimum=0)


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



DTYPE_HELP = "float32 or float64 (default: float32 for networks, float64 for analytic models)"
DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu; on several processes each uses its own)"

#: the help text of ``--option`` (the same in every command that has it)
OPTION_HELP = ("a sampler option KEY=VALUE, e.g. --option num_steps=50 --option grid=log_sigma --option denoise=true; "
               "the value is read as JSON, else as YAML, else kept as a string (repeatable)")


def add_pilot_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The pilot's size options (``fit-grid``; ``train`` has them as ``--grid-pilot``, ``--grid-pilot-steps``)."""
    p.add_argument(f"--{prefix}pilot" if prefix else "--num-pilot", dest="num_pilot", type=int, default=2048,
                   metavar="N", help="draws of the pilot (default 2048; smaller is faster and less precise: docs/"
                   "fast_samplers.md, 'The model's grid')")
    p.add_argument(f"--{prefix}pilot-steps", dest="pilot_steps", type=int, default=100, metavar="N",
                   help="steps of the pilot's converged ODE (default 100)")


def parse_value(raw: str) -> Any:
    """The value of ``--option KEY=VALUE``: JSON (``50``, ``1e-3``, ``true``, ``[1, 2]``), else YAML (``[a, b]``,
    ``{k: 1}``), else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        import yaml

        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["num_steps=50", "grid=log_sigma"]`` -> ``{"num_steps": 50, "grid": "log_sigma"}`` (values by
    :func:`parse_value`); a :class:`CLIError` (exit code 2) for an item without ``=`` or a repeated key."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"expected --option KEY=VALUE, found {item!r}")
        if key in out:
            raise CLIError(f"sampler option {key!r} given twice")
        out[key] = parse_value(raw)
    return out


def checked_sampler(name: str, options: dict[str, Any], *, steps_flag: str = "--option num_steps"):
    """The sampler ``name`` with ``options`` (the registry's errors for an unknown sampler or option), refusing a
    step count that would do nothing: a command writes the final samples only, and an adaptive sampler's
    ``num_steps`` (``pf_ode`` with an adaptive method) only sets the output times of a returned trajectory.
    ``steps_flag`` names the flag that gave it, for the message."""
    from ..registry import get_sampler

    sampler = get_sampler(name, **options)
    if "num_steps" in options and sampler.properties.adaptive:
        method = sampler.config.get("method")
        how = f" with method {method!r}" if method is not None else ""
        raise CLIError(f"{steps_flag} has no effect on sampler {name!r}{how}: it is adaptive and takes as many steps "
                       f"as its tolerances need (--option rtol=... atol=...); drop {steps_flag}, or choose a "
                       f"fixed-grid method (e.g. --option method=rk4) to set the number of steps")
    return sampler


def parse_yaml_option(text: str) -> tuple[str, Any]:
    """One ``--option KEY=VALUE`` as a pair (see :func:`parse_options`)."""
    return next(iter(parse_options([text]).items()))


def resolve_model(spec: str) -> str:
    """A model argument: an existing folder as it is; else the name of a shipped model (``digits``, ``toy2d``) or
    ``hub_cards/<name>`` written from another directory than the repository root, resolved with
    :func:`score_toolkit.pipeline.shipped_model_path` (so it works from any directory; the rule of
    ``ScorePipeline.from_pretrained``); else unchanged (a Hub repository id, an ``analytic:`` model, or a missing
    folder that the caller reports)."""
    if spec.startswith("analytic:") or os.path.isdir(spec):
        return spec
    from ..folders import _shipped_folder  # the rule of ScorePipeline.from_pretrained

    shipped = _shipped_folder(spec)
    return spec if shipped is None else str(shipped)


def missing_model(spec: str) -> str:
    """What to say about a model argument that names nothing: the shipped models, where they are and the closest
    name (``digit``: did you mean 'digits'?)."""
    from ..folders import _shipped_names

    return _shipped_names(spec)


def _analytic(name: str):
    from ..analytic import anisotropic_mixture, gaussian, ring_mixture

    if name == "ring":
        return ring_mixture(), (-6.0, 6.0, -6.0, 6.0)
    if name == "aniso16":
        return anisotropic_mixture(16), None
    return gaussian([0.0, 0.0], [[1.0, 0.6], [0.6, 0.5]]), (-4.0, 4.0, -4.0, 4.0)


def _process(name: str | None):
    from ..processes import VESDE, VPSDE, SubVPSDE

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
    from ..hub import load_pipeline_components
    from ..scores import ScoreAdapter

    spec = resolve_model(spec)
    if not os.path.isdir(spec):
        raise CLIError(f"expected --model to be a pipeline folder, a shipped model's name or analytic:<name>, found no "
                       f"folder at {spec} ({missing_model(spec)})")
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
        check_count("--num-samples", num_samples)
        n = 256 if num_samples is None else num_samples
        return model["mixture"].sample(n, generator=torch.Generator().manual_seed(seed)).to(dtype), \
            f"{n} exact draws of the analytic model (seed {seed})"
    from ..data import load_dataset

    ds = load_dataset("vectors", path=path) if path is not None else load_dataset(name)
    x = ds.data
    if num_samples is not None:
        check_count("--num-samples", num_samples)
        if num_samples > len(x):
            raise CLIError(f"--num-samples {num_samples} exceeds the {len(x)} samples of the data")
        x = x[:num_samples]
    return x.to(dtype), f"{len(x)} samples of {ds.description}" + (" (the first ones)" if num_samples else "")


def _device(name: str | None, option: str = "--device"):
    """The device of ``--device NAME`` (default: cuda if there is one, else cpu); a :class:`CLIError` for a name torch
    does not know or a CUDA device this machine does not have (before any work, not a traceback from the first
    tensor moved there)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"expected {option} cpu, cuda, cuda:1, ..., found {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise CLIError(f"{option} {name}: no such CUDA device on this machine (found {count} CUDA device(s))")
    return device


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
    from .._io import write_json_atomic

    write_json_atomic(path, obj, default=_jsonable)


def _jsonable(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return repr(v)


