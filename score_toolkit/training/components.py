"""The parts of a run built from its configuration and checked against each other: the data set, the process,
the network (one forward call on two samples) and the objective (:func:`build_components`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import MODEL_CLASSES, PROCESS_CLASSES, ConfigError, ModelConfig, ObjectiveConfig, ProcessConfig, RunConfig

__all__ = ["Components", "build_components"]


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
    from .. import processes

    if cfg.name not in PROCESS_CLASSES:
        close = difflib.get_close_matches(cfg.name, PROCESS_CLASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown process {cfg.name!r}.{hint} Available: {', '.join(PROCESS_CLASSES)}")
    try:
        return getattr(processes, cfg.name)(**cfg.options)
    except (TypeError, ValueError) as err:  # unknown option, or a value out of range (beta_max = .inf)
        raise ConfigError(f"process {cfg.name} (process.options {dict(cfg.options)}): {err}") from err


def _model_class(name: str):
    if name == "UNet2DModel":
        from diffusers import UNet2DModel

        return UNet2DModel
    from .. import models

    return getattr(models, name)


def _build_model(cfg: ModelConfig, sample_shape: tuple[int, ...]) -> torch.nn.Module:
    if cfg.name not in MODEL_CLASSES:
        close = difflib.get_close_matches(cfg.name, MODEL_CLASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model {cfg.name!r}.{hint} Available: {', '.join(MODEL_CLASSES)}")
    options = dict(cfg.options)
    if cfg.preset is not None:
        if cfg.name != "UNet2DModel":
            raise ConfigError(f"model.preset = {cfg.preset!r} is a UNet2DModel layout: set model.name: UNet2DModel, "
                              f"found {cfg.name!r}")
        from ..models.presets import unet_preset

        try:
            options = unet_preset(cfg.preset, **options)
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from err
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
                hint = ""
                if key == "in_channels" and found in (1, 3) and c in (1, 3):
                    kind = {1: "grey (1-channel)", 3: "RGB (3-channel)"}
                    hint = (f": {kind[c]} images for a {found}-channel network; convert them with the data option "
                            f"channels: {found}, or set model.options.in_channels/out_channels to {c}")
                raise ConfigError(f"model.options.{key} = {found!r} but the data give {want} (samples "
                                  f"{sample_shape}){hint}")
        blocks = [*options.get("down_block_types", []), *options.get("up_block_types", [])]
        if c != 3 and any("Skip" in str(b) for b in blocks):
            raise ConfigError(
                f"the UNet's skip blocks ({sorted({b for b in blocks if 'Skip' in str(b)})}, NCSN++ style) work on "
                f"3-channel images only (diffusers builds their skip convolutions for RGB), but the data have {c} "
                f"channel(s): use data option channels: 3 or blocks without skip connections"
            )
    cls = _model_class(cfg.name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"model {cfg.name}: {err}") from err


def _is_variance_exploding(process) -> bool:
    t = torch.tensor([process.t_min, process.t_max], dtype=torch.float64)
    return bool(process.log_alpha(t).abs().max() < 1e-12)


def _build_objective(cfg: ObjectiveConfig, process, dataset, prediction_type: str):
    from ..objectives import OBJECTIVES, get_objective

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
    from ..data import load_dataset
    from ..scores import PREDICTION_TYPES, TIME_INPUTS, ScoreAdapter

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
    if cfg.train.gradient_checkpointing and not getattr(model, "_supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: the network {m.name} does not support it (UNet2DModel does)")
    objective = _build_objective(cfg.objective, process, dataset, m.prediction_type)
    # one forward call on two samples at both ends of the time range
    probe = model
    table = getattr(model, "config", {}).get("num_class_embeds") or getattr(model, "config", {}).get("num_classes")
    if table is not None:  # a label-conditional network: probe it with the null label (the last row)
        null = torch.full((2,), int(table) - 1, dtype=torch.long)

        def probe(y, t):
            return model(y, t, class_labels=null[: y.shape[0]])
    score_fn = ScoreAdapter(probe, process, m.prediction_type, m.time_input)
    x = dataset.head(2)
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
