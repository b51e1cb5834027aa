"""The ancestral scheduler (:class:`ScoreAncestralScheduler`): score_toolkit's ``ancestral`` sampler, the
process's exact Gaussian posterior, as a diffusers scheduler."""

from __future__ import annotations

import torch

from .._utils import randn
from ..samplers.ancestral import _posterior_step, forward_transitions
from .base import ScoreSchedulerBase
from .config import ANCESTRAL_FIELDS, config_init, knobs_of, spec_of
from .knobs import warn_learned_variance


class ScoreAncestralScheduler(ScoreSchedulerBase):
    """Ancestral sampling with the process's exact Gaussian posterior (score_toolkit's ``ancestral`` sampler:
    DDPM, Ho et al. 2020, Algorithm 2, for VP; its SMLD counterpart for VE) as a diffusers scheduler.

    From ``t = t_i`` to ``s = t_{i+1}``: ``x_s = (x_t + sigma_{t|s}^2 s(x_t, t)) / alpha_{t|s} + sqrt(var) z`` with
    ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` (``variance="posterior"``) or ``sigma_{t|s}^2`` (``"forward"``).

    Args (besides the shared ones below):
        variance: ``posterior`` or ``forward`` (diffusers' ``variance_type`` ``fixed_small``/``fixed_large``
            sets it).
    """

    # the public path: saved pipelines record it in model_index.json
    __module__ = "score_toolkit.diffusers_schedulers"
    sampler_name = "ancestral"

    @config_init(ANCESTRAL_FIELDS)
    def __init__(self, **config):
        variance_type, variance = config["variance_type"], config["variance"]
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
        warn_learned_variance("ScoreAncestralScheduler", variance_type, f"the {variance} variance is used; ")
        self._variance = variance
        self.register_to_config(variance=variance)
        self._setup(spec_of(config), knobs_of(config))

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
        # the ancestral sampler's step (score_toolkit.samplers.ancestral), the same function
        co = self._coefs[i]
        if co is None:  # a zero-length last step (the grid's last time is already t_min)
            return x, self._tweedie(i, x, score)
        _, s_t, _, s_s, a_ts, var_ts = co
        var = var_ts * s_s**2 / s_t**2 if self._variance == "posterior" else var_ts
        draw = lambda v: randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)  # noqa: E731
        return _posterior_step(x, score, a_ts, var_ts, var**0.5, draw), self._tweedie(i, x, score)
