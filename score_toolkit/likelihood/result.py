"""What :func:`~score_toolkit.likelihood.log_likelihood` returns (:class:`LikelihoodResult`) and the error it raises
when the ODE solver cannot finish (:class:`SolverError`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .quantization import bits_per_dim

__all__ = ["LikelihoodResult", "SolverError", "student_t_quantile"]


class SolverError(RuntimeError):
    """The ODE solver could not finish: step budget exhausted or step size underflow."""


@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` returns (all per-sample tensors of shape (B,), in the input's order).

    Attributes:
        log_prob: ``log p_{t_min}(x)`` in nats, in model space.
        std_err: standard error of ``log_prob`` from the Hutchinson probes: ``std(I_k) / sqrt(K)`` over the K probes
            (0 for the exact divergence; NaN with one probe, and NaN where all K probe estimates agree, which does
            not mean the error is 0: with K = 4 Rademacher probes in 2-D it happens to 1/8 of the samples). With
            few probes, ``log_prob +- 2 std_err`` covers less than 95%: use :meth:`interval` (a Student t
            interval) and see docs/likelihood.md for the measured coverage.
        prior_log_prob: ``log p_1(x_1)`` of the state reached at ``t = 1``.
        delta_log_prob: ``int_{t_min}^1 div F dt`` (``log_prob = prior_log_prob + delta_log_prob``).
        nfe: number of ODE right-hand-side evaluations, i.e. batched score evaluations, over every solve
            (each also costs ``d`` (exact) or ``K`` (Hutchinson) vector-Jacobian products).
        nfe_per_sample: NFE of the solve each sample was part of.
        num_dims: ``d``, the number of features per sample.
        divergence, num_probes, probe: how the divergence was computed.
        t_min: where the integration started.
        wall_time_s: wall time of the call.
        latent: the state at ``t = 1`` (with ``return_latent=True``), shaped like ``x``.
        info: solver settings.
        probe_variance: per-sample sample variance of the K probe estimates (Hutchinson with K >= 2, else None),
            zeros included; its pooled mean gives the probe error of a mean over samples without bias.
    """

    log_prob: torch.Tensor
    std_err: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    nfe: int
    nfe_per_sample: torch.Tensor
    num_dims: int
    divergence: str
    num_probes: int
    probe: str | None
    t_min: float
    wall_time_s: float
    latent: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    probe_variance: torch.Tensor | None = None

    def interval(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample interval ``log_prob -+ q std_err`` for the Hutchinson error, with ``q`` the Student t
        quantile with ``K - 1`` degrees of freedom (3.18 at K = 4 and level 0.95, not 2). NaN where the standard
        error is unknown; zero width for the exact divergence (which has no probe error, only the solver's)."""
        if not 0 < level < 1:
            raise ValueError(f"expected level in (0, 1), found {level!r}")
        if self.divergence == "exact":
            return self.log_prob.clone(), self.log_prob.clone()
        if self.num_probes < 2:
            nan = torch.full_like(self.log_prob, math.nan)
            return nan, nan.clone()
        q = student_t_quantile(0.5 + level / 2, self.num_probes - 1)
        return self.log_prob - q * self.std_err, self.log_prob + q * self.std_err

    @property
    def nll(self) -> torch.Tensor:
        """Negative log-likelihood in nats (B,)."""
        return -self.log_prob

    def bits_per_dim(self, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0) -> torch.Tensor:
        """Bits/dim of this result when ``x`` was dequantised as in :func:`dequantize` (see :func:`bits_per_dim`)."""
        return bits_per_dim(self.nll, self.num_dims, bits=bits, levels=levels, scale=scale)

    def summary(self) -> dict[str, Any]:
        """Means over samples, as plain numbers.

        ``std_err_mean_nll`` is the spread of the per-sample estimates over ``sqrt(n)``: the error of the mean as an
        estimate of the expected NLL of the data's distribution. The per-sample estimates already carry their
        probe noise (independent probes per sample), so it is not added again. ``hutchinson_std_err_mean_nll`` is
        the probe error alone (the error of the mean over these very samples), from the pooled probe variance
        (None with one probe or the exact divergence); ``num_unknown_std_err`` counts the samples whose own
        standard error is unknown (NaN)."""
        n = self.log_prob.numel()
        nll = self.nll.double()
        spread = float(nll.std()) if n > 1 else math.nan
        hutch = None
        if self.probe_variance is not None:
            hutch = float(self.probe_variance.double().sum().div(self.num_probes).sqrt()) / n
        unknown = int(torch.isnan(self.std_err).sum()) if self.divergence == "hutchinson" else 0
        return {
            "num_samples": n,
            "num_dims": self.num_dims,
            "mean_nll_nats": float(nll.mean()),
            "std_err_mean_nll": spread / math.sqrt(n),
            "hutchinson_std_err_mean_nll": hutch,
            "num_unknown_std_err": unknown,
            "nfe": self.nfe,
            "wall_time_s": self.wall_time_s,
            "divergence": self.divergence,
            "num_probes": self.num_probes,
            "probe": self.probe,
            "t_min": self.t_min,
            **{k: v for k, v in self.info.items() if k not in ("num_processes",)},
            "num_processes": self.info.get("num_processes", 1),
        }


@functools.lru_cache(maxsize=64)
def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (``0.5 <= p < 1``), by
    bisection on its distribution function (Simpson's rule on the density; error below 1e-9)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"expected df to be an int >= 1, found {df!r}")
    if not 0.5 <= p < 1:
        raise ValueError(f"expected p in [0.5, 1), found {p!r}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # P(T <= x) for x >= 0, on the substitution t = tan(theta) (finite interval)
        n = 2000
        end = math.atan(x)
        h = end / n
        total = 0.0
        for i in range(n + 1):
            th = i * h
            t = math.tan(th)
            f = math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df)) / math.cos(th) ** 2
            total += f * (1 if i in (0, n) else (4 if i % 2 else 2))
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p and hi < 1e12:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2
