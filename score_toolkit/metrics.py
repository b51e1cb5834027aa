"""Distances between sample sets, and between samples and an analytic mixture.

* :func:`sliced_wasserstein`: sliced Wasserstein-2 with random unit directions (exact 1-D W2 per
  direction between equal-size sets by sorting, quantile-matched otherwise).
* :func:`energy_distance` (Szekely & Rizzo) and :func:`mmd` (RBF kernel, several bandwidths).
* :func:`mode_weight_error`: total-variation distance between the weights of a mixture and the fraction
  of samples assigned to each component (by posterior argmax).
* :func:`within_mode_sliced_wasserstein`: weight-averaged sliced W2 between the samples assigned to each
  component and exact draws from that component.
* :func:`mean_nll`: mean negative log-likelihood of samples under the true density.
* :func:`noise_floor`: the value of a metric between two independent exact sample sets of the same size,
  the yardstick a sampler is judged against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._utils import check_tensor, randn
from .analytic import GaussianMixture

__all__ = [
    "sliced_wasserstein",
    "energy_distance",
    "mmd",
    "mode_weight_error",
    "within_mode_sliced_wasserstein",
    "mean_nll",
    "noise_floor",
]


def _check_samples(x, name: str) -> torch.Tensor:
    """A sample set (n, ...): a floating-point tensor with at least one sample of at least one value, all finite
    (a NaN or an infinity would make every metric NaN or infinite without saying where it came from)."""
    check_tensor(x, name, min_rank=2)
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"expected {name} to hold at least one sample of at least one value, found shape "
                         f"{tuple(x.shape)}")
    finite = torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:, 0]
        raise ValueError(f"expected finite {name}, found {bad.numel()} of {x.shape[0]} samples with NaN or infinite "
                         f"values (first: sample {int(bad[0])})")
    return x


def _flat_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_samples(x, "x")
    _check_samples(y, "y")
    xf, yf = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"expected x and y with the same number of features, found {xf.shape[1]} and {yf.shape[1]}")
    dtype = torch.promote_types(xf.dtype, yf.dtype)
    if dtype in (torch.float16, torch.bfloat16):  # sums over samples and sorted differences need float32
        dtype = torch.float32
    return xf.to(dtype), yf.to(dtype).to(xf.device)


def _quantiles(v: torch.Tensor, n: int) -> torch.Tensor:
    """Empirical quantile function of the sorted columns of v at n mid-points."""
    m = v.shape[0]
    if m == n:
        return v
    q = (torch.arange(n, dtype=v.dtype, device=v.device) + 0.5) / n * m - 0.5
    lo = q.floor().clamp(0, m - 1).long()
    hi = (lo + 1).clamp(max=m - 1)
    w = (q - lo.to(v.dtype)).clamp(0, 1)[:, None]
    return v[lo] * (1 - w) + v[hi] * w


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein-2 distance sqrt(E_theta W2^2(theta^T x, theta^T y)) over ``num_projections``
    uniform random directions. Pass the same ``generator`` seed when comparing numbers."""
    xf, yf = _flat_pair(x, y)
    d = xf.shape[1]
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = randn((d, num_projections), generator=generator, device=xf.device, dtype=xf.dtype)  # on the generator's device
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(xf @ theta, dim=0)
    py, _ = torch.sort(yf @ theta, dim=0)
    n = max(px.shape[0], py.shape[0])
    w2 = (_quantiles(px, n) - _quantiles(py, n)).pow(2).mean()
    return float(w2.sqrt())


