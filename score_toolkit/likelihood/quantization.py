"""Data stored on ``L`` levels: the conversion from a model-space NLL to bits per dimension (:func:`bits_per_dim`,
with its derivation), uniform dequantization (:func:`dequantize`) and the levels of data on a grid
(:func:`to_levels`). No ODE here: :mod:`.bits` combines these with :func:`~score_toolkit.likelihood.log_likelihood`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._utils import GeneratorLike, check_tensor, per_sample_generators, rand

__all__ = ["bits_per_dim", "dequantize", "to_levels"]


#: the per-sample random stream of the dequantization noise (see :func:`score_toolkit._utils.sample_seed`): with the
#: same seed as the probes, a shared stream would make the first Rademacher probe equal sign(u - 1/2)
DEQUANTIZATION_STREAM = 1


def _levels(bits, levels) -> int:
    if (bits is None) == (levels is None):
        raise ValueError(f"expected exactly one of bits or levels, found bits={bits!r}, levels={levels!r}")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
            raise ValueError(f"expected bits to be an int in [1, 32], found {bits!r}")
        return 2**bits
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"expected levels to be an int >= 2, found {levels!r}")
    return levels


def bits_per_dim(nll, num_dims: int, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0):
    """Bits per dimension of the discrete data from the model-space NLL (nats) of its uniform dequantization.

    Data stored with ``L = 2^B`` levels (``bits=B``, or any ``levels=L``, e.g. 17 for scikit-learn's digits),
    integers ``k in {0..L-1}^d``, are dequantised to ``y = (k + u) / L`` with ``u ~ U[0, 1)^d`` and mapped to the
    model's space by ``x = a y + b`` (``scale = a``, e.g. 2 with ``b = -1`` for data in [-1, 1]; see
    :func:`dequantize`). Then

        bpd = NLL_x / (d ln 2) - log2|a| + log2 L            (= ... + B for B-bit data).

    Derivation. Let ``v = k + u = L y``; its density is ``p_v(v) = p_x(a v / L + b) |a / L|^d``. The discrete
    model ``P(k) = int_{[0,1)^d} p_v(k + u) du`` satisfies, by Jensen's inequality,

        log P(k) >= E_u log p_v(k + u) = E_u log p_x(x) + d ln|a| - d ln L,

    so ``-log2 P(k) / d <= E_u[NLL_x] / (d ln 2) - log2|a| + log2 L``: the formula, averaged over ``u``, is an
    upper bound on the code length of ``k`` in bits per dimension, with equality when ``p_v`` is constant on each
    cell (a model that is itself a dequantised density). ``a = 2, B = 8`` gives score_sde's offset ``+7``;
    ``a = 1`` gives ``+8``; its fixed ``+7`` is wrong for other bit depths or scalings.

    Args:
        nll: NLL in nats (a tensor or a number), per sample.
        num_dims: ``d``.
    """
    lv = _levels(bits, levels)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < abs(scale) < math.inf):
        raise ValueError(f"expected a finite, non-zero scale, found {scale!r}")
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"expected num_dims to be an int >= 1, found {num_dims!r}")
    return nll / (num_dims * math.log(2)) - math.log2(abs(scale)) + math.log2(lv)


def _check_levels_data(k: torch.Tensor, lv: int) -> torch.Tensor:
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"expected the quantised data k to be a tensor of integers, found {type(k).__name__}")
    if k.ndim < 2:
        raise ValueError(f"expected quantised data of shape (B, ...), found {tuple(k.shape)}")
    if k.is_floating_point():
        if not bool(torch.isfinite(k).all()) or not bool((k == k.round()).all()):
            raise ValueError("expected the quantised data k to hold integers (levels), found non-integer values")
    elif k.dtype == torch.bool or k.is_complex():
        raise TypeError(f"expected integer levels, found dtype {k.dtype}")
    mn, mx = int(k.min()), int(k.max())
    if mn < 0 or mx > lv - 1:
        raise ValueError(f"expected levels k in [0, {lv - 1}] for {lv}-level data, found values in [{mn}, {mx}]")
    return k


def dequantize(k: torch.Tensor, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0,
               offset: float = -1.0, seed: int = 0, generator: GeneratorLike = None, dtype=torch.float32,
               indices: Sequence[int] | None = None) -> torch.Tensor:
    """Uniform dequantization into model space: ``x = scale * (k + u) / L + offset`` with ``u ~ U[0, 1)``.

    ``k``: integers in ``[0, L - 1]`` (any rank (B, ...)). Noise of sample ``i`` comes from a generator seeded
    by ``(seed, indices[i])`` (``indices`` default ``0..B-1``) in the dequantization stream
    (:data:`DEQUANTIZATION_STREAM`), which never coincides with the Hutchinson probes that
    :func:`~score_toolkit.likelihood.log_likelihood` draws for the same seed; or from ``generator``."""
    lv = _levels(bits, levels)
    k = _check_levels_data(k, lv)
    if generator is None:
        idx = range(k.shape[0]) if indices is None else indices
        generator = per_sample_generators(seed, idx, device=k.device, stream=DEQUANTIZATION_STREAM)
    u = rand(k.shape, generator=generator, device=k.device, dtype=dtype)
    return scale * (k.to(dtype) + u) / lv + offset


def to_levels(x: torch.Tensor, *, bits: int | None = None, levels: int | None = None, lo: float = -1.0,
              hi: float = 1.0, tol: float = 1e-3) -> torch.Tensor:
    """The integer levels of data stored on an ``L``-level grid from ``lo`` to ``hi``
    (``x = lo + k (hi - lo) / (L - 1)``, as e.g. ``images / 255 * 2 - 1``): ``k = round((x - lo) / (hi - lo) (L - 1))``.
    Raises a ValueError when the data are not on that grid (within ``tol`` of a level)."""
    lv = _levels(bits, levels)
    check_tensor(x, "x", min_rank=2)
    pos = (x.double() - lo) / (hi - lo) * (lv - 1)
    k = pos.round()
    off = float((pos - k).abs().max())
    if off > tol:
        raise ValueError(f"expected data on the {lv}-level grid from {lo:g} to {hi:g}, found values {off:.3g} "
                         f"levels away from it")
    mn, mx = int(k.min()), int(k.max())
    if mn < 0 or mx > lv - 1:
        raise ValueError(f"expected data in [{lo:g}, {hi:g}] ({lv} levels), found values in "
                         f"[{float(x.min()):g}, {float(x.max()):g}]")
    return k.long()
