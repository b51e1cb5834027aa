"""One training loop on Accelerate for every score-matching objective.

:func:`train` takes a :class:`RunConfig` (or a dict, a YAML/JSON file through :func:`load_config`) and

1. validates everything before any work: the config (unknown keys are errors), the data, the process,
   the network (one forward call on two samples), the objective and their consistency, the output
   folder (writable; with ``resume`` it must hold a complete checkpoint, without it none);
2. trains with Accelerate: mixed precision (``bf16``; ``fp16`` only on GPUs: on CPU it is a no-op,
   so it is refused with a warning and float32 is used), gradient accumulation, clipping, linear LR
   warm-up, an EMA of the weights, data parallelism over processes, a tqdm bar with loss and
   throughput, ``metrics.jsonl`` and optional TensorBoard;
3. writes crash-safe checkpoints (:func:`save_checkpoint`: temporary folder, fsync, a manifest with the
   sha256 of every file, then one atomic rename; the last ``keep_checkpoints`` are kept) and resumes
   from the latest one whose manifest verifies (:func:`latest_checkpoint`);
4. exports the EMA weights as a Hub-style folder with a model card (:mod:`score_toolkit.hub`).

Determinism: the data order and every noise draw are functions of ``(seed, step)`` only (no hidden
RNG state), so a resumed run reproduces the uninterrupted one exactly on the same hardware, and the
global batch of a step is the same whatever the number of processes. With
``train.per_sample_noise = true`` each sample's noise comes from its own generator (seeded by its
global position in the data stream), so one process with batch B and two processes with B/2 each
see identical data and noise: the models then agree up to float summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import fsync_dir, probe_writable, sha256_file, write_json_atomic

__all__ = [
    "RunConfig",
    "DataConfig",
    "ProcessConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "ExportConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "build_components",
    "Components",
    "train",
    "TrainResult",
    "EMA",
    "save_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
]

MODEL_CLASSES = ("ScoreMLP", "EnergyMLP", "UNet2DModel")
PROCESS_CLASSES = ("VESDE", "VPSDE", "SubVPSDE", "DiscreteVP")
MIXED_PRECISION = ("no", "bf16", "fp16")
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "MANIFEST.json"
_CKPT_PREFIX = "step_"


class ConfigError(ValueError):
    """An invalid or inconsistent training configuration (raised before any training work)."""


# ============================================================================ configuration
@dataclass
class DataConfig:
    """``name``: one of :data:`score_toolkit.data.DATASETS`; ``options``: that dataset's options."""

    name: str = "ring"
    options: dict = field(default_factory=dict)


@dataclass
class ProcessConfig:
    """``name``: VESDE, VPSDE, SubVPSDE or DiscreteVP; ``options``: its constructor arguments."""

    name: str = "VPSDE"
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """``name``: ScoreMLP, EnergyMLP or UNet2DModel; ``options``: its constructor arguments (``dim`` of the
    MLPs and ``sample_size``/``in_channels``/``out_channels`` of the UNet default to the data's shape);
    ``prediction_type`` and ``time_input`` as in :class:`~score_toolkit.scores.ScoreAdapter`."""

    name: str = "ScoreMLP"
    prediction_type: str = "epsilon"
    time_input: str = "t"
    options: dict = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """``name``: one of :data:`score_toolkit.objectives.OBJECTIVES`; ``options``: its options (the process
    is set from the ``process`` section; the time of the noise-free objectives defaults to ``t_min``)."""

    name: str = "continuous_dsm"
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is the GLOBAL batch of one optimizer step (summed over
    processes and accumulation micro-steps); it must divide by ``num_processes * gradient_accumulation_steps``."""

    steps: int = 1000
    batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    ema_decay: float | None = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    progress: bool = True
    log_with: str | None = None
    per_sample_noise: bool = False
    cpu: bool = False


@dataclass
class ExportConfig:
    """What happens after training: export the (EMA) weights to ``folder`` (default ``<output_dir>/pipeline``)
    with a model card whose sample image and measured results come from ``num_samples`` samples of
    ``sampler`` (a registered sampler name) with ``sampler_options``."""

    enabled: bool = True
    folder: str | None = None
    use_ema: bool = True
    overwrite: bool = False
    model_name: str | None = None
    license: str = "apache-2.0"
    sampler: str = "ancestral"
    sampler_options: dict = field(default_factory=lambda: {"num_steps": 500, "denoise": True})
    num_samples: int = 1000
    command: str | None = None


@dataclass
class RunConfig:
    """A complete training run. Load one with :func:`load_config`; see docs/training.md."""

    output_dir: str | None = None
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build from nested dicts; unknown keys and values of the wrong type are :class:`ConfigError`."""
        return _from_dict(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is __import__("types").UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict:
        return isinstance(value, Mapping)
    if hint is list:
        return isinstance(value, (list, tuple))
    return True


def _from_dict(cls, d, path: str):
    where = path or "the config"
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected {where} to be a mapping, found {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=1)
        hint = f" (did you mean {path + close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {path + str(k)!r}{hint}; keys of {where}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        value, hint = d[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{path}{name}.")
            continue
        if not _type_ok(value, hint):
            raise ConfigError(
                f"config key {path + name!r}: expected {_hint_name(hint)}, found {value!r} ({type(value).__name__})"
            )
        if hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        kwargs[name] = dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, tuple) else value
    return cls(**kwargs)


