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
        self._identity = (None, None)  # the one-hot rows of the exact divergence (see _basis)
        self._rows, self._probes_rows = None, probes  # the probes of the rows last evaluated
        self._dtype = torch.float64  # the state's (for rows_times; set by the first call)
        self._vjp_state: dict = {}

    def _divergence(self, s: torch.Tensor, xg: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if not s.requires_grad:
            raise TypeError(
                "expected score_fn to be differentiable with respect to x (the divergence needs autograd), found "
                "an output without a graph: do not evaluate the score under torch.no_grad() or detach it"
            )
        batch = xg.shape[0]
        if self.divergence == "hutchinson":
            if rows is not self._rows:  # the stepper passes the same rows tensor until some rows finish
                self._rows = rows
                self._probes_rows = self.probes if rows is None else self.probes[:, rows]
            probes = self._probes_rows
            vjp = _batched_vjp(s, xg, probes, self._vjp_state)  # (K, b, ...)
            return (vjp * probes).flatten(2).sum(2).transpose(0, 1)  # (b, K)
        d = self.dim
        chunk = max(1, min(d, _MAX_BATCHED_VJP_ELEMENTS // max(1, batch * d)))
        loop = s.device.type == "cpu" or not self._vjp_state.get("vmap", True)
        total = None
        for lo in range(0, d, chunk):
            hi = min(d, lo + chunk)
            if loop:  # one backward pass per coordinate, keeping its diagonal entry
                diag = [torch.autograd.grad(s, xg, e, retain_graph=True)[0].reshape(batch, d)[:, j]
                        for j, e in zip(range(lo, hi), self._basis(lo, hi, batch, s))]
                part = diag[0] if len(diag) == 1 else diag[0] + diag[1] if len(diag) == 2 else torch.stack(diag).sum(0)
            else:
                rows_j = _batched_vjp(s, xg, self._basis(lo, hi, batch, s), self._vjp_state).flatten(2)  # (c, b, D)
                c = torch.arange(hi - lo, device=s.device)
                part = rows_j[c, :, c + lo].sum(0)
            # the chunks are summed in the score's dtype (a score that promotes the state: wider than the chunk's)
            total = part.to(s.dtype) if total is None else total + part
        return total[:, None]

    def _basis(self, lo: int, hi: int, batch: int, s: torch.Tensor) -> torch.Tensor:
        """Rows ``lo:hi`` of the identity on the data's coordinates, each repeated for the ``batch`` rows:
        (hi - lo, batch, ...), shaped like the score. The whole identity (one chunk) is built once and sliced as the
        batch shrinks (the slice kept until the batch changes); the chunks of a larger one are built per call."""
        shape = (hi - lo, batch, *self.shape[1:])
        if hi - lo < self.dim:
            e = torch.eye(self.dim, dtype=s.dtype, device=s.device)[lo:hi]
            return e[:, None, :].expand(hi - lo, batch, self.dim).reshape(shape)
        full, sliced = self._identity
        if full is None or full.shape[1] < batch or full.dtype != s.dtype or full.device != s.device:
            e = torch.eye(self.dim, dtype=s.dtype, device=s.device)
            full, sliced = e[:, None, :].expand(self.dim, batch, self.dim).reshape(shape), None
        if sliced is None or sliced.shape[1] != batch:
            sliced = full[:, :batch]
            self._identity = (full, sliced)
        return sliced

    def _evaluate(self, state: torch.Tensor, t_vec: torch.Tensor, c, a, b, bc, ad, rows) -> torch.Tensor:
        """dy/dtau and d(int div)/dtau of the rows ``state`` (b, D + C) at times ``t_vec`` (b,), with ``x = c y``,
        ``dy/dtau = a y + b s`` and ``d(int div)/dtau = ad + bc div_x s`` (``ad = a d``, ``bc = b c``): numbers, or
        ``c`` of the data's rank and the others (b, 1) columns."""
        batch = state.shape[0]
        y = state[:, : self.dim]
        flat = len(self.shape) == 2
        with torch.enable_grad():
            xg = (c * (y if flat else y.reshape(batch, *self.shape[1:]))).detach().requires_grad_(True)
            s = self.score_fn(xg, t_vec)
            _check_score_output(s, xg)
            div_s = self._divergence(s, xg, rows)
        self.nfe += 1
        dy = a * y + b * (s if flat else s.reshape(batch, self.dim)).detach()
        out = torch.cat([dy, (ad + bc * div_s.detach()).to(dy.dtype)], 1)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(1).sum())
            raise NonFiniteError(
                f"log_likelihood: the score or its divergence became NaN or infinite at t = {float(t_vec.min()):.6g} "
                f"(step {self.steps}, evaluation {self.nfe}) in {bad} of {batch} samples; check the score function "
                f"and that the data lie where the model is defined"
            )
        return out

    def __call__(self, tau: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's right-hand side: one tau for the whole batch."""
        t, c, a, b = self.variable.coefficients(float(tau))
        t_vec = torch.full((self.batch,), t, dtype=state.dtype, device=state.device)
        return self._evaluate(state, t_vec, c, a, b, b * c, a * self.dim, None)

    def rows_times(self, taus: torch.Tensor, sign: float = 1.0) -> list[tuple]:
        """What the per-sample stepper's calls need from their times (the ``times`` of
        :func:`~score_toolkit.likelihood.stepper.solve_dopri5`), for the m rows of ``taus`` (m, b) at once: per row
        ``(t, c, a, b, b c, a d)`` in the state's dtype on ``taus``' device, ``t`` (b,), ``c`` of the data's rank,
        the others (b, 1) columns, then the row's float64 coefficients (for a call whose state has another dtype).
        ``sign = -1``: for the right-hand side negated (``a``, ``b``, ``b c`` and ``a d`` negated, which gives the
        same numbers as negating the result)."""
        m = taus.shape[0]
        # the process's coefficients in float64 on the CPU (as the scalar path), then in the state's dtype and device
        coef = torch.stack(self.variable.coefficients_rows(taus.detach().reshape(-1).cpu())).reshape(4, m, -1)
        rows = self._rows_of(coef, sign, taus.device)
        return [(*row, (coef[:, i], sign)) for i, row in enumerate(rows)]

    def _rows_of(self, coef: torch.Tensor, sign: float, device) -> list[tuple]:
        """``(t, c, a, b, b c, a d)`` per row of the float64 coefficients ``coef`` (4, m, b), in ``self._dtype``."""
        m = coef.shape[1]
        t, c, a, b = coef.to(device, self._dtype).unbind(0)
        bc, ad = b * c, a * self.dim
        if sign < 0:
            a, b, bc, ad = -a, -b, -bc, -ad
        col = (m, -1, *[1] * (len(self.shape) - 1))
        return list(zip(t, c.reshape(col), a[..., None], b[..., None], bc[..., None], ad[..., None]))

    def rows_call(self, times: tuple, state: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The per-sample stepper's right-hand side at one of :meth:`rows_times`' rows (one time per row of
        ``state``)."""
        if times[0].dtype != state.dtype:  # the state's dtype changed (the first call, or a score that promotes it):
            self._dtype = state.dtype      # the coefficients again from float64, as every later attempt's
            coef, sign = times[6]
            times = self._rows_of(coef[:, None], sign, state.device)[0]
        return self._evaluate(state, *times[:6], rows)

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
