"""Predictor-corrector imputation (Song et al. 2021, "Score-based generative modeling through SDEs", App. I.2;
score_sde's ``controllable_generation.get_pc_inpainter``), for any linear operator.

Each step from ``t`` to ``s`` runs the ancestral predictor (see :mod:`.ancestral`) and ``corrector_steps`` Langevin
corrector steps at ``s`` on the whole state, and after each of them replaces the observed part of the state by a
fresh noised observation: ``x <- x + A^+ (alpha_s y + sigma_s A z - A x)`` (for a mask: ``x[m] <- alpha_s y + sigma_s
z``), see :func:`~score_toolkit.conditioning.operators.replace_observed`. The observation is taken as noise-free.
Without an operator it is plain ancestral sampling (with the corrector), so the unconditional conformance suite
applies.
"""

from __future__ import annotations

import torch

from ..conditioning.operators import check_operator_options, replace_observed
from ..processes import TIME_GRIDS
from ._observed import ancestral_step_observed, checked_observation
from .base import Sampler, SamplerProperties, SamplingContext, check_choice, check_float, check_int

__all__ = ["ImputationSampler"]


class ImputationSampler(Sampler):
    """score_sde's predictor-corrector imputation with an ancestral predictor.

    Options:
        num_steps (1000): predictor steps on ``process.time_grid(num_steps, grid)``.
        grid ("uniform"): time grid kind.
        corrector_steps (0): Langevin corrector steps after each predictor step (one score evaluation each), step
            ``eps = 2 snr^2 sigma(s)^2`` (the ``"sigma"`` rule of ``predictor_corrector``).
        snr (0.16): the corrector's signal-to-noise ratio.
        operator (None): a :class:`~score_toolkit.conditioning.LinearOperator` (``Mask`` for inpainting).
        observation (None): the noise-free observation ``y = A x_0`` (one for all samples, or one per sample).

    NFE: ``num_steps * (1 + corrector_steps)``.
    """

    name = "imputation"
    description = "Predictor-corrector imputation: ancestral steps, observed part replaced by the noised observation (Song et al. 2021, App. I.2)"
    properties = SamplerProperties(stochastic=True, order=1.0)
    options = {"num_steps": 1000, "grid": "uniform", "corrector_steps": 0, "snr": 0.16, "operator": None,
               "observation": None}
    conformance = {"sampler_options": {"num_steps": 20}, "accuracy_options": {"num_steps": 200}}

    def _validate_options(self, cfg):
        super()._validate_options(cfg)
        check_int(cfg, "num_steps", self.name)
        check_int(cfg, "corrector_steps", self.name, minimum=0)
        check_float(cfg, "snr", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        check_operator_options(self.name, cfg["operator"], cfg["observation"])

    @property
    def nfe(self) -> int:
        """Score evaluations of one run: ``num_steps * (1 + corrector_steps)`` (+1 with ``denoise``)."""
        return self.config["num_steps"] * (1 + self.config["corrector_steps"]) + self._final_steps_nfe()

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        process, cfg = ctx.process, self.config
        op, y = checked_observation(cfg, x)
        ts = process.time_grid(cfg["num_steps"], cfg["grid"]).tolist()
        for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            x, a_s, s_s = ancestral_step_observed(ctx, x, t_cur, t_next, op, y)
            eps = 2 * cfg["snr"] ** 2 * s_s**2
            for _ in range(cfg["corrector_steps"]):
                x = x + eps * ctx.score(x, t_next) + (2 * eps) ** 0.5 * ctx.randn_like(x)
                if op is not None:
                    x = replace_observed(op, x, y, a_s, s_s, ctx.randn_like(x))
            ctx.record(x, t_next, step=i + 1)
        return x
