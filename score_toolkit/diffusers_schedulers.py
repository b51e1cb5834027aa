"""score_toolkit's fixed-grid samplers as diffusers schedulers (``SchedulerMixin`` + ``ConfigMixin``).

Each class here runs one step of a score_toolkit sampler inside any diffusers denoising loop, including the
pipelines that start mid-schedule (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``,
SDEdit-style loops)::

    from diffusers import DDPMPipeline
    from score_toolkit.diffusers_schedulers import ScoreDPMSolverScheduler

    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.scheduler = ScoreDPMSolverScheduler.from_config(pipe.scheduler.config)
    images = pipe(num_inference_steps=25).images

=============================  ===========================  ==========================================
scheduler                      sampler it mirrors           update (shared code)
=============================  ===========================  ==========================================
:class:`ScoreAncestralScheduler`       ``ancestral``        exact Gaussian posterior (``forward_transition``)
:class:`ScoreEulerMaruyamaScheduler`   ``euler_maruyama``   Euler-Maruyama step of the reverse SDE
:class:`ScoreDPMSolverScheduler`       ``dpmpp_2m`` (order  DPM-Solver++ multistep (``multistep_coefficients``)
                                       1 = DDIM, 2, 3)
=============================  ===========================  ==========================================

The process, the prediction type and the network's time input come from the config exactly as
:func:`score_toolkit.schedulers.read_scheduler_config` reads them, so ``from_config`` accepts a
``DDPMScheduler``/``DDIMScheduler``/``DPMSolverMultistepScheduler``/... config (discrete VP table, the network
receives the table index), a ``ScoreSdeVeScheduler`` config (VE, the network receives sigma and returns the
score) or a :class:`~score_toolkit.schedulers.ScoreSDEScheduler` config (any process).

**diffusers' scheduler contract.** ``set_timesteps(num_inference_steps=None, device=None, timesteps=None,
sigmas=None)``, ``timesteps`` (the network inputs), ``sigmas`` (noise-to-signal ratios ``sigma / alpha`` of the
grid, k-diffusion's convention, with the final one), ``step_index``, ``begin_index``, ``set_begin_index``,
``index_for_timestep``, ``scale_model_input`` (identity), ``init_noise_sigma``, ``order`` (1: one network
evaluation per step), ``add_noise``, ``get_velocity`` and, for beta-table processes whose network receives the
table index, ``betas``/``alphas``/``alphas_cumprod``. The step counter follows diffusers: the first ``step``
after ``set_timesteps`` starts at ``begin_index`` (set by img2img pipelines) or at the index of its timestep,
and every ``step`` advances it; a ``timestep`` that is not the one at ``step_index`` is an error. The
multistep solver keeps the denoised values of its previous steps (diffusers' ``model_outputs``), not samples,
so a pipeline may hand ``step`` a sample it modified (inpainting) or start anywhere in the schedule.

**diffusers' knobs.** Every setting of diffusers' schedulers is either mapped (``timestep_spacing``,
``steps_offset``, ``final_sigmas_type``, ``set_alpha_to_one``, ``use_karras_sigmas``, ``use_exponential_sigmas``,
``use_lu_lambdas``, ``lambda_min_clipped``, ``variance_type``, and for the multistep solver ``solver_order``,
``lower_order_final``, ``euler_at_final``, ``solver_type``, ``algorithm_type="dpmsolver++"``) or, when a config
sets it to a value that would change the sampling, reported by a :class:`SchedulerConfigWarning` naming it
(``DIFFUSERS_KNOBS`` lists which is which; docs/pipeline.md has the table). Keys a source scheduler left at its
own defaults (``_use_default_values``) take our defaults, as between diffusers' schedulers, except the fields
that describe the model (the beta table, the sigma range, the prediction type), which are always kept.

This module path is recorded in saved pipelines (``model_index.json``): keep it stable. diffusers' loader
needs the name ``SchedulerMixin`` in it, hence the module-level import; the module must be imported before
``DiffusionPipeline.from_pretrained`` loads such a pipeline.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ._config import config_keys, init_keys, strict_config
from ._utils import randn
from .processes import TIME_GRIDS, Process
from .samplers.ancestral import forward_transitions
from .samplers.dpm_solver import _denoise, _lincomb, multistep_coefficients
from .scheduler_configs import _DDPM_STYLE, read_scheduler_config
from .scores import ScoreAdapter, prediction_to_score

__all__ = [
    "ScoreAncestralScheduler",
    "ScoreEulerMaruyamaScheduler",
    "ScoreDPMSolverScheduler",
    "ScoreSchedulerOutput",
    "SchedulerConfigWarning",
    "SCHEDULER_CLASSES",
    "DIFFUSERS_KNOBS",
    "SchedulerMixin",
]


class SchedulerConfigWarning(UserWarning):
    """A diffusers scheduler setting in a config that this scheduler does not apply (the message names it)."""


@dataclass
class ScoreSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next grid time (feed it to the next ``step``);
    ``pred_original_sample``: Tweedie's denoiser ``E[x_0 | x_t]`` at the current time (for previews)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- diffusers' knobs
#: config fields that describe the model (always read, even when the source left them at its defaults)
_MODEL_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr", "sigma_min", "sigma_max", "sampling_eps", "process", "time_input",
                 "timestep_type")
#: diffusers settings mapped onto every scheduler here
_MAPPED = ("timestep_spacing", "steps_offset", "final_sigmas_type", "set_alpha_to_one", "use_karras_sigmas",
           "use_exponential_sigmas", "use_lu_lambdas", "lambda_min_clipped", "variance_type", "rho")
#: diffusers settings of the multistep solvers, mapped by ScoreDPMSolverScheduler
_MULTISTEP = ("solver_order", "lower_order_final", "euler_at_final", "solver_type", "algorithm_type")
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
    **{k: "model" for k in _MODEL_FIELDS if k not in ("process", "time_input")},
    **{k: "mapped" for k in _MAPPED},
    **{k: "multistep" for k in _MULTISTEP},
    **{k: "warned" for k in _NOT_APPLIED},
}

_SPACINGS = ("linspace", "leading", "trailing")
_FINAL_TYPES = ("sigma_min", "zero")


def _warn_knob(cls_name: str, name: str, value: Any, what: str, extra: str = "") -> None:
    warnings.warn(
        f"{cls_name}: scheduler config setting {name}={value!r}{extra} is not applied ({what} is not part of this "
        f"scheduler's update); the setting is kept in the config",
        SchedulerConfigWarning,
        stacklevel=4,
    )


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


def _scalar(value) -> float:
    """A timestep given as a number or as a tensor whose entries are all one value."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise ValueError(f"expected one timestep for the whole batch, found {value.tolist()!r}")
        return float(flat[0])
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected timestep to be a number or a tensor, found {type(value).__name__}")


