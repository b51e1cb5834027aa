"""Data-free grids fitted once on a standard reference family (``grid="reference"``).

A grid that needs no data of the user's: the fixed-grid sampler's time points are fitted once, offline, on a
fixed family of reference distributions (:func:`reference_family`: random mixtures of isotropic Gaussians in 2, 4
and 8 dimensions whose mode widths span 0.05 to 1 and whose modes lie a few units apart, the scale of standardised
data), for each shipped sampler and budget, and shipped as log-SNR points (:data:`REFERENCE_GRIDS`). A process's
grid of ``n`` steps is the shipped fit of the nearest budget read as a step density over absolute log-SNR and split
over the process's own range into ``n`` parts of equal mass (:func:`~score_toolkit.samplers.grid_store.transfer_log_snr`),
so one table serves VE processes with any ``sigma_max``, VP, sub-VP and DDPM tables.

The fit (:func:`fit_reference_grid`) minimises, jointly over the family, the grid optimiser's objective with
``loss="nll"`` (:func:`~score_toolkit.samplers.grids.optimize_grid`: pathwise error against a converged solution of
the same probability-flow ODE from the same prior draws, the tail term, the squared mean log-density bias), one term
per reference distribution (:func:`family_objective`). None of the family is a benchmark test distribution; measured
on those as held-out targets in docs/fast_samplers.md ("The reference grid"): it is not the default grid, because
the shipped ``grid="fitted"`` (fitted on the benchmark's own mixtures) does better on the 2-D ring. The 29-step fit
was made with ``unipc``'s ``lower_order_final=False``, before that option's ``"auto"`` default (see the docs).
"""

from __future__ import annotations

import math

import torch

from ..processes import Process
from ._grid_reference import MixtureScore, OffData
from ._reference_table import REFERENCE_GRIDS, reference_log_snr  # the shipped table; re-exported here
from .base import SamplingContext
from .grid_validation import TAIL_MARGIN
from .grids import softmax_times

__all__ = ["REFERENCE_GRIDS", "reference_family", "reference_log_snr", "family_objective", "fit_reference_grid"]

def reference_family(dims=(2, 2, 4, 4, 8, 8), components: int = 8, widths=(0.05, 1.0), seed: int = 1000,
                     dtype=torch.float64) -> list:
    """The reference family (deterministic given ``seed``; the defaults are the family the shipped grids were fitted
    on): one mixture of ``components`` isotropic Gaussians per entry of ``dims`` (the dimension); each component's
    standard deviation log-uniform in ``widths``; means in uniformly random directions at radii uniform in [1.5, 4];
    weights uniform in [0.5, 1.5] (normalised)."""
    from ..analytic import GaussianMixture

    out = []
    K = int(components)
    for k, dim in enumerate(dims):
        g = torch.Generator().manual_seed(seed + k)
        u = torch.randn(K, dim, generator=g, dtype=dtype)
        radius = torch.empty(K, 1, dtype=dtype).uniform_(1.5, 4.0, generator=g)
        means = u / u.norm(dim=1, keepdim=True) * radius
        std = torch.exp(torch.empty(K, dtype=dtype).uniform_(math.log(widths[0]), math.log(widths[1]), generator=g))
        weights = torch.empty(K, dtype=dtype).uniform_(0.5, 1.5, generator=g)
        out.append(GaussianMixture(means, std**2, weights, dtype=dtype))
    return out