def _hint_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_hint_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def load_config(path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config from a YAML (``.yaml``/``.yml``) or JSON (``.json``) file and apply
    ``overrides`` (``"train.steps=100"``, values parsed as YAML)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"expected a config file at {p}, found nothing there")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"expected a .yaml, .yml or .json config file, found {p.name}")
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"cannot parse the config file {p}: {err}") from err
    if raw is None:
        raw = {}
    return RunConfig.from_dict(apply_overrides(raw, overrides))


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``config`` with ``KEY.PATH=VALUE`` overrides applied (the value is
    parsed as YAML: ``100`` is an int, ``[32, 64]`` a list, ``null`` None, ``bf16`` a string)."""
    import copy

    import yaml

    out = copy.deepcopy(dict(config))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"expected an override KEY=VALUE (e.g. train.steps=100), found {item!r}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"expected a dotted key such as train.steps, found {key!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse the value of override {item!r}: {err}") from err
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


# ============================================================================ components
@dataclass
class Components:
    """Everything a run is made of, built and cross-checked by :func:`build_components`."""

    config: RunConfig
    dataset: Any
    process: Any
    model: torch.nn.Module
    objective: Any
    prediction_type: str
    time_input: str


def _build_process(cfg: ProcessConfig):
    from . import processes

    if cfg.name not in PROCESS_CLASSES:
        close = difflib.get_close_matches(cfg.name, PROCESS_CLASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown process {cfg.name!r}.{hint} Available: {', '.join(PROCESS_CLASSES)}")
    try:
        return getattr(processes, cfg.name)(**cfg.options)
    except TypeError as err:
        raise ConfigError(f"process {cfg.name}: {err}") from err


def _model_class(name: str):
    if name == "UNet2DModel":
        from diffusers import UNet2DModel

        return UNet2DModel
    from . import models

    return getattr(models, name)


def _build_model(cfg: ModelConfig, sample_shape: tuple[int, ...]) -> torch.nn.Module:
    if cfg.name not in MODEL_CLASSES:
        close = difflib.get_close_matches(cfg.name, MODEL_CLASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {cfg.name!r}.{hint} Available: {', '.join(MODEL_CLASSES)}")
    options = dict(cfg.options)
    if cfg.name in ("ScoreMLP", "EnergyMLP"):
        dim = math.prod(sample_shape)
        options.setdefault("dim", dim)
        if options["dim"] != dim:
            raise ConfigError(
                f"model.options.dim = {options['dim']} but the data have {dim} features per sample "
                f"(shape {sample_shape})"
            )
    else:
        if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
            raise ConfigError(
                f"UNet2DModel needs square images (C, H, H) as data, found samples of shape {sample_shape}"
            )
        c, h, _ = sample_shape
        for key, want in (("sample_size", h), ("in_channels", c), ("out_channels", c)):
            options.setdefault(key, want)
            found = options[key]
            if (list(found) if isinstance(found, (list, tuple)) else found) not in (want, [want, want]):
                raise ConfigError(f"model.options.{key} = {found!r} but the data give {want} (samples {sample_shape})")
    cls = _model_class(cfg.name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"model {cfg.name}: {err}") from err


def _is_variance_exploding(process) -> bool:
    t = torch.tensor([process.t_min, process.t_max], dtype=torch.float64)
    return bool(process.log_alpha(t).abs().max() < 1e-12)


def _build_objective(cfg: ObjectiveConfig, process, dataset, prediction_type: str):
    from .objectives import OBJECTIVES, get_objective

    name = cfg.name
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(str(name).lower(), OBJECTIVES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown objective {name!r}.{hint} Available: {', '.join(OBJECTIVES)}")
    options = dict(cfg.options)
    for bad in ("process", "target_score", "reduction"):
        if bad in options:
            raise ConfigError(f"objective.options.{bad} is set by the trainer (from the process and data sections)")
    if name in ("continuous_dsm", "epsilon", "ncsn"):
        options["process"] = process
    if name in ("ncsn", "dsm") and not _is_variance_exploding(process):
        raise ConfigError(
            f"objective {name!r} perturbs x + sigma z (alpha = 1) and needs a variance-exploding process "
            f"(VESDE), found {process!r}: use continuous_dsm or epsilon for this process"
        )
    if name in ("esm", "ism", "ssm", "ssm_vr"):
        options.setdefault("t", float(process.t_min))
    if name == "dsm":
        if "sigma" not in options:
            raise ConfigError("objective 'dsm' needs objective.options.sigma (the noise level)")
        if "t" not in options:
            t = float(process.t_from_noise_to_signal(torch.tensor(float(options["sigma"]), dtype=torch.float64)))
            if not process.t_min - 1e-9 <= t <= process.t_max + 1e-9:
                raise ConfigError(f"objective 'dsm': sigma = {options['sigma']} lies outside the process's range {process!r}")
            options["t"] = min(max(t, process.t_min), process.t_max)
    if name == "esm":
        if dataset.mixture is None:
            raise ConfigError(
                f"objective 'esm' needs the data's exact score; dataset {dataset.name!r} has none (use 'ring')"
            )
        mixture, t_esm = dataset.mixture, options["t"]

        def target_score(x, _m=mixture, _t=t_esm, _p=process):
            return _m.score(x.double(), torch.full((x.shape[0],), _t, dtype=torch.float64), _p).to(x.dtype)

        options["target_score"] = target_score
    if prediction_type == "energy" and name == "epsilon":
        pass  # the adapter's epsilon view of an energy model goes through autograd: allowed
    try:
        return get_objective(name, **options)
    except TypeError as err:
        raise ConfigError(f"objective {name}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"objective {name}: {err}") from err


def build_components(config: RunConfig | Mapping[str, Any]) -> Components:
    """Build and cross-check data, process, network and objective of ``config`` (no training).

    Raises :class:`ConfigError` for any inconsistency: unknown names, an energy network without
    ``prediction_type: energy`` (or the reverse), NCSN/DSM on a non-VE process, ESM without a known data
    score, a network that cannot be evaluated on the data and the process's time range."""
    from .data import load_dataset
    from .scores import PREDICTION_TYPES, TIME_INPUTS, ScoreAdapter

    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    m = cfg.model
    if m.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"model.prediction_type: expected one of {PREDICTION_TYPES}, found {m.prediction_type!r}")
    if m.time_input not in TIME_INPUTS:
        raise ConfigError(f"model.time_input: expected one of {TIME_INPUTS}, found {m.time_input!r}")
    if (m.name == "EnergyMLP") != (m.prediction_type == "energy"):
        raise ConfigError(
            f"model {m.name} with prediction_type {m.prediction_type!r}: an energy network (EnergyMLP) needs "
            f"prediction_type 'energy', and prediction_type 'energy' needs an EnergyMLP"
        )
    try:
        dataset = load_dataset(cfg.data.name, **cfg.data.options)
    except (TypeError, ValueError, FileNotFoundError, ImportError) as err:
        raise ConfigError(f"data: {err}") from err
    process = _build_process(cfg.process)
    try:
        model = _build_model(m, dataset.sample_shape)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"model {m.name}: {err}") from err
    objective = _build_objective(cfg.objective, process, dataset, m.prediction_type)
    # one forward call on two samples at both ends of the time range
    score_fn = ScoreAdapter(model, process, m.prediction_type, m.time_input)
    x = dataset.data[:2]
    for t_end in (process.t_min, process.t_max):
        try:
            with torch.no_grad() if m.prediction_type != "energy" else torch.enable_grad():
                s = score_fn(x, torch.full((x.shape[0],), float(t_end)))
        except Exception as err:
            raise ConfigError(
                f"the network {m.name} cannot be evaluated on data of shape {tuple(x.shape[1:])} at t = {t_end:g} "
                f"with time_input {m.time_input!r} (network time {float(score_fn.network_time(torch.tensor([float(t_end)]))[0]):g}): {err}"
            ) from err
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(
                f"the network {m.name} returns non-finite values at t = {t_end:g} with time_input {m.time_input!r}"
            )
    return Components(cfg, dataset, process, model, objective, m.prediction_type, m.time_input)


