"""The store of named time grids (:func:`save_grid`, :func:`load_grid`, :func:`list_grids`, :func:`delete_grid`;
JSON files in :func:`default_grid_dir`) and the carrying of a saved grid to another process: as a step density over
log-SNR (:func:`transfer_log_snr`), as absolute log-SNR points (:func:`absolute_log_snr`) or, for a grid fitted for a
family, interpolated between the family's extremes (:mod:`score_toolkit.samplers._grid_family`). The samplers read
grids through :mod:`score_toolkit.samplers.fixed_grid`, which re-exports every public name here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import write_json_atomic
from ..processes import TIME_GRIDS, Process
from ._grid_family import INTERPOLATED_RULE, FamilyGrid, check_transfer_option

GRID_DIR_ENV_VAR = "SCORE_TOOLKIT_GRID_DIR"
_FORMAT = "score_toolkit.time_grid"
_VERSION = 2  # 2: adds "transfer"; version-1 files (log-SNR points and their process) are read the same way
#: the versions of files whose grid is carried by a rule older readers do not know (they refuse the file instead of
#: carrying it by the density rule): 3 the anchored head, 4 the absolute rule, 5 the interpolated rule
_VERSION_ANCHORED, _VERSION_ABSOLUTE, _VERSION_INTERPOLATED = 3, 4, 5
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
#: relative tolerance when matching a saved grid's log-SNR ends to a process
_LOG_SNR_TOL = 1e-6
#: grid kinds every fixed-grid sampler accepts: the data-free fitted grid and the process's built-in kinds
GRID_KINDS = ("fitted", *TIME_GRIDS)
#: the grid option of the data-free grids fitted on a reference family (:mod:`score_toolkit.samplers.reference_grids`)
REFERENCE_GRID = "reference"

# ---------------------------------------------------------------------------------------------- store
def default_grid_dir() -> Path:
    """Where named grids live: ``$SCORE_TOOLKIT_GRID_DIR`` if set, else ``$XDG_CACHE_HOME/score_toolkit/grids``
    (``~/.cache/score_toolkit/grids``)."""
    env = os.environ.get(GRID_DIR_ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "score_toolkit" / "grids"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name.endswith(".json"):
        raise ValueError(
            f"expected a grid name of letters, digits, '_', '.', '-' (not ending in .json), found {name!r}"
        )
    if name in (*GRID_KINDS, REFERENCE_GRID):
        raise ValueError(f"grid name {name!r} is reserved for a built-in grid kind {(*GRID_KINDS, REFERENCE_GRID)}")
    return name


def _grid_path(name_or_path: str | os.PathLike, directory: str | os.PathLike | None) -> Path:
    s = os.fspath(name_or_path)
    if s.endswith(".json") or os.sep in s or (os.altsep and os.altsep in s):
        return Path(s).expanduser()
    _check_name(s)
    return Path(directory).expanduser() if directory is not None else default_grid_dir()


def _file_for(name_or_path, directory) -> Path:
    p = _grid_path(name_or_path, directory)
    return p if os.fspath(p).endswith(".json") else p / f"{os.fspath(name_or_path)}.json"


def _process_record(process: Process) -> dict[str, Any]:
    cfg = {k: v for k, v in dict(process.config).items() if not k.startswith("_")}
    return {"class": type(process).__name__, "config": cfg}


def save_grid(
    name: str | os.PathLike,
    times: Sequence[float] | torch.Tensor,
    process: Process,
    *,
    sampler: str | None = None,
    info: Mapping[str, Any] | None = None,
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
    transfer_head: int = 0,
    transfer: str = "density",
    family_grid: FamilyGrid | None = None,
) -> Path:
    """Save a time grid (decreasing times from ``t = 1`` to ``process.t_min``) under ``name`` as JSON.

    ``name`` is a grid name (stored in ``directory``, default :func:`default_grid_dir`) or a path ending in
    ``.json``. The file records the log-SNR values (what samplers use, and what carries the grid to other
    processes: :func:`transfer_log_snr`), the times, the process, the sampler it was made for and ``info``
    (JSON-serialisable). Returns the file's path. An existing grid is replaced
    only with ``overwrite=True``. ``transfer_head=k`` records that the grid is carried to other processes with its
    first ``k`` steps mapped per process (:func:`transfer_log_snr`'s ``head``; what ``optimize_grid(family=...,
    transfer_head=k)`` fitted it for). ``transfer="absolute"`` records that it is carried by the absolute rule
    instead (:func:`absolute_log_snr`: its points kept in absolute log-SNR, the step count following from the
    process; what ``optimize_grid(family=..., transfer="absolute")`` fitted it for). ``transfer="interpolated"`` with
    ``family_grid`` (a :class:`~score_toolkit.samplers._grid_family.FamilyGrid`, what ``optimize_grid(family=...,
    transfer="interpolated")`` fitted; ``times`` its own under ``process``) records the interpolated rule."""
    if not isinstance(process, Process):
        raise TypeError(f"expected a score_toolkit Process, found {type(process).__name__}")
    ts = _check_times(times, process, label="times")
    check_transfer_option(transfer, transfer_head, family_grid, process, process.log_snr(ts))
    path = _file_for(name, directory)
    if path.exists() and not overwrite:
        raise FileExistsError(f"grid {os.fspath(name)!r} already exists at {path}; pass overwrite=True to replace it")
    if transfer == "interpolated":
        rule, version = family_grid.record(), _VERSION_INTERPOLATED
    elif transfer == "absolute":
        rule, version = ({"rule": "log_snr_absolute", "extend": "one", "merge": ABSOLUTE_MERGE,
                          "max_extension": MAX_TRANSFER_EXTENSION}, _VERSION_ABSOLUTE)
    elif transfer_head:
        rule, version = ({"rule": "log_snr_anchored", "head": transfer_head, "max_extension": MAX_TRANSFER_EXTENSION},
                         _VERSION_ANCHORED)
    else:
        rule, version = {"rule": "log_snr_density", "max_extension": MAX_TRANSFER_EXTENSION}, _VERSION
    record = {
        "format": _FORMAT,
        "version": version,
        "name": path.stem,
        "num_steps": ts.numel() - 1,
        "log_snr": process.log_snr(ts).tolist(),
        "transfer": rule,  # how another process of the family uses the grid
        "times": ts.tolist(),
        "process": _process_record(process),
        "sampler": sampler,
        "info": dict(info) if info is not None else {},
    }
    return write_json_atomic(path, record, indent=1)  # a crash never leaves a half-written grid


def _read_record(name_or_path, directory) -> dict[str, Any]:
    path = _file_for(name_or_path, directory)
    if not path.is_file():
        available = list_grids(directory) if not os.fspath(name_or_path).endswith(".json") else []
        import difflib

        close = difflib.get_close_matches(os.fspath(name_or_path), available, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(
            f"no saved grid {os.fspath(name_or_path)!r}{hint}: expected a built-in kind {GRID_KINDS}, a grid saved in "
            f"{path.parent} (available: {available or 'none'}) or a path to a grid .json file"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read grid file {path}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != _FORMAT or "log_snr" not in record:
        raise ValueError(f"{path} is not a score_toolkit time-grid file (expected format {_FORMAT!r})")
    if record.get("version", 1) not in (1, 2, _VERSION_ANCHORED, _VERSION_ABSOLUTE, _VERSION_INTERPOLATED):
        raise ValueError(f"{path}: time-grid file version {record.get('version')!r} is newer than this score_toolkit "
                         f"reads (1 to {_VERSION_INTERPOLATED}); upgrade score_toolkit")
    rule = record.get("transfer", {"rule": "log_snr_density"})
    if not isinstance(rule, dict) or rule.get("rule") not in TRANSFER_RULES:
        raise ValueError(f"{path}: unknown transfer rule {rule!r} (expected one of {TRANSFER_RULES})")
    if rule["rule"] == "log_snr_absolute" and (rule.get("extend", "one") != "one" or
                                               rule.get("merge", ABSOLUTE_MERGE) != ABSOLUTE_MERGE):
        raise ValueError(f"{path}: the absolute rule's settings {rule!r} are not this score_toolkit's (extend 'one', "
                         f"merge {ABSOLUTE_MERGE}); upgrade score_toolkit")
    record["_rule"] = ("absolute" if rule["rule"] == "log_snr_absolute" else FamilyGrid.from_record(rule, str(path))
                       if rule["rule"] == INTERPOLATED_RULE else "density")
    head = rule.get("head", 0) if rule["rule"] == "log_snr_anchored" else 0
    if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < len(record["log_snr"]) - 1:
        raise ValueError(f"{path}: expected the transfer rule's head to be an int in [0, steps), found {head!r}")
    record["_head"] = head
    lam = record["log_snr"]
    if not (isinstance(lam, list) and len(lam) >= 2 and all(isinstance(v, (int, float)) for v in lam)):
        raise ValueError(f"{path}: expected 'log_snr' to be a list of >= 2 numbers")
    if any(b <= a for a, b in zip(lam[:-1], lam[1:])):
        raise ValueError(f"{path}: expected strictly increasing log-SNR values (decreasing times)")
    record["_path"] = os.fspath(path)
    return record


def load_grid(
    name_or_path: str | os.PathLike,
    process: Process | None = None,
    *,
    directory: str | os.PathLike | None = None,
) -> torch.Tensor:
    """A saved grid as float64 times for ``process`` (or, without a process, its log-SNR values).

    Under a process spanning another log-SNR range than the one the grid was made for, the grid is carried over by
    the rule its file records: as a step density over log-SNR (:func:`transfer_log_snr`, the default; with its
    anchored head if any), or as absolute log-SNR points (:func:`absolute_log_snr`: then the step count follows from
    the process). Raises ``ValueError`` if the grid does not exist or cannot
    be carried over (the message says why)."""
    record = _read_record(name_or_path, directory)
    lam = torch.tensor(record["log_snr"], dtype=torch.float64)
    if process is None:
        return lam
    return _times_from_log_snr(lam, process, f"grid {record['name']!r} ({record['_path']})", record.get("process"),
                               record["_head"], record["_rule"])


def list_grids(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the grids saved in ``directory`` (default :func:`default_grid_dir`)."""
    d = Path(directory).expanduser() if directory is not None else default_grid_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def delete_grid(name: str, *, directory: str | os.PathLike | None = None) -> None:
    """Remove a saved grid (``ValueError`` if it does not exist)."""
    path = _file_for(name, directory)
    if not path.is_file():
        raise ValueError(f"no saved grid {name!r} at {path}")
    path.unlink()


