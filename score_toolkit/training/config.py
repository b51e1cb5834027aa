"""The run configuration: the dataclasses of a run (:class:`RunConfig` and its sections), reading a YAML/JSON
file (:func:`load_config`) with ``--set KEY=VALUE`` overrides (:func:`apply_overrides`), and the checks of the
``train`` and ``export`` sections. Unknown keys are errors that name the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "DataConfig", "ProcessConfig", "ModelConfig", "ObjectiveConfig", "TrainConfig", "ExportConfig", "ConfigError", "load_config", "apply_overrides", "MODEL_CLASSES", "PROCESS_CLASSES", "MIXED_PRECISION"]


MODEL_CLASSES = ("ScoreMLP", "EnergyMLP", "UNet2DModel")
PROCESS_CLASSES = ("VESDE", "VPSDE", "SubVPSDE", "DiscreteVP")
MIXED_PRECISION = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """An invalid or inconsistent training configuration (raised before any training work)."""



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
    ``prediction_type`` and ``time_input`` as in :class:`~score_toolkit.scores.ScoreAdapter`. ``preset`` (UNet2DModel
    only) starts ``options`` from a layout of :mod:`score_toolkit.models.presets` (``options`` override it)."""

    name: str = "ScoreMLP"
    prediction_type: str = "epsilon"
    time_input: str = "t"
    options: dict = field(default_factory=dict)
    preset: str | None = None


@dataclass
class ObjectiveConfig:
    """``name``: one of :data:`score_toolkit.objectives.OBJECTIVES`; ``options``: its options (the process
    is set from the ``process`` section; the time of the noise-free objectives defaults to ``t_min``)."""

    name: str = "continuous_dsm"
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``batch_size`` is the GLOBAL batch of one optimizer step (summed over
    processes and accumulation micro-steps); it must divide by ``num_processes * gradient_accumulation_steps``.
    ``lr_scheduler``: a schedule of ``diffusers.optimization.get_scheduler`` (``constant_with_warmup``, ``linear``,
    ``cosine``, ``cosine_with_restarts``, ``polynomial``, ``constant``, ``piecewise_constant``) over ``steps`` with
    ``warmup_steps``; ``lr_scheduler_options``: its ``num_cycles``, ``power`` or ``step_rules``.
    ``mixed_precision``: ``no``, ``bf16`` or ``fp16``; null (the default) takes Accelerate's setting (``accelerate
    launch --mixed_precision``, its config file, ``ACCELERATE_MIXED_PRECISION``; ``no`` without one).
    ``log_with``: any tracker Accelerate supports (``tensorboard``, ``wandb``, ``mlflow``, ... or ``all``), or a
    list. ``gradient_checkpointing``: recompute activations in the backward pass (UNet2DModel).
    ``compile``: ``torch.compile`` the network (Accelerate's dynamo backend ``inductor``).
    ``label_dropout``: for a network with a class-label table (``UNet2DModel`` ``num_class_embeds`` or ``ScoreMLP``
    ``num_classes``; its last row is the null label), the probability of training on the null label instead of the
    example's label (classifier-free guidance, docs/conditioning.md)."""

    steps: int = 1000
    batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_scheduler: str = "constant_with_warmup"
    lr_scheduler_options: dict = field(default_factory=dict)
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = None
    ema_decay: float | None = 0.999
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    progress: bool = True
    log_with: str | list | None = None
    per_sample_noise: bool = False
    cpu: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    label_dropout: float = 0.1


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
        value = _number_from_text(value, hint)
        if not _type_ok(value, hint):
            raise ConfigError(
                f"config key {path + name!r}: expected {_hint_name(hint)}, found {value!r} ({type(value).__name__})"
            )
        if hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint)):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        kwargs[name] = dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, tuple) else value
    return cls(**kwargs)


