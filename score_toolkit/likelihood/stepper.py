"""The Dormand-Prince 5(4) pair with a step size per sample: the default solver of
:func:`~score_toolkit.likelihood.log_likelihood` (``method="dopri5_per_sample"``).

Each sample of the batch keeps its own integration variable ``tau``, its own step size and its own accept/reject
decision; every call of the right-hand side evaluates all samples still integrating, each at its own stage time
(a score function takes one ``t`` per sample). A sample whose ODE is easy therefore takes long steps even when
another sample of the batch needs short ones, and every sample meets the tolerance by itself. The error ratio of a
row is given by the caller (``ratio``); :func:`~score_toolkit.likelihood.log_likelihood` passes
``sqrt((rms_x^2 + rms_logp^2) / 2)``, the RMS over the x components and the RMS over the log-density component(s),
each over ``atol + rtol max(|y|, |y_new|)``, weighing half each whatever the dimension (scipy's RK45 norm, one RMS
over the whole vector, would leave the log-density ``1 / (d + 1)`` of the weight: docs/likelihood.md).

The tableau is the one of the ``adaptive_ode`` sampler (:data:`score_toolkit.samplers.adaptive.TABLEAUS`).
Step-size control is scipy's ``RK45`` (Hairer, Norsett & Wanner, Solving ODEs I, II.4): after an accepted step the
next one is ``h min(10, 0.9 err^(-1/5))`` -- it shrinks when the error ratio was close to 1, which torchdiffeq's
controller never does after an accepted step (it then rejects more steps) -- never larger than ``h`` right after a
rejection; a rejected step is retried with ``h max(0.2, 0.9 err^(-1/5))``. The first step is Hairer's estimate
(one extra evaluation), per sample. With ``shared=True`` all samples share one step, accepted when the largest
error ratio is below 1 (the classic batch solve, for comparison and tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..samplers.adaptive import TABLEAUS
from .result import SolverError

__all__ = ["solve_dopri5"]

_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_EXPONENT = -1 / 5  # -1 / (order of the error estimate + 1)


def _combine(weights, ks, h: torch.Tensor) -> torch.Tensor:
    out = None
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = w * k if out is None else out.add(k, alpha=w)
    return out * h[:, None]


def solve_dopri5(
    func: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    y0: torch.Tensor,
    lo: float,
    hi: float,
    *,
    rtol: float,
    atol: float,
    ratio: Callable[[torch.Tensor], torch.Tensor],
    max_num_steps: int,
    shared: bool = False,
    on_attempt: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Integrate ``dy/dtau = func(tau, y, rows)`` from ``lo`` to ``hi`` for every row of ``y0`` (B, n).

    ``func`` gets ``tau`` (b,) (float64), the b rows still integrating and their indices ``rows`` into the batch
    (``None`` for the whole batch) and returns dy/dtau (b, n). ``ratio`` maps the scaled error (b, n) to one error
    ratio per row (accepted when < 1). ``max_num_steps``: attempts (accepted or rejected) allowed per row; more raise
    :class:`SolverError`. ``on_attempt(attempt, tau)`` is told the smallest tau still integrating before each attempt.

    Returns y at ``hi`` (B, n) and statistics: ``nfe`` (calls of ``func``), ``attempts`` (the most of any row),
    ``accepted`` and ``rejected`` (per row, (B,) tensors).
    """
    tab = TABLEAUS["dopri5"]
    b = y0.shape[0]
    dev = y0.device
    span = hi - lo
    tau = torch.full((b,), lo, dtype=torch.float64, device=dev)
    y = y0
    f = func(tau, y, None)
    nfe = 1

    def row_ratio(e: torch.Tensor) -> torch.Tensor:
        r = ratio(e)
        return r.max().expand(r.shape[0]) if shared else r

    # Hairer's initial step (scipy's select_initial_step), per row
    scale = atol + y.abs() * rtol
    d0, d1 = row_ratio(y / scale).double(), row_ratio(f / scale).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = h0.clamp(max=span)
    f1 = func(tau + h0, y + h0.to(y.dtype)[:, None] * f, None)
    nfe += 1
    d2 = row_ratio((f1 - f) / scale).double() / h0
    dm = torch.maximum(d1, d2)
    h1 = torch.where(dm <= 1e-15, (h0 * 1e-3).clamp_min(1e-6), (0.01 / dm.clamp_min(1e-300)) ** (1 / 5))
    h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))

    done = torch.zeros(b, dtype=torch.bool, device=dev)
    after_reject = torch.zeros(b, dtype=torch.bool, device=dev)
    accepted = torch.zeros(b, dtype=torch.long, device=dev)
    rejected = torch.zeros(b, dtype=torch.long, device=dev)
    attempts = 0
    while not bool(done.all()):
        rows = None if not bool(done.any()) else (~done).nonzero().squeeze(1)
        if rows is None:
            ya, fa, ta, ha, rej = y, f, tau, h, after_reject
        else:
            ya, fa, ta, ha, rej = y[rows], f[rows], tau[rows], h[rows], after_reject[rows]
        attempts += 1
        if on_attempt is not None:
            on_attempt(attempts, float(ta.min()))
        if attempts > max_num_steps:
            raise SolverError(f"max_num_steps exceeded (max_num_steps={max_num_steps})")
        left = hi - ta
        last = ha >= left
        ha = torch.where(last, left, ha)
        if bool((ha <= 1e-14 * max(1.0, abs(hi), abs(lo))).any()):
            raise SolverError(f"underflow in dt at tau = {float(ta.min()):.6g}")
        hy = ha.to(y.dtype)
        ks = [fa]
        for stage in range(1, len(tab.c) - 1):
            ys = ya + _combine(tab.a[stage], ks, hy)
            ks.append(func(ta + tab.c[stage] * ha, ys, rows))
        y_new = ya + _combine(tab.a[-1], ks, hy)  # the propagated fifth-order solution (FSAL: its f is the last stage)
        t_new = torch.where(last, torch.full_like(ta, hi), ta + ha)
        ks.append(func(t_new, y_new, rows))
        nfe += len(tab.c) - 1
        err = _combine(tab.e, ks, hy)
        scale = atol + torch.maximum(ya.abs(), y_new.abs()) * rtol
        r = row_ratio(err / scale).double()
        ok = r < 1
        rc = r.clamp_min(1e-300)
        grow = (_SAFETY * rc ** _EXPONENT).clamp(max=_MAX_FACTOR)
        grow = torch.where(r == 0, torch.full_like(r, _MAX_FACTOR), grow)
        grow = torch.where(rej, grow.clamp(max=1.0), grow)
        shrink = (_SAFETY * rc ** _EXPONENT).clamp(min=_MIN_FACTOR)
        h_next = ha * torch.where(ok, grow, shrink)
        okc = ok[:, None]
        y_upd = torch.where(okc, y_new, ya)
        f_upd = torch.where(okc, ks[-1], fa)
        t_upd = torch.where(ok, t_new, ta)
        d_upd = ok & last
        if rows is None:
            y, f, tau, h, after_reject = y_upd, f_upd, t_upd, h_next, ~ok
            done = d_upd
            accepted += ok.long()
            rejected += (~ok).long()
        else:
            y, f = y.index_copy(0, rows, y_upd), f.index_copy(0, rows, f_upd)
            tau, h = tau.index_copy(0, rows, t_upd), h.index_copy(0, rows, h_next)
            after_reject = after_reject.index_copy(0, rows, ~ok)
            done = done.index_copy(0, rows, d_upd)
            accepted.index_add_(0, rows, ok.long())
            rejected.index_add_(0, rows, (~ok).long())
    stats = {"nfe": nfe, "attempts": attempts, "accepted": accepted, "rejected": rejected}
    return y, stats
