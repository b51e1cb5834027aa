"""Exact log-likelihoods through the probability-flow ODE, and bits/dim with uniform dequantization.

The probability-flow ODE of a process (Song et al. 2021, "Score-based generative modeling through SDEs",
eq. 13) is ``dx/dt = F(x, t) = f(t) x - g(t)^2 s(x, t) / 2``. Along its solution the instantaneous change of
variables (Chen et al. 2018, "Neural ordinary differential equations", Theorem 1; Song et al. 2021, eq. 39)
gives ``d log p_t(x_t) / dt = -div_x F(x_t, t)``, so, integrating forward from the data at ``t_min`` to the
prior at ``t = 1``:

    log p_{t_min}(x) = log p_1(x_1) + int_{t_min}^{1} div_x F(x_t, t) dt,
    div_x F = f(t) d - g(t)^2 / 2 * div_x s(x, t).

:func:`log_likelihood` integrates the augmented state ``(x, int div F)`` with the Dormand-Prince 5(4) pair and a
step size per sample by default (:mod:`.stepper`, ``method="dopri5_per_sample"``), or with torchdiffeq (adaptive
dopri5, ..., or a fixed grid), in one of three integration variables (:mod:`.time_variable`; the same ODE, steps
placed differently): the VP clock ``"vp_t"`` (every process integrated as VP(0.1, 20) is in t, with the
variance-preserving state ``x / sqrt(alpha^2 + sigma^2)``), ``tau = ln(sigma / alpha)`` with the scaled state
``x / alpha`` (``"log_sigma"``), or t itself (``"t"``). The default ``"auto"`` takes ln(sigma / alpha) for networks
(a ``ScoreAdapter``: a noise predictor's score grows like 1 / sigma near t = 0) and the VP clock for an analytic or
plain score function under every process. The divergence of the score
is computed

* ``"exact"``: as the trace of the Jacobian, ``d`` vector-Jacobian products (one backward pass per basis vector on
  the CPU; vectorised with ``is_grads_batched`` on accelerators when the network supports it);
* ``"hutchinson"``: with Hutchinson's estimator ``div s = E_v[v^T (ds/dx) v]`` (``E[v v^T] = I``), ``K``
  Rademacher or Gaussian probes per sample, drawn once and held fixed through the solve (FFJORD, Grathwohl
  et al. 2019; score_sde_pytorch uses one probe).

Standard error of the Hutchinson estimate. Only the score's divergence is estimated (``f d`` is exact). The
trajectory ``x_t`` does not depend on the probes, so each probe ``v_k`` gives its own integral
``I_k = int [f d - g^2 / 2 * v_k^T J(x_t, t) v_k] dt`` (``J = ds/dx``; each ``I_k`` is a component of the
augmented state). ``E[I_k] = int [f d - g^2 / 2 * tr J] dt`` (linearity of the integral, the probes being fixed
in time), and ``I_1..I_K`` are i.i.d. given ``x``. The estimate is their mean ``I = mean_k I_k`` and its standard
error ``sd(I_1..I_K) / sqrt(K)`` (sample standard deviation, ``K - 1`` degrees of freedom; it needs ``K >= 2``,
and is NaN for ``K = 1``). It is the standard error of the log-likelihood itself; the solver's own error
(rtol/atol) is not included. This is why the probes are per-probe components of the state rather than one
summed estimate: the spread of the K integrals is what gives the error bar.

What is computed is ``log p_{t_min}`` of the model's marginal at ``t_min`` (score_sde's ``eps``), with the
process's Gaussian prior standing in for ``p_1`` (pass ``prior_log_prob`` to use another one).

The package's modules: :mod:`.ode` (:func:`log_likelihood` and its solve), :mod:`.dynamics` (the augmented ODE's
right-hand side), :mod:`.stepper` (the per-sample Dormand-Prince stepper), :mod:`.time_variable` (the integration
variable), :mod:`.divergence` (Hutchinson probes, vector-Jacobian products, error norms), :mod:`.bits` (bits/dim of
quantised data), :mod:`.quantization` (dequantization, levels, the NLL to bits/dim conversion), :mod:`.options` (options, defaults and input checks), :mod:`.result` (:class:`LikelihoodResult`,
:class:`SolverError`) and :mod:`.exchange` (the results of several processes).
"""

from .bits import BitsPerDimResult, dequantized_bits_per_dim
from .ode import log_likelihood
from .options import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NUM_STEPS,
    DEFAULT_NUM_PROBES,
    DEFAULT_RTOL,
    DIVERGENCES,
    METHODS,
    PROBES,
    TIME_VARIABLES,
)
from .quantization import bits_per_dim, dequantize, to_levels
from .result import LikelihoodResult, SolverError

__all__ = [
    "LikelihoodResult",
    "BitsPerDimResult",
    "SolverError",
    "log_likelihood",
    "bits_per_dim",
    "dequantize",
    "to_levels",
    "dequantized_bits_per_dim",
    "DIVERGENCES",
    "PROBES",
    "TIME_VARIABLES",
    "METHODS",
    "DEFAULT_RTOL",
    "DEFAULT_ATOL",
    "DEFAULT_MAX_NUM_STEPS",
    "DEFAULT_NUM_PROBES",
    "DEFAULT_BATCH_SIZE",
]
