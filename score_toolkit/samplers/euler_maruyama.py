"""Reverse-time SDE sampler (Song et al. 2021, "Score-based generative modeling through SDEs", eq. 6):

    dx = [f(t) x - g(t)^2 s(x, t)] dt + g(t) dw_bar,    from t = 1 down to t_min,

integrated with ``torchsde.sdeint`` on a fixed grid (Euler-Maruyama by default).

torchsde integrates forward in time, so the sampler substitutes ``u = -t`` (``u`` increases from -1 to
-t_min): ``dx = -[f(-u) x - g(-u)^2 s(x, -u)] du + g(-u) dW_u``, and maps the grid's intervals onto unit
steps (see :class:`_ReverseTimeSDE`) so that one ``sdeint`` call steps exactly on any grid. The noise is
additive (``g`` does not depend on ``x``), so the Ito and Stratonovich readings of this SDE coincide and
torchsde's Stratonovich solvers are valid too. Increments come from :class:`~score_toolkit.samplers._brownian.GridBrownianMotion`
(torch generators, per-sample with a generator list, exactly on the grid), never from torchsde's numpy-seeded
Brownian interval.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

import torch
import torchsde

from ..processes import TIME_GRIDS
from ._brownian import GridBrownianMotion
from .base import Sampler, SamplerProperties, SamplingContext, check_choice, check_int

__all__ = ["EulerMaruyamaSampler"]


class _Method(NamedTuple):
    sde_type: str  # how torchsde reads the SDE (both readings agree for additive noise)
    levy_area: str  # what the solver needs from the Brownian motion
    weak_order: float  # torchsde's declared weak order (checked against torchsde in the tests)
    nfe_per_step: int  # score evaluations per step (torchsde's repeated evaluations are cached)


METHODS: dict[str, _Method] = {
    "euler": _Method("ito", "none", 1.0, 1),
    # Milstein's correction g g' vanishes for additive noise: same iterates as euler.
    "milstein": _Method("ito", "none", 1.0, 1),
    # Roessler's SRA1 (torchsde's additive-noise SRK), needs the space-time Levy area.
    "srk": _Method("ito", "space-time", 1.5, 2),
    "heun": _Method("stratonovich", "none", 1.0, 2),
    "midpoint": _Method("stratonovich", "none", 1.0, 2),
    "euler_heun": _Method("stratonovich", "none", 1.0, 1),
}

_UNSUPPORTED = {
    "log_ode": "it needs Davie/Foster Levy-area approximations, which this sampler's Brownian motion does not "
               "generate (for additive noise it reduces to 'midpoint': use that)",
    "reversible_heun": "it carries solver state across steps for reversible adjoint backpropagation; use 'heun' "
                       "or 'midpoint'",
    "adjoint_reversible_heun": "it is only for the backward pass of torchsde's adjoint",
}


class _ReverseTimeSDE:
    """The reverse SDE for torchsde, on flattened (B, D) states, in the step variable ``s``.

    Time runs as ``u = -t`` (increasing), and ``u`` is mapped piecewise linearly onto ``s``:
    ``u(s) = u_k + (s - k) h_k`` on ``[k, k + 1]`` with ``h_k = u_{k+1} - u_k``, so that any grid (uniform,
    log-sigma, Karras) becomes the integers ``0..n`` and one ``sdeint`` call with ``dt = 1`` steps exactly on
    it (integers are exact in floating point: no stray last step). In ``s`` the drift is
    ``h_k [g^2 s(x, t) - f(t) x]`` and the diffusion ``g(t) sqrt(h_k)``; an Euler step is then exactly
    ``x + (g^2 s - f x) h_k + g sqrt(h_k) z``, the Euler-Maruyama step on the t grid.

    Every supported torchsde solver draws the step's increment first and then evaluates ``f`` at the
    start of the step on the current state: that call records the state reached by the previous step
    (finiteness check, trajectory, callback, progress). ``f`` also remembers its last call: torchsde's
    contract check evaluates ``f(ts[0], y0)`` before the first step does, and SRA1 repeats a stage, so a
    repeat costs no score evaluation.
    """

    noise_type = "additive"

    def __init__(self, ctx: SamplingContext, shape: torch.Size, ts: torch.Tensor, sde_type: str, bm: GridBrownianMotion):
        self.sde_type = sde_type
        self._ctx = ctx
        self._shape = shape
        self._t = ts.tolist()
        # coefficients on the grid, computed at once (most evaluations fall on grid points)
        self._f = ctx.process.drift_coef(ts).tolist()
        self._g2 = ctx.process.diffusion_squared(ts).clamp_min(0).tolist()
        self._bm = bm
        self._recorded = 0
        self._last: tuple[float, torch.Tensor, torch.Tensor] | None = None

    def _coefs(self, s) -> tuple[float, float, float, float]:
        """(t, f(t), g(t)^2, h_k) at step variable s, on the interval the solver is stepping through
        (h_k = t_k - t_{k+1} > 0, the step in t)."""
        s = float(s)
        k = max(self._bm.current_interval, 0)
        t0, t1 = self._t[k], self._t[k + 1]
        c = s - k
        if c == 0.0 or c == 1.0:
            j = k + int(c)
            return self._t[j], self._f[j], self._g2[j], t0 - t1
        t = t0 + c * (t1 - t0)
        tt = torch.tensor([t], dtype=torch.float64)
        process = self._ctx.process
        return t, float(process.drift_coef(tt)), float(process.diffusion_squared(tt).clamp_min(0)), t0 - t1

    def _record_previous_step(self, s: float, y: torch.Tensor) -> None:
        k = self._bm.current_interval
        if k > self._recorded:
            if s != k or k != self._recorded + 1:  # pragma: no cover - guards against a change in torchsde
                raise RuntimeError(
                    f"sampler {self._ctx.sampler.name!r}: expected torchsde to evaluate the drift at the start of "
                    f"step {self._recorded + 1} first, found s = {s:g} in interval {k}"
                )
            self._ctx.record(y.reshape(self._shape), self._t[k], step=k)
            self._recorded = k

    def f(self, s, y: torch.Tensor) -> torch.Tensor:
        s = float(s)
        self._record_previous_step(s, y)
        if self._last is not None and self._last[1] is y and self._last[0] == s:
            return self._last[2]
        t, f_t, g2, h = self._coefs(s)
        score = self._ctx.score(y.reshape(self._shape), t).reshape(y.shape)
        out = (g2 * h) * score - (f_t * h) * y  # h_k (g^2 s - f x): minus the forward drift, as t decreases
        self._last = (s, y, out)
        return out

    def g_prod(self, s, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, _, g2, h = self._coefs(s)
        return (g2 * h) ** 0.5 * v


def _global_rng_state(device: torch.device):
    if device.type == "cpu":
        return torch.get_rng_state()
    return getattr(torch, device.type).get_rng_state(device)


def _set_global_rng_state(device: torch.device, state) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


class EulerMaruyamaSampler(Sampler):
    """Euler-Maruyama (or another fixed-step torchsde solver) on the reverse-time SDE.

    Options:
        num_steps (int, 1000): steps of the fixed time grid from t = 1 to t_min.
        grid (str, ``"uniform"``): grid kind of :meth:`Process.time_grid`: ``uniform`` in t,
            ``log_sigma`` (uniform in ln(sigma/alpha)) or ``karras`` (rho = 7).
        method (str, ``"euler"``): torchsde solver; one of :data:`METHODS`: ``euler`` (Euler-Maruyama),
            ``milstein`` (identical to euler here: additive noise), ``srk`` (SRA1, 2 score evaluations per
            step), ``heun``, ``midpoint`` (2 per step), ``euler_heun`` (1 per step).
        last_step_noise (bool, ``True``): whether the last step (to t_min) adds noise. ``False`` makes it
            noise-free (its Brownian increment is zero: score_sde's sampler returns that step's mean).
            The default was chosen by measurement (docs/samplers_sde_ode.md, "Noise in the last step").
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.

    The score is evaluated ``num_steps * nfe_per_step`` times (+1 with ``denoise``). The state is checked
    and recorded after every step. With a list of one generator per sample, each sample's noise comes
    from its own generator only, so a sample does not depend on the batch it is drawn in.
    ``properties.order`` is the chosen method's weak order as declared by torchsde (an instance
    attribute when ``method`` is not ``euler``).
    """

    name: ClassVar[str] = "euler_maruyama"
    description: ClassVar[str] = "Reverse-time SDE (Song et al. 2021, eq. 6) on a fixed grid with torchsde (Euler-Maruyama by default)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(
        stochastic=True, order=1.0, adaptive=False, fixed_grid=True, per_sample=True
    )
    options: ClassVar[dict[str, Any]] = {"num_steps": 1000, "grid": "uniform", "method": "euler", "last_step_noise": True}

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        check_int(cfg, "num_steps", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        method = cfg["method"]
        if method in _UNSUPPORTED:
            raise ValueError(
                f"sampler {self.name!r}: method {method!r} is not supported: {_UNSUPPORTED[method]}; "
                f"valid methods are {tuple(METHODS)}"
            )
        check_choice(cfg, "method", self.name, tuple(METHODS))
        if not isinstance(cfg["last_step_noise"], bool):
            raise TypeError(f"sampler {self.name!r}: expected option last_step_noise to be a bool, found {cfg['last_step_noise']!r}")
        if METHODS[method].weak_order != type(self).properties.order:
            self.properties = replace(type(self).properties, order=METHODS[method].weak_order)

    @property
    def nfe_per_step(self) -> int:
        """Score evaluations per step of the chosen method."""
        return METHODS[self.config["method"]].nfe_per_step

    @property
    def nfe(self) -> int:
        """Score evaluations of one run: ``num_steps * nfe_per_step`` (+1 with ``denoise``)."""
        return self.config["num_steps"] * self.nfe_per_step + self._final_steps_nfe()

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        method = METHODS[self.config["method"]]
        n = self.config["num_steps"]
        ts = ctx.process.time_grid(n, self.config["grid"], dtype=torch.float64)
        steps = torch.arange(n + 1, dtype=torch.float64)
        shape = x.shape
        y0 = x.reshape(shape[0], -1)
        # torchsde's contract check probes g_prod with torch.randn from the global generator before the first
        # step; undo that draw, so that the global generator only serves our own noise (when generator=None).
        state = [_global_rng_state(y0.device)]

        quiet_last = not self.config["last_step_noise"]

        def draw() -> torch.Tensor:
            if state:
                _set_global_rng_state(y0.device, state.pop())
            if quiet_last and bm.current_interval == n - 1:
                return torch.zeros_like(y0)  # the noise-free last step
            return ctx.randn_like(y0)

        bm = GridBrownianMotion(steps, y0.shape, y0.dtype, y0.device, draw, method.levy_area)
        sde = _ReverseTimeSDE(ctx, shape, ts, method.sde_type, bm)
        y = torchsde.sdeint(sde, y0, steps[[0, -1]], bm=bm, method=self.config["method"], dt=1.0)[-1]
        if bm.current_interval != n - 1:  # pragma: no cover - guards against a change in torchsde's stepping
            raise RuntimeError(f"sampler {self.name!r}: expected {n} steps, torchsde took {bm.current_interval + 1}")
        ctx.record(y.reshape(shape), float(ts[-1]), step=n)
        return y.reshape(shape)
