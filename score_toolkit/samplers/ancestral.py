"""Ancestral sampling: DDPM (Ho et al. 2020, Algorithm 2) for VP processes and its SMLD counterpart for
VE (Song et al. 2021, Appendix F), unified through the exact Gaussian posterior of the forward process.

For times ``s < t`` the forward transition is ``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)`` with
``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2`` (Kingma et al.
2021, "Variational Diffusion Models", Sec. 3.1). Its posterior given the clean point is

    q(x_s | x_t, x_0) = N(mean, var),
    mean = (alpha_{t|s} sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x_0,
    var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2

(Ho et al. 2020, eqs. 6-7 in the discrete notation). Ancestral sampling replaces ``x_0`` by Tweedie's
denoiser ``x_0 = (x_t + sigma_t^2 s(x_t, t)) / alpha_t``. For VP this mean is exactly
``(x + beta s) / sqrt(1 - beta)`` with ``beta = 1 - alpha_{t|s}^2`` (DDPM's score form); for VE it is
``x + (sigma_t^2 - sigma_s^2) s`` with variance ``sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2``
(score_sde's ``AncestralSamplingPredictor`` for SMLD). In general, substituting Tweedie's ``x_0`` gives
``mean = (x_t + sigma_{t|s}^2 s(x_t, t)) / alpha_{t|s}``, the form computed here (it never divides by a
small ``alpha_t``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..processes import TIME_GRIDS, Process
from .base import Sampler, SamplerProperties, SamplingContext, check_choice, check_int

__all__ = ["AncestralSampler", "forward_transition", "forward_transitions"]


def forward_transition(process: Process, t: float, s: float) -> tuple[float, float, float, float, float, float]:
    """Coefficients of the forward transition ``q(x_t | x_s)`` between two times ``s < t``.

    Returns ``(alpha_t, sigma_t, alpha_s, sigma_s, alpha_{t|s}, sigma_{t|s}^2)`` as Python floats computed in
    float64, with ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``.
    Raises ``ValueError`` if ``sigma_{t|s}^2 <= 0`` (the process's noise does not grow from s to t).
    """
    ts = torch.tensor([t, s], dtype=torch.float64)
    alpha, sigma = process.marginal(ts)
    a_t, a_s = alpha.tolist()
    s_t, s_s = sigma.tolist()
    return _transition(process, t, s, a_t, s_t, a_s, s_s)


def forward_transitions(process: Process, times) -> list[tuple[float, float, float, float, float, float] | None]:
    """:func:`forward_transition` from each time of a grid to the next (``times[i] -> times[i + 1]``, one marginal
    evaluation for the whole grid), ``None`` where ``times[i + 1] >= times[i]`` (a zero-length step)."""
    ts = torch.as_tensor(times, dtype=torch.float64).flatten()
    alpha, sigma = process.marginal(ts)
    tl, al, sl = ts.tolist(), alpha.tolist(), sigma.tolist()
    return [_transition(process, tl[i], tl[i + 1], al[i], sl[i], al[i + 1], sl[i + 1]) if tl[i + 1] < tl[i] else None
            for i in range(len(tl) - 1)]


def _transition(process, t, s, a_t, s_t, a_s, s_s):
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    if not var_ts > 0:
        raise ValueError(
            f"{type(process).__name__}: expected the forward transition variance sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 "
            f"to be > 0 between s = {s:.6g} and t = {t:.6g}, found {var_ts:.3g}; ancestral steps need a process whose "
            "noise-to-signal ratio sigma/alpha strictly increases in t (or a coarser time grid)"
        )
    return a_t, s_t, a_s, s_s, a_ts, var_ts


class AncestralSampler(Sampler):
    """Ancestral sampling with the exact Gaussian posterior of the process (DDPM / SMLD ancestral).

    On the grid ``t_0 = 1 > t_1 > ... > t_N = t_min`` (``process.time_grid(num_steps, grid)``) each step from
    ``t = t_i`` to ``s = t_{i+1}`` draws ``x_s ~ N(mean, var)`` with

        x_0   = (x_t + sigma_t^2 s(x_t, t)) / alpha_t                          (Tweedie)
        mean  = (alpha_{t|s} sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x_0
              = (x_t + sigma_{t|s}^2 s(x_t, t)) / alpha_{t|s}
        var   = sigma_{t|s}^2 sigma_s^2 / sigma_t^2   (variance="posterior", Ho et al.'s sigma^2 = beta~)
              = sigma_{t|s}^2                          (variance="forward",   Ho et al.'s sigma^2 = beta)

    (Ho et al. 2020, Algorithm 2 and eqs. 6-7; Song et al. 2021, Appendix F for VE). Noise is added on every
    step including the last (to ``t_min``); pass ``denoise=True`` for a final Tweedie step at ``t_min``. A step is
    two fused passes over the state (:func:`_posterior_step`); the grid and the step coefficients are computed once
    per process and kept for the next run.

    Options:
        num_steps (1000): number of steps (= NFE, plus one with ``denoise``).
        grid ("uniform"): time grid kind: "uniform" in t, "log_sigma", "karras" (see ``Process.time_grid``).
        variance ("posterior"): "posterior" or "forward" (see above).

    Works with every process whose ``sigma/alpha`` increases in t (VE, VP, sub-VP, discrete VP tables);
    otherwise a step raises ``ValueError``. Declared weak order 1.
    """

    name = "ancestral"
    description = "DDPM / SMLD ancestral sampling with the exact Gaussian posterior of the process (Ho et al. 2020)"
    properties = SamplerProperties(stochastic=True, order=1.0)
    options = {"num_steps": 1000, "grid": "uniform", "variance": "posterior"}
    # conformance suite: 200 steps reach 1.06x (VE) and 0.91x (VP) the within-mode sliced-W2 noise floor
    conformance = {"sampler_options": {"num_steps": 20}, "accuracy_options": {"num_steps": 200}}

    def _validate_options(self, cfg):
        super()._validate_options(cfg)
        check_int(cfg, "num_steps", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        check_choice(cfg, "variance", self.name, ("posterior", "forward"))

    @property
    def nfe(self) -> int:
        """Score evaluations of one run: ``num_steps`` (+1 with ``denoise``)."""
        return self.config["num_steps"] + self._final_steps_nfe()

    def _steps(self, process: Process) -> tuple[list[float], list[tuple[float, float, float]]]:
        """The grid and each step's ``(alpha_{t|s}, sigma_{t|s}^2, std)`` as Python floats, computed once per process
        object and options (processes are immutable) and kept for the next run."""
        key = (process, self.config["num_steps"], self.config["grid"], self.config["variance"])
        cached = self.__dict__.get("_setup")
        if cached is not None and cached[0][0] is process and cached[0][1:] == key[1:]:
            return cached[1]
        ts = process.time_grid(self.config["num_steps"], self.config["grid"]).tolist()
        posterior = self.config["variance"] == "posterior"
        steps = []
        for _, s_t, _, s_s, a_ts, var_ts in forward_transitions(process, ts):
            var = var_ts * s_s**2 / s_t**2 if posterior else var_ts
            steps.append((a_ts, var_ts, var**0.5))
        self._setup = (key, (ts, steps))
        return ts, steps

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        ts, steps = self._steps(ctx.process)
        for i, (a_ts, var_ts, std) in enumerate(steps):
            x = _posterior_step(x, ctx.score(x, ts[i]), a_ts, var_ts, std, ctx.randn_like)
            ctx.record(x, ts[i + 1], step=i + 1)
        return x


def _posterior_step(x: torch.Tensor, score: torch.Tensor, a_ts: float, var_ts: float, std: float,
                    draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One ancestral step ``(x + sigma_{t|s}^2 score) / alpha_{t|s} + std z`` with ``z = draw(x)`` (drawn after the
    score, as every caller evaluates it first). Two fused passes over the state, ``x + var_ts score`` and
    ``+ std z`` (``torch.add(..., alpha=)``, one rounding each), and a division only where ``alpha_{t|s} != 1``
    (VE never divides). Shared by :class:`AncestralSampler` and its diffusers scheduler, which thereby agree bit
    for bit."""
    mean = torch.add(x, score, alpha=var_ts)
    if a_ts != 1.0:
        mean.div_(a_ts)
    return mean.add_(draw(x), alpha=std)