def _check_train_config(t: TrainConfig) -> None:
    def positive_int(name):
        v = getattr(t, name)
        if v < 1:
            raise ConfigError(f"train.{name}: expected a positive int, found {v}")

    for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
        positive_int(name)
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: expected >= 0, found {t.warmup_steps}")
    if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
        raise ConfigError(f"train.learning_rate: expected > 0, found {t.learning_rate}")
    if not t.weight_decay >= 0:
        raise ConfigError(f"train.weight_decay: expected >= 0, found {t.weight_decay}")
    if len(t.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas: expected two numbers in [0, 1), found {t.adam_betas}")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        raise ConfigError(f"train.max_grad_norm: expected > 0 or null (no clipping), found {t.max_grad_norm}")
    if t.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"train.mixed_precision: expected one of {MIXED_PRECISION}, found {t.mixed_precision!r}")
    if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: expected a number in [0, 1) or null (no EMA), found {t.ema_decay}")
    if t.log_with not in (None, "tensorboard"):
        raise ConfigError(f"train.log_with: expected null or 'tensorboard', found {t.log_with!r}")
    if t.log_with == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "train.log_with = 'tensorboard' needs the tensorboard package: pip install 'score-toolkit[tensorboard]'"
            )


def _check_export_config(e: ExportConfig) -> None:
    if e.num_samples < 1:
        raise ConfigError(f"export.num_samples: expected a positive int, found {e.num_samples}")
    if not e.enabled:
        return
    from .registry import get_sampler

    try:
        get_sampler(e.sampler, **e.sampler_options)
    except (KeyError, ValueError, TypeError, LookupError) as err:
        raise ConfigError(f"export.sampler: {err}") from err


