"""diffusers' scheduler settings ("knobs"): which are read, mapped or not applied (:data:`DIFFUSERS_KNOBS`),
the warning a config gets for a setting that would change the sampling but is not applied
(:class:`SchedulerConfigWarning`), and the checks of the mapped settings' values."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from .._warnings import caller_stacklevel
from ..processes import TIME_GRIDS, Process


class SchedulerConfigWarning(UserWarning):
    """A diffusers scheduler setting in a config that this scheduler does not apply (the message names it)."""


# ---------------------------------------------------------------------------------------------- diffusers' knobs
#: config fields that describe the model (always read, even when the source left them at its defaults)
MODEL_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "rescale_betas_zero_snr", "sigma_min", "sigma_max", "sampling_eps", "process", "time_input",
                "timestep_type")
#: diffusers settings mapped onto every scheduler here
MAPPED = ("timestep_spacing", "steps_offset", "final_sigmas_type", "set_alpha_to_one", "use_karras_sigmas",
          "use_exponential_sigmas", "use_lu_lambdas", "lambda_min_clipped", "variance_type", "rho")
#: diffusers settings of the multistep solvers, mapped by ScoreDPMSolverScheduler
MULTISTEP = ("solver_order", "lower_order_final", "euler_at_final", "solver_type", "algorithm_type")
_ANY = object()
# diffusers settings that are not applied here: name -> (the values at which the setting changes nothing, what it
# is). A setting marked (_ANY, parent) only acts through its parent setting and is named in the parent's warning.
_NOT_APPLIED: dict[str, tuple[Any, str]] = {
    "thresholding": ((False,), "dynamic thresholding of the predicted sample"),
    "dynamic_thresholding_ratio": (_ANY, "thresholding"),
    "sample_max_value": (_ANY, "thresholding"),
    "clip_sample": ((False,), "clipping of the predicted sample"),
    "clip_sample_range": (_ANY, "clip_sample"),
    "use_beta_sigmas": ((False,), "the beta-distribution time grid (use grid='karras' or 'log_sigma')"),
    "use_flow_sigmas": ((False,), "flow-matching sigmas (a flow model is not a score process)"),
    "flow_shift": ((1.0,), "the flow-matching time shift"),
    "use_dynamic_shifting": ((False,), "resolution-dependent time shifting"),
    "time_shift_type": (_ANY, "use_dynamic_shifting"),
    "shift_terminal": ((None,), "the terminal time shift"),
    "skip_prk_steps": ((True,), "PNDM's Runge-Kutta warm-up steps"),
    "predictor_order": ((2,), "UniPC's predictor order"),
    "corrector_order": ((2,), "UniPC's corrector order"),
    "disable_corrector": (([],), "UniPC's corrector"),
    "solver_p": ((None,), "UniPC's external solver"),
    "predict_x0": ((True,), "UniPC's noise-prediction form"),
    "tau_func": ((None,), "SA-Solver's stochasticity schedule"),
    "noise_sampler_seed": ((None,), "a Brownian-tree noise seed (pass generator= to step instead)"),
    "snr": ((0.15,), "the score-SDE Langevin corrector (use score_toolkit's 'pc' sampler)"),
    "correct_steps": ((1,), "the score-SDE Langevin corrector (use score_toolkit's 'pc' sampler)"),
    "interpolation_type": (("linear",), "log-linear sigma interpolation"),
    "timestep_scaling": ((10.0,), "LCM's boundary-condition scaling"),
    "original_inference_steps": ((50,), "LCM's original schedule"),
    "sigma_data": ((0.5,), "EDM's preconditioning"),
    "sigma_schedule": (("karras",), "EDM's sigma schedule (use grid='karras' or 'log_sigma')"),
}
# on the single-step schedulers: the multistep settings at the values diffusers' DPM-Solver uses by default
_MULTISTEP_NEUTRAL = {"solver_order": (1, 2), "lower_order_final": (True, False), "euler_at_final": (False,),
                      "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
                      "algorithm_type": ("dpmsolver++", "deis", "data_prediction")}

#: how each diffusers scheduler setting is handled: ``"model"`` (describes the model: read),
#: ``"mapped"`` (mapped onto every scheduler here), ``"multistep"`` (mapped by ScoreDPMSolverScheduler, warned
#: about by the single-step ones when it would matter) or ``"warned"`` (not applied; a config that sets it to a
#: value that changes the sampling gives a :class:`SchedulerConfigWarning` naming it)
DIFFUSERS_KNOBS: dict[str, str] = {
    **{k: "model" for k in MODEL_FIELDS if k not in ("process", "time_input")},
    **{k: "mapped" for k in MAPPED},
    **{k: "multistep" for k in MULTISTEP},
    **{k: "warned" for k in _NOT_APPLIED},
}

_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_TYPES = ("sigma_min", "zero")


def warn_knob(cls_name: str, name: str, value: Any, what: str, extra: str = "") -> None:
    """A :class:`SchedulerConfigWarning`: the setting ``name=value`` is not applied (``what`` it is)."""
    warnings.warn(
        f"{cls_name}: scheduler config setting {name}={value!r}{extra} is not applied ({what} is not part of this "
        f"scheduler's update); the setting is kept in the config",
        SchedulerConfigWarning,
        stacklevel=caller_stacklevel("diffusers", "huggingface_hub"),
    )


def warn_learned_variance(cls_name: str, variance_type: str | None, used: str = "") -> None:
    """A :class:`SchedulerConfigWarning` for a learned-variance model output (its variance is dropped)."""
    if variance_type in ("learned", "learned_range"):
        warnings.warn(
            f"{cls_name}: scheduler config setting variance_type={variance_type!r}: the model's learned variance is "
            f"not applied ({used}the output's first half of channels is the prediction)", SchedulerConfigWarning,
            stacklevel=caller_stacklevel("diffusers", "huggingface_hub"))


def warn_not_applied(name: str, cfg: Mapping[str, Any], maps_multistep: bool) -> None:
    """Warn (:class:`SchedulerConfigWarning`) about each setting of ``cfg`` that is not applied and would change
    the sampling; the multistep settings too unless the scheduler maps them (``maps_multistep``)."""
    for key, (neutral, what) in _NOT_APPLIED.items():
        if key not in cfg or neutral is _ANY or cfg[key] in neutral:
            continue
        children = [k for k, (n, parent) in _NOT_APPLIED.items() if n is _ANY and parent == key and k in cfg]
        extra = "".join(f", {k}={cfg[k]!r}" for k in children)
        warn_knob(name, key, cfg[key], what, extra)
    if not maps_multistep:
        for key, neutral in _MULTISTEP_NEUTRAL.items():
            if key in cfg and cfg[key] not in neutral:
                warn_knob(name, key, cfg[key], "a multistep-solver setting (ScoreDPMSolverScheduler maps it)")
        clipped = cfg.get("lambda_min_clipped", -math.inf)
        if clipped is not None and clipped != -math.inf:
            warn_knob(name, "lambda_min_clipped", clipped,
                       "DPM-Solver's log-SNR clipping of the schedule (ScoreDPMSolverScheduler maps it)")


def check_knobs(k: Mapping[str, Any], process: Process, time_input: str, has_table: bool) -> None:
    """Check the values of the mapped settings ``k`` (the scheduler's ``grid``, ``rho`` and diffusers' knobs) for
    a scheduler of ``process`` whose network receives ``time_input`` (``has_table``: a beta table whose index it
    receives)."""
    if k["grid"] not in TIME_GRIDS:
        raise ValueError(f"scheduler config field 'grid': expected one of {TIME_GRIDS}, found {k['grid']!r}")
    rho = k["rho"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise ValueError(f"scheduler config field 'rho': expected a number > 0, found {rho!r}")
    if k["timestep_spacing"] not in (None, *_SPACINGS):
        raise ValueError(
            f"scheduler config field 'timestep_spacing': expected one of {_SPACINGS} or None (the 'grid' setting), "
            f"found {k['timestep_spacing']!r}"
        )
    if k["timestep_spacing"] is not None and not has_table:
        raise ValueError(
            f"scheduler config field 'timestep_spacing': {k['timestep_spacing']!r} picks entries of a beta table "
            f"whose index the network receives; this config describes {type(process).__name__} with time "
            "input " + repr(time_input) + " (use 'grid' instead)"
        )
    offset = k["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"scheduler config field 'steps_offset': expected an int >= 0, found {offset!r}")
    if k["final_sigmas_type"] not in _FINAL_TYPES:
        raise ValueError(
            f"scheduler config field 'final_sigmas_type': expected one of {_FINAL_TYPES}, found "
            f"{k['final_sigmas_type']!r}"
        )
    chosen = [n for n in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas") if k[n]]
    for n in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"):
        if not isinstance(k[n], bool):
            raise TypeError(f"scheduler config field {n!r}: expected a bool, found {k[n]!r}")
    if len(chosen) > 1:
        raise ValueError(f"scheduler config: only one of {chosen} can be set")
    if k["variance_type"] not in (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                  "learned", "learned_range"):
        raise ValueError(
            f"scheduler config field 'variance_type': expected None, fixed_small(_log), fixed_large(_log), "
            f"learned or learned_range, found {k['variance_type']!r}"
        )
