"""The probability-flow ODE pushed from the prior to the data with its log-density: the transport of
:mod:`~score_toolkit.samplers.importance_ode` (:func:`flow_with_density`), on the augmented dynamics, integration
variables and solvers of :mod:`score_toolkit.likelihood`, integrated the other way (from ``t = 1`` down to ``t_min``).
"""

from __future__ import annotations

import math

import torch

from ..likelihood.divergence import _per_sample_norm
from ..likelihood.dynamics import _AugmentedDynamics
from ..likelihood.ode import _integrate
from ..likelihood.options import METHODS, _resolve_time_variable
from ..likelihood.time_variable import _TimeVariable
from ..processes import Process

__all__ = ["flow_with_density", "METHODS", "DEFAULT_TOLERANCE", "DEFAULT_MAX_NUM_STEPS"]

DEFAULT_TOLERANCE = 1e-5
DEFAULT_MAX_NUM_STEPS = 10_000


def flow_with_density(score_fn, process: Process, x1: torch.Tensor, *, method: str = "dopri5_per_sample",
                      rtol: float = DEFAULT_TOLERANCE, atol: float = DEFAULT_TOLERANCE, num_steps: int | None = None,
                      grid: str = "uniform", max_num_steps: int = DEFAULT_MAX_NUM_STEPS, divergence: str = "exact",
                      probes: torch.Tensor | None = None, time_variable: str = "auto"):
    """Push ``x1`` (N, ...) from ``t = 1`` to ``t_min`` along the probability-flow ODE of ``score_fn`` and integrate the
    log-density on the way: returns ``(x_{t_min}, delta)`` with ``log q(x_{t_min}) = log p_1(x1) + delta`` (N,) (the
    mean over the probes' integrals with ``divergence="hutchinson"``, ``probes`` (P, N, ...)).

    The augmented state and right-hand side are :func:`~score_toolkit.likelihood.log_likelihood`'s, in the same
    integration variable (``time_variable``) and with the same solvers: the per-sample Dormand-Prince stepper
    (``"dopri5_per_sample"``: every point meets ``rtol``/``atol`` by itself, so its result does not depend on its
    batch), torchdiffeq's adaptive methods, or a fixed grid of ``num_steps`` steps (``euler``, ``midpoint``,
    ``heun2``, ``heun3``, ``rk4``) on ``process.time_grid(num_steps, grid)``, integrated the other way (from the prior
    to the data). ``score_fn`` must be differentiable in ``x`` (for DPS and PiGDM that is a double backward)."""
    if method not in METHODS:
        raise ValueError(f"flow_with_density: expected method in {tuple(METHODS)}, found {method!r}")
    adaptive = METHODS[method]
    variable = _TimeVariable(_resolve_time_variable(time_variable, process, score_fn), process, process.t_min,
                             process.t_max)
    n = x1.shape[0]
    dyn = _AugmentedDynamics(score_fn, process, x1.shape, divergence, probes, variable,
                             max_num_steps if adaptive and method != "dopri5_per_sample" else None)
    comps = 1 if probes is None else probes.shape[0]
    y_start = x1.reshape(n, -1) * math.exp(-variable.log_c_hi)
    y0 = torch.cat([y_start, torch.zeros(n, comps, dtype=x1.dtype, device=x1.device)], 1)
    grid_tau = None
    if not adaptive:
        grid_tau = variable.to_tau(process.time_grid(num_steps, grid, dtype=torch.float64))
        grid_tau[0], grid_tau[-1] = variable.hi, variable.lo
    y_end = _integrate(dyn, y0, variable.hi, variable.lo, method=method, rtol=rtol, atol=atol,
                       max_num_steps=max_num_steps, norm=_per_sample_norm(dyn.dim), grid=grid_tau,
                       who="importance_ode")
    x0 = (y_end[:, : dyn.dim] * math.exp(variable.log_c_lo)).reshape(x1.shape)
    # the component integrated int_{tau(1)}^{tau(t_min)} (div_y dy/dtau) dtau = -(the forward integral), plus the
    # change of scale of the state x = c y (see log_likelihood)
    shift = 0.0 if variable.kind == "t" else dyn.dim * (variable.log_c_hi - variable.log_c_lo)
    delta = (-y_end[:, dyn.dim:] + shift).mean(1)
    return x0, delta
