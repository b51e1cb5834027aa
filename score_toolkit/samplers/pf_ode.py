"""Probability-flow ODE sampler (Song et al. 2021, "Score-based generative modeling through SDEs", eq. 13):

    dx/dt = f(t) x - g(t)^2 s(x, t) / 2,    from t = 1 down to t_min,

integrated with ``torchdiffeq.odeint``: adaptively (Dormand-Prince RK45, ``dopri5``, by default, as
score_sde's ODE sampler does with scipy's RK45 at rtol = atol = 1e-5) or on a fixed grid (``euler`` runs
its own loop, the same chain at a fraction of torchdiffeq's per-step cost).

Deterministic given the initial state: the generator only draws the initial state from the prior.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

import torch
import torchdiffeq

from ..processes import TIME_GRIDS
from ._odeint import raise_odeint_failure
from .base import (
    NonFiniteError,
    Sampler,
    SamplerProperties,
    SamplingContext,
    all_finite,
    check_choice,
    check_float,
    check_int,
    time_dtype,
)
from .grids import check_to_zero, step_to_zero

__all__ = ["ProbabilityFlowODESampler"]


class _Method(NamedTuple):
    adaptive: bool
    order: int  # torchdiffeq's declared order (checked against torchdiffeq in the tests)
    nfe_per_step: int  # score evaluations per step (adaptive: per step attempted, after 2 for the first step)


METHODS: dict[str, _Method] = {
    "dopri5": _Method(True, 5, 6),
    "dopri8": _Method(True, 8, 13),  # torchdiffeq evaluates all 13 stages (no FSAL reuse)
    "bosh3": _Method(True, 3, 3),
    "adaptive_heun": _Method(True, 2, 1),
    "euler": _Method(False, 1, 1),
    "midpoint": _Method(False, 2, 2),
    "heun2": _Method(False, 2, 2),
    "heun3": _Method(False, 3, 3),
    "rk4": _Method(False, 4, 4),
}

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_NUM_STEPS = 10_000
DEFAULT_MAX_NFE = 10_000

_ADAPTIVE_ONLY = ("rtol", "atol", "max_num_steps", "max_nfe", "per_sample_norm")


def per_sample_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """max over samples of the RMS over each sample's features: the step is accepted only when every
    sample meets the tolerance by itself (torchdiffeq's default RMS over the whole batch lets a hard
    sample hide among easy ones)."""
    return x.reshape(x.shape[0], -1).abs().pow(2).mean(1).sqrt().max()


class _ProbabilityFlow:
    """The ODE right-hand side for torchdiffeq, with its step hooks (``callback_step``)."""

    def __init__(self, ctx: SamplingContext, max_num_steps: int | None, record_steps: bool):
        self._ctx = ctx
        self._max_num_steps = max_num_steps
        self._record_steps = record_steps
        self.steps = 0  # steps attempted (accepted and rejected)
        self.t = ctx.process.t_max
        self._coefs: dict[float, tuple[float, float]] = {}  # (f, g^2) at the times of a fixed grid

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = float(t)
        coefs = self._coefs.get(t)
        if coefs is None:
            process = self._ctx.process
            # adaptive steps may probe past t_min (the score is clamped too, in ctx.score)
            tt = process.clamp_t(torch.tensor([t], dtype=torch.float64))
            coefs = float(process.drift_coef(tt)), float(process.diffusion_squared(tt).clamp_min(0))
            if self._record_steps:  # a fixed grid: the same few times come back
                self._coefs[t] = coefs
        f_t, g2 = coefs
        s = self._ctx.score(x, t)
        # f = 0 (VE): skip the product 0 * x (the same drift, up to the sign of zero entries)
        dx = torch.mul(s, -0.5 * g2) if f_t == 0.0 else f_t * x - (0.5 * g2) * s
        if not all_finite(dx):
            raise NonFiniteError(
                f"sampler {self._ctx.sampler.name!r}: the probability-flow drift became NaN or infinite at step "
                f"{self.steps} (t = {t:.6g}); check the score function"
            )
        return dx

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        # called by torchdiffeq before every step attempt, with the state reached so far
        if self._record_steps and self.steps > 0:
            self._ctx.record(y0, float(t0), step=self.steps)
        self.steps += 1
        self.t = float(t0)
        if self._max_num_steps is not None and self.steps > self._max_num_steps:
            raise RuntimeError(_too_many_steps(self._ctx.sampler.name, self._max_num_steps, self.t))


def _too_many_steps(name: str, max_num_steps: int, t: float) -> str:
    return (
        f"sampler {name!r}: exceeded max_num_steps={max_num_steps} at t = {t:.6g} before reaching t_min; raise "
        f"max_num_steps, loosen rtol/atol, or use a fixed-grid method"
    )


class ProbabilityFlowODESampler(Sampler):
    """Probability-flow ODE with torchdiffeq (and a plain loop for fixed-grid Euler).

    Options:
        method (str, ``"dopri5"``): adaptive ``dopri5`` (RK45, order 5), ``dopri8``, ``bosh3`` (order 3),
            ``adaptive_heun`` (order 2); fixed-grid ``euler`` (1; a plain loop, see :func:`_euler`),
            ``midpoint`` (2), ``heun2`` (2), ``heun3`` (3), ``rk4`` (4; the 3/8 rule, 4 score evaluations per
            step).
        num_steps (int, 100): fixed-grid methods: steps of the grid. Adaptive methods: intervals of the grid
            of output times at which the trajectory is recorded when ``return_trajectory=True`` (dense
            output: extra output times cost no score evaluation).
        grid (str, ``"uniform"``): kind of that grid (:meth:`Process.time_grid`: uniform, log_sigma, karras).
        rtol, atol (float, adaptive methods only; default 1e-5 each, score_sde's choice): tolerances of
            the error test ``||err / (atol + rtol max(|y0|, |y1|))|| <= 1``.
        max_num_steps (int, adaptive methods only; default 10000): cap on the steps attempted (accepted
            and rejected) over the whole solve; exceeding it raises a ``RuntimeError`` (also under
            ``python -O``, where torchdiffeq's own ``assert`` vanishes).
        max_nfe (int, adaptive methods only; default 10000): cap on the score evaluations of the whole run
            (final steps included); exceeding it raises :class:`~score_toolkit.samplers.base.NFEBudgetError`
            (a ``RuntimeError``). A score that is not smooth (e.g. piecewise constant) otherwise drives the
            step size down for tens of thousands of evaluations.
        to_zero (bool, False): end with the PF-ODE step from ``t_min`` to noise level 0 (one more
            evaluation; :func:`~score_toolkit.samplers.grids.step_to_zero`); exclusive with ``denoise``.
        per_sample_norm (bool, adaptive methods only; default ``True``): measure the error as the max over
            samples of each sample's RMS (:func:`per_sample_rms_norm`), so that every sample meets the
            tolerance by itself and its result depends on its batch only within that tolerance (steps are
            still shared). ``False`` uses torchdiffeq's RMS over the whole batch (cheaper; a hard sample among
            easy ones may end far less accurate).
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.

    The adaptive options default to ``None`` (meaning the defaults above) and must stay ``None`` with a
    fixed-grid method, where they would be ignored.

    Adaptive steps are never allowed past t_min (torchdiffeq's ``step_t`` forces a step to end exactly
    there); the few evaluations an adaptive solver still makes outside [t_min, 1] (e.g. its initial step
    probe on a short interval) see t clamped into the process's range.

    Recording (finiteness check, trajectory, callback, progress): fixed-grid methods after every step;
    adaptive methods after the solve, at the output times (the end only, or the ``num_steps`` grid with
    ``return_trajectory=True``). A NaN or infinite drift raises :class:`NonFiniteError` at once.

    Score evaluations: fixed grid ``num_steps * nfe_per_step`` (euler 1, midpoint 2, heun2 2, heun3 3,
    rk4 4); dopri5 ``2 + 6 * steps attempted`` (two for the initial step size, FSAL), dopri8 ``2 + 13 * steps``,
    bosh3 ``2 + 3 * steps``, adaptive_heun ``2 + steps``; plus one for ``to_zero`` or ``denoise``. ``properties`` is an
    instance attribute reflecting the chosen method (order, adaptive, per_sample).
    """

    name: ClassVar[str] = "pf_ode"
    description: ClassVar[str] = "Probability-flow ODE (Song et al. 2021, eq. 13) with torchdiffeq (adaptive dopri5 by default, or a fixed grid)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(
        stochastic=False, order=5, adaptive=True, fixed_grid=False, per_sample=False
    )
    options: ClassVar[dict[str, Any]] = {
        "method": "dopri5",
        "num_steps": 100,
        "grid": "uniform",
        "rtol": None,
        "atol": None,
        "max_num_steps": None,
        "max_nfe": None,
        "per_sample_norm": None,
        "to_zero": False,
    }

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        check_to_zero(cfg, self.name)
        method = check_choice(cfg, "method", self.name, tuple(METHODS))
        check_int(cfg, "num_steps", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        spec = METHODS[method]
        if not spec.adaptive:
            given = [k for k in _ADAPTIVE_ONLY if cfg[k] is not None]
            if given:
                raise ValueError(
                    f"sampler {self.name!r}: option(s) {', '.join(given)} only apply to adaptive methods "
                    f"{tuple(m for m, s in METHODS.items() if s.adaptive)}, found method={method!r}"
                )
        else:
            for key in ("rtol", "atol"):
                if cfg[key] is not None:
                    check_float(cfg, key, self.name)
            for key in ("max_num_steps", "max_nfe"):
                if cfg[key] is not None:
                    check_int(cfg, key, self.name)
            if cfg["per_sample_norm"] is not None and not isinstance(cfg["per_sample_norm"], bool):
                raise TypeError(
                    f"sampler {self.name!r}: expected option per_sample_norm to be a bool or None, "
                    f"found {cfg['per_sample_norm']!r}"
                )
        props = replace(
            type(self).properties,
            order=spec.order,
            adaptive=spec.adaptive,
            fixed_grid=not spec.adaptive,
            # adaptive solves share their steps across the batch: even with the per-sample norm a
            # sample's result depends on its neighbours (within the tolerance), so it is not per-sample
            per_sample=not spec.adaptive,
        )
        if props != type(self).properties:
            self.properties = props

    @staticmethod
    def _setting(cfg: dict[str, Any], key: str):
        """An adaptive option's value, with ``None`` meaning its default."""
        defaults = {"rtol": DEFAULT_RTOL, "atol": DEFAULT_ATOL, "max_num_steps": DEFAULT_MAX_NUM_STEPS,
                    "max_nfe": DEFAULT_MAX_NFE, "per_sample_norm": True}
        return defaults[key] if cfg[key] is None else cfg[key]

    def _num_progress_steps(self) -> int | None:
        return None if METHODS[self.config["method"]].adaptive else self.config["num_steps"]

    @property
    def nfe(self) -> int | None:
        """Score evaluations of one run with a fixed-grid method (``None`` for adaptive ones)."""
        spec = METHODS[self.config["method"]]
        if spec.adaptive:
            return None
        return self.config["num_steps"] * spec.nfe_per_step + self._final_steps_nfe()

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        x = self._solve(ctx, x)
        if self.config["to_zero"]:
            x = step_to_zero(ctx, x, ctx.process.t_min)
        return x

    def _solve(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        method = cfg["method"]
        spec = METHODS[method]
        process = ctx.process
        grid = process.time_grid(cfg["num_steps"], cfg["grid"], dtype=torch.float64)  # on the CPU: MPS has no float64
        if method == "euler":
            return _euler(ctx, x, grid.tolist())
        times_cpu = grid
        grid = grid.to(device=x.device, dtype=time_dtype(x))  # torchdiffeq's times, on the state's device
        ends = grid[[0, -1]]
        if not spec.adaptive:
            func = _ProbabilityFlow(ctx, None, record_steps=True)
            options = {"grid_constructor": lambda f, y0, t: grid.to(t)}
            y = torchdiffeq.odeint(func, x, ends, method=method, options=options)[-1]
            ctx.record(y, float(grid[-1]), step=cfg["num_steps"])
            return y

        max_num_steps = self._setting(cfg, "max_num_steps")
        ctx.max_nfe = self._setting(cfg, "max_nfe")
        func = _ProbabilityFlow(ctx, max_num_steps, record_steps=False)
        options: dict[str, Any] = {"max_num_steps": max_num_steps, "step_t": ends[1:].clone()}
        if self._setting(cfg, "per_sample_norm"):
            options["norm"] = per_sample_rms_norm
        times = grid if ctx.trajectory is not None else ends
        times_cpu = times_cpu if ctx.trajectory is not None else times_cpu[[0, -1]]
        try:
            ys = torchdiffeq.odeint(func, x, times, rtol=self._setting(cfg, "rtol"), atol=self._setting(cfg, "atol"),
                                    method=method, options=options)
        except AssertionError as e:  # torchdiffeq checks with assert (absent under python -O)
            raise_odeint_failure(e, who=f"sampler {self.name!r}", t=func.t, steps=func.steps,
                                 too_many=_too_many_steps(self.name, max_num_steps, func.t))
        ctx.info = {"steps_attempted": func.steps}
        tl = times_cpu.tolist()
        for i in range(1, len(tl)):
            ctx.record(ys[i], tl[i], step=i)
        return ys[-1]


def _euler(ctx: SamplingContext, x: torch.Tensor, times: list[float]) -> torch.Tensor:
    """Fixed-grid Euler on the probability-flow ODE, ``x <- x + (t_1 - t_0) (f x - g^2 s / 2)``, in a plain loop
    rather than torchdiffeq's (whose per-step work, time reversal, output interpolation bookkeeping and step
    hooks, cost more than the step itself at small batch): one fused pass per step for VE (``f = 0``), two
    otherwise, and ``ctx.record``'s finiteness check after every step, as on every fixed grid. The same chain as
    torchdiffeq's ``euler`` up to float rounding (tested)."""
    t = torch.tensor(times, dtype=torch.float64)
    f = ctx.process.drift_coef(t).tolist()
    g2 = ctx.process.diffusion_squared(t).clamp_min(0).tolist()
    for i in range(len(times) - 1):
        dt = times[i + 1] - times[i]
        s = ctx.score(x, times[i])
        # x + dt (f x - g^2 s / 2) = (1 + dt f) x - (dt g^2 / 2) s
        x = torch.add(x if f[i] == 0.0 else x * (1.0 + dt * f[i]), s, alpha=-0.5 * g2[i] * dt)
        ctx.record(x, times[i + 1], step=i + 1)
    return x