# ---------------------------------------------------------------------------------------------- grids
def _check_times(times, process: Process, *, label: str) -> torch.Tensor:
    if isinstance(times, torch.Tensor):
        ts = times.detach().to(dtype=torch.float64, device="cpu").flatten()
    else:
        try:
            ts = torch.tensor([float(v) for v in times], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError(f"expected {label} to be a sequence of numbers or a tensor, found {times!r}") from None
    if ts.numel() < 2 or not bool(torch.isfinite(ts).all()):
        raise ValueError(f"expected {label} to hold >= 2 finite times, found {ts.tolist()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"expected {label} to be strictly decreasing (from t = 1 to t_min), found {ts.tolist()}")
    t_hi, t_lo = process.t_max, process.t_min
    tol = 1e-9
    if abs(float(ts[0]) - t_hi) > tol or abs(float(ts[-1]) - t_lo) > tol * max(1.0, t_lo):
        raise ValueError(
            f"expected {label} to start at t_max = {t_hi:g} and end at t_min = {t_lo:g} of {type(process).__name__}, "
            f"found {float(ts[0]):.10g} ... {float(ts[-1]):.10g}"
        )
    ts = ts.clone()
    ts[0], ts[-1] = t_hi, t_lo
    return ts


#: how far (a fraction of a saved grid's own log-SNR span) another process's range may reach beyond it at either end
#: for the grid to be carried over (beyond that its step density would be a guess)
MAX_TRANSFER_EXTENSION = 0.25


def _log_snr_ends(process: Process) -> tuple[float, float]:
    """The process's log-SNR range ``(lambda(1), lambda(t_min))`` as floats (computed in float64)."""
    return tuple(process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64)).tolist())


