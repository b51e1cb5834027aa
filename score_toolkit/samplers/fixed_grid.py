"""Fixed time grids: the ``grid`` option of the fixed-grid samplers (a built-in kind, a saved grid, a file or
explicit times), the store of named grids (:func:`save_grid`, :func:`load_grid`, :func:`list_grids`,
:func:`delete_grid`), their shared base class :class:`GridSampler`, and the final step to noise level zero.

The samplers import this module; the grid optimiser (:mod:`score_toolkit.samplers.grids`, which also re-exports
every public name here) runs the samplers, so it lives apart. See :mod:`score_toolkit.samplers.grids` for the
meaning of the options and of saved grids.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..processes import Process
from ._reference_table import REFERENCE_GRIDS, reference_log_snr
from .base import Sampler, SamplingContext, check_float, check_int
from .grid_store import (  # the store of named grids and the log-SNR transfer; re-exported here
    ABSOLUTE_MERGE,
    GRID_DIR_ENV_VAR,
    GRID_KINDS,
    MAX_TRANSFER_EXTENSION,
    REFERENCE_GRID,
    _check_times,
    _log_snr_ends,
    _read_record,
    _times_from_log_snr,
    absolute_log_snr,
    default_grid_dir,
    delete_grid,
    list_grids,
    load_grid,
    save_grid,
    transfer_log_snr,
)

__all__ = [
    "GridSampler",
    "GRID_KINDS",
    "fitted_log_snr",
    "GRID_DIR_ENV_VAR",
    "check_to_zero",
    "step_to_zero",
    "default_grid_dir",
    "save_grid",
    "load_grid",
    "list_grids",
    "delete_grid",
    "resolve_grid",
    "transfer_log_snr",
    "absolute_log_snr",
    "MAX_TRANSFER_EXTENSION",
    "ABSOLUTE_MERGE",
]


# The data-free grids. Grids fitted by optimize_grid(mixture=...) on the benchmark's reference mixtures, written
# as their log-SNR values lambda = ln(alpha / sigma): the 2-D ring of 8 Gaussians (std 0.2, radius 4) and the 16-D
# anisotropic mixture (10 components, eigenvalues in [0.01, 0.25]) under VESDE(0.01, 50) and VPSDE(0.1, 20). In
# absolute log-SNR the VE and VP fits of one mixture nearly coincide (the ring's 2M fits within 0.16 at every point):
# where the steps go depends on the noise level relative to the data, not on the process. Each fit is read as a step
# density over lambda (1 / (n * step) on each step, its end densities extended beyond its range); a shipped grid is
# a weighted mean of such densities, and a process's grid of n steps splits the density's mass over the process's
# own log-SNR range [lambda(1), lambda(t_min)] into n equal parts. See docs/fast_samplers.md ("Defaults").
#
# Second order (dpmpp_2m): fits of dpmpp_2m with to_zero, loss "mse", 512/256 draws, 60 L-BFGS evaluations; 11 steps
# on the ring, 19 on the 16-D mixture, VE and VP; equal weights (weighting the 16-D fits 3:1, or them alone, was
# measured worse on the ring; mixing in 30-50 % of even log-SNR steps was worse in both metrics).
_FITTED_2M = (
    (-3.912, -2.558, -1.382, -1.042, -0.539, -0.122, 0.329, 0.755, 1.224, 1.726, 2.919, 4.605),
    (-5.025, -2.716, -1.422, -1.163, -0.607, -0.176, 0.303, 0.753, 1.252, 1.788, 3.044, 4.558),
    (-3.912, -2.634, -1.979, -1.519, -1.152, -0.812, -0.505, -0.147, 0.151, 0.432, 0.747, 1.07, 1.564, 1.709, 1.939,
     2.144, 2.416, 2.629, 3.268, 4.605),
    (-5.025, -3.089, -2.428, -1.92, -1.556, -1.221, -0.914, -0.54, -0.282, 0.044, 0.303, 0.6, 0.897, 1.261, 1.702,
     1.894, 2.22, 2.43, 3.092, 4.558),
)
# Third order (dpmpp_3m): fits of dpmpp_3m with to_zero, loss "nll" (the pathwise error plus the squared mean
# log-density bias: the 2M fits above leave the small-variance directions of the 16-D mixture 2-3 % too wide), 512
# draws, 60 L-BFGS evaluations, started from the uniform log-SNR grid: 11 and 14 steps on the ring (VE, VP), 14, 19
# and 24 steps on the 16-D mixture (VP). Mixed with the 2M fits (which resolve the range where the ring's modes
# separate) at weights 7 (the four 2M fits together) : 8 (the 16-D fits) : 4 (the ring fits), chosen by measurement
# (docs/fast_samplers.md).
_FITTED_3M = (
    (-3.912, -2.7617, -2.081, -0.7318, 0.0167, 0.7022, 1.2587, 1.8152, 2.1576, 2.562, 3.4173, 4.6051),
    (-5.025, -3.8297, -2.8463, -1.802, -0.5987, 0.1119, 0.74, 1.2596, 1.9169, 2.2952, 2.8563, 4.5577),
    (-3.912, -3.4993, -3.0832, -2.1864, -1.977, -0.6919, -0.056, 0.6166, 1.1697, 1.6911, 2.08, 2.2503, 2.7299, 3.5137,
     4.6051),
    (-5.025, -4.2723, -3.5536, -2.9796, -2.5632, -2.4906, -0.805, -0.1795, 0.4679, 0.9892, 1.4706, 2.136, 2.3391,
     2.8661, 4.5577),
    (-5.025, -3.5337, -2.3097, -1.4453, -0.8376, -0.2693, 0.3646, 0.9162, 1.4516, 1.925, 2.1158, 2.9723, 3.3514,
     3.5399, 4.5577),
    (-5.025, -4.2547, -3.4968, -2.7681, -2.1057, -1.4954, -0.9275, -0.536, -0.2049, 0.2702, 0.6509, 1.0443, 1.4046,
     1.6471, 1.8928, 2.5997, 3.0597, 3.3168, 3.6317, 4.5577),
    (-5.025, -4.3065, -3.5965, -2.9119, -2.3062, -1.8126, -1.424, -1.0923, -0.7655, -0.4832, -0.2498, 0.0577, 0.3248,
     0.6169, 0.8915, 1.1505, 1.4055, 1.5929, 1.762, 2.3579, 2.812, 3.1038, 3.3967, 3.8352, 4.5577),
)
# Fourth order (unipc: UniP-3 + UniC): the same fits at weights 12 (the 2M fits) : 4 (ring) : 8 (16-D), chosen by
# measurement among 7-12 : 4-8 : 4-12 (docs/fast_samplers.md, benchmarks/results/defaults_unipc_explore.md): more of
# the 2M spacing serves the ring at 15 NFE; a UniPC fit of its own (loss "nll") was worse on the ring than this mix.
#: the shipped densities by the order of the sampler they were fitted for: (knots, weights)
_FITTED = {
    2: (_FITTED_2M, (1.0,) * 4),
    3: (_FITTED_2M + _FITTED_3M, (7 / 4,) * 4 + (1.0,) * 4 + (8 / 3,) * 3),
    4: (_FITTED_2M + _FITTED_3M, (3.0,) * 4 + (1.0,) * 4 + (8 / 3,) * 3),
}


def _fitted_density(lam: torch.Tensor, order: int = 2) -> torch.Tensor:
    """The shipped step density over log-SNR for samplers of ``order`` at the points ``lam`` (the weighted mean of
    the fitted grids' densities)."""
    knots_list, weights = _FITTED[order]
    total = torch.zeros_like(lam)
    for knots, weight in zip(knots_list, weights):
        k = torch.tensor(knots, dtype=torch.float64)
        dens = 1.0 / ((k.numel() - 1) * torch.diff(k))
        idx = (torch.searchsorted(k, lam, right=True) - 1).clamp(0, dens.numel() - 1)
        total += weight * dens[idx]
    return total / sum(weights)


def fitted_log_snr(process: Process, num_steps: int, order: int = 2) -> torch.Tensor:
    """The data-free grid (``grid="fitted"``) as float64 log-SNR values ``lambda(1) < ... < lambda(t_min)``.

    ``order``: 2 (the density fitted for second-order samplers: dpmpp_2m and the rest), 3 (the one fitted for
    dpmpp_3m: finer steps at high log-SNR, where a third-order method's error budget goes) or 4 (unipc with its
    order-3 predictor and corrector: the same fits, more weight on the second-order ones).

    The shipped step density over log-SNR (fitted once, see the comment above) is integrated over the process's
    range and the grid points split its mass into ``num_steps`` equal parts: a data-free grid for any process and
    budget, which transfers across processes (VE with any sigma_max, VP, sub-VP, DDPM tables) because it lives in
    absolute log-SNR. Like every data-free rule it assumes data of about unit scale (per feature spreads of 0.1 to
    1, distances between modes of a few units), as a standardised data set has."""
    if order not in _FITTED:
        raise ValueError(f"fitted_log_snr: expected order in {sorted(_FITTED)}, found {order!r}")
    n = int(num_steps)
    a, b = _log_snr_ends(process)
    m = 4097
    lam = torch.linspace(a, b, m, dtype=torch.float64)
    dens = _fitted_density(lam, order)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * torch.diff(lam), 0)])
    cdf = cdf / cdf[-1]
    q = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    j = (torch.searchsorted(cdf, q, right=True) - 1).clamp(0, m - 2)
    frac = ((q - cdf[j]) / (cdf[j + 1] - cdf[j]).clamp_min(1e-300)).clamp(0, 1)
    out = lam[j] + frac * (lam[j + 1] - lam[j])
    out[0], out[-1] = a, b
    return out