def _number_from_text(value, hint):
    """A float field given as text that spells a number: YAML 1.1 (PyYAML) reads ``1e-3`` as the string
    ``'1e-3'`` (it wants ``1.0e-3``), which is what users write; accept it. Other text is left to the type check."""
    wants_float = hint is float or (typing.get_origin(hint) is typing.Union and float in typing.get_args(hint))
    if wants_float and isinstance(value, str) and not (typing.get_origin(hint) is typing.Union
                                                        and str in typing.get_args(hint)):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


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
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected the config file {p} to hold a mapping of sections (output_dir, data, model, "
                          f"train, ...), found a {type(raw).__name__}")
    return RunConfig.from_dict(apply_overrides(raw, overrides))


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the nested dict ``config`` with ``KEY.PATH=VALUE`` overrides applied (the value is
    parsed as YAML: ``100`` is an int, ``[32, 64]`` a list, ``null`` None, ``bf16`` a string)."""
    import copy

    import yaml

    if not isinstance(config, Mapping):
        raise ConfigError(f"expected the config to be a mapping of sections, found a {type(config).__name__}")
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
    if isinstance(t.label_dropout, bool) or not isinstance(t.label_dropout, (int, float)) \
            or not 0 <= t.label_dropout <= 1:
        raise ConfigError(f"train.label_dropout: expected a probability in [0, 1], found {t.label_dropout!r}")
    if t.mixed_precision is not None and t.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"train.mixed_precision: expected one of {MIXED_PRECISION} or null (Accelerate's setting), "
                          f"found {t.mixed_precision!r}")
    _check_lr_scheduler(t)
    if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: expected a number in [0, 1) or null (no EMA), found {t.ema_decay}")
    check_trackers(t.log_with)


SCHEDULER_OPTIONS = ("num_cycles", "power", "step_rules")


def _check_lr_scheduler(t: TrainConfig) -> None:
    from diffusers.optimization import SchedulerType

    names = [s.value for s in SchedulerType]
    if t.lr_scheduler not in names:
        close = difflib.get_close_matches(str(t.lr_scheduler), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"train.lr_scheduler: expected one of {names}, found {t.lr_scheduler!r}{hint}")
    unknown = sorted(set(t.lr_scheduler_options) - set(SCHEDULER_OPTIONS))
    if unknown:
        raise ConfigError(f"train.lr_scheduler_options: unknown option(s) {unknown}; expected a subset of "
                          f"{list(SCHEDULER_OPTIONS)}")
    if t.lr_scheduler == "piecewise_constant" and "step_rules" not in t.lr_scheduler_options:
        raise ConfigError("train.lr_scheduler = 'piecewise_constant' needs train.lr_scheduler_options.step_rules "
                          "(e.g. '1:10,0.1:20,0.01')")
    if t.lr_scheduler == "constant" and t.warmup_steps:
        raise ConfigError(f"train.lr_scheduler = 'constant' has no warm-up but train.warmup_steps = {t.warmup_steps}: "
                          f"use constant_with_warmup")


def check_trackers(log_with) -> list[str]:
    """Validate ``train.log_with`` (null, a tracker name Accelerate supports, ``all``, or a list of names) and
    check that each named tracker's package is installed. Returns the names."""
    from accelerate import utils as accelerate_utils
    from accelerate.utils import LoggerType

    if log_with is None:
        return []
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    known = [t.value for t in LoggerType]
    for name in names:
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"train.log_with: expected null, one of {known} or a list of them, found {name!r}{hint}")
        check = getattr(accelerate_utils, f"is_{name}_available", None)
        if name != "all" and check is not None and not check():
            how = "pip install 'score-toolkit[tensorboard]'" if name == "tensorboard" else f"pip install {name}"
            raise ConfigError(f"train.log_with = {name!r} needs the {name} package: {how}")
    return names


def _check_export_config(e: ExportConfig) -> None:
    if e.num_samples < 1:
        raise ConfigError(f"export.num_samples: expected a positive int, found {e.num_samples}")
    if not e.enabled:
        return
    from ..registry import get_sampler

    try:
        get_sampler(e.sampler, **e.sampler_options)
    except (KeyError, ValueError, TypeError, LookupError) as err:
        raise ConfigError(f"export.sampler: {err}") from err
