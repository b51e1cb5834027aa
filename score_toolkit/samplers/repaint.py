"""RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using denoising diffusion probabilistic models", Algorithm 1),
for any process and any linear operator.

Each step down from ``t`` to ``s`` takes the ancestral step (see :mod:`.ancestral`) for the unknown part and a
forward-noised observation for the known part: ``x <- x + A^+ (alpha_s y + sigma_s A z - A x)`` (for a mask,
RePaint's ``m * x_known + (1 - m) x_unknown``). Resampling: at every ``jump_length``-th step (counted from the
end, as in RePaint's ``get_schedule_jump``) the state is noised back up ``jump_length`` steps with the forward
transition ``x_t = alpha_{t|s} x_s + sigma_{t|s} z`` and denoised again, ``jump_n_sample - 1`` extra times, which
harmonises the known and the generated parts. Without an operator it is ancestral sampling with the same
resampling (exact marginals are preserved by the forward jumps), so the unconditional conformance suite applies.
"""

from __future__ import annotations

import torch

from ..conditioning.operators import check_operator_options
from ..processes import TIME_GRIDS
from ._observed import ancestral_step_observed, checked_observation
from .ancestral import forward_transition
from .base import Sampler, SamplerProperties, SamplingContext, check_choice, check_int

__all__ = ["RePaintSampler", "repaint_schedule"]


def repaint_schedule(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The sequence of grid indices visited (0 = t=1, ``num_steps`` = t_min), as RePaint's ``get_schedule_jump``:
    going down one index at a time; at the indices ``num_steps - j`` for ``j = 0, jump_length, ...`` below
    ``num_steps - jump_length``, jump back up ``jump_length`` indices, ``jump_n_sample - 1`` times each."""
    jumps = {num_steps - j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    seq, i = [0], 0
    while i < num_steps:
        i += 1
        seq.append(i)
        if jumps.get(i, 0) > 0:
            jumps[i] -= 1
            for _ in range(jump_length):
                i -= 1
                seq.append(i)
    return seq


class RePaintSampler(Sampler):
    """RePaint with resampling jumps.

    Options:
        num_steps (250): steps of the grid ``process.time_grid(num_steps, grid)``.
        grid ("uniform"): time grid kind.
        jump_length (10): RePaint's jump length ``j``.
        jump_n_sample (10): RePaint's resampling count ``U`` (1: no resampling).
        operator (None), observation (None): the known part (a :class:`~score_toolkit.conditioning.Mask`, or any
            :class:`~score_toolkit.conditioning.LinearOperator`) and its noise-free observation.

    With ``jump_length >= num_steps`` there are no jumps (plain ancestral steps with the known part replaced).
    NFE: the number of downward steps of :func:`repaint_schedule`, about ``num_steps * (1 + (U - 1))`` for
    ``jump_length`` much smaller than ``num_steps``.
    """

    name = "repaint"
    description = "RePaint inpainting (Lugmayr et al. 2022): known part from the forward process, resampling jumps"
    properties = SamplerProperties(stochastic=True, order=1.0)
    options = {"num_steps": 250, "grid": "uniform", "jump_length": 10, "jump_n_sample": 10, "operator": None,
               "observation": None}
    conformance = {"sampler_options": {"num_steps": 20, "jump_length": 5, "jump_n_sample": 2},
                   "accuracy_options": {"num_steps": 200, "jump_length": 10, "jump_n_sample": 2}}

    def _validate_options(self, cfg):
        super()._validate_options(cfg)
        check_int(cfg, "num_steps", self.name)
        check_int(cfg, "jump_length", self.name)
        check_int(cfg, "jump_n_sample", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        check_operator_options(self.name, cfg["operator"], cfg["observation"])

    def _num_progress_steps(self):
        c = self.config
        return len(repaint_schedule(c["num_steps"], c["jump_length"], c["jump_n_sample"])) - 1

    @property
    def nfe(self) -> int:
        """Score evaluations of one run: the downward steps of :func:`repaint_schedule` (+1 with ``denoise``)."""
        c = self.config
        seq = repaint_schedule(c["num_steps"], c["jump_length"], c["jump_n_sample"])
        return sum(j > i for i, j in zip(seq[:-1], seq[1:])) + self._final_steps_nfe()

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        process, cfg = ctx.process, self.config
        op, y = checked_observation(cfg, x)
        ts = process.time_grid(cfg["num_steps"], cfg["grid"]).tolist()
        seq = repaint_schedule(cfg["num_steps"], cfg["jump_length"], cfg["jump_n_sample"])
        for k, (i, j) in enumerate(zip(seq[:-1], seq[1:])):
            if j > i:  # down: t = ts[i] -> s = ts[j]
                x, _, _ = ancestral_step_observed(ctx, x, ts[i], ts[j], op, y)
            else:  # up: forward transition from s = ts[i] to t = ts[j]
                *_, a_ts, var_ts = forward_transition(process, ts[j], ts[i])
                x = a_ts * x + var_ts**0.5 * ctx.randn_like(x)
            ctx.record(x, ts[j], step=k + 1)
        return x