@dataclass(frozen=True)
class _GridSpec:
    kind: str | None = None  # a built-in kind
    log_snr: torch.Tensor | None = None  # a saved grid
    times: tuple[float, ...] | None = None  # explicit times
    label: str = ""
    made_for: dict | None = field(default=None, compare=False)
    sampler: str | None = None  # whose shipped reference grid (grid="reference")
    head: int = 0  # a saved grid's transfer head (transfer_log_snr)
    rule: str = "density"  # a saved grid's transfer rule: "density" (transfer_log_snr) or "absolute" (absolute_log_snr)

    @property
    def num_steps(self) -> int | None:
        if self.log_snr is not None:
            return self.log_snr.numel() - 1
        if self.times is not None:
            return len(self.times) - 1
        return None


def _parse_grid(grid, sampler: str) -> _GridSpec:
    if isinstance(grid, str):
        if grid == REFERENCE_GRID:
            if sampler not in REFERENCE_GRIDS:
                raise ValueError(f"sampler {sampler!r}: option grid 'reference': no reference grid is shipped for this "
                                 f"sampler; shipped for {sorted(REFERENCE_GRIDS)}")
            return _GridSpec(kind=REFERENCE_GRID, label=REFERENCE_GRID, sampler=sampler)
        if grid in GRID_KINDS:
            return _GridSpec(kind=grid, label=grid)
        try:
            record = _read_record(grid, None)
        except ValueError as exc:
            raise ValueError(f"sampler {sampler!r}: option grid: {exc}") from None
        lam = torch.tensor(record["log_snr"], dtype=torch.float64)
        return _GridSpec(log_snr=lam, label=f"grid {record['name']!r} ({record['_path']})", made_for=record.get("process"),
                         head=record["_head"], rule=record["_rule"])
    if isinstance(grid, os.PathLike):
        return _parse_grid(os.fspath(grid), sampler)
    if isinstance(grid, (torch.Tensor, list, tuple)):
        if isinstance(grid, torch.Tensor):
            if grid.ndim != 1 or not grid.is_floating_point():
                raise ValueError(f"sampler {sampler!r}: expected option grid as a 1-D float tensor of times, found {grid!r}")
            values = grid.detach().to("cpu", torch.float64).tolist()
        else:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid):
                raise TypeError(f"sampler {sampler!r}: expected option grid as a sequence of times, found {grid!r}")
            values = [float(v) for v in grid]
        if len(values) < 2 or any(not math.isfinite(v) for v in values) or any(b >= a for a, b in zip(values[:-1], values[1:])):
            raise ValueError(
                f"sampler {sampler!r}: expected option grid as >= 2 strictly decreasing finite times from 1 to t_min, "
                f"found {values}"
            )
        return _GridSpec(times=tuple(values), label="option grid")
    raise TypeError(
        f"sampler {sampler!r}: expected option grid to be one of {GRID_KINDS}, {REFERENCE_GRID!r}, a saved grid name or "
        ".json path, "
        f"or a sequence of times; found {type(grid).__name__}"
    )