class _ScoreScheduler(SchedulerMixin, ConfigMixin):
    """Shared machinery: the process from the config, the time grid and the diffusers step counter, the timestep
    table, the score of a model output, ``add_noise``/``get_velocity``. Subclasses implement :meth:`_update`
    (one step from grid index ``i``)."""

    config_name = "scheduler_config.json"
    order = 1
    # diffusers' schedulers whose configs round-trip through ours (and back) with every value kept, for the
    # beta-table configs ours are usually built from; ``compatibles`` narrows this to the instance's family
    _compatibles = list(_DDPM_STYLE)
    #: the registered sampler whose update this scheduler runs
    sampler_name: ClassVar[str] = ""
    #: whether the update draws fresh noise
    stochastic: ClassVar[bool] = True
    #: which diffusers formulas ``timestep_spacing`` follows ("ddpm": DDPMScheduler's, "dpm": DPM-Solver's)
    _spacing_style: ClassVar[str] = "ddpm"
    #: the diffusers settings this class maps besides ``_MAPPED``
    _own_knobs: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ config reading
    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        config_dict = dict(config_dict)
        defaulted = set(config_dict.get("_use_default_values", None) or [])
        # Unknown keys (typos) are errors, as in network configs (score_toolkit._config); _use_default_values goes.
        config_dict = strict_config(config_dict, score_scheduler_config_keys(cls) | set(kwargs),
                                    f"the {cls.__name__} config")
        # diffusers semantics for the sampling settings: those the source left at its defaults (in memory:
        # diffusers never writes that list to a file) take ours. The fields that describe the model are kept
        # whatever their origin (a default ScoreSdeVeScheduler's sigma range, a default DDPMScheduler's table
        # describe the model as much as explicit ones).
        config_dict = {k: v for k, v in config_dict.items() if k not in defaulted or k in _MODEL_FIELDS}
        source = config_dict.get("_class_name")
        timestep_type = kwargs.get("timestep_type", config_dict.get("timestep_type", "discrete"))
        if timestep_type != "discrete":
            raise ValueError(
                f"scheduler config field 'timestep_type': expected 'discrete' (the network receives the table index), "
                f"found {timestep_type!r}"
            )
        merged = {**config_dict, **kwargs}
        # set_alpha_to_one (DDIM, PNDM): the last step ends at alpha = 1 (zero noise) or at the first table entry
        if "set_alpha_to_one" in merged and "final_sigmas_type" not in merged:
            final = "zero" if merged["set_alpha_to_one"] else "sigma_min"
            config_dict["final_sigmas_type"] = final
        cls._warn_not_applied(merged, source)
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def _warn_not_applied(cls, cfg: Mapping[str, Any], source) -> None:
        name = cls.__name__
        for key, (neutral, what) in _NOT_APPLIED.items():
            if key not in cfg or neutral is _ANY or cfg[key] in neutral:
                continue
            children = [k for k, (n, parent) in _NOT_APPLIED.items() if n is _ANY and parent == key and k in cfg]
            extra = "".join(f", {k}={cfg[k]!r}" for k in children)
            _warn_knob(name, key, cfg[key], what, extra)
        if "solver_order" not in cls._own_knobs:
            for key, neutral in _MULTISTEP_NEUTRAL.items():
                if key in cfg and cfg[key] not in neutral:
                    _warn_knob(name, key, cfg[key], "a multistep-solver setting (ScoreDPMSolverScheduler maps it)")
            clipped = cfg.get("lambda_min_clipped", -math.inf)
            if clipped is not None and clipped != -math.inf:
                _warn_knob(name, "lambda_min_clipped", clipped,
                           "DPM-Solver's log-SNR clipping of the schedule (ScoreDPMSolverScheduler maps it)")

    def _setup(self, spec_kwargs: dict[str, Any], knobs: dict[str, Any]) -> None:
        self.process, self.prediction_type, self.time_input = resolve_scheduler_spec(**spec_kwargs)
        # store what the fields resolved to, so that the saved config says it explicitly
        resolved: dict[str, Any] = {"prediction_type": self.prediction_type, "time_input": self.time_input}
        if spec_kwargs["process"] is None and (spec_kwargs["sigma_min"] is not None or spec_kwargs["sigma_max"] is not None):
            c = self.process.config
            resolved.update(sigma_min=float(c.sigma_min), sigma_max=float(c.sigma_max), sampling_eps=float(c.t_min))
        self.register_to_config(**resolved)
        self._zero_snr = bool(getattr(self.process, "zero_terminal_snr", False))
        if self._zero_snr and self.prediction_type not in ("v_prediction", "sample"):
            raise ValueError(
                f"scheduler config field 'prediction_type': with a zero-terminal-SNR table (rescale_betas_zero_snr) "
                f"alpha(1) = 0, where an {self.prediction_type} prediction does not determine the denoised sample; "
                "expected 'v_prediction' or 'sample'"
            )
        self._check_knobs(knobs)
        # the network-time map is the score adapter's, so the network sees what a score_toolkit sampler feeds it
        self._adapter = ScoreAdapter(_no_model, self.process, self.prediction_type, self.time_input,
                                     check_inputs=False)
        self.init_noise_sigma = float(self.process.prior_std)
        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        if self._has_table():
            ac = self.process.alphas_cumprod
            self.sigmas = ((1 - ac) / ac).sqrt().to(torch.float32)
        self._t: list[float] = []
        self._final_zero = False
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _check_knobs(self, k: dict[str, Any]) -> None:
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
        if k["timestep_spacing"] is not None and not self._has_table():
            raise ValueError(
                f"scheduler config field 'timestep_spacing': {k['timestep_spacing']!r} picks entries of a beta table "
                f"whose index the network receives; this config describes {type(self.process).__name__} with time "
                "input " + repr(self.time_input) + " (use 'grid' instead)"
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

    def _has_table(self) -> bool:
        from .processes import DiscreteVP

        return isinstance(self.process, DiscreteVP) and self.time_input == "index"

    # ------------------------------------------------------------------ the training-side attributes
    def _table(self) -> torch.Tensor:
        if not self._has_table():
            raise AttributeError(
                f"{type(self).__name__} of {type(self.process).__name__} with time input {self.time_input!r} has no "
                "beta table (betas/alphas/alphas_cumprod exist for beta-table configs whose network receives the "
                "table index); use .process.marginal(t) for alpha and sigma"
            )
        return self.process.alphas_cumprod

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The table ``alpha_bar_i`` (float32, as diffusers' schedulers hold it)."""
        return self._table().to(torch.float32)

    @property
    def alphas(self) -> torch.Tensor:
        """``alpha_i = alpha_bar_i / alpha_bar_{i-1}`` (float32)."""
        ac = self._table()
        return torch.cat([ac[:1], ac[1:] / ac[:-1]]).to(torch.float32)

    @property
    def betas(self) -> torch.Tensor:
        """``beta_i = 1 - alpha_i`` (float32)."""
        ac = self._table()
        return (1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])).to(torch.float32)

    @property
    def compatibles(self) -> list[type]:
        """The schedulers whose configs round-trip through this one's with every value kept: ours, and the
        diffusers schedulers of the same family (the beta-table ones for a table config, ``ScoreSdeVeScheduler``
        for a VE config of that form, none for a process config)."""
        import diffusers

        cfg = self.config
        if cfg.get("process") is not None:
            names: list[str] = []
        elif cfg.get("sigma_min") is not None:
            names = ["ScoreSdeVeScheduler"]
        else:
            names = list(_DDPM_STYLE)
        found = [getattr(diffusers, n) for n in names if hasattr(diffusers, n)]
        return [*SCHEDULER_CLASSES.values(), *found]

    # ------------------------------------------------------------------ the grid
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """Fix the grid of the sampling loop (diffusers' signature; give exactly one of the three).

        Args:
            num_inference_steps: the number of steps; the grid comes from the config (``grid`` and ``rho``, or
                diffusers' ``timestep_spacing``/``steps_offset``, ``use_karras_sigmas``, ``use_exponential_sigmas``,
                ``use_lu_lambdas``) and ends as ``final_sigmas_type`` says (``sigma_min``: at ``t_min``;
                ``zero``: the last step returns the denoised sample).
            device: where ``timesteps`` go.
            timesteps: custom network inputs (decreasing; e.g. table indices), the last step ending as
                ``final_sigmas_type`` says.
            sigmas: custom noise-to-signal ratios ``sigma / alpha`` (decreasing, k-diffusion's convention), one more
                than the steps: the last is where the loop ends (0: the denoised sample).

        Sets ``timesteps`` (float32 network inputs), ``sigmas`` (float32, with the final one), ``time_grid``
        (float64 times, the final one 0.0 when the loop ends denoised), and resets the step counter.
        """
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: expected exactly one of num_inference_steps, timesteps or "
                f"sigmas, found {given or 'none'}"
            )
        net: torch.Tensor | None = None
        if timesteps is not None:
            net = self._custom_values(timesteps, "timesteps")
            ts = self.t_from_network_time(net).tolist()
            final_zero = self.config.final_sigmas_type == "zero"
            final = None if final_zero else self.process.t_min
        elif sigmas is not None:
            s = self._custom_values(sigmas, "sigmas", allow_last_zero=True)
            if s.numel() < 2:
                raise ValueError(f"expected sigmas to hold the steps' values and the final one (>= 2), found {s.numel()}")
            t = self.process.t_from_noise_to_signal(s[:-1].clamp_min(1e-300))
            self.process.check_t(t, name="the times of sigmas", tol=1e-6)
            ts = self.process.clamp_t(t).tolist()
            final_zero = float(s[-1]) == 0.0
            if final_zero:
                final = None
            else:
                tf = self.process.t_from_noise_to_signal(s[-1:])
                self.process.check_t(tf, name="the time of the final sigma", tol=1e-6)
                final = float(self.process.clamp_t(tf))
        else:
            n = num_inference_steps
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise ValueError(f"expected num_inference_steps to be a positive int, found {num_inference_steps!r}")
            ts, final, net = self._grid(int(n))
            final_zero = self.config.final_sigmas_type == "zero"
            if final_zero:
                final = None
        if any(b >= a for a, b in zip(ts, ts[1:])) or (final is not None and final > ts[-1]):
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: expected strictly decreasing times, found {ts} "
                f"(final {final})"
            )
        self.num_inference_steps = len(ts)
        self._final_zero = final_zero
        self._t = [*ts, 0.0 if final is None else final]
        self.time_grid = torch.tensor(self._t, dtype=torch.float64)
        t_steps = torch.tensor(ts, dtype=torch.float64)
        if net is None:
            net = self._adapter.network_time(t_steps.to(torch.float32))
        self.timesteps = net.to(device=device, dtype=torch.float32)
        nts = self.process.noise_to_signal(t_steps)
        last = torch.zeros(1, dtype=torch.float64) if final is None else self.process.noise_to_signal(
            torch.tensor([final], dtype=torch.float64))
        self.sigmas = torch.cat([nts, last]).to(torch.float32)
        self._step_index = None
        self._begin_index = None
        grid = torch.tensor(self._t[:-1] if final_zero else self._t, dtype=torch.float64)
        self._on_set_timesteps(grid)

    def _custom_values(self, values, name: str, allow_last_zero: bool = False) -> torch.Tensor:
        v = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.detach().cpu(),
                            dtype=torch.float64).flatten()
        if v.numel() == 0 or not bool(torch.isfinite(v).all()):
            raise ValueError(f"expected {name} to be a non-empty list of finite numbers, found {values!r}")
        body = v[:-1] if allow_last_zero else v
        if bool((body <= 0).any()) and name == "sigmas" or bool((v < 0).any()):
            raise ValueError(f"expected {name} > 0 (only the final sigma may be 0), found {v.tolist()}")
        if bool((v[1:] >= v[:-1]).any()):
            raise ValueError(f"expected {name} strictly decreasing, found {v.tolist()}")
        return v

    def _grid(self, n: int) -> tuple[list[float], float, torch.Tensor | None]:
        """(times of the n network evaluations, the final time, the network inputs if they are exact integers)."""
        cfg = self.config
        kind = ("karras" if cfg.use_karras_sigmas else
                "log_sigma" if (cfg.use_exponential_sigmas or cfg.use_lu_lambdas) else None)
        if kind is None and cfg.timestep_spacing is not None:
            idx = self._spacing_indices(n)
            table_n = self.process.num_train_timesteps
            ts = ((torch.as_tensor(idx, dtype=torch.float64) + 1) / table_n).tolist()
            return ts, self.process.t_min, torch.as_tensor(idx, dtype=torch.float32)
        if self._zero_snr and (kind or cfg.grid) in ("log_sigma", "karras") and not (
                kind is None and cfg.timestep_spacing is not None):
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: the {kind or cfg.grid!r} grid is spaced in sigma / alpha, which is "
                "infinite at t = 1 for a zero-terminal-SNR table; set timestep_spacing (e.g. 'trailing', as Lin et al. "
                "recommend) or grid='uniform'"
            )
        if kind is not None:  # diffusers' sigma grids: n evaluations from the largest to the smallest sigma
            ts = self.process.time_grid(n - 1, kind, rho=float(cfg.rho), dtype=torch.float64).tolist() if n > 1 else [
                self.process.t_max]
            return ts, self.process.t_min, None
        full = self.process.time_grid(n, cfg.grid, rho=float(cfg.rho), dtype=torch.float64).tolist()
        return full[:-1], full[-1], None

    def _spacing_indices(self, n: int) -> np.ndarray:
        """diffusers' integer timesteps for ``timestep_spacing`` (DDPMScheduler's formulas, or DPM-Solver's with
        ``lambda_min_clipped`` for the multistep solver)."""
        cfg = self.config
        big_n = int(self.process.num_train_timesteps)
        spacing, offset = cfg.timestep_spacing, int(cfg.steps_offset)
        if self._spacing_style == "dpm":
            ac = self.process.alphas_cumprod.to(torch.float32)
            lam = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
            clipped = torch.searchsorted(torch.flip(lam, [0]), float(self.config.lambda_min_clipped))
            last = int(big_n - int(clipped))
            if spacing == "linspace":
                idx = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif spacing == "leading":
                ratio = last // (n + 1)
                idx = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
            else:
                idx = np.arange(last, 0, -big_n / n).round().copy().astype(np.int64) - 1
        else:
            if spacing == "linspace":
                idx = np.linspace(0, big_n - 1, n).round()[::-1].copy().astype(np.int64)
            elif spacing == "leading":
                ratio = big_n // n
                idx = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + offset
            else:
                idx = np.round(np.arange(big_n, 0, -big_n / n)).astype(np.int64) - 1
        if idx.size != n or idx.min() < 0 or idx.max() > big_n - 1 or (np.diff(idx) >= 0).any():
            raise ValueError(
                f"{type(self).__name__}.set_timesteps({n}): timestep_spacing={spacing!r} (steps_offset={offset}) gives "
                f"the table indices {idx.tolist()[:8]}...; expected {n} distinct indices in [0, {big_n - 1}] (fewer "
                "steps, or another spacing)"
            )
        return idx

    def _on_set_timesteps(self, grid: torch.Tensor) -> None:
        """Hook for per-grid precomputation (``grid``: the times of the regular steps and their end)."""

    # ------------------------------------------------------------------ the step counter (diffusers' semantics)
    @property
    def step_index(self) -> int | None:
        """The index of the next step in ``timesteps`` (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where the first ``step`` starts (set by pipelines that start mid-schedule), or ``None``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]`` (img2img and inpainting pipelines call this)."""
        if not isinstance(begin_index, (int, np.integer)) or isinstance(begin_index, bool) or begin_index < 0:
            raise ValueError(f"expected begin_index to be an int >= 0, found {begin_index!r}")
        if self.timesteps is not None and begin_index > len(self.timesteps):
            raise ValueError(f"expected begin_index <= {len(self.timesteps)} (the number of steps), found {begin_index}")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The index of ``timestep`` (a number or a tensor whose entries are all that value) in
        ``schedule_timesteps`` (default ``timesteps``); when it occurs twice, the second (diffusers' rule).
        A ``ValueError`` if it is not there."""
        table = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if table is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")
        value = _scalar(timestep)
        t64 = torch.as_tensor(table).detach().to("cpu", torch.float64).flatten()
        hits = torch.nonzero((t64 - value).abs() <= 1e-6 * max(1.0, abs(value))).flatten()
        if hits.numel() == 0:
            shown = ", ".join(f"{v:.6g}" for v in t64[:6].tolist()) + (", ..." if t64.numel() > 6 else "")
            raise ValueError(
                f"{type(self).__name__}: timestep {value!r} is not one of this scheduler's timesteps [{shown}] "
                f"(set_timesteps({self.num_inference_steps}) made them); pass the values of scheduler.timesteps "
                "unchanged"
            )
        return int(hits[1] if hits.numel() > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        self._on_loop_start()

    def _on_loop_start(self) -> None:
        """Hook: a loop starts (the first step after set_timesteps)."""

    # ------------------------------------------------------------------ the step
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the network receives the state as is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **ddim_kwargs: Any,
    ) -> ScoreSchedulerOutput | tuple[torch.Tensor]:
        """One step of the sampler from ``timesteps[step_index]`` (which ``timestep`` must be) to the next grid time.

        ``model_output`` is the network's prediction at (``sample``, ``timestep``) in the config's prediction
        type (with ``variance_type`` ``learned``/``learned_range``, the first half of its channels);
        ``generator`` (one, or a list with one per sample) draws the step's noise. Half-precision inputs are
        computed in float32 and returned in the sample's dtype.
        Returns :class:`ScoreSchedulerOutput` (or ``(prev_sample,)``).

        ``DDIMPipeline`` also passes ``eta`` and ``use_clipped_model_output``: accepted only at values this
        update honours (``eta=0`` for a deterministic scheduler; no clipping); anything else is a ``TypeError``."""
        self._check_ddim_kwargs(ddim_kwargs)
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.ndim < 1:
            raise TypeError(f"expected sample to be a float tensor (B, ...), found {type(sample).__name__}")
        if (isinstance(model_output, torch.Tensor) and self.config.variance_type in ("learned", "learned_range")
                and sample.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]):
            model_output = model_output[:, : sample.shape[1]]
        if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
            found = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
            raise ValueError(
                f"{type(self).__name__}.step: expected model_output of the sample's shape {tuple(sample.shape)} "
                f"(a {self.prediction_type} prediction; for learned-variance outputs set variance_type='learned'), "
                f"found {found}"
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        n = self.num_inference_steps
        if i >= n:
            raise ValueError(
                f"{type(self).__name__}.step: all {n} steps of this schedule were taken; call set_timesteps again to "
                "start a new loop"
            )
        expected = float(self.timesteps[i])
        value = _scalar(timestep)
        if abs(value - expected) > 1e-6 * max(1.0, abs(expected)):
            raise ValueError(
                f"{type(self).__name__}.step: expected timestep {expected:.6g} (timesteps[{i}], step {i - (self._begin_index or 0) + 1} "
                f"of this loop), found {value:.6g}; run the loop over scheduler.timesteps in order, or call "
                "set_timesteps (and set_begin_index) to start another loop"
            )
        out_dtype = sample.dtype
        work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
        x, pred = sample.to(work), model_output.to(work)
        t_cur = self._t[i]
        tt = self.process.clamp_t(torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device))
        alpha, sigma = self.process.marginal(tt)
        if self._zero_snr and float(self.process.alpha(torch.tensor(t_cur, dtype=torch.float64))) == 0.0:
            # alpha = 0 (zero terminal SNR): the score is -x / sigma^2 whatever the network says; the update uses the
            # denoised sample, which a v or x0 prediction gives directly (x0 = alpha x - sigma v)
            d0 = pred if self.prediction_type == "sample" else -pred  # sigma = 1 where alpha = 0
            prev, denoised = self._update_at_zero_alpha(i, x, d0, generator)
            self._record(i, denoised)
        else:
            score = prediction_to_score(pred, x, alpha, sigma, self.prediction_type)
            if self._final_zero and i == n - 1:
                denoised = self._tweedie(i, x, score)
                self._record(i, denoised)
                prev = denoised
            else:
                prev, denoised = self._update(i, x, score, generator)
        self._step_index = i + 1
        prev, denoised = prev.to(out_dtype), denoised.to(out_dtype)
        if not return_dict:
            return (prev,)
        return ScoreSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _record(self, i: int, denoised: torch.Tensor) -> None:
        """Hook: the denoised value of step ``i`` (the multistep solver keeps it)."""

    def _check_ddim_kwargs(self, kwargs: dict[str, Any]) -> None:
        eta = kwargs.pop("eta", None)
        clipped = kwargs.pop("use_clipped_model_output", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.step got unexpected keyword arguments {sorted(kwargs)}")
        if eta is not None and not (eta == 0 and not self.stochastic):
            raise TypeError(
                f"{type(self).__name__}.step: eta={eta!r} is a DDIM setting; this scheduler runs score_toolkit's "
                f"{self.sampler_name!r} update ({'stochastic' if self.stochastic else 'deterministic'}), which has no "
                f"eta. Use it in DDPMPipeline, or use ScoreDPMSolverScheduler (eta=0) in DDIMPipeline"
            )
        if clipped:
            raise TypeError(f"{type(self).__name__}.step: use_clipped_model_output=True is not supported (no clipping)")

    # ------------------------------------------------------------------ the forward process
    def _times_of(self, timesteps, batch: int) -> torch.Tensor:
        """Times (float64, (B,)) of network inputs: a scheduled timestep's exact grid time, else the inverse of
        the network-time map."""
        ts = torch.as_tensor(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                             dtype=torch.float64).flatten()
        if ts.numel() == 1:
            ts = ts.expand(batch)
        if ts.numel() != batch:
            raise ValueError(f"expected one timestep or one per sample ({batch}), found {ts.numel()}")
        t = self.t_from_network_time(ts) if not self._t else None
        if t is None:
            sched = self.timesteps.detach().to("cpu", torch.float64)
            grid = torch.tensor(self._t[:-1], dtype=torch.float64)
            close = (ts.unsqueeze(1) - sched.unsqueeze(0)).abs() <= 1e-6 * sched.abs().clamp_min(1.0)
            on_grid = close.any(1)
            t = torch.empty_like(ts)
            if bool(on_grid.any()):
                t[on_grid] = grid[close[on_grid].to(torch.int64).argmax(1)]
            if bool((~on_grid).any()):
                t[~on_grid] = self.t_from_network_time(ts[~on_grid])
        return t

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward marginal ``x_t = alpha(t) x_0 + sigma(t) noise`` at network inputs ``timesteps`` (a number,
        or one per sample: e.g. training indices of a DDPM table), for samples of any rank. A timestep of the
        current schedule uses its exact grid time."""
        x0 = original_samples
        t = self._times_of(timesteps, x0.shape[0])
        work = torch.float64 if x0.device.type == "cpu" else torch.float32
        out = self.process.perturb(x0.to(work), t.to(x0.device, work), noise.to(work))
        return out.to(x0.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ``v = alpha(t) noise - sigma(t) x_0`` (``sample`` is the clean ``x_0``, as in
        diffusers' training scripts) at network inputs ``timesteps``."""
        from ._utils import append_dims

        t = self._times_of(timesteps, sample.shape[0])
        work = torch.float64 if sample.device.type == "cpu" else torch.float32
        alpha, sigma = self.process.marginal(t.to(sample.device, work))
        v = append_dims(alpha, sample.ndim) * noise.to(work) - append_dims(sigma, sample.ndim) * sample.to(work)
        return v.to(sample.dtype)

    def t_from_network_time(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of the network-time map (continuous time ``t`` of network inputs; float64)."""
        v = torch.as_tensor(values, dtype=torch.float64)
        if self.time_input == "t":
            t = v
        elif self.time_input == "index":  # the index map is affine in t
            lo, hi = self._adapter.network_time(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
            t = (v - lo) / (hi - lo)
        else:  # sigma(t) increases in t: bisection
            ends = self.process.sigma(torch.tensor([self.process.t_min, self.process.t_max], dtype=torch.float64))
            s_lo, s_hi = ends.tolist()
            if not bool(((v >= s_lo * (1 - 1e-6)) & (v <= s_hi * (1 + 1e-6))).all()):
                raise ValueError(
                    f"expected timesteps (sigma, the network's time input) in [{s_lo:.6g}, {s_hi:.6g}], found values in "
                    f"[{float(v.min()):.6g}, {float(v.max()):.6g}]"
                )
            lo = torch.full_like(v, self.process.t_min)
            hi = torch.full_like(v, self.process.t_max)
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                below = self.process.sigma(mid) < v
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            t = 0.5 * (lo + hi)
        self.process.check_t(t, name="the time of timesteps", tol=1e-6)
        return self.process.clamp_t(t)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ------------------------------------------------------------------ subclass hook
    def _update(self, i: int, x: torch.Tensor, score: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _update_at_zero_alpha(self, i, x, denoised, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The step from a time where alpha = 0 (zero terminal SNR), given the denoised sample: the exact
        posterior q(x_s | x_t, x_0 = denoised) = N(alpha_s x_0, sigma_s^2), which is also the DPM-Solver step
        there (h = infinity); the last step returns the denoised sample."""
        if self._final_zero and i == self.num_inference_steps - 1:
            return denoised, denoised
        alpha_s, sigma_s = (float(v) for v in self.process.marginal(torch.tensor(self._t[i + 1], dtype=torch.float64)))
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if self.stochastic else None
        if noise is None:  # the probability-flow ODE keeps the noise it has: x_t is pure noise here
            return alpha_s * denoised + sigma_s * x, denoised
        return alpha_s * denoised + sigma_s * noise, denoised

    def _tweedie(self, i: int, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(torch.tensor(self._t[i], dtype=torch.float64))
        return (x + float(sigma) ** 2 * score) / float(alpha)


def _no_model(x, t):  # pragma: no cover - the schedulers only use the adapter's time map
    raise RuntimeError("a scheduler never calls the network itself")


# The config fields every scheduler here accepts (those of the configs it can be built from).
_SPEC_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "rescale_betas_zero_snr", "sigma_min", "sigma_max", "sampling_eps", "process", "time_input")
_KNOB_FIELDS = ("grid", "rho", "timestep_spacing", "steps_offset", "final_sigmas_type", "use_karras_sigmas",
                "use_exponential_sigmas", "use_lu_lambdas", "variance_type")


def _spec(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in _SPEC_FIELDS}


def _warn_learned_variance(cls_name: str, variance_type: str | None, used: str = "") -> None:
    if variance_type in ("learned", "learned_range"):
        warnings.warn(
            f"{cls_name}: scheduler config setting variance_type={variance_type!r}: the model's learned variance is "
            f"not applied ({used}the output's first half of channels is the prediction)", SchedulerConfigWarning,
            stacklevel=4)


def _knobs(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in _KNOB_FIELDS}


_COMMON_ARGS_DOC = """
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


class ScoreAncestralScheduler(_ScoreScheduler):
    """Ancestral sampling with the process's exact Gaussian posterior (score_toolkit's ``ancestral`` sampler:
    DDPM, Ho et al. 2020, Algorithm 2, for VP; its SMLD counterpart for VE) as a diffusers scheduler.

    From ``t = t_i`` to ``s = t_{i+1}``: ``x_s = (x_t + sigma_{t|s}^2 s(x_t, t)) / alpha_{t|s} + sqrt(var) z`` with
    ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` (``variance="posterior"``) or ``sigma_{t|s}^2`` (``"forward"``).

    Args (besides the shared ones below):
        variance: ``posterior`` or ``forward`` (diffusers' ``variance_type`` ``fixed_small``/``fixed_large``
            sets it).
    """

    sampler_name = "ancestral"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
        process: dict[str, Any] | None = None,
        time_input: str | None = None,
        grid: str = "uniform",
        rho: float = 7.0,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        final_sigmas_type: str = "sigma_min",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        variance_type: str | None = None,
        variance: str | None = None,
    ):
        from_type = {"fixed_small": "posterior", "fixed_small_log": "posterior", "fixed_large": "forward",
                     "fixed_large_log": "forward"}.get(variance_type)
        if variance is None:
            variance = from_type or "posterior"
        elif from_type is not None and from_type != variance:
            raise ValueError(
                f"scheduler config: variance={variance!r} contradicts variance_type={variance_type!r} (which means "
                f"{from_type!r}); set one of them"
            )
        if variance not in ("posterior", "forward"):
            raise ValueError(f"scheduler config field 'variance': expected 'posterior' or 'forward', found {variance!r}")
        _warn_learned_variance("ScoreAncestralScheduler", variance_type, f"the {variance} variance is used; ")
        self._variance = variance
        self.register_to_config(variance=variance)
        self._setup(_spec(locals()), _knobs(locals()))

    def _on_set_timesteps(self, grid):
        t = grid.tolist()
        self._coefs = forward_transitions(self.process, t)  # as the ancestral sampler computes them

    def _update_at_zero_alpha(self, i, x, denoised, generator):
        if self._variance == "posterior" or (self._final_zero and i == self.num_inference_steps - 1):
            return super()._update_at_zero_alpha(i, x, denoised, generator)
        # forward variance: sigma_{t|s}^2 = sigma_t^2 = 1 at alpha_t = 0
        alpha_s = float(self.process.alpha(torch.tensor(self._t[i + 1], dtype=torch.float64)))
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return alpha_s * denoised + noise, denoised

    def _update(self, i, x, score, generator):
        # the ancestral sampler's step (score_toolkit.samplers.ancestral), operation for operation
        co = self._coefs[i]
        if co is None:  # a zero-length last step (the grid's last time is already t_min)
            return x, self._tweedie(i, x, score)
        _, s_t, _, s_s, a_ts, var_ts = co
        mean = (x + var_ts * score) / a_ts
        var = var_ts * s_s**2 / s_t**2 if self._variance == "posterior" else var_ts
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + var**0.5 * noise, self._tweedie(i, x, score)


class ScoreEulerMaruyamaScheduler(_ScoreScheduler):
    """One Euler-Maruyama step of the reverse-time SDE (Song et al. 2021, eq. 6; score_toolkit's
    ``euler_maruyama`` sampler with ``method="euler"``) as a diffusers scheduler:

        x_{i+1} = x_i + [g(t_i)^2 s(x_i, t_i) - f(t_i) x_i] h_i + g(t_i) sqrt(h_i) z,   h_i = t_i - t_{i+1}.

    """

    sampler_name = "euler_maruyama"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
        process: dict[str, Any] | None = None,
        time_input: str | None = None,
        grid: str = "uniform",
        rho: float = 7.0,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        final_sigmas_type: str = "sigma_min",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        variance_type: str | None = None,
    ):
        _warn_learned_variance("ScoreEulerMaruyamaScheduler", variance_type)
        self._setup(_spec(locals()), _knobs(locals()))

    def _on_set_timesteps(self, grid):
        # coefficients on the grid computed as the sampler computes them (one vectorised call)
        self._f = self.process.drift_coef(grid).tolist()
        self._g2 = self.process.diffusion_squared(grid).clamp_min(0).tolist()
        self._grid_t = grid.tolist()

    def _update(self, i, x, score, generator):
        h = self._grid_t[i] - self._grid_t[i + 1]
        f_t, g2 = self._f[i], self._g2[i]
        drift = (g2 * h) * score - (f_t * h) * x
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + drift + (g2 * h) ** 0.5 * noise, self._tweedie(i, x, score)


class ScoreDPMSolverScheduler(_ScoreScheduler):
    """DPM-Solver++ multistep (Lu et al. 2022) on the probability-flow ODE, any process, as a diffusers
    scheduler: ``solver_order=1`` is DDIM (the first-order exponential integrator), ``2`` is DPM-Solver++(2M)
    (score_toolkit's ``dpmpp_2m`` sampler), ``3`` is DPM-Solver++(3M) (``dpmpp_3m``). The coefficients are
    :func:`score_toolkit.samplers.dpm_solver.multistep_coefficients`, the samplers' own.

    As in diffusers' ``DPMSolverMultistepScheduler``, the solver keeps the denoised values of the steps it has
    taken since ``set_timesteps`` (``model_outputs``): the first step of a loop (wherever it starts, e.g. at
    ``begin_index`` in img2img) is first order, the next ones use up to ``solver_order - 1`` previous values, and
    the sample handed to a step may be any tensor (inpainting pipelines re-noise the known region in between).

    Args (besides the shared ones below):
        solver_order: 1, 2 or 3. lower_order_final: the last steps use lower orders, as in the samplers (at
            every number of steps; diffusers only below 15). euler_at_final: the last step is first order.
        solver_type: the second-order formula: ``heun`` (Lu et al.'s "taylor", the samplers') or ``midpoint``
            (diffusers' default); diffusers' ``logrho``/``bh1``/``bh2`` map to ``midpoint`` as in diffusers.
        algorithm_type: ``dpmsolver++`` (``deis``/``data_prediction`` map to it, as in diffusers); the noise
            prediction and SDE variants are not applied (warning).
        lambda_min_clipped: DPM-Solver's clipping of the log-SNR (with ``timestep_spacing``).
    """

    sampler_name = "dpmpp_2m"
    stochastic = False
    _spacing_style = "dpm"
    _own_knobs = _MULTISTEP + ("lambda_min_clipped",)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
        process: dict[str, Any] | None = None,
        time_input: str | None = None,
        grid: str = "log_sigma",
        rho: float = 7.0,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        final_sigmas_type: str = "sigma_min",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        variance_type: str | None = None,
        solver_order: int = 2,
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        solver_type: str = "heun",
        algorithm_type: str = "dpmsolver++",
        lambda_min_clipped: float = -math.inf,
    ):
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"scheduler config field 'solver_order': expected 1, 2 or 3, found {solver_order!r}")
        for name, value in (("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final)):
            if not isinstance(value, bool):
                raise TypeError(f"scheduler config field {name!r}: expected a bool, found {value!r}")
        if solver_type not in ("heun", "midpoint", "logrho", "bh1", "bh2"):
            raise ValueError(f"scheduler config field 'solver_type': expected 'heun' or 'midpoint', found {solver_type!r}")
        self._midpoint = solver_type != "heun"
        if algorithm_type not in ("dpmsolver++", "deis", "data_prediction"):
            if algorithm_type not in ("dpmsolver", "sde-dpmsolver", "sde-dpmsolver++"):
                raise ValueError(
                    f"scheduler config field 'algorithm_type': expected 'dpmsolver++', found {algorithm_type!r}")
            _warn_knob("ScoreDPMSolverScheduler", "algorithm_type", algorithm_type,
                       "another DPM-Solver variant (this scheduler runs dpmsolver++, the data-prediction ODE solver)")
        if not isinstance(lambda_min_clipped, (int, float)) or isinstance(lambda_min_clipped, bool):
            raise TypeError(f"scheduler config field 'lambda_min_clipped': expected a number, found {lambda_min_clipped!r}")
        self._setup(_spec(locals()), _knobs(locals()))
        self._outputs: list[torch.Tensor] = []
        self._lower_order_nums = 0
        self._first_history = 0

    def _on_set_timesteps(self, grid):
        order = int(self.config.solver_order)
        n_reg = grid.numel() - 1
        self._a: list[float] = []
        self._w: dict[int, list[list[float]]] = {}
        if n_reg < 1:
            self._sigma2, self._inv_alpha = [], []
        first = 1 if self._zero_snr and float(self.process.alpha(grid[:1])) == 0.0 else 0
        self._first_history = first  # a denoised value at alpha = 0 (log-SNR -inf) is no interpolation node
        for k in range(1, order + 1):
            orders = [max(1, min(k, i + 1 - first)) for i in range(n_reg)] if n_reg else []
            if not orders:
                break
            co = multistep_coefficients(self.process, grid, orders)
            self._a = co["a"].tolist()
            w = co["w"]
            if k >= 2 and self._midpoint:
                w = self._midpoint_weights(grid, w, orders)
            self._w[k] = w.tolist()
            self._sigma2, self._inv_alpha = co["sigma2"].tolist(), co["inv_alpha"].tolist()
        self._outputs = []
        self._lower_order_nums = 0

    def _midpoint_weights(self, grid, w, orders):
        """diffusers' ``solver_type="midpoint"`` second-order update: ``D_0 + (D_0 - D_1) / (2 r)``."""
        alpha, sigma = self.process.marginal(grid)
        lam = torch.log(alpha) - torch.log(sigma)
        w = w.clone()
        for i, k in enumerate(orders):
            if k != 2:
                continue
            h, h0 = float(lam[i + 1] - lam[i]), float(lam[i] - lam[i - 1])
            base = float(alpha[i + 1]) * -math.expm1(-h)
            half_inv_r = 0.5 * h / h0
            w[i, 0], w[i, 1] = base * (1 + half_inv_r), -base * half_inv_r
        return w

    def _order(self, i: int) -> int:
        cfg = self.config
        n = self.num_inference_steps
        k = min(int(cfg.solver_order), self._lower_order_nums + 1, max(1, i + 1 - self._first_history))
        if cfg.lower_order_final:
            k = min(k, n - i)
        if cfg.euler_at_final and i == n - 1:
            k = 1
        return k

    def _record(self, i, denoised):
        self._outputs.insert(0, denoised)
        del self._outputs[int(self.config.solver_order):]
        self._lower_order_nums = min(self._lower_order_nums + 1, int(self.config.solver_order))

    def _on_loop_start(self):
        self._outputs = []
        self._lower_order_nums = 0

    @property
    def model_outputs(self) -> list[torch.Tensor]:
        """The denoised values of the previous steps of this loop, most recent first."""
        return list(self._outputs)

    def _update(self, i, x, score, generator):
        k = self._order(i)
        denoised = _denoise(x, score, self._sigma2[i], self._inv_alpha[i])
        history = [denoised, *self._outputs[: k - 1]]
        w = self._w[k][i]
        x_next = _lincomb([(self._a[i], x)] + [(w[j], history[j]) for j in range(k)])
        self._record(i, denoised)
        return x_next, denoised


for _cls in (ScoreAncestralScheduler, ScoreEulerMaruyamaScheduler, ScoreDPMSolverScheduler):
    _cls.__doc__ = (_cls.__doc__ or "").rstrip() + "\n\n    Shared args:" + _COMMON_ARGS_DOC + "\n"


def score_scheduler_config_keys(cls: type) -> set[str]:
    """The keys a config of one of these schedulers may hold: its own, those of the diffusers schedulers it reads,
    and those of the other schedulers here (a config converted between them keeps the others' keys)."""
    from diffusers import ScoreSdeVeScheduler

    keys = config_keys(cls) | init_keys(ScoreSdeVeScheduler) | set(DIFFUSERS_KNOBS)
    for other in SCHEDULER_CLASSES.values():
        keys |= init_keys(other)
    return keys



#: scheduler class by the sampler name whose update it runs
SCHEDULER_CLASSES: dict[str, type[_ScoreScheduler]] = {
    cls.sampler_name: cls for cls in (ScoreAncestralScheduler, ScoreEulerMaruyamaScheduler, ScoreDPMSolverScheduler)
}


def is_score_scheduler(obj) -> bool:
    """Whether ``obj`` is one of the schedulers of this module (they carry their process)."""
    return isinstance(obj, _ScoreScheduler)
