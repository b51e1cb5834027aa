"""The config of the schedulers here: the fields every one takes and each one's own (one table, read by
diffusers' ``ConfigMixin`` through the ``__init__`` signature that :func:`config_init` builds from it), and what
the fields say about the model (:func:`resolve_scheduler_spec`: the process, prediction type and time input)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .._config import init_from_fields
from ..processes import Process
from ..scheduler_configs import read_scheduler_config

# name: (default, annotation). The fields that say which model the scheduler serves: those of the configs a
# scheduler here can be built from (a DDPM beta table, a ScoreSdeVeScheduler, a ScoreSDEScheduler process).
SPEC_FIELDS: dict[str, tuple[Any, str]] = {
    "num_train_timesteps": (1000, "int"),
    "beta_start": (0.0001, "float"),
    "beta_end": (0.02, "float"),
    "beta_schedule": ("linear", "str"),
    "trained_betas": (None, "list[float] | None"),
    "prediction_type": (None, "str | None"),
    "rescale_betas_zero_snr": (False, "bool"),
    "sigma_min": (None, "float | None"),
    "sigma_max": (None, "float | None"),
    "sampling_eps": (None, "float | None"),
    "process": (None, "dict[str, Any] | None"),
    "time_input": (None, "str | None"),
}
# the time grid and diffusers' grid settings (mapped onto every scheduler here)
KNOB_FIELDS: dict[str, tuple[Any, str]] = {
    "grid": ("uniform", "str"),
    "rho": (7.0, "float"),
    "timestep_spacing": (None, "str | None"),
    "steps_offset": (0, "int"),
    "final_sigmas_type": ("sigma_min", "str"),
    "use_karras_sigmas": (False, "bool"),
    "use_exponential_sigmas": (False, "bool"),
    "use_lu_lambdas": (False, "bool"),
    "variance_type": (None, "str | None"),
}
# the schedulers' own fields
ANCESTRAL_FIELDS: dict[str, tuple[Any, str]] = {"variance": (None, "str | None")}
DPM_SOLVER_FIELDS: dict[str, tuple[Any, str]] = {
    "solver_order": (2, "int"),
    "lower_order_final": (True, "bool"),
    "euler_at_final": (False, "bool"),
    "solver_type": ("heun", "str"),
    "algorithm_type": ("dpmsolver++", "str"),
    "lambda_min_clipped": (-math.inf, "float"),
}
#: every field a scheduler here takes (a config converted between them keeps the others' fields)
ALL_FIELDS = frozenset({**SPEC_FIELDS, **KNOB_FIELDS, **ANCESTRAL_FIELDS, **DPM_SOLVER_FIELDS})


def config_init(own: Mapping[str, tuple[Any, str]] | None = None, **defaults: Any) -> Callable:
    """Decorator of a scheduler's ``__init__(self, **config)``. Its signature -- which diffusers' ``ConfigMixin``
    reads as the config's keys and defaults -- becomes the shared fields (:data:`SPEC_FIELDS`,
    :data:`KNOB_FIELDS`), with ``defaults`` replacing some of their defaults, then the class's ``own`` fields.
    The decorated ``__init__`` receives every field (given or default), as
    :func:`score_toolkit._config.init_from_fields` says."""
    fields = {**SPEC_FIELDS, **KNOB_FIELDS}
    unknown = set(defaults) - set(fields)
    if unknown:
        raise TypeError(f"config_init: {sorted(unknown)} are not shared fields")
    fields.update({name: (value, fields[name][1]) for name, value in defaults.items()})
    fields.update(own or {})
    return init_from_fields(fields)


def spec_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SPEC_FIELDS` of a full config (the keyword arguments of :func:`resolve_scheduler_spec`)."""
    return {k: config[k] for k in SPEC_FIELDS}


