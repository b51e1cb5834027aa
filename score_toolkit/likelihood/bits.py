"""Bits per dimension of quantised data through the probability-flow ODE: dequantise, compute each
:func:`~score_toolkit.likelihood.log_likelihood`, convert and average (:func:`dequantized_bits_per_dim`). The
conversions themselves are in :mod:`.quantization`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .._utils import sample_seed
from ..processes import Process
from .ode import log_likelihood
from .quantization import _levels, bits_per_dim, dequantize
from .result import LikelihoodResult

__all__ = ["dequantized_bits_per_dim", "BitsPerDimResult"]


@dataclass
class BitsPerDimResult:
    """What :func:`dequantized_bits_per_dim` returns.

    Attributes:
        bpd: per-sample bits/dim (B,), averaged over the dequantization draws.
        std_err: per-sample standard error (B,): over the draws when ``num_dequant >= 2`` (it then includes the
            dequantization noise and the Hutchinson error), else the Hutchinson error alone (NaN where unknown:
            see :attr:`LikelihoodResult.std_err`).
        nll: per-sample model-space NLL (nats), averaged over the draws.
        nfe: total ODE function evaluations; wall_time_s: wall time.
        levels, scale, offset, num_dequant: the dequantization.
        likelihoods: the :class:`LikelihoodResult` of every draw.
    """

    bpd: torch.Tensor
    std_err: torch.Tensor
    nll: torch.Tensor
    nfe: int
    wall_time_s: float
    levels: int
    scale: float
    offset: float
    num_dequant: int
    likelihoods: list[LikelihoodResult]

    def summary(self) -> dict[str, Any]:
        """Means over samples. ``std_err_mean_bpd`` is the spread of the per-sample values over ``sqrt(n)``; each
        value already carries its dequantization and probe noise (independent per sample), so they are not
        added again."""
        n = self.bpd.numel()
        spread = float(self.bpd.double().std()) if n > 1 else math.nan
        return {"num_samples": n, "mean_bpd": float(self.bpd.double().mean()),
                "std_err_mean_bpd": spread / math.sqrt(n), "mean_nll_nats": float(self.nll.double().mean()),
                "levels": self.levels, "scale": self.scale, "offset": self.offset, "num_dequant": self.num_dequant,
                "nfe": self.nfe, "wall_time_s": self.wall_time_s}


def dequantized_bits_per_dim(score_fn, process: Process, k: torch.Tensor, *, bits: int | None = None,
                             levels: int | None = None, scale: float = 2.0, offset: float = -1.0, num_dequant: int = 1,
                             seed: int = 0, dtype=torch.float32, **likelihood_options) -> BitsPerDimResult:
    """Bits/dim of quantised data ``k`` (integers in ``[0, L - 1]``): dequantise ``num_dequant`` times
    (:func:`dequantize`), compute each :func:`log_likelihood` (``likelihood_options`` are passed on), convert with
    :func:`bits_per_dim` and average. Draw ``j`` uses the seed ``sample_seed(seed, j, stream=2)``
    (:func:`score_toolkit._utils.sample_seed`) for the dequantization noise of sample ``i`` (its dequantization
    stream) and for its probes (the probe stream): the two are independent, so the Hutchinson estimate stays
    unbiased (a shared stream made the first Rademacher probe equal ``sign(u - 1/2)``)."""
    start = time.perf_counter()
    lv = _levels(bits, levels)
    if isinstance(num_dequant, bool) or not isinstance(num_dequant, int) or num_dequant < 1:
        raise ValueError(f"expected num_dequant to be an int >= 1, found {num_dequant!r}")
    for key in ("seed", "generator", "data_range"):
        if key in likelihood_options:
            raise ValueError(f"dequantized_bits_per_dim sets {key} itself; do not pass it")
    lo, hi = sorted((offset, offset + scale))
    results, per_draw = [], []
    d = math.prod(k.shape[1:])
    for j in range(num_dequant):
        x = dequantize(k, levels=lv, scale=scale, offset=offset, seed=_mix_seed(seed, j), dtype=dtype)
        res = log_likelihood(score_fn, process, x, seed=_mix_seed(seed, j), data_range=(lo, hi), **likelihood_options)
        results.append(res)
        per_draw.append(bits_per_dim(res.nll.double(), d, levels=lv, scale=scale))
    stack = torch.stack(per_draw)  # (J, B)
    bpd = stack.mean(0)
    if num_dequant > 1:
        std_err = stack.std(0) / math.sqrt(num_dequant)
    else:
        std_err = results[0].std_err.double() / (d * math.log(2))
    nll = torch.stack([r.nll.double() for r in results]).mean(0)
    return BitsPerDimResult(bpd=bpd, std_err=std_err, nll=nll, nfe=sum(r.nfe for r in results),
                            wall_time_s=time.perf_counter() - start, levels=lv, scale=float(scale),
                            offset=float(offset), num_dequant=num_dequant, likelihoods=results)


def _mix_seed(seed: int, j: int) -> int:
    return sample_seed(seed, j, _DRAW_STREAM)


_DRAW_STREAM = 2
