"""The right-hand side of the augmented probability-flow ODE on the flat state ``(x, int div F)``
(:class:`_AugmentedDynamics`): the score and its divergence (exact, one vector-Jacobian product per coordinate, or
Hutchinson's estimate) at one ``tau`` for the whole batch (torchdiffeq) or one per row (the per-sample stepper).
"""

from __future__ import annotations

import math

import torch

from ..processes import Process
from ..samplers.base import NonFiniteError
from .divergence import _MAX_BATCHED_VJP_ELEMENTS, _batched_vjp
from .result import SolverError
from .time_variable import _TimeVariable


class _AugmentedDynamics:
    """Right-hand side of the augmented ODE on a flat state (B, D + C): C = 1 (exact) or K (per probe)."""

    def __init__(self, score_fn, process: Process, shape, divergence: str, probes, variable: _TimeVariable,
                 max_num_steps: int | None):
        self.score_fn = score_fn
        self.process = process
        self.shape = tuple(shape)
        self.batch = self.shape[0]
        self.dim = math.prod(self.shape[1:])
        self.divergence = divergence
        self.probes = probes  # (K, B, ...) or None
        self.variable = variable
        self.max_num_steps = max_num_steps
        self.nfe = 0
        self.steps = 0
        self.t = variable.t_lo
        self._basis = None
        self._vjp_state: dict = {}

    def _divergence(self, s: torch.Tensor, xg: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if not s.requires_grad:
            raise TypeError(
                "expected score_fn to be differentiable with respect to x (the divergence needs autograd), found "
                "an output without a graph: do not evaluate the score under torch.no_grad() or detach it"
            )
        batch = xg.shape[0]
        if self.divergence == "hutchinson":
            probes = self.probes if rows is None else self.probes[:, rows]
            vjp = _batched_vjp(s, xg, probes, self._vjp_state)  # (K, b, ...)
            return (vjp * probes).flatten(2).sum(2).transpose(0, 1)  # (b, K)
        d = self.dim
        if self._basis is None or self._basis.dtype != s.dtype or self._basis.device != s.device:
            self._basis = torch.eye(d, dtype=s.dtype, device=s.device)
        total = torch.zeros(batch, dtype=s.dtype, device=s.device)
        chunk = max(1, min(d, _MAX_BATCHED_VJP_ELEMENTS // max(1, batch * d)))
        for lo in range(0, d, chunk):
            e = self._basis[lo : lo + chunk]  # (c, D)
            grads = e[:, None, :].expand(e.shape[0], batch, d).reshape(e.shape[0], batch, *self.shape[1:])
            rows_j = _batched_vjp(s, xg, grads, self._vjp_state).flatten(2)  # (c, b, D): rows of the Jacobian
            idx = torch.arange(lo, lo + e.shape[0], device=s.device)
            total = total + rows_j[torch.arange(e.shape[0], device=s.device), :, idx].sum(0)
        return total[:, None]

    def _evaluate(self, state: torch.Tensor, t_vec: torch.Tensor, c, a, b, rows, t_report: float) -> torch.Tensor:
        """dy/dtau and d(int div)/dtau of the rows ``state`` (b, D + C) at times ``t_vec`` (b,); ``c, a, b`` are
        numbers or (b, 1) tensors."""
        batch = state.shape[0]
        y = state[:, : self.dim].reshape(batch, *self.shape[1:])
        cy = c if not isinstance(c, torch.Tensor) else c.reshape(batch, *([1] * (y.ndim - 1)))
        with torch.enable_grad():
            xg = (cy * y).detach().requires_grad_(True)
            s = self.score_fn(xg, t_vec)
            _check_score_output(s, xg)
            div_s = self._divergence(s, xg, rows)
        self.nfe += 1
        s2 = s.detach().reshape(batch, self.dim)
        dy = a * state[:, : self.dim] + b * s2
        ddiv = a * self.dim + (b * c) * div_s.detach()
        out = torch.cat([dy, ddiv.to(dy.dtype)], 1)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(1).sum())
            raise NonFiniteError(
                f"log_likelihood: the score or its divergence became NaN or infinite at t = {t_report:.6g} (step "
                f"{self.steps}, evaluation {self.nfe}) in {bad} of {batch} samples; check the score function "
                f"and that the data lie where the model is defined"
            )
        return out

    def __call__(self, tau: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's right-hand side: one tau for the whole batch."""
        t, c, a, b = self.variable.coefficients(float(tau))
        t_vec = torch.full((self.batch,), t, dtype=state.dtype, device=state.device)
        return self._evaluate(state, t_vec, c, a, b, None, t)

    def rows_call(self, tau: torch.Tensor, state: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The per-sample stepper's right-hand side: ``tau`` (b,), one per row of ``state``."""
        # the process's coefficients in float64 on the CPU (as the scalar path), then on the state's device
        t, c, a, b = self.variable.coefficients_rows(tau.detach().cpu())
        dt, dev = state.dtype, state.device
        return self._evaluate(state, t.to(dev, dt), c.to(dev, dt)[:, None], a.to(dev, dt)[:, None],
                              b.to(dev, dt)[:, None], rows, float(t.min()))

    def callback_step(self, tau0, y0, dt) -> None:
        self.steps += 1
        self.t = self.variable.coefficients(float(tau0))[0]
        if self.max_num_steps is not None and self.steps > self.max_num_steps:
            raise SolverError(_too_many_steps(self.max_num_steps, self.t, self.variable.t_hi))


def _check_score_output(s, x: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        found = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        hint = ""
        if isinstance(s, torch.Tensor) and (s.shape == x.shape[:1] or s.shape == (x.shape[0], 1)):
            hint = (" (one number per sample looks like an energy: wrap the network as "
                    "ScoreAdapter(model, process, prediction_type='energy'))")
        raise ValueError(f"log_likelihood: expected score_fn to return a score of shape {tuple(x.shape)} (like x), "
                         f"found {found}{hint}")


def _too_many_steps(max_num_steps: int, t: float, t_end: float) -> str:
    return (f"log_likelihood: the ODE solver exceeded max_num_steps={max_num_steps} at t = {t:.6g} before reaching "
            f"t = {t_end:g}; raise max_num_steps, loosen rtol/atol, or use a fixed-grid method (num_steps)")