def knobs_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`KNOB_FIELDS` of a full config."""
    return {k: config[k] for k in KNOB_FIELDS}


def _no_energy(process: Process, prediction_type: str) -> None:
    if prediction_type == "energy":
        raise ValueError(
            "scheduler config field 'prediction_type': an energy network's score needs autograd through the "
            "network, which a scheduler's step() cannot do; sample it with score_toolkit.pipeline.ScorePipeline"
        )


def resolve_scheduler_spec(
    *,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas,
    prediction_type: str | None,
    rescale_betas_zero_snr: bool,
    sigma_min: float | None,
    sigma_max: float | None,
    sampling_eps: float | None,
    process: Mapping[str, Any] | None,
    time_input: str | None,
) -> tuple[Process, str, str]:
    """``(process, prediction_type, time_input)`` of a scheduler config whose ``_class_name`` is gone
    (``from_config`` does not pass it on). Which family the fields describe, in order: a ``process`` dict
    (a :class:`~score_toolkit.schedulers.ScoreSDEScheduler` config), ``sigma_min``/``sigma_max`` (a
    ``ScoreSdeVeScheduler`` config), else the DDPM beta table. The mapping itself is
    :func:`~score_toolkit.schedulers.read_scheduler_config`'s."""
    if process is not None:
        cfg: dict[str, Any] = {"_class_name": "ScoreSDEScheduler", "process": process,
                               "prediction_type": prediction_type or "score", "time_input": time_input or "t"}
    elif sigma_min is not None or sigma_max is not None:
        if prediction_type not in (None, "score") or time_input not in (None, "sigma"):
            raise ValueError(
                "scheduler config with sigma_min/sigma_max (ScoreSdeVeScheduler): the network receives sigma and "
                f"returns the score; expected prediction_type 'score' and time_input 'sigma', found "
                f"prediction_type={prediction_type!r}, time_input={time_input!r} (use a 'process' config for others)"
            )
        cfg = {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": num_train_timesteps,
               "sigma_min": 0.01 if sigma_min is None else sigma_min,
               "sigma_max": 1348.0 if sigma_max is None else sigma_max,
               "sampling_eps": 1e-5 if sampling_eps is None else sampling_eps}
    else:
        if time_input not in (None, "index"):
            raise ValueError(
                f"scheduler config field 'time_input': a DDPM beta-table config feeds the network the table index; "
                f"expected 'index' or None, found {time_input!r} (use a 'process' config for other time inputs)"
            )
        cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
               "beta_end": beta_end, "beta_schedule": beta_schedule, "trained_betas": trained_betas,
               "prediction_type": prediction_type or "epsilon", "rescale_betas_zero_snr": rescale_betas_zero_snr}
    proc, pred, ti = read_scheduler_config(cfg)
    _no_energy(proc, pred)
    return proc, pred, ti


#: the docstring of the shared fields (appended to each scheduler's)
SHARED_ARGS_DOC = """
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
        rescale_betas_zero_snr: a DDPM beta-table config (as ``DDPMScheduler``'s).
        sigma_min, sigma_max, sampling_eps: a ``ScoreSdeVeScheduler`` config (VE).
        process, time_input: a :class:`~score_toolkit.schedulers.ScoreSDEScheduler` config (any process).
        grid: the time grid kind (``uniform`` in t, ``log_sigma``, ``karras``); rho: Karras' exponent.
        timestep_spacing, steps_offset: diffusers' integer table indices (``linspace``, ``leading``,
            ``trailing``; beta-table configs) instead of ``grid`` (``None``).
        final_sigmas_type: ``sigma_min`` (the last step ends at ``t_min``) or ``zero`` (it returns the
            denoised sample).
        use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas: diffusers' sigma grids: the Karras grid,
            or uniform in log sigma (= uniform in log-SNR), with the n network evaluations spanning the whole
            range as in diffusers (``grid`` spreads n + 1 points, the last being where the loop ends).
        variance_type: ``learned``/``learned_range``: the model output carries a variance in its second half
            of channels, which is dropped."""
