"""The Euler-Maruyama scheduler (:class:`ScoreEulerMaruyamaScheduler`): score_toolkit's ``euler_maruyama``
sampler, one step of the reverse-time SDE, as a diffusers scheduler."""

from __future__ import annotations

from .._utils import randn
from .base import ScoreSchedulerBase
from .config import config_init, knobs_of, spec_of
from .knobs import warn_learned_variance


class ScoreEulerMaruyamaScheduler(ScoreSchedulerBase):
    """One Euler-Maruyama step of the reverse-time SDE (Song et al. 2021, eq. 6; score_toolkit's
    ``euler_maruyama`` sampler with ``method="euler"``) as a diffusers scheduler:

        x_{i+1} = x_i + [g(t_i)^2 s(x_i, t_i) - f(t_i) x_i] h_i + g(t_i) sqrt(h_i) z,   h_i = t_i - t_{i+1}.

    """

    # the public path: saved pipelines record it in model_index.json
    __module__ = "score_toolkit.diffusers_schedulers"
    sampler_name = "euler_maruyama"

    @config_init()
    def __init__(self, **config):
        warn_learned_variance("ScoreEulerMaruyamaScheduler", config["variance_type"])
        self._setup(spec_of(config), knobs_of(config))

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
