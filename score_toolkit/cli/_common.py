"""Helpers shared by the commands: usage errors and their exit codes, device and dtype choice, the
Accelerator under a launcher, ``--option KEY=VALUE`` parsing, JSON output, and the models and data that
``likelihood`` and ``evaluate`` read (``--model``, ``--data``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["CLIError", "run_guarded", "parse_options", "parse_yaml_option", "write_json", "load_score_model",
           "load_data", "ANALYTIC_MODELS", "ANALYTIC_PROCESSES"]

#: ``--model analytic:<name>``: exact scores of the analytic test bed (no network)
ANALYTIC_MODELS = ("ring", "aniso16", "gaussian2d")
ANALYTIC_PROCESSES = ("VE", "VP", "subVP")


class CLIError(ValueError):
    """A usage error reported as ``error: ...`` with exit code 2."""


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



def parse_options(items: list[str]) -> dict[str, Any]:
    """``["num_steps=50", "grid=log_sigma"]`` -> ``{"num_steps": 50, "grid": "log_sigma"}`` (JSON values, else
    strings); a ``ValueError`` for an item without ``=`` or a repeated key."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected --option KEY=VALUE, found {item!r}")
        if key in out:
            raise ValueError(f"sampler option {key!r} given twice")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def parse_yaml_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise CLIError(f"expected --option KEY=VALUE, found {text!r}")
    key, raw = text.split("=", 1)
    try:
        import yaml

        value = yaml.safe_load(raw)
    except Exception:  # noqa: BLE001 - not YAML: keep the string
        value = raw
    return key.strip(), value


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
    from ..data import load_dataset

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
    from .._io import write_json_atomic

    write_json_atomic(path, obj, default=_jsonable)


def _jsonable(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return repr(v)


