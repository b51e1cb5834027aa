"""The interpolated transfer rule (``"log_snr_interpolated"``): one grid for a family of processes that share their
low-noise end (VE processes with one ``sigma_min`` and any ``sigma_max``), as a function of where each process
starts.

A :class:`FamilyGrid` holds two normalised grids ``g_0, g_1`` (``0 = u_0 < ... < u_n = 1``, the same step count),
fitted for the family's two extremes: the member with the lowest starting log-SNR ``s_0`` (the widest range, e.g.
the largest ``sigma_max``) and the one with the highest ``s_1``. A process of the family starting at
``lambda_s = lambda(1)`` and ending at ``lambda_e = lambda(t_min)`` runs on

    ``w = (lambda_s - s_0) / (s_1 - s_0)``,  ``u = (1 - w) g_0 + w g_1``,  ``lambda_i = lambda_s + u_i (lambda_e - lambda_s)``

so the extremes run on their own grids, every member in between on a blend of the two (monotone: a convex
combination of increasing grids is increasing), and the step count is the same for every member. A process
starting outside ``[s_0, s_1]`` is refused (the rule does not extrapolate), and so is one of another kind or with
another end (another family). Fitted by ``optimize_grid(family=[...], transfer="interpolated")``; saved in a
version-5 grid file (:func:`score_toolkit.samplers.grid_store.save_grid`). Measured in docs/fast_samplers.md ("The
interpolated rule, measured").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..processes import Process

#: the rule's name in a grid file's ``"transfer"`` entry
INTERPOLATED_RULE = "log_snr_interpolated"
#: relative tolerance on a process's start against the extremes' (log-SNR)
_TOL = 1e-6
#: how far (in log-SNR, relative) a member's low-noise end may lie from the family's: VE processes sharing sigma_min
#: and t_min end at ``-ln sigma_min - t_min ln(sigma_max / sigma_min)``, a few 1e-5 apart; each member runs to its own
_END_TOL = 1e-3


def _ends(process: Process) -> tuple[float, float]:
    return tuple(process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64)).tolist())


def _check_grids(grids) -> torch.Tensor:
    g = torch.as_tensor(grids, dtype=torch.float64)
    if g.ndim != 2 or g.shape[0] != 2 or g.shape[1] < 2:
        raise ValueError(f"expected two normalised grids of the same length >= 2 (shape (2, n + 1)), found shape "
                         f"{tuple(g.shape)}")
    v = g.detach()
    if not bool(torch.isfinite(v).all()) or not bool((torch.diff(v, dim=1) > 0).all()):
        raise ValueError(f"expected two strictly increasing normalised grids, found {v.tolist()}")
    if (v[:, 0].abs().max() > 1e-9) or ((v[:, -1] - 1).abs().max() > 1e-9):
        raise ValueError(f"expected normalised grids from 0 to 1, found ends {v[:, 0].tolist()} and {v[:, -1].tolist()}")
    return g


def interpolated_log_snr(grids, starts: Sequence[float], end: float, process: Process,
                         kind: str | None = None) -> torch.Tensor:
    """The log-SNR grid of ``process`` under the interpolated rule (module docstring): ``grids`` the two normalised
    grids (shape ``(2, n + 1)``, for the starts ``s_0 < s_1`` of ``starts``), ``end`` the family's low-noise end,
    ``kind`` the family's process class name (checked when given). Differentiable in ``grids``. Raises ``ValueError``
    for a process of another kind or end, or starting outside ``[s_0, s_1]``."""
    g = _check_grids(grids)
    s0, s1 = (float(v) for v in starts)
    if not s0 < s1:
        raise ValueError(f"expected the family's starting log-SNRs s_0 < s_1, found {s0!r}, {s1!r}")
    if kind is not None and type(process).__name__ != kind:
        raise ValueError(f"the grid was fitted for a family of {kind} processes, not {type(process).__name__}: "
                         f"{process!r} is not a member")
    a, b = _ends(process)
    if abs(b - end) > _END_TOL * max(1.0, abs(end)):
        raise ValueError(f"{process!r} ends at log-SNR {b:.6g}, the family's grid at {end:.6g} (another sigma_min or "
                         "t_min): not a member of the family the grid was fitted for")
    w = (a - s0) / (s1 - s0)
    tol = _TOL * max(1.0, abs(s0), abs(s1)) / (s1 - s0)
    if not -tol <= w <= 1 + tol:
        raise ValueError(f"{process!r} starts at log-SNR {a:.6g}, outside the family's fitted range [{s0:.6g}, {s1:.6g}] "
                         "(its widest and narrowest members); the interpolated rule does not extrapolate: fit the grid "
                         "for a family that includes this process")
    w = min(max(w, 0.0), 1.0)
    u = (1.0 - w) * g[0] + w * g[1]
    lam = a + u[1:-1] * (b - a)
    return torch.cat([lam.new_tensor([a]), lam, lam.new_tensor([b])])


@dataclass(frozen=True)
class FamilyGrid:
    """A grid for a family of processes under the interpolated rule (module docstring): the two normalised grids
    (``grids[0]`` for the start ``starts[0]``, the lower one), the family's end and its process class."""

    grids: tuple[tuple[float, ...], tuple[float, ...]]
    starts: tuple[float, float]
    end: float
    kind: str

    def __post_init__(self):
        _check_grids(self.grids)
        if not float(self.starts[0]) < float(self.starts[1]):
            raise ValueError(f"expected the family's starting log-SNRs s_0 < s_1, found {self.starts!r}")

    @property
    def num_steps(self) -> int:
        return len(self.grids[0]) - 1

    def log_snr(self, process: Process, label: str = "the family grid") -> torch.Tensor:
        """The grid under ``process`` (float64 log-SNR), or ``ValueError`` (prefixed by ``label``) if it is not a member
        of the family."""
        try:
            return interpolated_log_snr(torch.tensor(self.grids, dtype=torch.float64), self.starts, self.end, process,
                                        self.kind)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None

    @classmethod
    def of(cls, grids: torch.Tensor, members: Sequence[Process]) -> FamilyGrid:
        """The family grid of two normalised grids for the extremes of ``members`` (see :func:`family_extremes`)."""
        starts, end, kind = family_extremes(members)
        g = _check_grids(grids).detach()
        return cls(tuple(map(tuple, g.tolist())), starts, end, kind)

    def record(self) -> dict[str, Any]:
        """The grid file's ``"transfer"`` entry."""
        return {"rule": INTERPOLATED_RULE, "grids": [list(v) for v in self.grids], "starts": list(self.starts), "end": self.end,
                "process_class": self.kind}

    @classmethod
    def from_record(cls, rule: dict, where: str) -> FamilyGrid:
        try:
            grids, starts = rule["grids"], rule["starts"]
            if len(grids) != 2 or len(starts) != 2:
                raise ValueError("expected two grids and two starts")
            out = cls((tuple(float(v) for v in grids[0]), tuple(float(v) for v in grids[1])),
                      (float(starts[0]), float(starts[1])), float(rule["end"]), str(rule["process_class"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"{where}: a malformed interpolated transfer rule (expected 'grids': two increasing "
                             f"normalised grids, 'starts', 'end', 'process_class'): {exc}") from None
        return out


def family_extremes(members: Sequence[Process]) -> tuple[tuple[float, float], float, str]:
    """The starts ``(s_0, s_1)`` (the lowest and highest starting log-SNR), the shared end and the process class of a
    family; ``ValueError`` if the members differ in kind or end, or all start alike."""
    members = list(members)
    kinds = {type(p).__name__ for p in members}
    if len(kinds) != 1:
        raise ValueError(f"the interpolated rule needs a family of one process kind, found {sorted(kinds)}")
    ends = [_ends(p) for p in members]
    end = ends[0][1]
    for p, (_, b) in zip(members, ends):
        if abs(b - end) > _END_TOL * max(1.0, abs(end)):
            raise ValueError(f"the interpolated rule needs a family sharing its low-noise end: {p!r} ends at log-SNR "
                             f"{b:.6g}, {members[0]!r} at {end:.6g}")
    s0, s1 = min(a for a, _ in ends), max(a for a, _ in ends)
    if not s1 - s0 > _TOL * max(1.0, abs(s0)):
        raise ValueError(f"the interpolated rule needs members starting at two different log-SNRs, found all at {s0:.6g}")
    return (s0, s1), end, kinds.pop()


def check_transfer_option(transfer: str, transfer_head: int, family_grid, process: Process, log_snr: torch.Tensor) -> None:
    """``save_grid``'s transfer options: ``transfer`` a rule ("density", "absolute", "interpolated"), ``transfer_head``
    only with the density rule, ``family_grid`` (a :class:`FamilyGrid` whose grid under ``process`` is ``log_snr``)
    exactly with the interpolated rule."""
    steps = log_snr.numel() - 1
    if not isinstance(transfer_head, int) or isinstance(transfer_head, bool) or not 0 <= transfer_head < steps:
        raise ValueError(f"expected transfer_head to be an int with 0 <= transfer_head < {steps} (the grid's steps), "
                         f"found {transfer_head!r}")
    if transfer not in ("density", "absolute", "interpolated"):
        raise ValueError(f"expected transfer 'density', 'absolute' or 'interpolated', found {transfer!r}")
    if transfer != "density" and transfer_head:
        raise ValueError(f"transfer_head={transfer_head} belongs to the density rule's anchored head; the {transfer} rule "
                         "has none (pass transfer_head=0)")
    if (transfer == "interpolated") != isinstance(family_grid, FamilyGrid):
        raise ValueError(f"expected family_grid (a FamilyGrid) exactly with transfer='interpolated', found transfer="
                         f"{transfer!r}, family_grid={family_grid!r}")
    if family_grid is not None and not torch.allclose(family_grid.log_snr(process), log_snr, rtol=0, atol=1e-6):
        raise ValueError(f"expected the times to be the family grid's own under {process!r} (FamilyGrid.log_snr)")
