"""Score matching on clean data: explicit (:class:`ESM`, needs the true score), implicit (:class:`ISM`, the
trace of the score's Jacobian) and sliced (:class:`SSM`, random projections, with or without variance
reduction). Formulas in :mod:`score_toolkit.objectives`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._utils import rand, randn
from .base import (
    Objective,
    _check_time_value,
    _dot,
    _input_with_grad,
    _needs_x_graph,
    _score,
    _sq_norm,
)

__all__ = ["ESM", "ISM", "SSM", "PROJECTIONS"]


PROJECTIONS = ("rademacher", "gaussian", "sphere")


class ESM(Objective):
    """Explicit score matching against a known target score: ``1/2 E ||s(x, t) - target(x)||^2``
    (Hyvarinen 2005, eq. 2). Minimiser: ``s = target`` on the data's support.

    Args:
        target_score: callable ``x -> score`` of the same shape as ``x``.
        t: the time handed to ``score_fn`` (default 0.0).
    """

    name = "esm"

    def __init__(self, target_score: Callable[[torch.Tensor], torch.Tensor], t: float = 0.0, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        if not callable(target_score):
            raise TypeError(f"expected target_score to be callable as target_score(x), found {type(target_score).__name__}")
        self.target_score = target_score
        self.t = _check_time_value(t)

    def _options(self):
        return {"target_score": getattr(self.target_score, "__name__", type(self.target_score).__name__), "t": self.t}

    def _per_sample(self, score_fn, x, generator):
        s = _score(score_fn, x, self._time(x, self.t))
        target = self.target_score(x)
        if not isinstance(target, torch.Tensor) or target.shape != x.shape:
            found = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"expected target_score to return a tensor of shape {tuple(x.shape)}, found {found}")
        return 0.5 * _sq_norm(s - target.detach().to(s.dtype))


class ISM(Objective):
    """Implicit score matching (Hyvarinen 2005, Theorem 1): ``E [1/2 ||s(x, t)||^2 + tr(grad_x s(x, t))]``.

    The trace is exact: one backward pass per feature (d passes for d features of any rank, which are
    flattened), so the cost grows linearly with d; use :class:`SSM` in high dimension. The graph is
    kept (``create_graph=True`` when gradients are enabled) so the loss can be trained. Each sample's
    trace is obtained from the gradient of the batch sum, which assumes samples do not interact
    through the network (no batch norm). Minimiser: the data score (ESM = ISM + 1/2 E ||grad log p||^2).

    Args:
        t: the time handed to ``score_fn`` (default 0.0).
    """

    name = "ism"

    def __init__(self, t: float = 0.0, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        self.t = _check_time_value(t)

    def _options(self):
        return {"t": self.t}

    def _per_sample(self, score_fn, x, generator):
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = _input_with_grad(x)
            s = _score(score_fn, xg, self._time(x, self.t))
            _needs_x_graph(s, "ISM")
            s_flat = s.reshape(s.shape[0], -1)
            trace = torch.zeros_like(s_flat[:, 0])
            for i in range(s_flat.shape[1]):
                (g,) = torch.autograd.grad(
                    s_flat[:, i].sum(), xg, create_graph=create_graph, retain_graph=True, allow_unused=True
                )
                if g is not None:
                    trace = trace + g.reshape(g.shape[0], -1)[:, i]
            loss = 0.5 * _sq_norm(s) + trace
        return loss if create_graph else loss.detach()


def _projections(kind: str, shape, *, generator, device, dtype) -> torch.Tensor:
    """Random directions with E[v v^T] = I, shape ``shape`` = (B, M, *features)."""
    if kind == "rademacher":
        return torch.where(rand(shape, generator=generator, device=device, dtype=dtype) < 0.5, -1.0, 1.0).to(dtype)
    v = randn(shape, generator=generator, device=device, dtype=dtype)
    if kind == "sphere":
        flat = v.reshape(shape[0], shape[1], -1)
        d = flat.shape[-1]
        v = (flat * (math.sqrt(d) / flat.norm(dim=-1, keepdim=True))).reshape(shape)
    return v


class SSM(Objective):
    """Sliced score matching (Song et al. 2019, "Sliced score matching", eq. 7):
    ``E_v E_x [v^T (grad_x s) v + 1/2 (v^T s)^2]``; with ``variance_reduction=True`` (SSM-VR, eq. 8)
    ``1/2 (v^T s)^2`` is replaced by its expectation ``1/2 ||s||^2``. Minimiser: the data score.

    Args:
        num_projections: M random directions per sample, averaged (the batch is repeated M times, so
            all projections cost one backward pass together).
        projection: the law of v, always with E[v v^T] = I: ``"rademacher"`` (+-1 entries),
            ``"gaussian"`` (N(0, I)) or ``"sphere"`` (sqrt(d) times uniform on the unit sphere).
        variance_reduction: SSM-VR.
        t: the time handed to ``score_fn`` (default 0.0).

    Unbiased for ISM: for every x, E_v of the per-sample loss equals the ISM per-sample loss.
    """

    def __init__(
        self,
        num_projections: int = 1,
        projection: str = "rademacher",
        variance_reduction: bool = False,
        t: float = 0.0,
        *,
        reduction: str = "mean",
    ):
        super().__init__(reduction=reduction)
        if isinstance(num_projections, bool) or not isinstance(num_projections, int):
            raise TypeError(f"expected num_projections to be an int, found {type(num_projections).__name__}")
        if num_projections < 1:
            raise ValueError(f"expected num_projections >= 1, found {num_projections}")
        if projection not in PROJECTIONS:
            raise ValueError(f"expected projection in {PROJECTIONS}, found {projection!r}")
        if not isinstance(variance_reduction, bool):
            raise TypeError(f"expected variance_reduction to be a bool, found {type(variance_reduction).__name__}")
        self.num_projections = num_projections
        self.projection = projection
        self.variance_reduction = variance_reduction
        self.t = _check_time_value(t)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "ssm_vr" if self.variance_reduction else "ssm"

    def _options(self):
        return {
            "num_projections": self.num_projections,
            "projection": self.projection,
            "variance_reduction": self.variance_reduction,
            "t": self.t,
        }

    def _per_sample(self, score_fn, x, generator):
        b, m = x.shape[0], self.num_projections
        v = _projections(self.projection, (b, m, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        v = v.reshape(b * m, *x.shape[1:])
        xr = x.unsqueeze(1).expand(b, m, *x.shape[1:]).reshape(b * m, *x.shape[1:])
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = _input_with_grad(xr)
            s = _score(score_fn, xg, self._time(xr, self.t))
            _needs_x_graph(s, "SSM")
            vs = _dot(v, s)
            (g,) = torch.autograd.grad(vs.sum(), xg, create_graph=create_graph, allow_unused=True)
            vjv = _dot(v, g) if g is not None else torch.zeros_like(vs)
            second = 0.5 * _sq_norm(s) if self.variance_reduction else 0.5 * vs.pow(2)
            loss = (vjv + second).reshape(b, m).mean(1)
        return loss if create_graph else loss.detach()