def _check_reach(lo: float, hi: float, a: float, b: float, process: Process, why: str) -> None:
    """Refuse a process whose log-SNR range ``[a, b]`` reaches beyond the grid's ``[lo, hi]`` by more than
    ``MAX_TRANSFER_EXTENSION`` of the grid's span at either end."""
    reach = max(lo - a, b - hi)
    if reach > MAX_TRANSFER_EXTENSION * (hi - lo):
        raise ValueError(
            f"the grid spans log-SNR [{lo:.4g}, {hi:.4g}] and cannot be carried over to {process!r}, which spans "
            f"[{a:.4g}, {b:.4g}]: that reaches {reach:.3g} beyond the grid, more than {MAX_TRANSFER_EXTENSION:g} of its "
            f"span, {why}; fit a grid for this process (optimize_grid) or use a built-in kind"
        )


def transfer_log_snr(log_snr: Sequence[float] | torch.Tensor, process: Process, num_steps: int | None = None, *,
                     head: int = 0) -> torch.Tensor:
    """Carry a grid (increasing log-SNR points ``lambda_0 < ... < lambda_n``) to another process of the same
    family: the grid is read as a step density over absolute log-SNR (``1 / (n h_i)`` on its step `i`, the end
    steps' densities extended beyond its range), and the process's own range ``[lambda(1), lambda(t_min)]`` is
    split into ``num_steps`` (default ``n``) parts of equal mass (exact: the density is piecewise constant). On the
    grid's own range and step count this returns the grid itself. Differentiable in ``log_snr`` (what
    ``optimize_grid(family=...)`` fits through). The rule of the data-free grid
    (:func:`fitted_log_snr`): where the steps belong depends on the noise level relative to the data, so VE
    processes with any ``sigma_max``, VP and sub-VP share it.

    ``head=k`` (``1 <= k < n``; the "anchored" rule): the grid's first ``k`` steps, its high-noise end, are mapped
    per process: they split ``[lambda(1), lambda_k]`` of the new process in the grid's own proportions, and the
    points from ``lambda_k`` on keep their absolute log-SNR (carried by the density rule above onto
    ``[lambda_k, lambda(t_min)]`` when the low-noise end differs). Where the steps belong at low noise depends on the
    data, at the start on where the process starts; measured in docs/fast_samplers.md ("Transfer"). Needs
    ``num_steps`` equal to ``n`` (or None) and ``lambda_k`` above the process's start.

    Raises ``ValueError`` when the process's range reaches beyond the grid's by more than
    ``MAX_TRANSFER_EXTENSION`` of the grid's span at either end (the density there would be a guess)."""
    lam = torch.as_tensor(log_snr, dtype=torch.float64).flatten()
    n_src = lam.numel() - 1
    n = n_src if num_steps is None else int(num_steps)
    if n_src < 1 or n < 1 or not bool((torch.diff(lam) > 0).all()):
        raise ValueError(f"expected >= 2 increasing log-SNR points and num_steps >= 1, found {lam.tolist()}, {num_steps!r}")
    if not isinstance(head, int) or isinstance(head, bool) or head < 0 or (head and head >= n_src):
        raise ValueError(f"expected head to be an int with 0 <= head < the grid's {n_src} steps, found {head!r}")
    if head and n != n_src:
        raise ValueError(f"head={head} maps the grid's own steps: expected num_steps None or {n_src}, found {num_steps!r}")
    a, b = _log_snr_ends(process)
    lo, hi = float(lam[0].detach()), float(lam[-1].detach())  # (lam may carry a gradient: optimize_grid's family)
    _check_reach(lo, hi, a, b, process, "where its step density is unknown")
    if n == n_src and abs(a - lo) <= _LOG_SNR_TOL * max(1.0, abs(lo)) and abs(b - hi) <= _LOG_SNR_TOL * max(1.0, abs(hi)):
        return lam.clone()
    if head:
        pivot = lam[head]
        if not a < float(pivot.detach()) < b:
            raise ValueError(f"head={head}: the grid's point {float(pivot):.4g} that ends its mapped head must lie inside "
                             f"{process!r}'s log-SNR range [{a:.4g}, {b:.4g}]")
        first = a + (lam[: head + 1] - lam[0]) / (pivot - lam[0]) * (pivot - a)
        rest = lam[head:] if abs(b - hi) <= _LOG_SNR_TOL * max(1.0, abs(hi)) else _density_transfer(lam[head:], float(pivot.detach()), b, n - head)
        out = torch.cat([first[:-1], pivot.reshape(1), rest[1:]])
        out[0], out[-1] = a, b
        return out
    return _density_transfer(lam, a, b, n)


