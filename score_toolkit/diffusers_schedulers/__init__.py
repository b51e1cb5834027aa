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
needs the name ``SchedulerMixin`` in it, hence the import here; the module must be imported before
``DiffusionPipeline.from_pretrained`` loads such a pipeline.

Modules: ``base`` (the machinery every scheduler shares: config reading, ``set_timesteps``, the step counter,
``step``), ``forward`` (the beta table, ``add_noise``, ``get_velocity``), ``grid`` (the time grid from the
config), ``config`` (the config fields and what they say about the model), ``knobs`` (diffusers' settings:
mapped, read or warned about), and one module per scheduler: ``ancestral``, ``euler_maruyama``, ``dpm_solver``.
"""


from __future__ import annotations

from diffusers import SchedulerMixin

from .ancestral import ScoreAncestralScheduler
from .base import SCHEDULER_CLASSES, ScoreSchedulerOutput, is_score_scheduler, score_scheduler_config_keys  # noqa: F401  (read by score_toolkit.folders)
from .config import resolve_scheduler_spec  # noqa: F401
from .dpm_solver import ScoreDPMSolverScheduler
from .euler_maruyama import ScoreEulerMaruyamaScheduler
from .knobs import DIFFUSERS_KNOBS, SchedulerConfigWarning

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
