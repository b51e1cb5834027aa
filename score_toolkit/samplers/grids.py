"""Time grids for fixed-grid samplers: the shared base class, a store of named grids, and the grid optimiser.
The first two live in :mod:`score_toolkit.samplers.fixed_grid` (the samplers import them from there; this
module re-exports them) because the optimiser runs the samplers; its reference problems (the mixture fit, the
exact mixture score, the off-data measure) are in :mod:`score_toolkit.samplers._grid_reference`.

Every fixed-grid sampler of this family (DPM-Solver++ 2M/3M/2S/3S and their SDE variants, EDM Heun) takes
the same three options, handled once by :class:`GridSampler`:

* ``grid``: ``"fitted"`` (the data-free grid of :func:`fitted_log_snr`: grids fitted once by :func:`optimize_grid`
  on reference mixtures, shipped as a step density over log-SNR, so that one rule serves every process and budget);
  a built-in kind of :meth:`Process.time_grid` (``"log_sigma"``: uniform in log-SNR,
  ``"karras"``: the rho schedule of Karras et al. 2022, eq. 5, ``"uniform"`` in t); the name of a grid
  saved with :func:`save_grid` (for instance by :func:`optimize_grid`); a path to such a JSON file; or
  an explicit decreasing sequence of times from ``t = 1`` to ``t_min``.
* ``num_steps``: steps of the grid (a saved or explicit grid fixes it; passing a different value is an error).
* ``rho``: the Karras exponent (only with ``grid="karras"``).

Saved grids are stored as log-SNR values ``lambda = ln(alpha / sigma)`` with the process they were made for;
under that process they are mapped to times with :meth:`Process.t_from_log_snr`, under another one they are
carried over as a step density over log-SNR (:func:`transfer_log_snr`), or refused with the reason when the
other process's range reaches too far beyond theirs.

The optimiser (:func:`optimize_grid`) chooses the ``n + 1`` grid points of a deterministic sampler that
minimise its discretisation error on a reference problem: an analytic Gaussian mixture (given, or fitted
to the user's data by a small EM, :func:`fit_mixture`) whose exact score drives both the sampler and a
high-accuracy solution of the same probability-flow ODE from the same initial noise. The objective sees
blown-up samples (a tail term on how far beyond the reference outputs each sample lands), the grid is
parametrised monotonically in lambda (softmax step fractions between the fixed ends) and optimised through
autograd (the samplers' coefficient code is differentiable in the grid) with L-BFGS by default (Adam with
``method="adam"``), and every result carries a held-out validation report (tails, and the within-mode / NLL
criteria against the noise floor) that flags a grid with a bad tail (:class:`GridTailWarning`).

Why one module of this length: :func:`optimize_grid` is one function whose closures share the reference problem,
the draws, the family's members and the objective; its report and store are already in their own modules.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict

import torch

from .._warnings import caller_stacklevel
from ..processes import Process
from . import fixed_grid as _fixed
from ._grid_family import FamilyGrid, family_extremes, interpolated_log_snr
from ._grid_reference import MixtureScore, OffData, fit_mixture
from .base import SamplingContext
from .fixed_grid import *  # noqa: F403  (every public name of fixed_grid is re-exported here)
from .fixed_grid import GRID_KINDS, GridSampler, _parse_grid, resolve_grid, save_grid
from .fixed_grid import check_to_zero as check_to_zero  # re-exported: samplers import it from here
from .grid_store import (
    _check_reach,
    _check_times,
    _file_for,
    _log_snr_ends,
    _process_record,
    _read_record,
    _times_from_log_snr,
    absolute_log_snr,
    transfer_log_snr,
)
from .grid_validation import (  # the held-out report; re-exported here
    FAR_OFF_MARGIN,
    TAIL_MARGIN,
    GridOptimizationResult,
    GridTailError,
    GridTailWarning,
    GridValidation,
    _validate,
)

__all__ = [
    *_fixed.__all__,
    "fit_mixture",
    "optimize_grid",
    "GridOptimizationResult",
    "GridValidation",
    "GridTailWarning",
    "GridTailError",
    "FAR_OFF_MARGIN",
    "FAMILY_COMBINE",
]


def _reference_score(mixture, data, num_components, score_fn, process, covariance="full"):
    given = [v is not None for v in (mixture, data, score_fn)]
    if sum(given) != 1:
        raise ValueError("optimize_grid: pass exactly one of mixture=, data= (a mixture is fitted by EM) or score_fn=")
    if score_fn is not None:
        if not callable(score_fn):
            raise TypeError(f"optimize_grid: expected score_fn to be callable, found {type(score_fn).__name__}")
        return score_fn, None
    if data is not None:
        mixture = fit_mixture(data, num_components, covariance=covariance)
    from ..analytic import GaussianMixture

    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"optimize_grid: expected mixture to be a GaussianMixture, found {type(mixture).__name__}")
    return MixtureScore(mixture, process), mixture


def _check_arguments(sampler, process, ints, lr, loss, method, covariance, on_bad_tail, tail_weight,
                     tail_tolerance, rel_tol, nll_weight=1.0, family_combine="mean"):
    if not isinstance(sampler, GridSampler):
        raise TypeError(
            f"optimize_grid: expected a fixed-grid sampler of score_toolkit.samplers (a GridSampler instance), found "
            f"{type(sampler).__name__}"
        )
    if sampler.properties.stochastic:
        raise ValueError(
            f"optimize_grid: sampler {sampler.name!r} is stochastic; the grid optimiser measures the pathwise error of a "
            "deterministic sampler against the ODE solution (optimise the grid of its ODE counterpart instead)"
        )
    if not isinstance(process, Process):
        raise TypeError(f"optimize_grid: expected a score_toolkit Process, found {type(process).__name__}")
    for key, (value, minimum) in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"optimize_grid: expected {key} to be an int >= {minimum}, found {value!r}")
    for key, value in (("lr", lr), ("tail_weight", tail_weight), ("tail_tolerance", tail_tolerance), ("rel_tol", rel_tol),
                       ("nll_weight", nll_weight)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"optimize_grid: expected {key} to be a finite number >= 0, found {value!r}")
    if not lr > 0:
        raise ValueError(f"optimize_grid: expected lr > 0, found {lr!r}")
    if nll_weight != 1.0 and loss == "mse":
        raise ValueError(f"optimize_grid: nll_weight weighs the term of loss='nll', found loss={loss!r} with "
                         f"nll_weight={nll_weight!r} (pass loss='nll' or leave nll_weight at 1.0)")
    for key, value, allowed in (("loss", loss, ("auto", "mse", "nll")), ("method", method, ("lbfgs", "adam")),
                                ("covariance", covariance, ("full", "diag")), ("on_bad_tail", on_bad_tail, ("warn", "error")),
                                ("family_combine", family_combine, FAMILY_COMBINE)):
        if value not in allowed:
            raise ValueError(f"optimize_grid: expected {key} one of {allowed}, found {value!r}")


def _worst_tail(validation, family_validation) -> GridValidation:
    """The held-out report with the most far-off samples: the process's own or a family member's (carried grid)."""
    return max([validation["optimized"], *family_validation.values()], key=lambda v: v.far_off)


def _check_family(family, process, mix, transfer="density") -> tuple[Process, ...]:
    if isinstance(family, Process) or not isinstance(family, (list, tuple)):
        raise TypeError(f"optimize_grid: expected family to be a list or tuple of Processes, found {family!r}")
    for proc in family:
        if not isinstance(proc, Process):
            raise TypeError(f"optimize_grid: expected every family member to be a Process, found {type(proc).__name__}")
    if family and mix is None:
        raise ValueError("optimize_grid: family= needs a mixture reference problem (mixture= or data=): a score_fn is "
                         "tied to one process")
    if transfer == "interpolated":
        if not family:
            raise ValueError("optimize_grid: transfer='interpolated' fits a grid for a family: pass family=[...]")
        try:
            family_extremes((process, *family))
        except ValueError as exc:
            raise ValueError(f"optimize_grid: {exc}") from None
        return tuple(family)
    span = _log_snr_ends(process)
    for proc in family:  # refused here, with the reason, rather than at the first objective evaluation
        if transfer == "absolute":  # the reach (which inner points a member holds is decided by the fit's points)
            _check_reach(*span, *_log_snr_ends(proc), proc, "where no step of it was fitted")
        else:
            transfer_log_snr(torch.tensor(span, dtype=torch.float64), proc, 1)
    return tuple(family)


#: how ``optimize_grid(family=...)`` combines the processes' objectives (``family_combine``)
FAMILY_COMBINE = ("mean", "max", "geometric")


def _combine(values: torch.Tensor, how: str) -> torch.Tensor:
    """The family objective from the processes' objectives (a 1-D tensor): their mean, the worst one, or their
    geometric mean (the mean of logs: every member's relative progress counts alike)."""
    if how == "max":
        return values.max()
    if how == "geometric":
        return values.clamp_min(1e-300).log().mean().exp()
    return values.mean()


def _init_log_snr(init, process: Process, n: int) -> torch.Tensor | None:
    """The warm start of ``optimize_grid(init=...)``: its grid carried to ``process`` with ``n`` steps (log-SNR), or
    None for ``"best"`` and the grid kinds (resolved by the fit)."""
    if isinstance(init, str) and (init == "best" or init in GRID_KINDS):
        return None
    expected = (f"expected init 'best', a grid kind {GRID_KINDS}, a saved grid's name or path, a grid's times under "
                "the process, or a GridOptimizationResult")
    if isinstance(init, GridOptimizationResult):
        lam = init.log_snr
    elif isinstance(init, (str, os.PathLike)):
        try:
            lam = torch.tensor(_read_record(init, None)["log_snr"], dtype=torch.float64)
        except ValueError as exc:
            raise ValueError(f"optimize_grid: {expected}: {exc}") from None
    elif isinstance(init, (torch.Tensor, Sequence)):
        lam = process.log_snr(_check_times(init, process, label="init (a grid's times)"))
    else:
        raise TypeError(f"optimize_grid: {expected}, found {type(init).__name__}")
    try:  # (another process or step count: the density rule, resampled to n steps)
        return transfer_log_snr(lam.detach().to(torch.float64), process, num_steps=n)
    except ValueError as exc:
        raise ValueError(f"optimize_grid: init: the warm start's grid cannot be carried to {process!r}: {exc}") from None


def softmax_logits(log_snr: torch.Tensor) -> torch.Tensor:
    """The logits ``th`` at which :func:`softmax_times` gives the grid ``log_snr`` (increasing, ``n + 1`` points on
    the process's span) exactly (the inverse of its floor of 0.1 % of an even share; steps below it are lifted to it)."""
    n = log_snr.numel() - 1
    frac = torch.diff(log_snr) / (log_snr[-1] - log_snr[0])
    return torch.log(((frac - 1e-3 / n) / (1 - 1e-3)).clamp_min(1e-12))


def _normalised(log_snr: torch.Tensor) -> torch.Tensor:
    """A grid's log-SNR points as fractions ``0 = u_0 < ... < u_n = 1`` of its span."""
    return (log_snr - log_snr[0]) / (log_snr[-1] - log_snr[0])


def _pair_of_logits(n: int):
    """The interpolated rule's parametrisation: ``th`` (2 n logits) -> two normalised grids (shape ``(2, n + 1)``),
    each split by ``softmax`` step fractions as :func:`softmax_times` splits a process's span."""

    def pair_of(th: torch.Tensor) -> torch.Tensor:
        frac = torch.softmax(th.view(2, n), 1) * (1 - 1e-3) + 1e-3 / n
        inner = torch.cumsum(frac, 1)[:, :-1]
        return torch.cat([inner.new_zeros(2, 1), inner, inner.new_ones(2, 1)], 1)

    return pair_of


class _Stop(Exception):
    """Ends the optimiser's loop from inside its objective (budget spent, or no more progress)."""


def softmax_times(process: Process, n: int):
    """The grid parametrisation of the fits: ``th`` (n logits) -> float64 times ``1 > ... > t_min`` whose log-SNR steps
    split the process's span by ``softmax(th)`` (monotone, ends fixed, differentiable; every step keeps at least 0.1 %
    of an even share, so the multistep interpolation has distinct nodes). ``th = 0`` is the uniform log-SNR grid."""
    lam0, lam1 = _log_snr_ends(process)
    t_ends = (torch.tensor([process.t_max], dtype=torch.float64), torch.tensor([process.t_min], dtype=torch.float64))

    def times_of(th: torch.Tensor) -> torch.Tensor:
        frac = torch.softmax(th, 0) * (1 - 1e-3) + 1e-3 / n
        lam = lam0 + (lam1 - lam0) * torch.cumsum(frac, 0)[:-1]
        return torch.cat([t_ends[0], process.t_from_log_snr(lam), t_ends[1]])

    return times_of


def optimize_grid(
    sampler: GridSampler,
    process: Process,
    *,
    mixture=None,
    data: torch.Tensor | None = None,
    num_components: int = 8,
    covariance: str = "full",
    score_fn=None,
    shape: Sequence[int] | None = None,
    num_samples: int = 1024,
    num_validation: int = 4096,
    iterations: int = 100,
    patience: int = 25,
    rel_tol: float = 1e-3,
    lr: float = 0.05,
    init: str = "best",
    reference_steps: int = 250,
    seed: int = 0,
    save_as: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
    loss: str = "auto",
    nll_weight: float = 1.0,
    tail_weight: float = 1.0,
    tail_tolerance: float = 0.0,
    tail_rounds: int = 0,
    family: Sequence[Process] = (),
    tail_retries: int = 0,
    on_bad_tail: str = "warn",
    method: str = "lbfgs",
    dtype: torch.dtype = torch.float64,
    device=None,
    fit_dtype: torch.dtype | None = None,
    transfer_head: int = 0,
    family_combine: str = "mean",
    transfer: str = "density",
) -> GridOptimizationResult:
    """Choose the ``n + 1`` time points of ``sampler``'s grid (``n = sampler.config["num_steps"]``) that minimise
    its discretisation error on a reference problem, and validate them on held-out draws.

    Reference problem: a Gaussian mixture with exact scores (``mixture=``; or ``data=``, a held-out batch of the
    user's data to which a ``num_components``-component mixture is fitted by EM, :func:`fit_mixture`, with
    ``covariance="full"`` or ``"diag"``: prefer ``"diag"`` when the batch is small for the dimension), or any
    differentiable ``score_fn`` with the sample ``shape`` (e.g. the user's trained network).

    Objective: from ``num_samples`` prior draws (seed ``seed``), the sampler's output ``x`` is compared with a
    high-accuracy solution ``x_ref`` of the same probability-flow ODE from the same draws (DPM-Solver++(3M),
    ``reference_steps`` log-SNR steps). The sampler runs as it does in ``sample``: with its own end (``to_zero``'s
    step, unipc's final corrector and step to zero, ``denoise``), and the reference ends the same way. Two terms,
    both dimensionless:

    * body: the mean of ``e^2 / (c + e^2)`` with ``e = |x - x_ref|`` and ``c`` one feature's spread within a mode
      (the mixture's mean component variance): a sample that ends in another mode than its reference (near a
      boundary between modes the flow is chaotic, no grid fixes that) costs at most 1 instead of dominating the mean;
    * tail (times ``tail_weight``): the mean over samples of how far each lands beyond the reference outputs
      (:class:`~score_toolkit.samplers._grid_reference.OffData`: its negative log-density under the mixture minus
      the largest of the reference outputs', in nats, where that exceeds ``TAIL_MARGIN`` (1); for a ``score_fn``
      reference the squared distance to the nearest reference output beyond the reference outputs' own largest
      nearest-neighbour one, in units of ``c``). A threshold inside the data's own tail (tried: the 99 % quantile)
      makes the optimiser shrink the modes to pull natural tail samples in: a mean-NLL bias of 3 to 6 floors. A mode flip lands on the data
      and costs nothing here; a sample that a bad grid throws off the data costs in proportion to how far (without
      this term the body's cap made it cost no more than a flip, and the optimiser could not see it).

    Hard examples (``tail_rounds=1``, off by default): the draws of a second set of ``num_validation`` that the fitted
    grid throws beyond the reference outputs join the training set and the fit continues (``result.mined``); 1024
    draws rarely hold one of the rare events the tail term is for. Measured on the 2-D ring (2M, 14 steps, VP) it
    doubled the fitting time and left a mean log-density bias of 0.012 nats against the exact ODE where one round
    left 0.003, so it is opt-in.

    ``loss="nll"`` (mixtures only) adds the squared mean log-density bias of the samples (what the mean-NLL metric
    sees), times ``nll_weight``; ``loss="mse"`` leaves it out; the default ``"auto"`` is ``"nll"`` with a mixture
    reference and ``"mse"`` with a ``score_fn`` (measured: without the term the grids' bias of the bulk's mean NLL,
    invisible to the pathwise error, failed the criterion at budgets above the smallest passing one).

    Parametrisation and optimiser: the log-SNR span is split by softmax fractions (monotone, ends fixed, every step
    at least 0.1 % of an even share), initialised at ``init`` (a grid kind of ``GRID_KINDS``, or ``"best"``: the kind
    with the smallest training objective, so the result is never worse than every built-in kind on the training
    draws; or a warm start, below), and minimised through autograd with L-BFGS (``method="lbfgs"``, strong-Wolfe line search) or Adam
    (``method="adam"``, ``lr``, cosine decay); the best iterate is kept. It stops after ``iterations`` objective
    evaluations, or earlier once the best objective has improved by less than ``rel_tol`` (relative) over the last
    ``patience`` evaluations.

    Warm start (``init=`` a grid: a saved grid's name or path, a :class:`GridOptimizationResult`, or a grid's times
    under ``process``): the fit starts from that grid, carried to ``process`` and resampled to ``n`` steps by the
    density rule (:func:`transfer_log_snr` with ``num_steps``) when it was made for another process or budget: for
    instance the previous budget's fit of a ladder, or a saved grid of the nearest budget. The built-in kinds are
    not tried then. Measured in docs/fast_samplers.md ("Fitting time").

    Validation: ``num_validation`` fresh prior draws (seed ``seed + 7919``) and their reference solutions; for the
    optimised grid, the data-free ``"fitted"`` grid (the sampler's own shipped density) and the built-in kinds, :class:`GridValidation` gives the
    objective, the error quantiles (median, 99 %, 99.9 %, max), the number of samples far off the data, and with a
    mixture the mode flips and the criteria users are judged by: within-mode sliced W2 and |mean-NLL gap| of the
    outputs taken to noise level zero, against as many exact samples of the mixture, divided by their noise floors.
    A grid whose held-out ``far_off`` count exceeds ``tail_tolerance * num_validation`` (default: any) is flagged:
    ``result.tail_ok`` is False and a :class:`GridTailWarning` is issued (``on_bad_tail="error"``: a
    :class:`GridTailError` is raised and nothing is saved). With ``save_as`` the grid is saved as a named grid
    (report and settings in its ``info``), usable as ``grid="<name>"`` by every fixed-grid sampler of this family
    (its stochastic variants included), under this process or, carried over as a step density over log-SNR, under
    another process of the family (:func:`transfer_log_snr`).

    One grid for a family of processes (``family=``, mixtures only): the grid is fitted for ``process`` and for every
    process of ``family`` at once, each of them using it as a saved grid is used under another process (carried over
    by :func:`transfer_log_snr`, a step density over absolute log-SNR; ``process`` should span the widest range): the
    objective combines each process's objective on its own prior draws and reference solutions (draws
    ``num_samples`` per process, so the cost grows in proportion): ``family_combine="mean"`` (default) their mean,
    ``"max"`` the worst member's (no member is left behind; L-BFGS follows the worst member's gradient), ``"geometric"``
    their geometric mean (every member's relative improvement counts alike). ``result.family_losses`` has each
    process's training objective at the kept grid (what ``result.loss`` combines), ``result.family_validation`` the
    held-out report of the carried grid under each family process. Measured on the 2-D ring (VE sigma_max 10, 40 and 50,
    dpmpp_2m): a grid fitted under sigma_max 50 alone and carried to sigma_max 10 needs twice the NFE of a grid fitted
    there; one fitted for the family with the density rule up to 2x, with ``transfer_head=2`` 1.22x (1.67x counting a
    failure above its first pass) (docs/fast_samplers.md, "Measured", "Transfer").
    ``transfer_head=k`` (``0 <= k < n``; 0, the density rule, by default) fits the grid for the anchored rule instead
    (:func:`transfer_log_snr` with ``head=k``: its first ``k`` steps are mapped onto each process's own start, the
    points from the ``k``-th on keep their log-SNR); a saved grid records the rule, so it is carried the same way.
    ``transfer="absolute"`` fits it for the absolute rule instead (:func:`absolute_log_snr`, "clip / extend": each
    member runs on the grid's points inside its own range, its own ends added, and a member starting below the grid
    gets one extension step; so the step count follows from the process). Fit it under the narrowest member as
    ``process`` and the wider ones as ``family``: every member then sees all of the grid's points (unless a member's
    start lies within ``ABSOLUTE_MERGE`` of the grid's first step from the process's start, where the first point
    gives way to it). Measured on the ring (sigma_max 10, 40, 50), fitted this way and warm-started from the narrowest
    member's own fit (``init=``): within 1.2x of the per-process fits' NFE at first pass (1.11x, and 1.00x judged
    again on other seeds), 1.44x counting failures above a first pass; cold-started, 1.22x at first pass
    (docs/fast_samplers.md, "The absolute rule, measured").
    ``transfer="interpolated"`` fits two normalised grids instead, one for each extreme of the family (``process``
    and ``family`` together: the member starting at the lowest log-SNR and the one starting at the highest); a member
    starting in between runs on their blend, weighted by where its start lies between the extremes'
    (:mod:`~score_toolkit.samplers._grid_family`); every member keeps the step count, and a process starting outside
    the extremes' range, or of another kind or low-noise end, is refused. ``result.family_grid`` holds the pair (a
    saved grid records it, file version 5). ``init`` may then be a pair of grids, one per extreme (lowest start
    first; e.g. their own fits), or one grid for both. Measured in docs/fast_samplers.md ("The interpolated rule,
    measured").

    Retries (``tail_retries=k``, off by default): when the held-out report flags the grid, it is refitted from other
    training draws (``seed + 1``, up to ``k`` times); every fit is scored on the same held-out draws (seed
    ``seed + 7919``) and the one with the fewest far-off samples is kept, the first of equals (``result.retries``,
    ``result.seed``: the kept fit's training seed); the warning is issued only if the kept fit is still flagged. Measured on
    the 2-D ring (3M, 24 steps, VP, ``loss="nll"``): the first fit threw 2 of 4096 held-out samples off the ring (judged
    W-SW2 1.62x the floor), the refit none (0.84x); a second hard-example round instead found the same grid.

    Only deterministic samplers (``properties.stochastic`` False) of :class:`GridSampler` are optimised: a pathwise
    error against the ODE solution is not defined for a stochastic sampler.

    ``fit_dtype`` (default: ``dtype``, float64): the dtype of the training runs (the held-out validation stays in
    ``dtype``); ``torch.float32`` fits 1.5-2x faster in 16-D but finds other grids (measured in
    docs/fast_samplers.md, "Fitting time"), so it is opt-in. The training reference solutions of a mixture reference
    are solved in float32 whatever ``fit_dtype`` (their rounding is far below the errors a grid is fitted on).

    Cost: about ``iterations`` forward and backward runs of the sampler on ``num_samples`` draws, usually fewer
    (early stop); ``result.fit_seconds`` has the time (measured in docs/fast_samplers.md, "Fitting time").
    """
    start = time.perf_counter()
    _check_arguments(sampler, process,
                     {"num_samples": (num_samples, 1), "num_validation": (num_validation, 2), "iterations": (iterations, 0),
                      "reference_steps": (reference_steps, 1), "patience": (patience, 1), "tail_rounds": (tail_rounds, 0),
                      "tail_retries": (tail_retries, 0)},
                     lr, loss, method, covariance, on_bad_tail, tail_weight, tail_tolerance, rel_tol, nll_weight,
                     family_combine)
    if save_as is not None:
        path = _file_for(save_as, directory)
        if path.exists() and not overwrite:
            raise FileExistsError(f"grid {os.fspath(save_as)!r} already exists at {path}; pass overwrite=True to replace it")
    score, mix = _reference_score(mixture, data, num_components, score_fn, process, covariance)
    if transfer not in ("density", "absolute", "interpolated"):
        raise ValueError(f"optimize_grid: expected transfer 'density', 'absolute' or 'interpolated', found {transfer!r}")
    if transfer != "density" and transfer_head:
        raise ValueError(f"optimize_grid: transfer_head={transfer_head} is the density rule's anchored head; "
                         f"transfer={transfer!r} has none (leave transfer_head at 0)")
    family = _check_family(family, process, mix, transfer)
    n = int(sampler.config["num_steps"])
    if not isinstance(transfer_head, int) or isinstance(transfer_head, bool) or not 0 <= transfer_head < n:
        raise ValueError(f"optimize_grid: expected transfer_head to be an int with 0 <= transfer_head < num_steps = {n}, "
                         f"found {transfer_head!r}")
    if loss == "nll" and mix is None:
        raise ValueError("optimize_grid: loss='nll' needs a mixture reference problem (mixture= or data=), not score_fn=")
    if loss == "auto":  # the NLL term where it can be computed (measured: docs/fast_samplers.md, "Measured")
        loss = "nll" if mix is not None else "mse"
    if nll_weight != 1.0 and loss != "nll":
        raise ValueError(f"optimize_grid: nll_weight weighs the term of loss='nll', which a score_fn reference has "
                         f"not, found nll_weight={nll_weight!r}")
    if mix is not None:
        sample_shape = (mix.dim,)
    elif data is not None:
        sample_shape = tuple(data.shape[1:])
    elif shape is not None:
        sample_shape = tuple(int(s) for s in shape)
    else:
        raise ValueError("optimize_grid: pass shape= (one sample's shape) together with score_fn=")

    if fit_dtype is not None and fit_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"optimize_grid: expected fit_dtype to be torch.float32, torch.float64 or None, found {fit_dtype!r}")
    # the training runs' dtype (the held-out validation and its reference solutions stay in ``dtype``)
    train_dtype = fit_dtype if fit_dtype is not None else dtype
    # the training and hard-example reference solutions of a mixture reference are solved in float32 (measured:
    # 2-4x faster in 64-D; their float32 rounding, 1e-5 median, is far below the errors a grid is fitted on)
    ref_dtype = torch.float32 if mix is not None else train_dtype
    from .dpm_solver import DPMSolverPP3M

    # the sampler is fitted and validated as it runs: its own end (to_zero, unipc's final corrector, denoise); the
    # reference solution ends the same way
    ends = {k: bool(sampler.config.get(k, False)) for k in ("to_zero", "denoise")}
    at_zero = ends["to_zero"] or ends["denoise"]  # the output is already a clean sample
    reference = DPMSolverPP3M(num_steps=reference_steps, grid="log_sigma", lower_order_final=False, **ends)

    def draws(count, s, proc=process, as_dtype=dtype):  # (drawn in dtype: the same draws whatever the training dtype)
        return proc.prior_sample((count, *sample_shape), generator=torch.Generator().manual_seed(s),
                                 device=device, dtype=dtype).to(as_dtype)

    def context(smp, proc=process, fn=score):
        return SamplingContext(smp, fn, proc, None, None, False, False, None)

    def solve(smp, x, ts=None, proc=process, fn=score):
        ctx = context(smp, proc, fn)
        x = smp._run_grid(ctx, x, smp.time_grid(proc) if ts is None else ts)
        return smp._denoise(ctx, x) if smp.config["denoise"] else x

    def reference_of(x, proc=process, fn=score):  # a training reference solution, solved in ref_dtype
        return solve(reference, x.to(ref_dtype), proc=proc, fn=fn).to(x.dtype)

    def kind_grid(kind, proc=process):  # (the data-free "fitted" grid with the sampler's own density, as it runs)
        return resolve_grid(_parse_grid(kind, sampler.name), proc, n, 7.0, sampler.fitted_order)

    # c: one feature's spread within a mode (far above the errors of a usable grid, far below the distance between
    # modes); without a mixture it is read off the validation's reference outputs (the same for every attempt)
    with torch.no_grad():
        x_val = draws(num_validation, seed + 7919)  # one held-out set: every attempt is judged on the same draws
        ref_val = solve(reference, x_val)
    c = float(mix.eigvals.mean()) if mix is not None else 0.01 * float(ref_val.flatten(1).var(0).mean())

    def objective(x, ref, off):
        per = (x - ref).flatten(1).pow(2).sum(1)
        weight = c / (c + per)
        value = (per * weight).mean() / c + tail_weight * torch.relu(off(x) - TAIL_MARGIN).mean()
        if loss == "nll":  # the squared mean log-density bias of the samples that stay in mode
            dnll = mix.log_prob(x.flatten(1).to(mix.dtype)) - mix.log_prob(ref.flatten(1).to(mix.dtype))
            value = value + nll_weight * ((weight.detach() * dnll).sum() / weight.detach().sum()) ** 2
        return value

    interp = transfer == "interpolated"  # the fit's grid is then the pair of normalised grids (_grid_family)
    if interp:
        fam_starts, fam_end, _ = family_extremes((process, *family))

        def start_log_snr(p):
            return _log_snr_ends(p)[0]

        members = (process, *family)
        extremes = [min(members, key=start_log_snr), max(members, key=start_log_snr)]  # the lowest start first
        times_of = _pair_of_logits(n)
    else:
        times_of = softmax_times(process, n)
    if interp and isinstance(init, tuple) and len(init) == 2 and not isinstance(init[0], (int, float)):
        warm = [_init_log_snr(g, p, n) for g, p in zip(init, extremes)]  # one warm start per extreme
    else:
        warm = _init_log_snr(init, process, n)  # a warm start's grid (None: "best" or a kind)
        warm = None if warm is None else [warm, warm] if interp else warm
    if warm is not None:
        warm_times = (torch.stack([_normalised(v) for v in warm]) if interp
                      else _times_from_log_snr(warm, process, "optimize_grid: init"))

    def member_times(ts, proc):
        lam = (interpolated_log_snr(ts, fam_starts, fam_end, proc) if interp
               else absolute_log_snr(process.log_snr(ts), proc) if transfer == "absolute"
               else transfer_log_snr(process.log_snr(ts), proc, head=transfer_head))
        out = proc.t_from_log_snr(lam)
        return torch.cat([out.new_tensor([proc.t_max]), out[1:-1], out.new_tensor([proc.t_min])])

    def own(ts):  # the fit's grid under ``process``
        return member_times(ts, process) if interp else ts

    def start_of(kind):  # a grid kind as the fit's starting grid (interpolated: the kind under each extreme)
        if not interp:
            return kind_grid(kind)
        return torch.stack([_normalised(p.log_snr(kind_grid(kind, p))) for p in extremes])

    def carries(ts):  # can every family member carry this grid (the anchored rule's head must end inside its range)
        if not transfer_head:
            return True
        lam_k = float(process.log_snr(ts[transfer_head : transfer_head + 1]))
        return all(lam_k > float(proc.log_snr(torch.tensor([proc.t_max], dtype=torch.float64))) for proc in family)

    def fit(fit_seed):
        """One fit from the training draws of ``fit_seed``: (times, best training objective, history, hard examples
        mined, the initial kind)."""
        with torch.no_grad():
            x_train = draws(num_samples, fit_seed, as_dtype=train_dtype)
            ref_train = reference_of(x_train)
        off_train = OffData(ref_train, mix, scale=c, level=1.0)
        # the family's processes: each with its own score, prior draws and reference solutions, using the grid
        # carried over
        members = []
        for k, proc in enumerate(family, start=1):
            fn = MixtureScore(mix, proc)
            with torch.no_grad():
                xs = draws(num_samples, fit_seed + 104_711 * k, proc, train_dtype)
                refs = reference_of(xs, proc, fn)
            members.append((proc, fn, xs, refs, OffData(refs, mix, scale=c, level=1.0)))

        def family_values(ts, x_fit, ref_fit, off_fit):
            """Each process's objective (``process`` first, then the family's), or None if a member cannot carry it."""
            values = [objective(solve(sampler, x_fit, own(ts)), ref_fit, off_fit)]
            for proc, fn, xs, refs, off in members:
                try:
                    member_ts = member_times(ts, proc)
                except ValueError:  # the anchored head's end moved past this member's start: no usable grid
                    return None
                values.append(objective(solve(sampler, xs, member_ts, proc, fn), refs, off))
            return values

        def family_objective(ts, x_fit, ref_fit, off_fit):
            values = family_values(ts, x_fit, ref_fit, off_fit)
            if values is None:
                return torch.tensor(math.inf, dtype=train_dtype)
            return values[0] if len(values) == 1 else _combine(torch.stack(values), family_combine)

        start_kind = init if warm is None else "warm start"
        if start_kind == "best":  # start from the grid kind with the smallest training objective (the family's)
            with torch.no_grad():
                losses = {k: float(family_objective(start_of(k), x_train, ref_train, off_train)) for k in GRID_KINDS}
            # (with transfer_head, only kinds whose head ends inside every member's range: the rule needs it)
            usable = [k for k in losses if carries(start_of(k))] or list(losses)
            start_kind = min(usable, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)
        start_grid = start_of(start_kind) if warm is None else warm_times
        if not carries(start_grid):
            raise ValueError(f"optimize_grid: transfer_head={transfer_head}: the {start_kind!r} grid's point "
                             f"{transfer_head} does not lie above every family member's starting log-SNR; use a "
                             "smaller transfer_head or another init")
        theta = (torch.cat([softmax_logits(g) for g in start_grid]) if interp
                 else softmax_logits(process.log_snr(start_grid)))

        history: list[float] = []
        best = [math.inf, theta.clone()]

        def run(x_fit, ref_fit, off_fit, budget):
            """Minimise the objective on (x_fit, ref_fit) (and the family's draws) from the best point so far, for at
            most `budget` evaluations."""
            start_count = len(history)
            best[0] = math.inf  # the objective changes with the training set
            th = best[1].clone().requires_grad_(True)

            def closure():
                done = len(history) - start_count
                if done >= budget:
                    raise _Stop
                recent = history[start_count:]
                if done > patience and best[0] > (1 - rel_tol) * min(recent[:-patience], default=math.inf):
                    raise _Stop  # the last `patience` evaluations improved the best by less than rel_tol
                opt.zero_grad()
                with torch.enable_grad():
                    value_t = family_objective(times_of(th), x_fit, ref_fit, off_fit)
                    value = float(value_t.detach())
                    history.append(value)
                    if math.isfinite(value) and value < best[0]:
                        best[0], best[1] = value, th.detach().clone()
                    if not math.isfinite(value):  # a grid the sampler cannot run on: push back towards the best one
                        return value_t.detach().nan_to_num(posinf=1e30, nan=1e30).requires_grad_()
                    value_t.backward()
                return value_t

            try:
                if method == "lbfgs":
                    opt = torch.optim.LBFGS([th], lr=1.0, max_iter=10 * budget + 1, max_eval=10 * budget + 1,
                                            history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                            tolerance_change=1e-12)
                    opt.step(closure)
                else:
                    opt = torch.optim.Adam([th], lr=float(lr))
                    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, budget))
                    for _ in range(budget):
                        opt.step(closure)
                        sched.step()
            except _Stop:
                pass
            if len(history) == start_count:  # no evaluation (iterations=0): the starting grid
                with torch.no_grad():
                    best[0] = float(family_objective(times_of(best[1]), x_fit, ref_fit, off_fit))

        run(x_train, ref_train, off_train, iterations)
        mined = 0
        if tail_rounds:
            # hard examples: the draws of a second set that the grid throws beyond the reference outputs join the
            # training set (1024 draws rarely hold one of the 1e-3 .. 1e-4 events the judges' metrics see)
            with torch.no_grad():
                x_mine = draws(num_validation, fit_seed + 2 * 7919, as_dtype=train_dtype)
                ref_mine = reference_of(x_mine)
                far_mine = OffData(ref_mine, mix, scale=c, level=1.0)(solve(sampler, x_mine, own(times_of(best[1])))) > 0
            mined = int(far_mine.sum())
            if mined:
                x_fit, ref_fit = torch.cat([x_train, x_mine[far_mine]]), torch.cat([ref_train, ref_mine[far_mine]])
                run(x_fit, ref_fit, off_train, iterations)
        with torch.no_grad():  # each process's training objective at the kept grid (on the first round's draws)
            values = family_values(times_of(best[1]), x_train, ref_train, off_train)
        losses = {repr(p): float(v) for p, v in zip((process, *family), values)} if values is not None else {}
        return times_of(best[1]).detach(), best[0], history, mined, start_kind, losses

    # the family's held-out draws and reference solutions (also one set for every attempt)
    held_out = []
    with torch.no_grad():
        for proc in family:
            fn = MixtureScore(mix, proc)
            xv = draws(num_validation, seed + 7919, proc)
            held_out.append((proc, fn, xv, solve(reference, xv, proc=proc, fn=fn)))

    floors: dict = {}  # the report's exact sets and noise floors: the same for every member and attempt

    def validate(ts):
        with torch.no_grad():
            grids = {"optimized": own(ts), **{kind: kind_grid(kind) for kind in GRID_KINDS}}
            validation = _validate(grids, sampler, process, mix, x_val, ref_val, c, objective, solve, context, seed,
                                   at_zero, floors)
            family_validation = {}
            for proc, fn, xv, rv in held_out:  # the carried grid under each family process, on its own held-out draws
                family_validation[repr(proc)] = _validate(
                    {"optimized": member_times(ts, proc)}, sampler, proc, mix, xv, rv, c, objective,
                    lambda smp, x, g, proc=proc, fn=fn: solve(smp, x, g, proc, fn),
                    lambda smp, proc=proc, fn=fn: context(smp, proc, fn), seed, at_zero, floors)["optimized"]
        return validation, family_validation

    allowed = int(tail_tolerance * num_validation)
    result = worst = None
    for attempt in range(1 + tail_retries):
        # a flagged fit is refitted from other training draws (seed + 1, ...); every fit is judged on the same
        # held-out draws, and the one with the fewest far-off samples is kept (the first of equals)
        ts, best_loss, history, mined, start_kind, losses = fit(seed + attempt)
        validation, family_validation = validate(ts)
        candidate = _worst_tail(validation, family_validation)
        if result is None or candidate.far_off < worst.far_off:
            result = GridOptimizationResult(
                times=own(ts), log_snr=process.log_snr(own(ts)), loss=best_loss, validation=validation,
                tail_ok=candidate.far_off <= allowed, history=history, evaluations=len(history), mined=mined,
                fit_seconds=0.0, num_validation=num_validation, family_validation=family_validation, seed=seed + attempt,
                family_losses=losses, family_grid=FamilyGrid.of(ts, (process, *family)) if interp else None)
            worst, kept_init = candidate, start_kind
        result.retries = attempt
        if result.tail_ok:
            break
    result.fit_seconds = time.perf_counter() - start
    if not result.tail_ok:
        message = (f"optimize_grid: the optimised {n}-step grid of {sampler.name!r} throws "
                   f"{worst.far_off} of {num_validation} held-out samples far off the data (allowed: "
                   f"{allowed}; max error {worst.max_error:.3g}); more num_samples, another seed or "
                   "another budget usually fixes it. The report:\n" + str(result))
        if on_bad_tail == "error":
            raise GridTailError(message)
        warnings.warn(message, GridTailWarning, stacklevel=caller_stacklevel())
    if save_as is not None:
        options = {k: v for k, v in sampler.config.items() if isinstance(v, (int, float, str, bool))}
        info = {"loss": result.loss, "validation": {k: asdict(v) for k, v in result.validation.items()},
                "tail_ok": result.tail_ok, "num_samples": num_samples, "num_validation": num_validation,
                "evaluations": result.evaluations, "mined": result.mined,
                "fit_seconds": result.fit_seconds, "loss_kind": loss, "tail_weight": tail_weight, "method": method,
                "init": kept_init if kept_init != "warm start" or not isinstance(init, (str, os.PathLike))
                else f"warm start: {os.fspath(init)}", "seed": result.seed, "retries": result.retries, "sampler_options": options,
                "family": [_process_record(p) for p in family], "transfer_head": transfer_head, "transfer": transfer,
                "family_combine": family_combine, "family_losses": result.family_losses,
                "family_validation": {k: asdict(v) for k, v in result.family_validation.items()},
                "reference": "mixture" if mix is not None else "score_fn"}
        result.path = save_grid(save_as, result.times, process, sampler=sampler.name, info=info, directory=directory,
                                overwrite=overwrite, transfer_head=transfer_head, transfer=transfer,
                                family_grid=result.family_grid)
        result.name = result.path.stem
    return result
