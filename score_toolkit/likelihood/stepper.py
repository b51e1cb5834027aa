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

Bookkeeping (what a call costs besides the right-hand side; docs/likelihood.md, "Speed"): the rows still integrating
are kept contiguous and are gathered anew only when some rows finish (not at every step); an attempt's stage times
are computed together, and ``times`` lets the caller turn them into what its right-hand side needs once per attempt
rather than once per call. Every number is computed by the same operations on the same rows as a step-by-step
gather would, so the results do not depend on this bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..samplers.adaptive import TABLEAUS
from .result import SolverError

__all__ = ["solve_dopri5"]

_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_EXPONENT = -1 / 5  # -1 / (order of the error estimate + 1)


def _combine(weights, ks, h_col: torch.Tensor) -> torch.Tensor:
    out = None
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = w * k if out is None else out.add(k, alpha=w)
    return out * h_col


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
    on_attempt: Callable[[int, torch.Tensor], None] | None = None,
    times: Callable[[torch.Tensor], object] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Integrate ``dy/dtau = func(tau, y, rows)`` from ``lo`` to ``hi`` for every row of ``y0`` (B, n).

    ``func`` gets ``tau`` (b,) (float64), the b rows still integrating and their indices ``rows`` into the batch
    (``None`` for the whole batch; the same tensor object from one call to the next until some rows finish) and
    returns dy/dtau (b, n). ``times``: if given, ``func`` gets ``times(taus)[i]`` in place of ``taus[i]``, where
    ``taus`` (m, b) holds the m values of tau at which ``func`` is called next (the 6 stages of an attempt; 1 in the
    first step's calls). ``ratio`` maps the scaled error (b, n) to one error ratio per row (accepted when < 1).
    ``max_num_steps``: attempts (accepted or rejected) allowed per row; more raise :class:`SolverError`.
    ``on_attempt(attempt, tau)`` is told, before each attempt, its number and the tau (b,) of the rows still
    integrating.

    Returns y at ``hi`` (B, n) and statistics: ``nfe`` (calls of ``func``), ``attempts`` (the most of any row),
    ``accepted`` and ``rejected`` (per row, (B,) tensors).
    """
    tab = TABLEAUS["dopri5"]
    b = y0.shape[0]
    dev = y0.device
    span = hi - lo
    prepare = (lambda taus: taus) if times is None else times
    tau = torch.full((b,), lo, dtype=torch.float64, device=dev)
    y = y0
    f = func(prepare(tau[None])[0], y, None)
    nfe = 1

    def row_ratio(e: torch.Tensor) -> torch.Tensor:
        r = ratio(e)
        return r.max().expand(r.shape[0]) if shared else r

    # Hairer's initial step (scipy's select_initial_step), per row
    scale = atol + y.abs() * rtol
    d0, d1 = row_ratio(y / scale).double(), row_ratio(f / scale).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = h0.clamp(max=span)
    f1 = func(prepare((tau + h0)[None])[0], y + h0.to(y.dtype)[:, None] * f, None)
    nfe += 1
    d2 = row_ratio((f1 - f) / scale).double() / h0
    dm = torch.maximum(d1, d2)
    h1 = torch.where(dm <= 1e-15, (h0 * 1e-3).clamp_min(1e-6), (0.01 / dm.clamp_min(1e-300)) ** (1 / 5))
    h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))

    # the stage fractions c_2 .. c_6 as a column, so that an attempt's stage times are one product and one sum
    fractions = torch.tensor(tab.c[1:-1], dtype=torch.float64, device=dev)[:, None]
    stages = len(tab.c) - 1  # calls per attempt (FSAL: the last one starts the next step)
    tiny = 1e-14 * max(1.0, abs(hi), abs(lo))
    y_out = None  # the rows' results, in the state's dtype after the first step (a score may promote it)
    accepted_out = torch.zeros(b, dtype=torch.long, device=dev)
    rejected_out = torch.zeros(b, dtype=torch.long, device=dev)
    # the rows still integrating, contiguous: y, f, tau, h, after_reject, rejected (theirs), and their indices rows
    rows = None
    after_reject = torch.zeros(b, dtype=torch.bool, device=dev)
    rejected = torch.zeros(b, dtype=torch.long, device=dev)
    attempts = 0
    while y.shape[0] > 0:
        attempts += 1
        if on_attempt is not None:
            on_attempt(attempts, tau)
        if attempts > max_num_steps:
            raise SolverError(f"max_num_steps exceeded (max_num_steps={max_num_steps})")
        left = hi - tau
        last = h >= left
        ha = torch.where(last, left, h)
        if bool((ha <= tiny).any()):
            raise SolverError(f"underflow in dt at tau = {float(tau.min()):.6g}")
        h_col = ha.to(y.dtype)[:, None]
        t_new = torch.where(last, hi, tau + ha)
        at = prepare(torch.cat([tau + fractions * ha, t_new[None]]))
        ks = [f]
        for stage in range(1, stages):
            ks.append(func(at[stage - 1], y + _combine(tab.a[stage], ks, h_col), rows))
        y_new = y + _combine(tab.a[-1], ks, h_col)  # the propagated fifth-order solution (FSAL: its f is the last stage)
        ks.append(func(at[stages - 1], y_new, rows))
        nfe += stages
        err = _combine(tab.e, ks, h_col)
        scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
        r = row_ratio(err / scale).double()
        ok = r < 1
        factor = _SAFETY * r.clamp_min(1e-300) ** _EXPONENT
        grow = torch.where(r == 0, _MAX_FACTOR, factor.clamp(max=_MAX_FACTOR))
        grow = torch.where(after_reject, grow.clamp(max=1.0), grow)
        h = ha * torch.where(ok, grow, factor.clamp(min=_MIN_FACTOR))
        okc = ok[:, None]
        y = torch.where(okc, y_new, y)
        f = torch.where(okc, ks[-1], f)
        tau = torch.where(ok, t_new, tau)
        after_reject = ~ok
        rejected += after_reject
        finished = ok & last
        if not bool(finished.any()):
            continue
        # write the finished rows out and keep the others contiguous
        fin = finished.nonzero().squeeze(1)
        into = fin if rows is None else rows[fin]
        if y_out is None:
            y_out = y.new_empty((b, y.shape[1]))
        y_out.index_copy_(0, into, y[fin])
        rejected_out.index_copy_(0, into, rejected[fin])
        accepted_out.index_copy_(0, into, attempts - rejected[fin])
        keep = (~finished).nonzero().squeeze(1)
        rows = keep if rows is None else rows[keep]
        y, f, tau, h, after_reject, rejected = (v[keep] for v in (y, f, tau, h, after_reject, rejected))
    stats = {"nfe": nfe, "attempts": attempts, "accepted": accepted_out, "rejected": rejected_out}
    return (y if y_out is None else y_out), stats
