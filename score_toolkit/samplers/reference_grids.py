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
the shipped ``grid="fitted"`` (fitted on the benchmark's own mixtures) does better on the 2-D ring and the reference
grid better on the 64-D mixture.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..processes import Process
from ._grid_reference import MixtureScore, OffData
from .base import SamplingContext
from .grid_store import transfer_log_snr
from .grid_validation import TAIL_MARGIN

__all__ = ["REFERENCE_GRIDS", "reference_family", "reference_log_snr", "family_objective", "fit_reference_grid"]

#: the shipped fits: ``{sampler name: {num_steps: log-SNR points lambda(1) < ... < lambda(t_min)}}`` fitted by
#: :func:`fit_reference_grid` on :func:`reference_family` under VPSDE(0.1, 20) (log-SNR range [-5.025, 4.558])
REFERENCE_GRIDS: dict[str, dict[int, tuple[float, ...]]] = {
    "unipc": {
        11: (-5.025, -3.7699, -2.5535, -1.6178, -0.4333, 0.2327, 0.9351, 1.5007, 2.4243, 2.7465, 3.4944, 4.5577),
        14: (-5.025, -4.1907, -3.357, -2.5281, -1.7142, -0.9094, -0.2728, 0.2257, 0.7484, 1.1921, 1.606, 2.2693,
             2.7149, 3.2943, 4.5577),
        19: (-5.025, -4.2492, -3.4679, -2.6927, -1.9514, -1.3244, -0.8598, -0.5327, -0.2996, -0.0758, 0.3157, 0.541,
             0.8771, 1.2231, 1.6285, 1.9962, 2.7024, 3.0655, 3.6375, 4.5577),
        24: (-5.025, -3.3741, -2.0878, -1.6297, -1.0003, -0.8337, -0.5645, -0.2911, -0.2251, 0.0851, 0.1371, 0.3758,
             0.4197, 0.6107, 0.7742, 0.9766, 1.1908, 1.4684, 1.6393, 2.2563, 2.4468, 2.9289, 3.7346, 3.9388, 4.5577),
    },
}


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


def reference_log_snr(process: Process, num_steps: int, sampler: str) -> torch.Tensor:
    """The reference grid of ``sampler`` for ``num_steps`` steps under ``process`` as float64 log-SNR values
    ``lambda(1) < ... < lambda(t_min)``: the shipped fit of the nearest budget (in log steps), carried over to the
    process's range and step count as a step density over absolute log-SNR."""
    fits = REFERENCE_GRIDS.get(sampler)
    if not fits:
        raise ValueError(f"grid 'reference': no reference grid is shipped for sampler {sampler!r}; shipped for "
                         f"{sorted(REFERENCE_GRIDS)}")
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"grid 'reference': expected num_steps >= 1, found {num_steps!r}")
    nearest = min(fits, key=lambda m: (abs(math.log(m / n)), m))
    return transfer_log_snr(torch.tensor(fits[nearest], dtype=torch.float64), process, n)


def _to_zero(score, process: Process, x: torch.Tensor) -> torch.Tensor:
    """The step to noise level zero of ``to_zero`` (:func:`~score_toolkit.samplers.fixed_grid.step_to_zero`),
    differentiable, without recording."""
    alpha, sigma = process.marginal(torch.tensor([process.t_min], dtype=torch.float64))
    return (x + 0.5 * sigma**2 * score(x, process.t_min)) / alpha


def _sampler_output(sampler, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """What the sampler returns from ``x`` on ``ts``, taken to noise level zero (the metrics judge that): its own
    final step with ``to_zero`` (unipc's corrects the last step first), else the step to zero after it."""
    if sampler.config.get("to_zero") and "final" in inspect.signature(sampler._integrate).parameters:
        return sampler._integrate(ctx, x, ts, final=True)
    out = sampler._integrate(ctx, x, ts)
    return _to_zero(ctx.score, ctx.process, out)


def family_objective(sampler, process: Process, mixtures, *, num_samples: int = 256, reference_steps: int = 250,
                     seed: int = 0, tail_weight: float = 1.0, nll_weight: float = 1.0, combine: str = "log"):
    """The objective of the joint fit as a function of the float64 times ``ts`` (``t_0 = 1 > ... > t_n = t_min``,
    differentiable). Per mixture, the grid optimiser's ``loss="nll"`` objective on ``num_samples`` prior draws of its
    own: the capped pathwise error against a converged solution of the same ODE from the same draws
    (DPM-Solver++(3M), ``reference_steps`` log-SNR steps), the tail term (``tail_weight``) and the squared mean
    log-density bias (``nll_weight``), each judged on what the sampler returns, taken to noise level zero (the
    metrics judge that). ``combine="log"`` (the shipped fits) averages their logarithms, so each reference counts by
    its relative error and none dominates by its scale; ``"mean"`` averages the values."""
    if combine not in ("log", "mean"):
        raise ValueError(f"family_objective: expected combine 'log' or 'mean', found {combine!r}")
    from .dpm_solver import DPMSolverPP3M

    if not mixtures:
        raise ValueError("family_objective: expected at least one mixture")
    reference = DPMSolverPP3M(num_steps=reference_steps, grid="log_sigma", lower_order_final=False)
    terms = []
    for k, mix in enumerate(mixtures):
        score = MixtureScore(mix, process)
        ctx = SamplingContext(sampler, score, process, None, None, False, False, None)
        x = process.prior_sample((num_samples, mix.dim), generator=torch.Generator().manual_seed(seed + 7919 * k),
                                 dtype=torch.float64)
        with torch.no_grad():
            ref = reference._integrate(SamplingContext(reference, score, process, None, None, False, False, None), x,
                                       reference.time_grid(process))
            ref = _to_zero(score, process, ref)
        c = float(mix.eigvals.mean())
        terms.append((mix, ctx, x, ref, c, OffData(ref, mix, scale=c, level=1.0), mix.log_prob(ref)))

    def objective(ts):
        total = 0.0
        for mix, ctx, x, ref, c, off, ref_logp in terms:
            out = _sampler_output(sampler, ctx, x.clone(), ts)
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
    lam0, lam1 = (float(v) for v in process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64)))
    ends = (torch.tensor([process.t_max], dtype=torch.float64), torch.tensor([process.t_min], dtype=torch.float64))

    def times_of(th):
        frac = torch.softmax(th, 0) * (1 - 1e-3) + 1e-3 / n
        lam = lam0 + (lam1 - lam0) * torch.cumsum(frac, 0)[:-1]
        return torch.cat([ends[0], process.t_from_log_snr(lam), ends[1]])

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