# ============================================================================ EMA
class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging), with the warm-up of
    diffusers' ``EMAModel``: the decay used at update ``n`` is ``min(decay, (1 + n) / (10 + n))``.
    Shadow weights are float32 copies; :meth:`state_dict` / :meth:`load_state_dict` are tensors only
    (saved as safetensors in checkpoints)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"expected an EMA decay in [0, 1), found {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters() if p.requires_grad]
        self._params: tuple | None = None

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        # the parameter list is built once per model (a per-step list comprehension over the parameters
        # was measurable per-step overhead for small networks); float32 parameters are used as they are
        cached = self._params
        if cached is None or cached[0] is not model:
            params = [p for p in model.parameters() if p.requires_grad]
            cached = self._params = (model, params, all(p.dtype == torch.float32 for p in params))
        _, params, all_float = cached
        torch._foreach_lerp_(self.shadow, params if all_float else [p.float() for p in params], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, s in zip([p for p in model.parameters() if p.requires_grad], self.shadow):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], num_updates: int) -> None:
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in self.names]
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {extra}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])
        self.num_updates = int(num_updates)


# ============================================================================ checkpoints
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=True, default=str)


def _checkpoint_name(step: int) -> str:
    return f"{_CKPT_PREFIX}{step:07d}"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint folder in ``run_dir/checkpoints`` (complete or not), oldest
    first. Temporary folders of interrupted writes are not listed."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_CKPT_PREFIX) and p.name[len(_CKPT_PREFIX):].isdigit():
            out.append((int(p.name[len(_CKPT_PREFIX):]), p))
    return sorted(out)


def verify_checkpoint(folder) -> tuple[bool, str]:
    """Check a checkpoint against its manifest: every listed file present with its size and sha256.
    Returns ``(ok, reason)``."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False, f"no {MANIFEST} (the write did not complete)"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        files = info["files"]
        int(info["step"])
    except (ValueError, KeyError, TypeError) as err:
        return False, f"unreadable {MANIFEST}: {err}"
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return False, f"file {name} listed in the manifest is missing"
        if p.stat().st_size != meta["size"]:
            return False, f"file {name} has {p.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if sha256_file(p) != meta["sha256"]:
            return False, f"file {name} does not match its sha256 in the manifest (corrupt)"
    return True, "ok"


def latest_checkpoint(run_dir, *, warn: bool = True) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose manifest verifies, or None. Newer checkpoints that fail
    verification are skipped with a warning naming the reason."""
    for _step, folder in reversed(list_checkpoints(run_dir)):
        ok, reason = verify_checkpoint(folder)
        if ok:
            return folder
        if warn:
            warnings.warn(f"checkpoint {folder} is unusable ({reason}); falling back to an older one", stacklevel=2)
    return None


def save_checkpoint(accelerator, run_dir, step: int, *, ema: EMA | None, keep: int, extra_state: Mapping | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically; call on every process.

    ``accelerator.save_state`` writes into a temporary sibling folder; then the main process adds the EMA
    weights (safetensors) and ``trainer_state.json``, fsyncs every file, writes the manifest (step, size
    and sha256 of each file) and renames the folder into place. A crash at any point leaves either no new
    folder or a complete one; the previous checkpoints are untouched. The oldest complete checkpoints
    beyond ``keep`` are then removed."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / _checkpoint_name(step)
    tmp = root / f".tmp-{_checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        state = {"step": int(step), "ema_updates": ema.num_updates if ema is not None else None,
                 "num_processes": accelerator.num_processes, **(extra_state or {})}
        with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync_file(p)
                files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump({"step": int(step), "complete": True, "files": files}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # an unusable checkpoint of the same step from an earlier attempt
            _remove_tree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        _prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _remove_tree(path: Path) -> None:
    # rename first, so a crash during the removal never leaves a half-deleted folder under a checkpoint name
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune_checkpoints(run_dir, keep: int) -> None:
    root = Path(run_dir) / CHECKPOINT_DIR
    complete = [(s, p) for s, p in list_checkpoints(run_dir) if (p / MANIFEST).is_file()]
    for _, p in complete[: max(0, len(complete) - keep)]:
        _remove_tree(p)
    for p in root.iterdir():
        if p.name.startswith(".trash-"):
            shutil.rmtree(p, ignore_errors=True)


# ============================================================================ data order and noise
def _mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFFFFFFFFFF for i in ints]).generate_state(1, np.uint64)[0] >> 1)


