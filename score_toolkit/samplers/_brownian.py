"""A Brownian motion for ``torchsde.sdeint`` that lives on a fixed time grid and draws its increments
from torch generators.

torchsde's own ``BrownianInterval`` takes its entropy from numpy's global RNG (``torch.manual_seed`` does
not make it reproducible), uses one stream for the whole batch (a sample's noise depends on the batch
size) and is several times slower than drawing ``randn`` per step. :class:`GridBrownianMotion` answers
only the queries a fixed-step solver makes, ``bm(t_k, t_{k+1})`` for consecutive grid intervals in
order, and draws each interval's increment once from ``draw()`` (e.g. ``SamplingContext.randn_like``,
which honours a list of one generator per sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchsde import BaseBrownian

__all__ = ["GridBrownianMotion"]

LEVY_AREAS = ("none", "space-time")


class GridBrownianMotion(BaseBrownian):
    """Brownian increments on the intervals of an increasing time grid, drawn in order.

    Args:
        grid: increasing times ``u_0 < ... < u_n`` (1-D tensor); the solver must query exactly the
            intervals ``[u_k, u_{k+1}]``, in increasing ``k`` (repeating the current one is allowed).
        shape: ``(batch, channels)`` of an increment.
        dtype, device: of the increments.
        draw: returns a standard normal tensor of ``shape`` (called once per interval, twice with
            space-time Levy area).
        levy_area_approximation: ``"none"`` or ``"space-time"``. With ``"space-time"`` a query with
            ``return_U=True`` also returns ``U = int_{u_k}^{u_{k+1}} (W_s - W_{u_k}) ds``, drawn exactly:
            ``U = h (W / 2 + H)`` with ``H ~ N(0, h / 12)`` independent of ``W ~ N(0, h)``
            (the convention of torchsde's ``BrownianInterval``).
    """

    def __init__(self, grid: torch.Tensor, shape, dtype: torch.dtype, device, draw: Callable[[], torch.Tensor],
                 levy_area_approximation: str = "none"):
        if levy_area_approximation not in LEVY_AREAS:
            raise ValueError(f"expected levy_area_approximation in {LEVY_AREAS}, found {levy_area_approximation!r}")
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if grid.numel() < 2 or not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError("expected a strictly increasing grid of at least two times")
        self._grid = grid.tolist()
        self._shape = tuple(int(s) for s in shape)
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._draw = draw
        self._levy = levy_area_approximation
        self._k = -1  # index of the interval whose increment is held in self._current
        self._current: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __repr__(self) -> str:
        return (f"GridBrownianMotion(steps={len(self._grid) - 1}, shape={self._shape}, dtype={self._dtype}, "
                f"levy_area_approximation={self._levy!r})")

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    @property
    def shape(self):
        return self._shape

    @property
    def levy_area_approximation(self):
        return self._levy

    @property
    def current_interval(self) -> int:
        """Index ``k`` of the last interval drawn (-1 before the first query)."""
        return self._k

    def _matches(self, k: int, ta: float, tb: float) -> bool:
        if k < 0 or k + 1 >= len(self._grid):
            return False
        a, b = self._grid[k], self._grid[k + 1]
        tol = 1e-9 * (b - a)
        return abs(ta - a) <= tol and abs(tb - b) <= tol

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None:
            raise ValueError("GridBrownianMotion answers interval queries bm(ta, tb) only, not point evaluations")
        if return_A:
            raise ValueError(
                "GridBrownianMotion does not generate Levy area (return_A=True); use a method that does not need it"
            )
        if return_U and self._levy != "space-time":
            raise ValueError("return_U=True needs levy_area_approximation='space-time'")
        ta, tb = float(ta), float(tb)
        if not self._matches(self._k, ta, tb):
            if not self._matches(self._k + 1, ta, tb):
                k = self._k + 1
                expected = (f"[{self._grid[k]!r}, {self._grid[k + 1]!r}]" if k + 1 < len(self._grid)
                            else "none (the grid is exhausted)")
                raise ValueError(
                    f"GridBrownianMotion: expected a query of the next grid interval {expected}, found "
                    f"[{ta!r}, {tb!r}]; it only serves fixed-step solvers stepping exactly on its grid"
                )
            self._k += 1
            h = self._grid[self._k + 1] - self._grid[self._k]
            z = self._draw()
            if tuple(z.shape) != self._shape:
                raise ValueError(f"GridBrownianMotion: expected draw() to return shape {self._shape}, found {tuple(z.shape)}")
            w = z if h == 1.0 else math.sqrt(h) * z
            u = None
            if self._levy == "space-time":
                hh = math.sqrt(h / 12.0) * self._draw()
                u = h * (0.5 * w + hh)
            self._current = (w, u)
        w, u = self._current
        return (w, u) if return_U else w
