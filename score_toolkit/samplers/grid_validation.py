"""What :func:`~score_toolkit.samplers.grids.optimize_grid` reports: the held-out validation of every grid it
compares (:class:`GridValidation`: error quantiles, far-off samples, mode flips, within-mode sliced W2 and mean-NLL
gap against the exact noise floor), the tail warning/error, and the result object it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._grid_reference import OffData
from .fixed_grid import step_to_zero

#: a held-out sample is "far off" when it lands this far beyond the least likely reference output (nats of the
#: mixture's negative log-density; for a score_fn reference: squared distance to the nearest reference output
#: beyond the largest nearest-neighbour one, in units of one feature's within-mode spread)
FAR_OFF_MARGIN = 5.0
#: within this factor of the noise floor in both within-mode sliced W2 and |mean-NLL gap|: the criterion reported
CRITERION = 1.5
#: the tail term counts a training sample from this far beyond the least likely reference output (same units):
#: samples in the data's own tail, moved slightly by the grid, do not count (counting them shrinks the modes)
TAIL_MARGIN = 1.0


class GridTailWarning(UserWarning):
    """An optimised grid throws more held-out samples far off the data than ``tail_tolerance`` allows."""


class GridTailError(ValueError):
    """Raised instead of :class:`GridTailWarning` with ``on_bad_tail="error"`` (nothing is saved)."""


@dataclass
class GridValidation:
    """One grid measured on the optimiser's held-out draws (see :func:`optimize_grid`).

    Attributes:
        objective: the optimiser's objective.
        median_error, q99_error, q999_error, max_error: quantiles of the per-sample distance ``|x - x_ref|`` between
            the sampler's output and the reference solution from the same draw (mode flips near boundaries between
            modes included: they are about one distance between modes).
        far_off: samples that land far off the data (``FAR_OFF_MARGIN`` beyond the least likely reference output):
            what a bad grid does, and what mode flips never do.
        mode_flips: samples that end in another mixture component than their reference (mixtures; else ``None``).
        wsw_ratio, nll_ratio: within-mode sliced W2 of the outputs (taken to noise level zero by the ``to_zero``
            step) against as many exact samples of the reference mixture, and their |mean-NLL gap| against the
            reference outputs from the same draws (paired, so the draws' sampling noise cancels), each divided by its
            noise floor at the validation size (mixtures; else ``None``).
    """

    objective: float
    median_error: float
    q99_error: float
    q999_error: float
    max_error: float
    far_off: int
    mode_flips: int | None = None
    wsw_ratio: float | None = None
    nll_ratio: float | None = None

    @property
    def meets(self) -> bool | None:
        """Both ratios within ``CRITERION`` (1.5) of the floor (``None`` without a mixture)."""
        if self.wsw_ratio is None or self.nll_ratio is None:
            return None
        return self.wsw_ratio <= CRITERION and self.nll_ratio <= CRITERION


@dataclass
class GridOptimizationResult:
    """What :func:`optimize_grid` found; ``print(result)`` shows the validation report.

    Attributes:
        times: the optimised grid (float64, ``t_0 = 1 > ... > t_n = t_min``); pass it as ``grid=`` (or the saved
            grid's ``name`` / ``path``).
        log_snr: the same grid in lambda = ln(alpha / sigma) (what is saved, and what carries it to other processes).
        loss: the best training objective.
        validation: the held-out report (:class:`GridValidation`) of the optimised grid (``"optimized"``), the
            data-free ``"fitted"`` grid and the built-in kinds.
        tail_ok: the optimised grid's held-out ``far_off`` count is within ``tail_tolerance``; when not, a
            :class:`GridTailWarning` was issued (or :class:`GridTailError` raised).
        history: the training objective at every evaluation.
        evaluations, fit_seconds: objective evaluations and wall time of the whole call.
        mined: hard examples added to the training set for the second round (``tail_rounds``).
        num_validation: held-out draws behind ``validation``.
        family_validation: with ``family=``, the held-out report of the grid carried over to each process of the
            family (keyed by the process's repr), on that process's own held-out draws.
        family_losses: the training objective of ``process`` and of each family process (keyed by repr) at the kept
            grid, on the first round's training draws: what ``loss`` combines (``family_combine``) without hard
            examples (``tail_rounds=0``).
        seed: the seed of the kept fit's draws; retries: refits made because the report flagged a fit
            (``tail_retries``).
        path, name: where and under which name the grid was saved (``save_as``), else ``None``.
        family_grid: with ``transfer="interpolated"``, the fitted
            :class:`~score_toolkit.samplers._grid_family.FamilyGrid` (``family_grid.log_snr(p)``: the grid under a
            member ``p``), else ``None``.
    """

    times: torch.Tensor
    log_snr: torch.Tensor
    loss: float
    validation: dict[str, GridValidation]
    tail_ok: bool
    history: list[float]
    evaluations: int
    mined: int
    fit_seconds: float
    num_validation: int
    family_validation: dict[str, GridValidation] = field(default_factory=dict)
    family_losses: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    retries: int = 0
    path: Path | None = None
    name: str | None = None
    family_grid: object | None = None

    @property
    def median_error(self) -> dict[str, float]:
        """The held-out median per-sample error of every grid."""
        return {k: v.median_error for k, v in self.validation.items()}

    def __str__(self) -> str:
        lines = [f"optimised grid: {self.times.numel() - 1} steps, {self.evaluations} evaluations ({self.mined} hard "
                 "examples mined), "
                 f"{self.fit_seconds:.1f} s, training objective {self.loss:.4g}; held-out report on "
                 f"{self.num_validation} draws (error = |x - x_ref|; far off = beyond {FAR_OFF_MARGIN:g} past the "
                 "reference outputs; ratios to the noise floor)",
                 f"{'grid':<10} {'objective':>10} {'median':>9} {'q99':>9} {'q99.9':>9} {'max':>9} {'far off':>8} "
                 f"{'flips':>6} {'W-SW2':>7} {'NLL':>7} {'meets':>6}"]

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        rows = [*self.validation.items(), *((f"carried to {k}", v) for k, v in self.family_validation.items())]
        for key, v in rows:
            lines.append(f"{key:<10} {v.objective:>10.3g} {v.median_error:>9.2e} {v.q99_error:>9.2e} "
                         f"{v.q999_error:>9.2e} {v.max_error:>9.3g} {v.far_off:>8d} {f(v.mode_flips, 'd'):>6} "
                         f"{f(v.wsw_ratio, '.2f'):>7} {f(v.nll_ratio, '.2f'):>7} {f(v.meets, ''):>6}")
        lines.append("tail: ok" if self.tail_ok else "tail: BAD (GridTailWarning): the optimised grid throws held-out "
                     "samples far off the data")
        if self.path is not None:
            lines.append(f"saved as {self.name!r} ({self.path})")
        return "\n".join(lines)


def _validate(grids, sampler, process, mix, x_val, ref_val, c, objective, solve, context, seed, at_zero=False,
              floors=None):
    """The held-out report of every grid (see :class:`GridValidation`); ``at_zero``: the outputs are already clean
    samples (the sampler ends with ``to_zero`` or ``denoise``), else the ``to_zero`` step is taken to judge them.
    ``floors``: a dict that keeps the exact sets and noise floors (they depend on the mixture, the set's size and
    ``seed`` only) for the next call with the same ones (a family's members, retries)."""
    from .. import metrics as M

    def to_zero(x):
        return x if at_zero else step_to_zero(context(sampler), x, process.t_min)

    far = OffData(ref_val, mix, scale=c, level=1.0)  # beyond the least likely reference output
    judged = None
    if mix is not None:
        count = x_val.shape[0]
        key = (id(mix), count, seed)
        if floors is None or key not in floors:
            gens = [torch.Generator().manual_seed(seed + 104_729 + k) for k in range(7)]
            exact, *pairs = (mix.sample(count, generator=g) for g in gens)
            wsw_floor = sum(M.within_mode_sliced_wasserstein(pairs[2 * k], mix, reference=pairs[2 * k + 1])
                            for k in range(3)) / 3
            # E|mean NLL(A) - mean NLL(B)| for two independent exact sets of this size
            nll_floor = 2.0 * float((-mix.log_prob(exact)).std()) / math.sqrt(math.pi * count)
            if floors is not None:
                floors[key] = (exact, wsw_floor, nll_floor)
        exact, wsw_floor, nll_floor = floors[key] if floors is not None else (exact, wsw_floor, nll_floor)
        ref_labels = mix.posterior(ref_val.flatten(1).to(mix.dtype)).argmax(1)
        # the NLL gap is taken against the reference outputs from the same draws (paired: the draws' own sampling
        # noise, which would otherwise dominate at this size, cancels)
        ref_nll = float(-mix.log_prob(to_zero(ref_val).flatten(1).to(mix.dtype)).mean())
        judged = (exact, ref_nll, wsw_floor, nll_floor, ref_labels)
    out = {}
    for key, grid in grids.items():
        x = solve(sampler, x_val, grid)
        err = (x - ref_val).flatten(1).norm(dim=1)
        q = torch.quantile(err, torch.tensor([0.5, 0.99, 0.999], dtype=err.dtype)).tolist()
        v = GridValidation(objective=float(objective(x, ref_val, far)), median_error=q[0], q99_error=q[1],
                           q999_error=q[2], max_error=float(err.max()), far_off=int((far(x) > FAR_OFF_MARGIN).sum()))
        if judged is not None:
            exact, exact_nll, wsw_floor, nll_floor, ref_labels = judged
            x0 = to_zero(x).flatten(1).to(mix.dtype)
            v.mode_flips = int((mix.posterior(x.flatten(1).to(mix.dtype)).argmax(1) != ref_labels).sum())
            v.wsw_ratio = M.within_mode_sliced_wasserstein(x0, mix, reference=exact) / wsw_floor
            v.nll_ratio = abs(float(-mix.log_prob(x0).mean()) - exact_nll) / nll_floor
        out[key] = v
    return out