class _DataStream:
    """The global sample order: an endless concatenation of permutations of the data set, permutation
    ``e`` seeded by ``(seed, e)``. Slot ``s`` of the stream is a pure function of ``(seed, s)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(_mix(self.seed, 0xDA7A, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        epoch, offset = divmod(start, self.n)
        if offset + count <= self.n:  # the common case: inside one permutation, a slice of it
            return self._perm(epoch)[offset:offset + count]
        slots = torch.arange(start, start + count)
        epochs = slots // self.n
        out = torch.empty(count, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            mask = epochs == e
            out[mask] = self._perm(e)[slots[mask] % self.n]
        return out


# ============================================================================ the loop
@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the last step, the logged history (one dict per log
    step: step, loss, lr, steps_per_s, samples_per_s), the exported folder (or None), the model (EMA
    weights when EMA is on) and the resolved config."""

    run_dir: Path
    step: int
    history: list[dict[str, Any]]
    export_folder: Path | None
    model: torch.nn.Module
    config: RunConfig
    resumed_from: Path | None = None
    num_processes: int = 1


# keys that may change between a run and its resume
_RESUME_MUTABLE = {"output_dir", "train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                   "train.progress", "train.log_with", "export"}


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in ("data.options", "process.options", "model.options", "objective.options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resume_compatible(saved: Mapping, current: Mapping) -> None:
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in _RESUME_MUTABLE or key.split(".")[0] in _RESUME_MUTABLE:
            continue
        if json.dumps(a.get(key), sort_keys=True) != json.dumps(b.get(key), sort_keys=True):
            diffs.append(f"{key}: run has {a.get(key)!r}, config has {b.get(key)!r}")
    if diffs:
        raise ConfigError(
            "cannot resume: the config differs from the run's saved config.json in keys that change the model "
            "(only train.steps, checkpoint_every, keep_checkpoints, log_every, progress, log_with and export.* may "
            "change):\n  " + "\n  ".join(diffs)
        )


def _check_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir}: cannot create it: {err}") from err
    if not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a folder")
    try:
        probe_writable(run_dir)
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir} is not writable: {err}") from err


def _resolve_mixed_precision(requested: str, use_cpu: bool) -> str:
    if requested == "fp16" and (use_cpu or not torch.cuda.is_available()):
        warnings.warn(
            "train.mixed_precision = 'fp16' has no effect on CPU (Accelerate silently trains in float32 there): "
            "training in float32; use 'bf16' for mixed precision on CPU",
            stacklevel=3,
        )
        return "no"
    return requested


def prepare_run(config: RunConfig | Mapping[str, Any], *, resume: bool = False) -> tuple[Components, Path, Path | None]:
    """Validate a run without starting it: the config, the components (:func:`build_components`) and the
    output folder. Returns ``(components, run_dir, checkpoint to resume from or None)``."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    if not cfg.output_dir:
        raise ConfigError("output_dir: expected the folder of the run, found none (set output_dir or --output-dir)")
    if isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed: expected an int >= 0, found {cfg.seed!r}")
    _check_train_config(cfg.train)
    run_dir = Path(cfg.output_dir)
    ckpt = None
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume: the run folder {run_dir} does not exist")
        if not list_checkpoints(run_dir):
            raise ConfigError(f"cannot resume: {run_dir / CHECKPOINT_DIR} holds no checkpoint")
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"cannot resume: no checkpoint in {run_dir / CHECKPOINT_DIR} passes verification")
        saved = run_dir / "config.json"
        if saved.is_file():
            _check_resume_compatible(json.loads(saved.read_text(encoding="utf-8")), cfg.to_dict())
        step = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["step"]
        if step > cfg.train.steps:
            raise ConfigError(f"cannot resume: the checkpoint is at step {step}, past train.steps = {cfg.train.steps}")
    elif list_checkpoints(run_dir):
        raise ConfigError(
            f"output_dir {run_dir} already holds checkpoints of a run: pass --resume to continue it, or choose "
            f"another output_dir"
        )
    _check_output_dir(run_dir)
    comps = build_components(cfg)
    _check_export_config(cfg.export)
    if cfg.export.enabled:
        folder = Path(cfg.export.folder) if cfg.export.folder else run_dir / "pipeline"
        if folder.exists() and not cfg.export.overwrite:
            raise ConfigError(f"export folder {folder} already exists: remove it or set export.overwrite = true")
        _check_export_folder(folder)
    return comps, run_dir, ckpt


def _check_export_folder(folder: Path) -> None:
    """The export is written to a temporary sibling folder and renamed: its parent must be a writable folder
    (checked now, not after the training)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"export folder {folder} exists and is not a folder")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"export folder {folder}: cannot create the folder it goes in: {err}") from err
    try:
        probe_writable(parent)
    except OSError as err:
        raise ConfigError(f"export folder {folder}: {parent} is not writable: {err}") from err


