"""Time grids for fixed-grid samplers: the shared base class, a store of named grids, and the grid optimiser.
The first two live in :mod:`score_toolkit.samplers.fixed_grid` (the samplers import them from there; this
module re-exports them) because the optimiser runs the samplers.

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
they are mapped to times with :meth:`Process.t_from_log_snr` and refused (``ValueError``) by a process
whose log-SNR range differs.

The optimiser (:func:`optimize_grid`) chooses the ``n + 1`` grid points of a deterministic sampler that
minimise its discretisation error on a reference problem: an analytic Gaussian mixture (given, or fitted
to the user's data by a small EM, :func:`fit_mixture`) whose exact score drives both the sampler and a
high-accuracy solution of the same probability-flow ODE from the same initial noise. The grid is
parametrised monotonically in lambda (softmax step fractions between the fixed ends) and optimised through
autograd (the samplers' coefficient code is differentiable in the grid) with L-BFGS by default (Adam with
``method="adam"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..processes import TIME_GRIDS, Process
from .base import SamplingContext
from .fixed_grid import (
    GRID_DIR_ENV_VAR,
    GRID_KINDS,
    GridSampler,
    _file_for,
    default_grid_dir,
    delete_grid,
    fitted_log_snr,
    list_grids,
    load_grid,
    resolve_grid,
    save_grid,
    step_to_zero,
)
from .fixed_grid import check_to_zero as check_to_zero  # re-exported: samplers import it from here

__all__ = [
    "GridSampler",
    "GRID_KINDS",
    "fitted_log_snr",
    "GRID_DIR_ENV_VAR",
    "step_to_zero",
    "default_grid_dir",
    "save_grid",
    "load_grid",
    "list_grids",
    "delete_grid",
    "resolve_grid",
    "fit_mixture",
    "optimize_grid",
    "GridOptimizationResult",
]

# ---------------------------------------------------------------------------------------------- reference problems
def fit_mixture(
    data: torch.Tensor,
    num_components: int = 8,
    *,
    covariance: str = "full",
    iterations: int = 100,
    seed: int = 0,
    reg: float = 1e-6,
):
    """Fit a :class:`~score_toolkit.analytic.GaussianMixture` to ``data`` (N, ...) by EM (k-means++ start,
    float64). ``covariance``: ``"full"`` or ``"diag"``; ``reg`` (times the mean data variance) is added to every
    covariance's diagonal. Used as the reference problem of :func:`optimize_grid`."""
    from ..analytic import GaussianMixture

    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise TypeError(f"expected data as a float tensor (N, ...), found {type(data).__name__}")
    if covariance not in ("full", "diag"):
        raise ValueError(f"expected covariance 'full' or 'diag', found {covariance!r}")
    x = data.detach().reshape(data.shape[0], -1).to("cpu", torch.float64)
    n, d = x.shape
    k = int(num_components)
    if not 1 <= k <= n:
        raise ValueError(f"expected 1 <= num_components <= number of data points ({n}), found {num_components!r}")
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):  # k-means++
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        centers.append(x[torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n) / n, 1, generator=g)].squeeze(0))
    means = torch.stack(centers)
    ridge = reg * float(x.var(0).mean()) + 1e-12
    var0 = x.var(0) + ridge
    covs = torch.diag(var0).expand(k, d, d).clone()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(int(iterations)):
        # E-step (log-domain through Cholesky factors)
        chol = torch.linalg.cholesky(covs)
        diff = x[None] - means[:, None]  # (k, n, d)
        sol = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # (k, d, n)
        maha = (sol**2).sum(1)  # (k, n)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        logp = -0.5 * (maha + logdet[:, None] + d * math.log(2 * math.pi)) + torch.log(weights)[:, None]
        resp = torch.softmax(logp, 0)  # (k, n)
        # M-step
        nk = resp.sum(1) + 1e-12
        weights = nk / n
        means = (resp @ x) / nk[:, None]
        diff = x[None] - means[:, None]
        if covariance == "full":
            covs = torch.einsum("kn,knd,kne->kde", resp, diff, diff) / nk[:, None, None] + ridge * eye
        else:
            covs = torch.diag_embed((resp[..., None] * diff**2).sum(1) / nk[:, None] + ridge)
        covs = 0.5 * (covs + covs.transpose(1, 2))
    return GaussianMixture(means, covs, weights.clamp_min(1e-12))