def _pairwise_mean(a: torch.Tensor, b: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    for i in range(0, a.shape[0], chunk):
        total = total + fn(torch.cdist(a[i : i + chunk], b)).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (V-statistic; 0 iff equal laws)."""
    xf, yf = _flat_pair(x, y)
    ident = lambda d: d  # noqa: E731
    e = 2 * _pairwise_mean(xf, yf, ident) - _pairwise_mean(xf, xf, ident) - _pairwise_mean(yf, yf, ident)
    return float(e.clamp_min(0))


def mmd(x: torch.Tensor, y: torch.Tensor, *, bandwidths: tuple[float, ...] | None = None) -> float:
    """Squared maximum mean discrepancy (V-statistic) with a sum of RBF kernels exp(-r^2 / (2 h^2)).
    Default bandwidths: the median pairwise distance of the pooled sample times (1/16, 1/4, 1), so that
    both the arrangement of modes and their widths are seen."""
    xf, yf = _flat_pair(x, y)
    if bandwidths is None:
        pool = torch.cat([xf[:1000], yf[:1000]])
        med = torch.cdist(pool, pool).median().clamp_min(1e-12)
        bandwidths = tuple(float(med) * f for f in (1 / 16, 1 / 4, 1.0))

    def k(d):
        return sum(torch.exp(-d * d / (2 * h * h)) for h in bandwidths)

    v = _pairwise_mean(xf, xf, k) + _pairwise_mean(yf, yf, k) - 2 * _pairwise_mean(xf, yf, k)
    return float(v.clamp_min(0))


def _labels(samples: torch.Tensor, mixture: GaussianMixture) -> torch.Tensor:
    return mixture.posterior(samples.reshape(samples.shape[0], -1)).argmax(1)


def mode_weight_error(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Total-variation distance between the mixture weights and the fraction of samples whose most
    likely component (posterior argmax under the clean mixture) is each component."""
    _check_samples(samples, "samples")
    labels = _labels(samples, mixture)
    freq = torch.bincount(labels.cpu(), minlength=mixture.num_components).to(torch.float64) / samples.shape[0]
    return float(0.5 * (freq - mixture.weights.cpu()).abs().sum())


def within_mode_sliced_wasserstein(
    samples: torch.Tensor,
    mixture: GaussianMixture,
    *,
    reference: torch.Tensor | None = None,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Weight-averaged sliced W2 between the samples assigned to each component and reference samples
    assigned to the same component (exact draws from the mixture, ``len(samples)`` of them, unless
    ``reference`` is given). Insensitive to mode weights; sensitive to the shape of each mode."""
    _check_samples(samples, "samples")
    if reference is not None:
        _check_samples(reference, "reference")
    xs = samples.reshape(samples.shape[0], -1).to(mixture.dtype)
    if reference is None:
        g = torch.Generator().manual_seed(12345) if generator is None else generator
        reference = mixture.sample(xs.shape[0], generator=g)
    ref = reference.reshape(reference.shape[0], -1).to(mixture.dtype)
    ls, lr = _labels(xs, mixture), _labels(ref, mixture)
    total, wsum = 0.0, 0.0
    for k in range(mixture.num_components):
        a, b = xs[ls == k], ref[lr == k]
        if a.shape[0] < 2 or b.shape[0] < 2:
            continue
        w = float(mixture.weights[k])
        gk = torch.Generator().manual_seed(1000 + k)
        total += w * sliced_wasserstein(a, b, num_projections=num_projections, generator=gk) ** 2
        wsum += w
    if wsum == 0:
        return math.inf
    return math.sqrt(total / wsum)


def mean_nll(samples: torch.Tensor, mixture: GaussianMixture) -> float:
    """Mean negative log-likelihood (nats) of ``samples`` under the clean mixture."""
    _check_samples(samples, "samples")
    return float(-mixture.log_prob(samples.reshape(samples.shape[0], -1).to(mixture.dtype)).mean())


def noise_floor(
    mixture: GaussianMixture,
    n: int,
    metric: Callable[[torch.Tensor, torch.Tensor], float] = sliced_wasserstein,
    *,
    seed: int = 0,
) -> float:
    """``metric`` between two independent exact sample sets of size ``n`` (the metric is called as
    ``metric(samples, reference)`` must take two sample sets; wrap one-sample metrics, e.g.
    ``lambda s, r: mode_weight_error(s, mixture)``): the best a sampler can do with ``n`` samples."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"noise_floor: expected n to be a positive int (samples per set), found {n!r}")
    a = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    b = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 2))
    return metric(a, b)