def train(
    config: RunConfig | Mapping[str, Any],
    *,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> TrainResult:
    """Train the run described by ``config`` (see module docstring and docs/training.md).

    ``resume``: continue from the latest complete checkpoint in ``output_dir`` (an error if there is
    none); without it ``output_dir`` must hold no checkpoint. ``callbacks`` are called on every process
    after every optimizer step with ``{"step", "loss", "model", "accelerator"}`` (``loss`` is this
    process's last micro-batch loss as a tensor); an exception raised there stops the run like a crash
    (nothing more is written)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import ProjectConfiguration, set_seed

    from .scores import ScoreAdapter

    comps, run_dir, ckpt = prepare_run(config, resume=resume)
    cfg, tc = comps.config, comps.config.train
    use_cpu = tc.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    mixed = _resolve_mixed_precision(tc.mixed_precision, use_cpu)
    # AcceleratorState is a per-process singleton; a second single-process run in the same interpreter
    # (tests, notebooks) may use another precision
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed,
        log_with=tc.log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * tc.gradient_accumulation_steps
    if tc.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size = {tc.batch_size} (global) must divide by num_processes x "
            f"gradient_accumulation_steps = {world} x {tc.gradient_accumulation_steps}"
        )
    local_batch = tc.batch_size // per_step
    micro_batch = tc.batch_size // tc.gradient_accumulation_steps

    # identical initial weights on every process (and DDP broadcasts rank 0's anyway)
    set_seed(cfg.seed)
    model = _build_model(cfg.model, comps.dataset.sample_shape)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    base_model = accelerator.unwrap_model(model)
    ema = EMA(base_model, tc.ema_decay) if tc.ema_decay is not None else None

    start = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        start = int(state["step"])
        if ema is not None:
            from safetensors.torch import load_file

            ema_file = ckpt / "ema.safetensors"
            if not ema_file.is_file():
                raise ConfigError(f"cannot resume with train.ema_decay set: {ckpt} has no ema.safetensors")
            ema.load_state_dict(load_file(str(ema_file)), state["ema_updates"])
    if accelerator.is_main_process:
        _write_json_atomic(run_dir / "config.json", cfg.to_dict())
        if cfg.export.command:
            with open(run_dir / "commands.txt", "a", encoding="utf-8") as f:
                f.write(cfg.export.command + "\n")
    if tc.log_with:
        # trackers accept scalars only
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
                   for k, v in _flatten(cfg.to_dict()).items()}
        accelerator.init_trackers("train", config=hparams | {"num_processes": world})

    # Accelerate's wrappers (AcceleratedOptimizer.step / zero_grad, Accelerator.backward / clip_grad_norm_)
    # cost a measurable fraction of a small network's step (a package look-up on disk for an optional
    # optimizer in every optimizer step, inspect.signature in every zero_grad, version checks in every
    # clip). Where they only forward to torch (no gradient scaler, no DeepSpeed / FSDP / XLA / Megatron),
    # the loop calls torch directly: the same operations on the same tensors, so the same numbers.
    from accelerate.utils import DistributedType

    direct = accelerator.scaler is None and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    torch_optimizer = optimizer.optimizer if direct else optimizer
    trainable = list(model.parameters())
    accumulation = tc.gradient_accumulation_steps

    def backward(loss: torch.Tensor) -> None:
        if not direct:
            accelerator.backward(loss / accumulation)
        elif accumulation == 1:  # x / 1 is exactly x, in the value and in the gradient
            loss.backward()
        else:
            (loss / accumulation).backward()

    def clip_gradients() -> None:
        if direct:
            torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
        else:
            accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)

    device = accelerator.device
    data = comps.dataset.data.to(device)
    stream = _DataStream(len(comps.dataset), cfg.seed)
    score_fn = ScoreAdapter(model, comps.process, comps.prediction_type, comps.time_input, check_inputs=False)
    objective = comps.objective

    history: list[dict[str, Any]] = []
    metrics_path = run_dir / "metrics.jsonl"
    bar = None
    if tc.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    t_window, steps_window = time.perf_counter(), 0
    last_saved = start
    step = start
    for step in range(start + 1, tc.steps + 1):
        lr = tc.learning_rate * (min(1.0, step / tc.warmup_steps) if tc.warmup_steps else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(tc.gradient_accumulation_steps):
            first = (step - 1) * tc.batch_size + micro * micro_batch + rank * local_batch
            x = data[stream.indices(first, local_batch).to(device)]
            if tc.per_sample_noise:
                from ._utils import per_sample_generators

                # base seed < 2^40 so that per_sample_generators' seed * 1_000_003 + index stays in int64
                generator = per_sample_generators(_mix(cfg.seed, 0x5EED) % (1 << 40), range(first, first + local_batch),
                                                  device=device)
            else:
                generator = torch.Generator(device=device).manual_seed(_mix(cfg.seed, 0x5EED, step, micro, rank))
            sync = micro == tc.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                loss = objective(score_fn, x, generator=generator)
                backward(loss)
            loss_sum += loss.detach()
            loss_count += 1
        if tc.max_grad_norm is not None:
            clip_gradients()
        torch_optimizer.step()
        torch_optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(base_model)
        steps_window += 1
        for cb in callbacks:
            cb({"step": step, "loss": loss.detach(), "model": base_model, "accelerator": accelerator})
        if step % tc.log_every == 0 or step == tc.steps:
            mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean")
            elapsed = time.perf_counter() - t_window
            rec = {"step": step, "loss": float(mean_loss), "lr": lr,
                   "steps_per_s": steps_window / elapsed if elapsed > 0 else float("nan"),
                   "samples_per_s": steps_window * tc.batch_size / elapsed if elapsed > 0 else float("nan")}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(
                    f"the training loss became {rec['loss']} at step {step}; lower train.learning_rate or set "
                    f"train.max_grad_norm (the last checkpoint is {last_saved})"
                )
            history.append(rec)
            if accelerator.is_main_process:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", it_s=f"{rec['steps_per_s']:.1f}",
                                    samples_s=f"{rec['samples_per_s']:.0f}")
            if tc.log_with:
                accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
            loss_sum.zero_()
            loss_count, steps_window, t_window = 0, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save_checkpoint(accelerator, run_dir, step, ema=ema, keep=tc.keep_checkpoints,
                            extra_state={"seed": cfg.seed})
            last_saved = step
    if bar is not None:
        bar.close()

    final_model = base_model
    if ema is not None and cfg.export.use_ema:
        import copy

        final_model = copy.deepcopy(base_model)
        ema.copy_to(final_model)
    final_model.eval()
    export_folder = None
    if cfg.export.enabled:
        if accelerator.is_main_process:
            export_folder = _export_run(comps, final_model, run_dir, history, world, device)
        accelerator.wait_for_everyone()
        if export_folder is None:
            export_folder = Path(cfg.export.folder) if cfg.export.folder else run_dir / "pipeline"
    if tc.log_with:
        accelerator.end_training()
    return TrainResult(run_dir, step if tc.steps > start else start, history, export_folder, final_model, cfg,
                       resumed_from=ckpt, num_processes=world)


# ============================================================================ export after training
def evaluate_samples(comps: Components, model: torch.nn.Module, *, num_samples: int, sampler: str,
                     sampler_options: Mapping[str, Any], seed: int, device=None) -> tuple[torch.Tensor, list[dict]]:
    """Draw ``num_samples`` samples of the trained ``model`` with a registered sampler and measure them
    against the training data: sliced Wasserstein-2 and energy distance, each with its noise floor (the
    same metric between two disjoint training subsets of the same size, when the data set is large
    enough), and the mode-weight error when the data's mixture is known. Returns ``(samples, results)``
    with results as dicts (name, type, value, dataset)."""
    from . import metrics
    from .registry import get_sampler
    from .scores import ScoreAdapter

    model = model.to(device) if device is not None else model
    score_fn = ScoreAdapter(model, comps.process, comps.prediction_type, comps.time_input)
    gens = torch.Generator(device=device or "cpu").manual_seed(_mix(seed, 0xE7A1))
    shape = (num_samples, *comps.dataset.sample_shape)
    out = get_sampler(sampler, **dict(sampler_options)).sample(score_fn, comps.process, shape=shape,
                                                                 generator=gens, device=device, dtype=torch.float32)
    samples = out.samples.detach().float().cpu()
    data = comps.dataset.data
    g = torch.Generator().manual_seed(_mix(seed, 0xE7A2))
    perm = torch.randperm(len(data), generator=g)
    ref = data[perm[:num_samples]].double()
    results = []
    dataset_name = comps.dataset.name
    sw = metrics.sliced_wasserstein(samples.double().flatten(1), ref.flatten(1),
                                    generator=torch.Generator().manual_seed(_mix(seed, 0xE7A3)))
    ed = metrics.energy_distance(samples.double().flatten(1), ref.flatten(1))
    results.append({"name": f"sliced W2 to {len(ref)} training samples", "type": "sliced_wasserstein",
                    "value": round(float(sw), 5), "dataset": dataset_name})
    results.append({"name": f"energy distance to {len(ref)} training samples", "type": "energy_distance",
                    "value": round(float(ed), 5), "dataset": dataset_name})
    if len(data) >= 2 * num_samples:
        other = data[perm[num_samples:2 * num_samples]].double()
        results.append({"name": "noise floor: sliced W2 between two disjoint training subsets",
                        "type": "sliced_wasserstein_floor",
                        "value": round(float(metrics.sliced_wasserstein(
                            other.flatten(1), ref.flatten(1), generator=torch.Generator().manual_seed(_mix(seed, 0xE7A3)))), 5),
                        "dataset": dataset_name})
        results.append({"name": "noise floor: energy distance between two disjoint training subsets",
                        "type": "energy_distance_floor",
                        "value": round(float(metrics.energy_distance(other.flatten(1), ref.flatten(1))), 5),
                        "dataset": dataset_name})
    if comps.dataset.mixture is not None:
        results.append({"name": "mode-weight error (TV) against the true mixture", "type": "mode_weight_error",
                        "value": round(float(metrics.mode_weight_error(samples.double(), comps.dataset.mixture)), 5),
                        "dataset": dataset_name})
    results.append({"name": f"samples drawn with {sampler} ({out.nfe} score evaluations)", "type": "nfe",
                    "value": int(out.nfe), "dataset": dataset_name})
    return samples, results


def sample_picture(comps: Components, samples: torch.Tensor):
    """A PIL picture of samples: an image grid for images, data vs samples histograms for 2-D points."""
    from .plotting import histogram_panel, image_grid, side_by_side

    if comps.dataset.is_image:
        n = min(len(samples), 64)
        return image_grid(samples[:n].clamp(-1, 1), nrow=int(math.ceil(math.sqrt(n))), scale=4 if samples.shape[-1] >= 16 else 8)
    if samples.ndim == 2 and samples.shape[1] == 2:
        extent = comps.dataset.extent or (-6.0, 6.0, -6.0, 6.0)
        data = comps.dataset.data[: max(len(samples), 1000)]
        return side_by_side([histogram_panel(data, extent, title="training data"),
                             histogram_panel(samples, extent, title="model samples")])
    return None


def _commands(run_dir: Path, last: str | None) -> str | None:
    """Every command that worked on this run folder (a resumed run lists each invocation)."""
    path = run_dir / "commands.txt"
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else []
    return "\n".join(lines) if lines else last


def _export_run(comps: Components, model, run_dir: Path, history, world: int, device) -> Path:
    import yaml

    from .hub import export_pipeline

    cfg = comps.config
    folder = Path(cfg.export.folder) if cfg.export.folder else run_dir / "pipeline"
    samples, results = evaluate_samples(comps, model, num_samples=cfg.export.num_samples, sampler=cfg.export.sampler,
                                        sampler_options=cfg.export.sampler_options, seed=cfg.seed, device=device)
    final_loss = next((h["loss"] for h in reversed(history) if math.isfinite(h["loss"])), None)
    if final_loss is not None:
        results.insert(0, {"name": f"final training loss ({cfg.objective.name}, mean over the last log window)",
                           "type": "training_loss", "value": round(final_loss, 6), "dataset": comps.dataset.name})
    config_dict = cfg.to_dict()
    config_dict["export"] = {k: v for k, v in config_dict["export"].items() if k != "command"}
    card_info = {
        "model_name": cfg.export.model_name or f"score-toolkit-{cfg.data.name}-{cfg.model.name.lower()}",
        "license": cfg.export.license,
        "dataset_name": comps.dataset.name,
        "dataset_description": comps.dataset.description,
        "dataset_id": comps.dataset.hub_id,
        "objective": f"{cfg.objective.name} {comps.objective!r}",
        "training_config_yaml": yaml.safe_dump(config_dict, sort_keys=False),
        "command": _commands(run_dir, cfg.export.command),
        "results": results,
        "sample_image": sample_picture(comps, samples),
        "sampler": f"{cfg.export.sampler} {dict(cfg.export.sampler_options)}",
        "num_processes": world,
        "steps": cfg.train.steps,
        "sample_shape": list(comps.dataset.sample_shape),
    }
    return export_pipeline(model, comps.process, comps.prediction_type, comps.time_input, folder, card_info,
                           overwrite=cfg.export.overwrite)