@dataclass
class GridOptimizationResult:
    """What :func:`optimize_grid` found.

    Attributes:
        times: the optimised grid (float64, ``t_0 = 1 > ... > t_n = t_min``); pass it as ``grid=`` (or the saved
            grid's ``name`` / ``path``).
        log_snr: the same grid in lambda = ln(alpha / sigma).
        loss: the best training loss.
        validation: the loss on held-out draws for the optimised grid and the built-in kinds
            (``{"optimized": ..., "log_sigma": ..., "karras": ..., "uniform": ...}``). A few samples near the
            boundaries between modes (where the flow is chaotic) can dominate it: read it with ``median_error``.
        median_error: the median per-sample squared distance to the reference solution on the held-out draws,
            for the same grids.
        history: the training loss at every evaluation.
        path, name: where and under which name the grid was saved (``save_as``), else ``None``.
    """

    times: torch.Tensor
    log_snr: torch.Tensor
    loss: float
    validation: dict[str, float]
    median_error: dict[str, float]
    history: list[float]
    path: Path | None = None
    name: str | None = None


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
    return mixture.score_fn(process), mixture


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
    iterations: int = 100,
    lr: float = 0.05,
    init: str = "best",
    reference_steps: int = 250,
    seed: int = 0,
    save_as: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
    loss: str = "mse",
    method: str = "lbfgs",
    dtype: torch.dtype = torch.float64,
    device=None,
) -> GridOptimizationResult:
    """Choose the ``n + 1`` time points of ``sampler``'s grid (``n = sampler.config["num_steps"]``) that minimise
    its discretisation error on a reference problem.

    Reference problem: a Gaussian mixture with exact scores (``mixture=``; or ``data=``, a held-out batch of the
    user's data to which a ``num_components``-component mixture is fitted by EM, :func:`fit_mixture`, with
    ``covariance="full"`` or ``"diag"``: prefer ``"diag"`` when the batch is small for the dimension), or any
    differentiable ``score_fn`` with the sample ``shape`` (e.g. the user's trained network).

    Objective: from ``num_samples`` prior draws (seed ``seed``), the sampler's output is compared with a
    high-accuracy solution of the same probability-flow ODE from the same draws (DPM-Solver++(3M), ``reference_steps``
    log-SNR steps). Per sample the squared distance ``e^2`` enters as ``c e^2 / (c + e^2)``, with ``c`` one
    feature's spread within a mode: a sample that ends in another mode than its reference (near a boundary between
    modes the flow is chaotic, no grid fixes that) costs a constant, while one that a bad grid throws off stays
    expensive. ``loss="mse"`` is the mean of that; ``loss="nll"`` (mixtures only) divides it by the mean component
    variance and adds the squared mean log-density bias of the samples (what the mean-NLL metric sees).

    Parametrisation and optimiser: the log-SNR span is split by softmax fractions (monotone, ends fixed, every step
    at least 0.1 % of an even share), initialised at ``init`` (a built-in kind, or ``"best"``: the kind with the
    smallest training loss, so the result is never worse than every built-in kind on the training draws), and
    minimised through autograd
    with L-BFGS (``method="lbfgs"``, strong-Wolfe line search, at most ``iterations`` evaluations) or Adam
    (``method="adam"``, ``lr``, cosine decay); the best iterate is kept. The result is compared on fresh draws
    with the built-in kinds, and with ``save_as`` saved as a named grid, usable as ``grid="<name>"`` by every
    fixed-grid sampler of this family (its stochastic variants included) under the same process.

    Only deterministic samplers (``properties.stochastic`` False) of :class:`GridSampler` are optimised: a pathwise
    error against the ODE solution is not defined for a stochastic sampler.

    Cost: about ``iterations`` forward and backward runs of the sampler on ``num_samples`` draws (on 2 CPU cores:
    about 5 s for 2M with 14 steps on the 2-d ring, about 1 minute for 3M with 39 steps on a 16-d mixture of 10
    components).
    """
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
    if init != "best" and init not in TIME_GRIDS:
        raise ValueError(f"optimize_grid: expected init 'best' or one of {TIME_GRIDS}, found {init!r}")
    for key, value, minimum in (("num_samples", num_samples, 1), ("iterations", iterations, 0),
                                ("reference_steps", reference_steps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"optimize_grid: expected {key} to be an int >= {minimum}, found {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"optimize_grid: expected lr > 0, found {lr!r}")
    if save_as is not None:
        path = _file_for(save_as, directory)
        if path.exists() and not overwrite:
            raise FileExistsError(f"grid {os.fspath(save_as)!r} already exists at {path}; pass overwrite=True to replace it")
    if loss not in ("mse", "nll"):
        raise ValueError(f"optimize_grid: expected loss 'mse' or 'nll', found {loss!r}")
    if method not in ("lbfgs", "adam"):
        raise ValueError(f"optimize_grid: expected method 'lbfgs' or 'adam', found {method!r}")
    if covariance not in ("full", "diag"):
        raise ValueError(f"optimize_grid: expected covariance 'full' or 'diag', found {covariance!r}")
    score, mix = _reference_score(mixture, data, num_components, score_fn, process, covariance)
    if loss == "nll" and mix is None:
        raise ValueError("optimize_grid: loss='nll' needs a mixture reference problem (mixture= or data=), not score_fn=")
    mean_var = float(mix.eigvals.mean()) if mix is not None else 1.0
    if mix is not None:
        sample_shape = (mix.dim,)
    elif data is not None:
        sample_shape = tuple(data.shape[1:])
    elif shape is not None:
        sample_shape = tuple(int(s) for s in shape)
    else:
        raise ValueError("optimize_grid: pass shape= (one sample's shape) together with score_fn=")

    from .dpm_solver import DPMSolverPP3M

    n = int(sampler.config["num_steps"])
    reference = DPMSolverPP3M(num_steps=reference_steps, grid="log_sigma", lower_order_final=False)

    def draws(s):
        return process.prior_sample((num_samples, *sample_shape), generator=torch.Generator().manual_seed(s),
                                    device=device, dtype=dtype)

    def solve(smp, x, ts=None):
        ctx = SamplingContext(smp, score, process, None, None, False, False, None)
        return smp._integrate(ctx, x, smp.time_grid(process) if ts is None else ts)

    def loss_of(x, ref):
        # saturating per-sample loss c e^2 / (c + e^2): a sample that lands in another mode than the reference
        # (near a boundary between modes the flow is chaotic: no grid fixes that) costs a constant, while a
        # sample that goes astray because of the grid stays expensive
        per = (x - ref).flatten(1).pow(2).sum(1)
        weight = saturation / (saturation + per)
        robust = (per * weight).mean()
        if loss == "mse":
            return robust
        # loss == "nll": the same in units of the mixture's mean component variance (about the mean squared error
        # of the log-density per sample) plus the squared mean log-density bias of the samples that stay in mode
        dnll = mix.log_prob(x.flatten(1).to(mix.dtype)) - mix.log_prob(ref.flatten(1).to(mix.dtype))
        bias = (weight.detach() * dnll).sum() / weight.detach().sum()
        return robust / mean_var + bias**2

    with torch.no_grad():
        x_train, x_val = draws(seed), draws(seed + 7919)
        ref_train, ref_val = solve(reference, x_train), solve(reference, x_val)
    # the saturation scale: one feature's spread within a mode (far above the errors of a usable grid, far below
    # the distance between modes)
    if mix is not None:
        saturation = float(mix.eigvals.mean())
    else:
        saturation = 0.01 * float(ref_train.flatten(1).var(0).mean())

    ends = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    lam0, lam1 = float(ends[0]), float(ends[1])
    if init == "best":  # start from the built-in kind with the smallest training loss
        with torch.no_grad():
            init_losses = {k: float(loss_of(solve(sampler, x_train, process.time_grid(n, k, dtype=torch.float64)), ref_train))
                           for k in TIME_GRIDS}
        init = min(init_losses, key=lambda k: init_losses[k] if math.isfinite(init_losses[k]) else math.inf)
    lam_init = process.log_snr(process.time_grid(n, init, dtype=torch.float64))
    theta = torch.log(torch.diff(lam_init).clamp_min(1e-12)).clone().requires_grad_(True)
    t_ends = (torch.tensor([process.t_max], dtype=torch.float64), torch.tensor([process.t_min], dtype=torch.float64))

    def times_of(th):
        # every step keeps at least 0.1 % of an even share (distinct nodes for the multistep interpolation)
        frac = torch.softmax(th, 0) * (1 - 1e-3) + 1e-3 / n
        lam = lam0 + (lam1 - lam0) * torch.cumsum(frac, 0)[:-1]
        return torch.cat([t_ends[0], process.t_from_log_snr(lam), t_ends[1]])

    history: list[float] = []
    best = [math.inf, theta.detach().clone()]

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            value_t = loss_of(solve(sampler, x_train, times_of(theta)), ref_train)
            value = float(value_t.detach())
            history.append(value)
            if math.isfinite(value) and value < best[0]:
                best[0], best[1] = value, theta.detach().clone()
            if not math.isfinite(value):  # a grid the sampler cannot run on: push back towards the best one
                return value_t.detach().nan_to_num(posinf=1e30, nan=1e30).requires_grad_()
            value_t.backward()
        return value_t

    if method == "lbfgs":
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)
        opt.step(closure)
    else:
        opt = torch.optim.Adam([theta], lr=float(lr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations))
        for _ in range(iterations):
            opt.step(closure)
            sched.step()
        closure()
    with torch.no_grad():
        ts = times_of(best[1])
        grids = {"optimized": ts, **{kind: process.time_grid(n, kind, dtype=torch.float64) for kind in TIME_GRIDS}}
        validation, median = {}, {}
        for key, grid in grids.items():
            out = solve(sampler, x_val, grid)
            validation[key] = float(loss_of(out, ref_val))
            median[key] = float((out - ref_val).flatten(1).pow(2).sum(1).median())
    result = GridOptimizationResult(times=ts, log_snr=process.log_snr(ts), loss=best[0], validation=validation,
                                    median_error=median, history=history)
    if save_as is not None:
        options = {k: v for k, v in sampler.config.items() if isinstance(v, (int, float, str, bool))}
        info = {"loss": best[0], "validation": validation, "median_error": median, "num_samples": num_samples,
                "iterations": iterations, "loss_kind": loss, "method": method, "init": init, "seed": seed,
                "sampler_options": options, "reference": "mixture" if mix is not None else "score_fn"}
        result.path = save_grid(save_as, ts, process, sampler=sampler.name, info=info, directory=directory,
                                overwrite=overwrite)
        result.name = result.path.stem
    return result
