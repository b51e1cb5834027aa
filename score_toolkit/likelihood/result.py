"""What :func:`~score_toolkit.likelihood.log_likelihood` returns (:class:`LikelihoodResult`) and the error it raises
when the ODE solver cannot finish (:class:`SolverError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .quantization import bits_per_dim

__all__ = ["LikelihoodResult", "SolverError"]


class SolverError(RuntimeError):
    """The ODE solver could not finish: step budget exhausted or step size underflow."""


@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` returns (all per-sample tensors of shape (B,), in the input's order).

    Attributes:
        log_prob: ``log p_{t_min}(x)`` in nats, in model space.
        std_err: standard error of ``log_prob`` from the Hutchinson probes (0 for the exact divergence).
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

    @property
    def nll(self) -> torch.Tensor:
        """Negative log-likelihood in nats (B,)."""
        return -self.log_prob

    def bits_per_dim(self, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0) -> torch.Tensor:
        """Bits/dim of this result when ``x`` was dequantised as in :func:`dequantize` (see :func:`bits_per_dim`)."""
        return bits_per_dim(self.nll, self.num_dims, bits=bits, levels=levels, scale=scale)

    def summary(self) -> dict[str, Any]:
        """Means over samples, as plain numbers. The standard error of the mean combines the spread over samples
        and the Hutchinson error of each sample (unknown, reported as None, with a single probe; the spread over
        samples already contains the probe noise then)."""
        n = self.log_prob.numel()
        nll = self.nll.double()
        spread = float(nll.std()) if n > 1 else 0.0
        hutch = float(self.std_err.double().pow(2).sum().sqrt()) / n
        hutch_known = math.isfinite(hutch)  # one probe gives no error bar
        return {
            "num_samples": n,
            "num_dims": self.num_dims,
            "mean_nll_nats": float(nll.mean()),
            "std_err_mean_nll": math.sqrt(spread**2 / n + (hutch**2 if hutch_known else 0.0)),
            "hutchinson_std_err_mean_nll": hutch if hutch_known else None,
            "nfe": self.nfe,
            "wall_time_s": self.wall_time_s,
            "divergence": self.divergence,
            "num_probes": self.num_probes,
            "probe": self.probe,
            "t_min": self.t_min,
            **{k: v for k, v in self.info.items() if k not in ("num_processes",)},
            "num_processes": self.info.get("num_processes", 1),
        }
