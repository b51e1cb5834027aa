"""Langevin dynamics at one fixed noise level: the unadjusted Langevin algorithm (ULA; Roberts & Tweedie
1996; Song & Ermon 2019, eq. 4) and, with ``metropolis=True``, its Metropolis-adjusted version (MALA;
Roberts & Tweedie 1996, Besag 1994).

Step-size convention: ``step_size`` is ``eps`` in

    x <- x + (eps / 2) s(x, t) + sqrt(eps) z,        z ~ N(0, I)

(Song & Ermon 2019). The other common convention ``x <- x + eta s + sqrt(2 eta) z`` (used by the
predictor-corrector sampler's corrector) has ``eta = eps / 2``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .._utils import append_dims, as_time
from ..processes import Process
from .base import NonFiniteError, Sampler, SamplerProperties, SamplingContext, check_float, check_int

__all__ = ["LangevinSampler"]


def energy_or_none(score_fn):
    """``score_fn.energy`` (``-log p_t`` up to a constant) where it is one (an analytic score, a ScoreAdapter with
    ``prediction_type="energy"``, a transform of such a score), else ``None``."""
    energy = getattr(score_fn, "energy", None)
    if callable(energy) and getattr(score_fn, "prediction_type", "energy") == "energy":
        return energy
    return None


def energy_function(score_fn, sampler: str):
    """The ``energy(x, t) -> (B,)`` view of ``score_fn`` (``-log p_t`` up to a constant), or a ``ValueError``
    saying how to get one: a :class:`~score_toolkit.scores.ScoreAdapter` with ``prediction_type="energy"``
    or an analytic score (``GaussianMixture.score_fn(process)``)."""
    energy = energy_or_none(score_fn)
    if energy is None:
        prediction_type = getattr(score_fn, "prediction_type", "energy")
        energy = getattr(score_fn, "energy", None)
        found = f"prediction_type={prediction_type!r}" if callable(energy) else f"{type(score_fn).__name__} without energy()"
        raise ValueError(
            f"sampler {sampler!r}: metropolis=True needs a score function with an energy(x, t) method "
            "(a ScoreAdapter with prediction_type='energy', or GaussianMixture.score_fn(process)); "
            f"found {found}"
        )
    return energy


class LangevinSampler(Sampler):
    """Langevin dynamics targeting ``p_t`` at one fixed time ``t`` (ULA, or MALA with ``metropolis=True``).

    ULA (Song & Ermon 2019, eq. 4): ``num_steps`` times ``x <- x + (eps/2) s(x, t) + sqrt(eps) z`` with
    ``eps = step_size``. Its stationary law is biased at order ``eps``: for a ``N(0, v)`` target the
    stationary variance is ``v / (1 - eps / (4 v))``; it is stable only for ``eps < 4 v_min`` (the smallest
    variance of the target). It does not cross between well separated modes in any practical number of
    steps: the mode weights of its output are those of the initial state's basins (annealed Langevin exists
    for this reason).

    MALA (``metropolis=True``): the same move is a proposal ``y``, accepted per sample with probability
    ``min(1, exp(E(x) - E(y)) q(x | y) / q(y | x))``, ``q(y | x) = N(y; x + (eps/2) s(x), eps I)``, ``E = -log p_t``
    (+ const). Exact at stationarity (no step-size bias). Needs the score function's ``energy(x, t)``
    (``properties.needs_energy`` is ``True`` for this configuration).

    Options:
        step_size (1e-3): ``eps`` above (problem dependent: keep it well below ``4 v_min``).
        num_steps (1000): number of steps.
        t (None): the time whose ``p_t`` is targeted; ``None`` means ``process.t_min``.
        metropolis (False): MALA instead of ULA.

    The initial state defaults to the process's prior (pass ``x_init`` to start elsewhere); ``denoise=True``
    applies Tweedie's denoiser at ``t``. NFE counts score evaluations: ``num_steps`` for ULA; for MALA
    ``2 (num_steps + 1)`` (a score and an energy evaluation per proposal, plus both at the initial state).
    """

    name = "langevin"
    description = "Langevin dynamics at one fixed noise level (ULA, or MALA with metropolis=True)"
    properties = SamplerProperties(stochastic=True, order=None, final_time="fixed")
    options = {"step_size": 1e-3, "num_steps": 1000, "t": None, "metropolis": False}
    # conformance suite: p_t at t = 0.6 is reached from the prior in 300 steps (within-mode sliced W2 0.85x (VE)
    # and 0.84x (VP) the noise floor, mode weights within sampling noise); at t_min a fixed-level chain cannot fix the mode weights.
    conformance = {"sampler_options": {"num_steps": 20},
                   "accuracy_options": {"t": 0.6, "step_size": 0.2, "num_steps": 300}}

    def __init__(self, **options):
        super().__init__(**options)
        if self.config["metropolis"]:
            self.properties = dataclasses.replace(type(self).properties, needs_energy=True)

    def _validate_options(self, cfg):
        super()._validate_options(cfg)
        check_float(cfg, "step_size", self.name)
        check_int(cfg, "num_steps", self.name)
        if cfg["t"] is not None:
            check_float(cfg, "t", self.name)
        if not isinstance(cfg["metropolis"], bool):
            raise TypeError(f"sampler {self.name!r}: expected option metropolis to be a bool, found {cfg['metropolis']!r}")

    @property
    def nfe(self) -> int:
        """Evaluations of one run (score and energy): ``num_steps`` (ULA) or ``2 (num_steps + 1)`` (MALA),
        +1 with ``denoise``."""
        n = self.config["num_steps"]
        return (2 * (n + 1) if self.config["metropolis"] else n) + self._final_steps_nfe()

    def _check_process(self, process: Process) -> None:
        t = self._final_time(process)
        if not process.t_min - 1e-12 <= t <= process.t_max + 1e-12:
            raise ValueError(
                f"sampler {self.name!r}: expected option t in [{process.t_min:g}, {process.t_max:g}] for "
                f"{type(process).__name__}, found {t!r}"
            )

    def _final_time(self, process: Process) -> float:
        t = self.config["t"]
        return process.t_min if t is None else float(t)

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        t = self._final_time(ctx.process)
        eps = self.config["step_size"]
        n = self.config["num_steps"]
        if not self.config["metropolis"]:
            for i in range(n):
                x = x + (eps / 2) * ctx.score(x, t) + math.sqrt(eps) * ctx.randn_like(x)
                ctx.record(x, t, step=i + 1)
            return x
        return self._mala(ctx, x, t, eps, n)

    def _mala(self, ctx: SamplingContext, x: torch.Tensor, t: float, eps: float, n: int) -> torch.Tensor:
        energy_fn = energy_function(ctx.score_fn, self.name)
        t_vec = ctx.process.clamp_t(as_time(t, x.shape[0], like=x))

        def energy(y):
            e = energy_fn(y, t_vec)
            ctx.nfe += 1
            if not isinstance(e, torch.Tensor) or e.shape != (y.shape[0],):
                found = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ValueError(f"sampler {self.name!r}: expected energy(x, t) of shape ({y.shape[0]},), found {found}")
            return e

        def log_q(to, frm, s_frm):  # log N(to; frm + (eps/2) s(frm), eps I) up to a constant
            return -(to - frm - (eps / 2) * s_frm).flatten(1).pow(2).sum(1) / (2 * eps)

        s_x, e_x = ctx.score(x, t), energy(x)
        for i in range(n):
            y = x + (eps / 2) * s_x + math.sqrt(eps) * ctx.randn_like(x)
            s_y, e_y = ctx.score(y, t), energy(y)
            bad = ~torch.isfinite(s_y).flatten(1).all(1) | torch.isnan(e_y)
            if bool(bad.any()):  # a rejection would hide the failure
                raise NonFiniteError(
                    f"sampler {self.name!r}: NaN or infinite score or NaN energy at the proposal of step {i + 1} "
                    f"(t = {t:.6g}) in {int(bad.sum())} of {x.shape[0]} samples; check the score function"
                )
            log_ratio = e_x - e_y + log_q(x, y, s_y) - log_q(y, x, s_x)
            u = ctx.rand((x.shape[0],), like=x)
            accept = torch.log(u) < log_ratio
            keep = append_dims(accept, x.ndim)
            x, s_x, e_x = torch.where(keep, y, x), torch.where(keep, s_y, s_x), torch.where(accept, e_y, e_x)
            ctx.record(x, t, step=i + 1)
        return x
