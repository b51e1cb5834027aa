"""Scheduler configs that name a process, a prediction type and a network's time input.

A saved pipeline's ``scheduler/scheduler_config.json`` is how a score model tells its reader what it
was trained on. Three kinds are written (by :func:`scheduler_for`) and read (by
:func:`read_scheduler_config`):

* a plain diffusers ``DDPMScheduler`` for a :class:`~score_toolkit.processes.DiscreteVP` network that
  receives the table index and predicts ``epsilon``, ``v_prediction`` or ``sample`` (such a folder also
  samples in diffusers' own ``DDPMPipeline``);
* a diffusers ``ScoreSdeVeScheduler`` for a :class:`~score_toolkit.processes.VESDE` score network that
  receives sigma (diffusers' score-SDE VE convention);
* :class:`ScoreSDEScheduler` for everything else: it stores the process's own config.

Reading configs (:func:`read_scheduler_config`, :func:`scheduler_config_keys`) lives in
:mod:`score_toolkit.scheduler_configs`, below both this module and :mod:`score_toolkit.diffusers_schedulers`;
the names are importable from here.

This module path is recorded in saved pipelines (``model_index.json`` names
``score_toolkit.schedulers``): keep it stable. diffusers' loader looks for the name ``SchedulerMixin``
in the module, hence the module-level import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config

from ._config import init_keys, strict_from_config
from .processes import VESDE, DiscreteVP, Process, process_from_config
from .scheduler_configs import _DDPM_PREDICTIONS, read_scheduler_config, scheduler_config_keys
from .scores import PREDICTION_TYPES, TIME_INPUTS

__all__ = ["ScoreSDEScheduler", "scheduler_for", "read_scheduler_config", "scheduler_config_keys", "SchedulerMixin"]

def _check_prediction_and_time(prediction_type, time_input) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"expected prediction_type in {PREDICTION_TYPES}, found {prediction_type!r}")
    if not isinstance(time_input, str) or time_input not in TIME_INPUTS:
        raise ValueError(
            f"expected time_input in {TIME_INPUTS} (a callable time input cannot be saved), found {time_input!r}"
        )


class ScoreSDEScheduler(SchedulerMixin, ConfigMixin):
    """The scheduler component of a score_toolkit pipeline whose process, prediction type or time input
    has no diffusers scheduler (e.g. a continuous VP SDE, a sub-VP SDE, an energy network).

    Args:
        process: the process's config dict, including ``_class_name`` (``process.config`` works);
            rebuilt with :func:`~score_toolkit.processes.process_from_config`.
        prediction_type: what the network predicts (``score``, ``epsilon``, ``v_prediction``, ``sample``,
            ``energy``).
        time_input: what the network receives as its time (``t``, ``sigma``, ``index``).

    diffusers' scheduler contract except ``step``: ``init_noise_sigma`` (the prior's std),
    ``set_timesteps(num_inference_steps=None, device=None, timesteps=None, sigmas=None, kind="uniform")`` /
    ``timesteps`` (the network inputs at the grid times from 1 down; ``time_grid`` holds the ``n + 1``
    times ending at ``t_min``, ``sigmas`` the noise-to-signal ratios), ``step_index``, ``begin_index``,
    ``set_begin_index``, ``index_for_timestep``, ``add_noise``, ``get_velocity``, ``scale_model_input``
    (identity), ``order = 1``; all as in :mod:`score_toolkit.diffusers_schedulers`, whose ancestral scheduler
    does the work. It has no ``step()`` (a ``TypeError`` says what to use): it names the model for
    ScorePipeline's samplers; for a diffusers loop use e.g.
    ``ScoreDPMSolverScheduler.from_config(scheduler.config)``.
    """

    config_name = "scheduler_config.json"
    order = 1

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # strict like a network config (score_toolkit._config): typos are errors, present values are used
        config_dict, kwargs = strict_from_config(config_dict, kwargs, init_keys(cls), "ScoreSDEScheduler")
        return super().extract_init_dict(config_dict, **kwargs)

    @register_to_config
    def __init__(self, process: Mapping[str, Any] | None = None, prediction_type: str = "score", time_input: str = "t"):
        if process is None:
            raise ValueError("expected process, the process's config dict with its _class_name; found None")
        if isinstance(process, Process):
            raise TypeError(
                "expected the process's config dict with its _class_name, found a Process object: build the "
                "scheduler with scheduler_for(process, prediction_type, time_input)"
            )
        if not isinstance(process, Mapping) or "_class_name" not in process:
            raise ValueError(
                f"expected process to be a config dict with a _class_name (VESDE, VPSDE, SubVPSDE, DiscreteVP), "
                f"found {process!r}"
            )
        _check_prediction_and_time(prediction_type, time_input)
        self.process = process_from_config(dict(process))
        self.init_noise_sigma = float(self.process.prior_std)
        self._grids: dict[str, Any] = {}
        self._grid = self._grid_scheduler("uniform")

    def _grid_scheduler(self, kind: str):
        """The diffusers_schedulers scheduler that holds the grid and the step counter for this process."""
        if kind not in self._grids:
            from .diffusers_schedulers import ScoreAncestralScheduler

            self._grids[kind] = ScoreAncestralScheduler(
                process=dict(self.config.process), prediction_type="score" if self.config.prediction_type in (
                    "energy", "epsilon") else self.config.prediction_type, time_input=self.config.time_input,
                grid=kind)
        return self._grids[kind]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      kind: str = "uniform") -> None:
        """diffusers' ``set_timesteps`` (exactly one of ``num_inference_steps``, ``timesteps``, ``sigmas``); the
        grid is the process's time grid of that ``kind`` (``uniform``, ``log_sigma``, ``karras``)."""
        self._grid = self._grid_scheduler(kind)
        self._grid.set_timesteps(num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas)

    num_inference_steps = property(lambda self: self._grid.num_inference_steps)
    timesteps = property(lambda self: self._grid.timesteps)
    time_grid = property(lambda self: self._grid.time_grid)
    sigmas = property(lambda self: self._grid.sigmas)
    step_index = property(lambda self: self._grid.step_index)
    begin_index = property(lambda self: self._grid.begin_index)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._grid.set_begin_index(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        return self._grid.index_for_timestep(timestep, schedule_timesteps)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward marginal ``alpha(t) x_0 + sigma(t) noise`` at network inputs ``timesteps``."""
        return self._grid.add_noise(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ``alpha(t) noise - sigma(t) x_0`` at network inputs ``timesteps``."""
        return self._grid.get_velocity(sample, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, *args, **kwargs):
        raise TypeError(
            "ScoreSDEScheduler has no step(): it names the process, prediction type and time input for "
            "ScorePipeline's samplers. In a diffusers loop use a stepping scheduler built from its config: "
            "score_toolkit.diffusers_schedulers.ScoreDPMSolverScheduler.from_config(scheduler.config) (or "
            "ScoreAncestralScheduler, ScoreEulerMaruyamaScheduler)"
        )

    def __len__(self) -> int:
        return int(self.process.num_train_timesteps)


def scheduler_for(process: Process, prediction_type: str, time_input: str) -> SchedulerMixin:
    """The scheduler that encodes ``(process, prediction_type, time_input)``: a diffusers
    ``DDPMScheduler`` or ``ScoreSdeVeScheduler`` when one represents the triple exactly (checked by
    reading it back), else a :class:`ScoreSDEScheduler`."""
    if not isinstance(process, Process):
        raise TypeError(f"expected a score_toolkit Process, found {type(process).__name__}")
    _check_prediction_and_time(prediction_type, time_input)
    candidate = None
    if isinstance(process, DiscreteVP) and time_input == "index" and prediction_type in _DDPM_PREDICTIONS:
        from diffusers import DDPMScheduler

        candidate = DDPMScheduler.from_config(process.to_scheduler_config(prediction_type))
    elif isinstance(process, VESDE) and time_input == "sigma" and prediction_type == "score":
        from diffusers import ScoreSdeVeScheduler

        candidate = ScoreSdeVeScheduler.from_config(process.to_scheduler_config("score"))
    if candidate is not None and read_scheduler_config(candidate) == (process, prediction_type, time_input):
        return candidate
    return ScoreSDEScheduler(process=_process_dict(process), prediction_type=prediction_type, time_input=time_input)


def _process_dict(process: Process) -> dict[str, Any]:
    cfg = {k: v for k, v in process.config.items() if not k.startswith("_")}
    cfg["_class_name"] = type(process).__name__
    return cfg
