"""What the samplers that keep an observed part (``imputation``, ``repaint``) share: the check of the operator
and observation against the state, and the ancestral step followed by the replacement of the observed part
(:func:`~score_toolkit.conditioning.operators.replace_observed`)."""

from __future__ import annotations

import torch

from ..conditioning.operators import replace_observed
from .ancestral import forward_transition
from .base import SamplingContext


def checked_observation(cfg, x: torch.Tensor):
    """``(operator, observation)`` of the sampler config ``cfg`` (``(None, None)`` without an operator), checked
    against the state ``x`` (B, ...): a clear ``ValueError`` before the first score evaluation."""
    op, y = cfg["operator"], cfg["observation"]
    if op is not None:
        op.check_input(x)
        op.check_observation(y, tuple(x.shape[1:]), x.shape[0])
    return op, y


def ancestral_step_observed(ctx: SamplingContext, x: torch.Tensor, t: float, s: float, op, y
                            ) -> tuple[torch.Tensor, float, float]:
    """One ancestral step from ``t`` down to ``s`` (posterior variance), then, with an operator, the observed part
    replaced by the observation noised to ``s``. Returns ``(x_s, alpha_s, sigma_s)``."""
    _, s_t, a_s, s_s, a_ts, var_ts = forward_transition(ctx.process, t, s)
    mean = (x + var_ts * ctx.score(x, t)) / a_ts
    x = mean + (var_ts * s_s**2 / s_t**2) ** 0.5 * ctx.randn_like(x)
    if op is not None:
        x = replace_observed(op, x, y, a_s, s_s, ctx.randn_like(x))
    return x, a_s, s_s
