"""Reading scheduler configs: the process, prediction type and time input a scheduler config names
(:func:`read_scheduler_config`) and the keys a scheduler class's config may hold (:func:`scheduler_config_keys`).

No scheduler class lives here, so both :mod:`score_toolkit.schedulers` (:class:`ScoreSDEScheduler`, which
re-exports these names) and :mod:`score_toolkit.diffusers_schedulers` (whose schedulers build on
:class:`ScoreSDEScheduler`'s configs) import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffusers import SchedulerMixin

from ._config import config_keys, strict_config
from .processes import Process, process_from_config, process_from_scheduler_config
from .scores import PREDICTION_TYPES, TIME_INPUTS

__all__ = ["read_scheduler_config", "scheduler_config_keys", "SCORE_SDE_SCHEDULER_KEYS"]

_DDPM_PREDICTIONS = ("epsilon", "v_prediction", "sample")
# schedulers whose config is a DDPM beta table (alphas_cumprod) and whose network receives the table index
_DDPM_STYLE = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
               "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
               "HeunDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
               "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "DDPMParallelScheduler",
               "DDIMParallelScheduler")


_SCORE_SDE = "ScoreSDEScheduler"
#: the config keys of :class:`score_toolkit.schedulers.ScoreSDEScheduler` (its ``__init__`` arguments; a test
#: checks them against the class)
SCORE_SDE_SCHEDULER_KEYS = frozenset({"process", "prediction_type", "time_input"})


def read_scheduler_config(config) -> tuple[Process, str, str]:
    """``(process, prediction_type, time_input)`` encoded by a scheduler config (a dict, a FrozenDict or a
    scheduler object).

    * :class:`ScoreSDEScheduler` -> its stored process, prediction type and time input;
    * ``DDPMScheduler`` and the other DDPM-table schedulers (DDIM, PNDM, ...) ->
      :class:`~score_toolkit.processes.DiscreteVP` with diffusers' exact ``alphas_cumprod``, the config's
      ``prediction_type`` (default ``epsilon``) and time input ``index``;
    * ``ScoreSdeVeScheduler`` -> :class:`~score_toolkit.processes.VESDE`, ``score``, ``sigma``.

    Read strictly, like a network config: a key that the named scheduler class (and its diffusers-compatible
    classes) does not take is an error, and every value present is used (``_use_default_values`` is never
    applied; see ``score_toolkit._config``).

    Raises ValueError naming the field that cannot be mapped.
    """
    if hasattr(config, "config") and isinstance(config.config, Mapping):
        cfg = dict(config.config)
        cfg.setdefault("_class_name", type(config).__name__)
    elif isinstance(config, Mapping):
        cfg = dict(config)
    else:
        raise TypeError(f"expected a scheduler config mapping or a scheduler, found {type(config).__name__}")
    name = cfg.get("_class_name")
    if name == _SCORE_SDE or name == "ScoreSdeVeScheduler" or name in _DDPM_STYLE or (
        name is None and "beta_schedule" in cfg
    ):
        cfg = strict_config(cfg, scheduler_config_keys(name or "DDPMScheduler"), f"the {name or 'DDPM'} scheduler config")
    if name == _SCORE_SDE:
        process = cfg.get("process")
        if not isinstance(process, Mapping):
            raise ValueError(f"scheduler config field 'process': expected a process config dict, found {process!r}")
        prediction_type, time_input = cfg.get("prediction_type", "score"), cfg.get("time_input", "t")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler config field 'prediction_type': expected one of {PREDICTION_TYPES}, found {prediction_type!r}"
            )
        if time_input not in TIME_INPUTS:
            raise ValueError(f"scheduler config field 'time_input': expected one of {TIME_INPUTS}, found {time_input!r}")
        return process_from_config(dict(process)), prediction_type, time_input
    if name == "ScoreSdeVeScheduler":
        return process_from_scheduler_config(cfg), "score", "sigma"
    if name in _DDPM_STYLE or (name is None and "beta_schedule" in cfg):
        prediction_type = cfg.get("prediction_type", "epsilon")
        if prediction_type not in _DDPM_PREDICTIONS:
            raise ValueError(
                f"scheduler config field 'prediction_type' of {name}: expected one of {_DDPM_PREDICTIONS}, "
                f"found {prediction_type!r}"
            )
        if cfg.get("timestep_type", "discrete") != "discrete":
            raise ValueError(
                f"scheduler config field 'timestep_type' of {name}: expected 'discrete' (the network receives the "
                f"table index), found {cfg['timestep_type']!r}"
            )
        return process_from_scheduler_config(cfg), prediction_type, "index"
    raise ValueError(
        f"scheduler config field '_class_name': cannot map {name!r} to a process; expected ScoreSDEScheduler, "
        f"ScoreSdeVeScheduler or a DDPM-table scheduler ({', '.join(_DDPM_STYLE[:3])}, ...)"
    )


def scheduler_config_keys(name: str) -> set[str]:
    """The keys a config of the scheduler class ``name`` (:class:`ScoreSDEScheduler` or a diffusers scheduler)
    may hold: what the class takes, plus what the diffusers schedulers it is compatible with take (diffusers
    keeps those when converting between them). The schedulers of :mod:`score_toolkit.diffusers_schedulers`
    have theirs in :func:`~score_toolkit.diffusers_schedulers.score_scheduler_config_keys` (that module
    builds on this one)."""
    if name == _SCORE_SDE:
        return set(SCORE_SDE_SCHEDULER_KEYS)
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler config field '_class_name': expected a scheduler class, found {name!r}")
    return config_keys(cls)
