"""The DPM-Solver++ multistep scheduler (:class:`ScoreDPMSolverScheduler`): score_toolkit's ``dpmpp_2m`` /
``dpmpp_3m`` samplers (order 1: DDIM) on the probability-flow ODE, as a diffusers scheduler."""

from __future__ import annotations

import math

import torch

from ..samplers.dpm_solver import _denoise, _lincomb, multistep_coefficients
from .base import ScoreSchedulerBase
from .config import DPM_SOLVER_FIELDS, config_init, knobs_of, spec_of
from .knobs import MULTISTEP, warn_knob


class ScoreDPMSolverScheduler(ScoreSchedulerBase):
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

    # the public path: saved pipelines record it in model_index.json
    __module__ = "score_toolkit.diffusers_schedulers"
    sampler_name = "dpmpp_2m"
    stochastic = False
    _spacing_style = "dpm"
    _own_knobs = MULTISTEP + ("lambda_min_clipped",)

    @config_init(DPM_SOLVER_FIELDS, grid="log_sigma")
    def __init__(self, **config):
        solver_order, solver_type, algorithm_type = config["solver_order"], config["solver_type"], config["algorithm_type"]
        lower_order_final, euler_at_final = config["lower_order_final"], config["euler_at_final"]
        lambda_min_clipped = config["lambda_min_clipped"]
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
            warn_knob("ScoreDPMSolverScheduler", "algorithm_type", algorithm_type,
                      "another DPM-Solver variant (this scheduler runs dpmsolver++, the data-prediction ODE solver)")
        if not isinstance(lambda_min_clipped, (int, float)) or isinstance(lambda_min_clipped, bool) or (
                lambda_min_clipped != lambda_min_clipped):
            raise TypeError(f"scheduler config field 'lambda_min_clipped': expected a number, found {lambda_min_clipped!r}")
        sigma_grid = config["use_karras_sigmas"] or config["use_exponential_sigmas"] or config["use_lu_lambdas"]
        if lambda_min_clipped > -math.inf and (config["timestep_spacing"] is None or sigma_grid):
            warn_knob("ScoreDPMSolverScheduler", "lambda_min_clipped", lambda_min_clipped,
                      "the clipping of timestep_spacing's table indices",
                      extra=" on a grid not built from timestep_spacing (timestep_spacing None, or use_karras_sigmas / "
                            "use_exponential_sigmas / use_lu_lambdas: diffusers ignores it there too)")
        self._setup(spec_of(config), knobs_of(config))
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