#: the absolute rule's merge: a grid point within this fraction of the grid's step beside it from a process's end is
#: dropped (the end takes its place) instead of leaving a tiny step
ABSOLUTE_MERGE = 0.1
#: the transfer rules a saved grid may record (its file's ``"transfer"`` entry): the step density (default), the
#: anchored head (``head``), and the absolute points (:func:`absolute_log_snr`)
TRANSFER_RULES = ("log_snr_density", "log_snr_anchored", "log_snr_absolute", INTERPOLATED_RULE)


def absolute_log_snr(log_snr: Sequence[float] | torch.Tensor, process: Process, *, extend: str = "one") -> torch.Tensor:
    """Carry a grid to another process as a set of points in absolute log-SNR (the "absolute" rule, "clip /
    extend"): the process runs on the grid's points that lie strictly inside its own range ``(lambda(1),
    lambda(t_min))``, with its own ends added. So a process starting inside the grid's range drops the grid's points
    below its start (the step nearest its start is shortened, not squeezed) and runs fewer steps; a process starting
    below the grid's first point gets one extension step from its start to that point (``extend="one"``) or as few
    equal steps as keep each no longer than the grid's first step (``extend="first"``); the low-noise end likewise.
    The step count follows from the process (what ``num_steps`` and ``nfe`` of a sampler then report). On the grid's
    own range this returns the grid itself. Differentiable in ``log_snr`` (its points inside the range keep their
    gradient; which points are inside is decided on their values).

    Raises ``ValueError`` when the process's range reaches beyond the grid's by more than ``MAX_TRANSFER_EXTENSION``
    of the grid's span at either end, or holds none of the grid's inner points (the grid says nothing there)."""
    lam = torch.as_tensor(log_snr, dtype=torch.float64).flatten()
    if lam.numel() < 2 or not bool((torch.diff(lam) > 0).all()):
        raise ValueError(f"expected >= 2 increasing log-SNR points, found {lam.tolist()}")
    if extend not in ("one", "first"):
        raise ValueError(f"expected extend 'one' or 'first', found {extend!r}")
    a, b = _log_snr_ends(process)
    v = lam.detach()
    lo, hi = float(v[0]), float(v[-1])
    _check_reach(lo, hi, a, b, process, "where no step of it was fitted")
    tol_a, tol_b = _LOG_SNR_TOL * max(1.0, abs(a)), _LOG_SNR_TOL * max(1.0, abs(b))
    if abs(a - lo) <= tol_a and abs(b - hi) <= tol_b:
        return lam.clone()
    # a grid point closer to the process's end than ABSOLUTE_MERGE of the grid's step beside it gives way to the end
    # (no step of a few percent of the grid's own: it would cost a score evaluation for nothing)
    h = torch.diff(v)
    below, above = torch.cat([h[:1], h]), torch.cat([h, h[-1:]])
    inside = (v > a + ABSOLUTE_MERGE * below) & (v < b - ABSOLUTE_MERGE * above)
    if not bool(inside.any()):
        raise ValueError(f"the grid's points {v.tolist()} all lie outside {process!r}'s log-SNR range "
                         f"[{a:.4g}, {b:.4g}]: the absolute rule has no point of the grid to use there")
    inner = lam[inside]

    def extension(start: float, end: float, step: float) -> torch.Tensor:  # the points strictly between
        k = 1 if extend == "one" else max(1, math.ceil((end - start) / step - 1e-9))
        return torch.linspace(start, end, k + 1, dtype=torch.float64)[1:-1]

    head = extension(a, lo, float(h[0])) if bool(inside[0]) else lam.new_zeros(0)
    tail = extension(hi, b, float(h[-1])) if bool(inside[-1]) else lam.new_zeros(0)
    return torch.cat([lam.new_tensor([a]), head, inner, tail, lam.new_tensor([b])])