def family_objective(sampler, process: Process, mixtures, *, num_samples: int = 256, reference_steps: int = 250,
                     seed: int = 0, tail_weight: float = 1.0, nll_weight: float = 1.0, combine: str = "log"):
    """The objective of the joint fit as a function of the float64 times ``ts`` (``t_0 = 1 > ... > t_n = t_min``,
    differentiable). Per mixture, the grid optimiser's ``loss="nll"`` objective on ``num_samples`` prior draws of its
    own: the capped pathwise error against a converged solution of the same ODE from the same draws
    (DPM-Solver++(3M), ``reference_steps`` log-SNR steps), the tail term (``tail_weight``) and the squared mean
    log-density bias (``nll_weight``), each judged on what the sampler returns (its own end, e.g. ``to_zero`` with
    unipc's final corrector) against the converged solution taken to noise level zero (the metrics judge that). ``combine="log"`` (the shipped fits) averages their logarithms, so each reference counts by
    its relative error and none dominates by its scale; ``"mean"`` averages the values."""
    if combine not in ("log", "mean"):
        raise ValueError(f"family_objective: expected combine 'log' or 'mean', found {combine!r}")
    from .dpm_solver import DPMSolverPP3M
    from .fixed_grid import GridSampler

    if not isinstance(sampler, GridSampler) or sampler.properties.stochastic:
        raise TypeError(f"family_objective: expected a deterministic fixed-grid sampler (a GridSampler such as unipc or "
                        f"dpmpp_2m), found {sampler!r}")
    if not sampler.config.get("to_zero") or sampler.config.get("denoise"):
        raise ValueError(f"family_objective: expected a sampler that ends with to_zero=True (its outputs are judged at "
                         f"noise level zero), found to_zero={sampler.config.get('to_zero')!r}, "
                         f"denoise={sampler.config.get('denoise')!r}")

    if not mixtures:
        raise ValueError("family_objective: expected at least one mixture")
    reference = DPMSolverPP3M(num_steps=reference_steps, grid="log_sigma", lower_order_final=False, to_zero=True)
    terms = []
    for k, mix in enumerate(mixtures):
        score = MixtureScore(mix, process)
        ctx = SamplingContext(sampler, score, process, None, None, False, False, None)
        x = process.prior_sample((num_samples, mix.dim), generator=torch.Generator().manual_seed(seed + 7919 * k),
                                 dtype=torch.float64)
        with torch.no_grad():
            ref = reference._run_grid(SamplingContext(reference, score, process, None, None, False, False, None), x,
                                      reference.time_grid(process))
        c = float(mix.eigvals.mean())
        terms.append((mix, ctx, x, ref, c, OffData(ref, mix, scale=c, level=1.0), mix.log_prob(ref)))

    def objective(ts):
        total = 0.0
        for mix, ctx, x, ref, c, off, ref_logp in terms:
            out = sampler._run_grid(ctx, x.clone(), ts)
            per = (out - ref).pow(2).sum(1)
            weight = c / (c + per)
            value = (per * weight).mean() / c + tail_weight * torch.relu(off(out) - TAIL_MARGIN).mean()
            dnll = mix.log_prob(out) - ref_logp
            value = value + nll_weight * ((weight.detach() * dnll).sum() / weight.detach().sum()) ** 2
            total = total + (torch.log(value) if combine == "log" else value)
        return total / len(terms)

    return objective


def fit_reference_grid(sampler, process: Process, mixtures, *, iterations: int = 80, **objective_options) -> torch.Tensor:
    """Fit the log-SNR points of ``sampler``'s grid (its ``num_steps``) under ``process`` jointly on ``mixtures``
    (Gaussian mixtures with exact scores): :func:`family_objective` (options ``objective_options``) minimised by
    L-BFGS over softmax step fractions from the uniform log-SNR grid, at most ``iterations`` objective evaluations;
    returns the best grid's float64 log-SNR points."""
    n = int(sampler.config["num_steps"])
    objective = family_objective(sampler, process, mixtures, **objective_options)
    times_of = softmax_times(process, n)

    th = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    best = [math.inf, th.detach().clone()]
    opt = torch.optim.LBFGS([th], lr=1.0, max_iter=iterations, max_eval=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        value = objective(times_of(th))
        v = float(value.detach())
        if math.isfinite(v) and v < best[0]:
            best[0], best[1] = v, th.detach().clone()
        if not math.isfinite(v):
            return value.detach().nan_to_num(posinf=1e30, nan=1e30).requires_grad_()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return process.log_snr(times_of(best[1]))