def resolve_grid(spec: _GridSpec, process: Process, num_steps: int, rho: float, fitted_order: int = 2) -> torch.Tensor:
    """The float64 times ``t_0 = 1 > ... > t_n = t_min`` of a parsed grid option under ``process``
    (``fitted_order``: which shipped density ``grid="fitted"`` uses, see :func:`fitted_log_snr`)."""
    if spec.kind == "fitted":
        return _times_from_log_snr(fitted_log_snr(process, num_steps, fitted_order), process, "the fitted grid")
    if spec.kind == REFERENCE_GRID:
        return _times_from_log_snr(reference_log_snr(process, num_steps, spec.sampler), process, "the reference grid")
    if spec.kind is not None:
        return process.time_grid(num_steps, spec.kind, rho=rho, dtype=torch.float64)
    if spec.log_snr is not None:
        return _times_from_log_snr(spec.log_snr, process, spec.label, spec.made_for, spec.head, spec.rule)
    return _check_times(spec.times, process, label=spec.label)


# ---------------------------------------------------------------------------------------------- base class
class GridSampler(Sampler):
    """Base of the samplers that run on a fixed time grid (options ``num_steps``, ``grid``, ``rho``, ``to_zero``).

    ``to_zero`` (False): after ``t_min``, take the probability-flow ODE to noise level zero with one more score
    evaluation (:func:`step_to_zero`); exclusive with ``denoise`` (Tweedie's step, which also shrinks the spread).

    Subclasses implement :meth:`_integrate` (from the prior at ``ts[0] = 1`` to ``ts[-1] = t_min``) and set
    ``nfe_per_step``. :meth:`_integrate` must be differentiable in ``ts`` when ``ts`` requires grad (so that
    :func:`optimize_grid` can optimise the grid): compute step coefficients with torch ops from ``ts``.
    """

    options: ClassVar[Mapping[str, Any]] = {"num_steps": 20, "grid": "log_sigma", "rho": 7.0, "to_zero": False}
    #: score evaluations per step (multistep: 1; single-step s-stage: s)
    nfe_per_step: ClassVar[int] = 1
    #: the shipped density ``grid="fitted"`` uses (:func:`fitted_log_snr`'s ``order``)
    fitted_order: ClassVar[int] = 2

    def __init__(self, **options: Any):
        self._given = frozenset(options)
        super().__init__(**options)

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        if cfg["denoise"] is True and cfg["to_zero"] is True and "to_zero" not in self._given:
            cfg["to_zero"] = False  # a to_zero default gives way to an explicit denoise=True
        check_to_zero(cfg, self.name)
        spec = _parse_grid(cfg["grid"], self.name)
        check_float(cfg, "rho", self.name)
        if spec.kind != "karras" and "rho" in self._given:
            raise ValueError(f"sampler {self.name!r}: option rho is used only with grid='karras', found grid={cfg['grid']!r}")
        if spec.num_steps is not None:
            if "num_steps" in self._given and cfg["num_steps"] != spec.num_steps:
                raise ValueError(
                    f"sampler {self.name!r}: option num_steps={cfg['num_steps']!r} disagrees with the {spec.num_steps} steps "
                    f"of {spec.label}; leave num_steps out"
                )
            cfg["num_steps"] = spec.num_steps
            if spec.times is not None:
                cfg["grid"] = list(spec.times)
        check_int(cfg, "num_steps", self.name)
        self._grid_spec = spec

    def _num_progress_steps(self) -> int | None:
        return int(self.config["num_steps"])

    @property
    def nfe(self) -> int:
        """Score evaluations of one run: ``num_steps * nfe_per_step``, plus one for ``to_zero`` or ``denoise``.
        (A saved grid with the absolute transfer rule runs another number of steps under another process than the
        one it was made for: :meth:`nfe_under` counts them.)"""
        return self.config["num_steps"] * self.nfe_per_step + self._final_steps_nfe()

    def nfe_under(self, process: Process) -> int:
        """Score evaluations of one run under ``process``: :attr:`nfe`, except for a saved grid carried by the
        absolute rule (:func:`absolute_log_snr`), whose step count follows from the process."""
        return (self.time_grid(process).numel() - 1) * self.nfe_per_step + self._final_steps_nfe()

    def time_grid(self, process: Process) -> torch.Tensor:
        """The float64 times ``t_0 = 1 > ... > t_n = t_min`` this sampler runs on under ``process``."""
        key = (self._grid_spec.label, id(self._grid_spec), self.config["num_steps"], self.config["rho"], self.fitted_order)
        ts = self._per_process(process, "grid", key, lambda: resolve_grid(
            self._grid_spec, process, int(self.config["num_steps"]), float(self.config["rho"]), self.fitted_order))
        return ts.clone()

    def _per_process(self, process: Process, slot: str, key, compute):
        """``compute()``, computed once per process object and ``key`` and kept for the next run (one entry per
        ``slot``): a run's grid and step coefficients depend only on them, and repeated runs (batches) then skip
        their setup. Processes are immutable (their config is frozen); an entry is matched by the process object's
        identity and ``key``."""
        cache = self.__dict__.setdefault("_setup_cache", {})
        entry = cache.get(slot)
        if entry is not None and entry[0] is process and entry[1] == key:
            return entry[2]
        value = compute()
        cache[slot] = (process, key, value)
        return value

    def _progress_total(self, process: Process | None = None) -> int | None:
        """Steps recorded in a run (final steps included); under ``process``, those of the grid it runs there
        (a grid carried by the absolute rule runs another number of steps than ``num_steps``)."""
        if process is None:
            return super()._progress_total()
        return self.time_grid(process).numel() - 1 + self._final_steps_nfe()

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        ts = self.time_grid(ctx.process)
        if ts.numel() - 1 != self.config["num_steps"]:  # a grid carried by the absolute rule: its steps here
            ctx.info["num_steps"] = ts.numel() - 1  # (the progress bar's total came from _progress_total(process))
        return self._run_grid(ctx, x, ts)

    def _run_grid(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """One run on the grid ``ts`` with this sampler's own end (``to_zero``): what ``sample`` runs, and what
        :func:`~score_toolkit.samplers.grids.optimize_grid` fits and validates (differentiable in ``ts``)."""
        x = self._integrate(ctx, x, ts)
        if self.config["to_zero"]:
            x = step_to_zero(ctx, x, ctx.process.t_min)
        return x

    def _integrate(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def check_to_zero(cfg: Mapping[str, Any], sampler: str) -> None:
    """Validate the ``to_zero`` option (a bool, exclusive with ``denoise``)."""
    if not isinstance(cfg["to_zero"], bool):
        raise TypeError(f"sampler {sampler!r}: expected option to_zero to be a bool, found {cfg['to_zero']!r}")
    if cfg["to_zero"] and cfg["denoise"]:
        raise ValueError(
            f"sampler {sampler!r}: options denoise and to_zero are exclusive final steps (denoise: Tweedie's E[x_0 | x_t]; "
            "to_zero: the probability-flow ODE to noise level 0); pass one of them"
        )


def step_to_zero(ctx: SamplingContext, x: torch.Tensor, t_end: float) -> torch.Tensor:
    """The probability-flow ODE from ``t_end`` to noise level zero in one Euler step in ``sigma~^2``
    (``sigma~ = sigma / alpha``), one score evaluation.

    In ``x~ = x / alpha`` the PF-ODE reads ``dx~ / d(sigma~^2) = -s~ / 2`` with ``s~ = alpha s`` bounded as the
    noise vanishes, so ``x_0 = x~ + sigma~^2 s~ / 2 = (x + sigma^2 s / 2) / alpha = (x~ + D) / 2`` (``D``: Tweedie's
    denoiser), exact up to O(sigma~^4). Tweedie's ``x <- D`` (option ``denoise``) instead removes the noise
    *and* shrinks the spread (by ``C / (C + sigma~^2)`` for a Gaussian of covariance C); this step keeps it.
    Recorded at ``t = 0`` (noise level zero)."""
    alpha, sigma = ctx.process.marginal(torch.tensor([float(t_end)], dtype=torch.float64))
    s = ctx.score(x, float(t_end))
    x = torch.add(x, s, alpha=0.5 * float(sigma) ** 2).div_(float(alpha))
    ctx.record(x, 0.0)
    return x


def _lincomb(pairs):
    """sum c * tensor over (c, tensor) pairs; fused in-place on a fresh tensor when the c are Python floats."""
    (c0, t0), *rest = pairs
    if isinstance(c0, float):
        out = t0 * c0
        for c, t in rest:
            out.add_(t, alpha=c)
        return out
    out = c0 * t0
    for c, t in rest:
        out = out + c * t
    return out


def _floats(*tensors: torch.Tensor):
    """Per-step coefficients as Python floats (fast path), or the tensors themselves when they carry grad."""
    if any(t.requires_grad for t in tensors):
        return tensors
    return tuple(t.tolist() for t in tensors)