def _density_transfer(lam: torch.Tensor, a: float, b: float, n: int) -> torch.Tensor:
    """``n + 1`` points splitting ``[a, b]`` into parts of equal mass under the step density of the grid ``lam``."""
    n_src = lam.numel() - 1
    # piecewise-constant density on the breakpoints (the grid's points inside (a, b), and a, b): exact mass per piece
    inner = lam[(lam > a) & (lam < b)]
    knots = torch.cat([torch.tensor([a], dtype=torch.float64), inner, torch.tensor([b], dtype=torch.float64)])
    steps = torch.diff(lam)
    mid = 0.5 * (knots[1:] + knots[:-1])
    idx = (torch.searchsorted(lam.detach(), mid, right=True) - 1).clamp(0, n_src - 1)
    mass = torch.diff(knots) / steps[idx]
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
    q = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64) * cdf[-1]  # (the total mass keeps its gradient)
    j = (torch.searchsorted(cdf.detach(), q.detach(), right=True) - 1).clamp(0, knots.numel() - 2)
    out = knots[j] + (q - cdf[j]) / mass[j] * (knots[j + 1] - knots[j])
    out[0], out[-1] = a, b
    return out


def _times_from_log_snr(lam: torch.Tensor, process: Process, label: str, made_for=None, head: int = 0,
                        rule: str = "density") -> torch.Tensor:
    """Times of a saved (log-SNR) grid under ``process``: as saved when the process spans the grid's range, else
    carried over by :func:`transfer_log_snr` (with the grid's ``head``) or, ``rule="absolute"``, by
    :func:`absolute_log_snr`; a :class:`FamilyGrid` ``rule`` gives them under every process (or refused with the reason)."""
    ends, lo, hi = _log_snr_ends(process), float(lam[0]), float(lam[-1])
    if isinstance(rule, FamilyGrid):
        lam = rule.log_snr(process, label)
    elif abs(lo - ends[0]) > _LOG_SNR_TOL * max(1.0, abs(ends[0])) or abs(hi - ends[1]) > _LOG_SNR_TOL * max(1.0, abs(ends[1])):
        where = f" (made for {made_for['class']}({made_for['config']}))" if isinstance(made_for, dict) else ""
        try:
            lam = absolute_log_snr(lam, process) if rule == "absolute" else transfer_log_snr(lam, process, head=head)
        except ValueError as exc:
            raise ValueError(f"{label}{where}: {exc}") from None
    ts = process.t_from_log_snr(lam.to(torch.float64))
    ts[0], ts[-1] = process.t_max, process.t_min
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{label}: its times under {process!r} are not strictly decreasing (steps too fine)")
    return ts
