"""Time grids for fixed-grid samplers: the shared base class, a store of named grids, and the grid optimiser.

Every fixed-grid sampler of this family (DPM-Solver++ 2M/3M/2S/3S and their SDE variants, EDM Heun) takes
the same three options, handled once by :class:`GridSampler`:

* ``grid``: ``"fitted"`` (the data-free grid of :func:`fitted_log_snr`: grids fitted once by :func:`optimize_grid`
  on reference mixtures, shipped as a step density over log-SNR, so that one rule serves every process and budget);
  a built-in kind of :meth:`Process.time_grid` (``"log_sigma"``: uniform in log-SNR,
  ``"karras"``: the rho schedule of Karras et al. 2022, eq. 5, ``"uniform"`` in t); the name of a grid
  saved with :func:`save_grid` (for instance by :func:`optimize_grid`); a path to such a JSON file; or
  an explicit decreasing sequence of times from ``t = 1`` to ``t_min``.
* ``num_steps``: steps of the grid (a saved or explicit grid fixes it; passing a different value is an error).
* ``rho``: the Karras exponent (only with ``grid="karras"``).

Saved grids are stored as log-SNR values ``lambda = ln(alpha / sigma)`` with the process they were made for;
they are mapped to times with :meth:`Process.t_from_log_snr` and refused (``ValueError``) by a process
whose log-SNR range differs.

The optimiser (:func:`optimize_grid`) chooses the ``n + 1`` grid points of a deterministic sampler that
minimise its discretisation error on a reference problem: an analytic Gaussian mixture (given, or fitted
to the user's data by a small EM, :func:`fit_mixture`) whose exact score drives both the sampler and a
high-accuracy solution of the same probability-flow ODE from the same initial noise. The grid is
parametrised monotonically in lambda (softmax step fractions between the fixed ends) and optimised through
autograd (the samplers' coefficient code is differentiable in the grid) with L-BFGS by default (Adam with
``method="adam"``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._io import write_json_atomic
from ..processes import TIME_GRIDS, Process
from .base import Sampler, SamplingContext, check_float, check_int

__all__ = [
    "GridSampler",
    "GRID_KINDS",
    "fitted_log_snr",
    "GRID_DIR_ENV_VAR",
    "step_to_zero",
    "default_grid_dir",
    "save_grid",
    "load_grid",
    "list_grids",
    "delete_grid",
    "resolve_grid",
    "fit_mixture",
    "optimize_grid",
    "GridOptimizationResult",
]

GRID_DIR_ENV_VAR = "SCORE_TOOLKIT_GRID_DIR"
_FORMAT = "score_toolkit.time_grid"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
#: relative tolerance when matching a saved grid's log-SNR ends to a process
_LOG_SNR_TOL = 1e-6
#: grid kinds every fixed-grid sampler accepts: the data-free fitted grid and the process's built-in kinds
GRID_KINDS = ("fitted", *TIME_GRIDS)

# The data-free grid. Grids of dpmpp_2m (with to_zero) fitted by optimize_grid(mixture=...) on the benchmark's
# reference mixtures (loss "mse", 512/256 draws, 60 L-BFGS evaluations), written as their log-SNR values
# lambda = ln(alpha / sigma): under VESDE(0.01, 50) and VPSDE(0.1, 20), 11 steps on the 2-D ring of 8 Gaussians (std
# 0.2, radius 4) and 19 steps on the 16-D anisotropic mixture (10 components, eigenvalues in [0.01, 0.25]). In
# absolute log-SNR the VE and VP fits of one mixture nearly coincide (the ring's within 0.16 at every point): where
# the steps go depends on the noise level relative to the data, not on the process. Each fit is read as a step
# density over lambda (1 / (n * step) on each step, its end densities extended beyond its range); the shipped grid
# is the mean of the four densities, and a process's grid of n steps splits the density's mass over the process's
# own log-SNR range [lambda(1), lambda(t_min)] into n equal parts. See docs/fast_samplers.md ("Defaults").
_FITTED_LOG_SNR = (
    (-3.912, -2.558, -1.382, -1.042, -0.539, -0.122, 0.329, 0.755, 1.224, 1.726, 2.919, 4.605),
    (-5.025, -2.716, -1.422, -1.163, -0.607, -0.176, 0.303, 0.753, 1.252, 1.788, 3.044, 4.558),
    (-3.912, -2.634, -1.979, -1.519, -1.152, -0.812, -0.505, -0.147, 0.151, 0.432, 0.747, 1.07, 1.564, 1.709, 1.939,
     2.144, 2.416, 2.629, 3.268, 4.605),
    (-5.025, -3.089, -2.428, -1.92, -1.556, -1.221, -0.914, -0.54, -0.282, 0.044, 0.303, 0.6, 0.897, 1.261, 1.702,
     1.894, 2.22, 2.43, 3.092, 4.558),
)
# equal weights (weighting the 16-D fits 3:1, or them alone, was measured worse on the ring; mixing in 30-50 % of
# even log-SNR steps was worse in both metrics)
_FITTED_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def _fitted_density(lam: torch.Tensor) -> torch.Tensor:
    """The shipped step density over log-SNR at the points ``lam`` (the mean of the fitted grids' densities)."""
    total = torch.zeros_like(lam)
    for knots, weight in zip(_FITTED_LOG_SNR, _FITTED_WEIGHTS):
        k = torch.tensor(knots, dtype=torch.float64)
        dens = 1.0 / ((k.numel() - 1) * torch.diff(k))
        idx = (torch.searchsorted(k, lam, right=True) - 1).clamp(0, dens.numel() - 1)
        total += weight * dens[idx]
    return total / sum(_FITTED_WEIGHTS)


def fitted_log_snr(process: Process, num_steps: int) -> torch.Tensor:
    """The data-free grid (``grid="fitted"``) as float64 log-SNR values ``lambda(1) < ... < lambda(t_min)``.

    The shipped step density over log-SNR (fitted once, see the comment above) is integrated over the process's
    range and the grid points split its mass into ``num_steps`` equal parts: a data-free grid for any process and
    budget, which transfers across processes (VE with any sigma_max, VP, sub-VP, DDPM tables) because it lives in
    absolute log-SNR. Like every data-free rule it assumes data of about unit scale (per feature spreads of 0.1 to
    1, distances between modes of a few units), as a standardised data set has."""
    n = int(num_steps)
    ends = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    a, b = float(ends[0]), float(ends[1])
    m = 4097
    lam = torch.linspace(a, b, m, dtype=torch.float64)
    dens = _fitted_density(lam)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * torch.diff(lam), 0)])
    cdf = cdf / cdf[-1]
    q = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    j = (torch.searchsorted(cdf, q, right=True) - 1).clamp(0, m - 2)
    frac = ((q - cdf[j]) / (cdf[j + 1] - cdf[j]).clamp_min(1e-300)).clamp(0, 1)
    out = lam[j] + frac * (lam[j + 1] - lam[j])
    out[0], out[-1] = a, b
    return out


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
    if name in GRID_KINDS:
        raise ValueError(f"grid name {name!r} is reserved for a built-in grid kind {GRID_KINDS}")
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
) -> Path:
    """Save a time grid (decreasing times from ``t = 1`` to ``process.t_min``) under ``name`` as JSON.

    ``name`` is a grid name (stored in ``directory``, default :func:`default_grid_dir`) or a path ending in
    ``.json``. The file records the log-SNR values (what samplers use), the times, the process, the sampler
    it was made for and ``info`` (JSON-serialisable). Returns the file's path. An existing grid is replaced
    only with ``overwrite=True``."""
    if not isinstance(process, Process):
        raise TypeError(f"expected a score_toolkit Process, found {type(process).__name__}")
    ts = _check_times(times, process, label="times")
    path = _file_for(name, directory)
    if path.exists() and not overwrite:
        raise FileExistsError(f"grid {os.fspath(name)!r} already exists at {path}; pass overwrite=True to replace it")
    record = {
        "format": _FORMAT,
        "version": 1,
        "name": path.stem,
        "num_steps": ts.numel() - 1,
        "log_snr": process.log_snr(ts).tolist(),
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

    Raises ``ValueError`` if the grid does not exist or if ``process`` spans another log-SNR range than
    the process the grid was made for."""
    record = _read_record(name_or_path, directory)
    lam = torch.tensor(record["log_snr"], dtype=torch.float64)
    if process is None:
        return lam
    return _times_from_log_snr(lam, process, f"grid {record['name']!r} ({record['_path']})", record.get("process"))


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


def _times_from_log_snr(lam: torch.Tensor, process: Process, label: str, made_for=None) -> torch.Tensor:
    ends = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64)).tolist()
    lo, hi = float(lam[0]), float(lam[-1])
    if abs(lo - ends[0]) > _LOG_SNR_TOL * max(1.0, abs(ends[0])) or abs(hi - ends[1]) > _LOG_SNR_TOL * max(1.0, abs(ends[1])):
        where = f" (made for {made_for['class']}({made_for['config']}))" if isinstance(made_for, dict) else ""
        raise ValueError(
            f"{label}{where} spans log-SNR [{lo:.6g}, {hi:.6g}], but {process!r} spans [{ends[0]:.6g}, {ends[1]:.6g}]; "
            "use a grid made for this process (optimize_grid) or a built-in kind"
        )
    ts = process.t_from_log_snr(lam.to(torch.float64))
    ts[0], ts[-1] = process.t_max, process.t_min
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{label}: its times under {process!r} are not strictly decreasing (steps too fine)")
    return ts


@dataclass(frozen=True)
class _GridSpec:
    kind: str | None = None  # a built-in kind
    log_snr: torch.Tensor | None = None  # a saved grid
    times: tuple[float, ...] | None = None  # explicit times
    label: str = ""
    made_for: dict | None = field(default=None, compare=False)

    @property
    def num_steps(self) -> int | None:
        if self.log_snr is not None:
            return self.log_snr.numel() - 1
        if self.times is not None:
            return len(self.times) - 1
        return None


def _parse_grid(grid, sampler: str) -> _GridSpec:
    if isinstance(grid, str):
        if grid in GRID_KINDS:
            return _GridSpec(kind=grid, label=grid)
        try:
            record = _read_record(grid, None)
        except ValueError as exc:
            raise ValueError(f"sampler {sampler!r}: option grid: {exc}") from None
        lam = torch.tensor(record["log_snr"], dtype=torch.float64)
        return _GridSpec(log_snr=lam, label=f"grid {record['name']!r} ({record['_path']})", made_for=record.get("process"))
    if isinstance(grid, os.PathLike):
        return _parse_grid(os.fspath(grid), sampler)
    if isinstance(grid, (torch.Tensor, list, tuple)):
        if isinstance(grid, torch.Tensor):
            if grid.ndim != 1 or not grid.is_floating_point():
                raise ValueError(f"sampler {sampler!r}: expected option grid as a 1-D float tensor of times, found {grid!r}")
            values = grid.detach().to("cpu", torch.float64).tolist()
        else:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid):
                raise TypeError(f"sampler {sampler!r}: expected option grid as a sequence of times, found {grid!r}")
            values = [float(v) for v in grid]
        if len(values) < 2 or any(not math.isfinite(v) for v in values) or any(b >= a for a, b in zip(values[:-1], values[1:])):
            raise ValueError(
                f"sampler {sampler!r}: expected option grid as >= 2 strictly decreasing finite times from 1 to t_min, "
                f"found {values}"
            )
        return _GridSpec(times=tuple(values), label="option grid")
    raise TypeError(
        f"sampler {sampler!r}: expected option grid to be one of {GRID_KINDS}, a saved grid name or .json path, "
        f"or a sequence of times; found {type(grid).__name__}"
    )


def resolve_grid(spec: _GridSpec, process: Process, num_steps: int, rho: float) -> torch.Tensor:
    """The float64 times ``t_0 = 1 > ... > t_n = t_min`` of a parsed grid option under ``process``."""
    if spec.kind == "fitted":
        return _times_from_log_snr(fitted_log_snr(process, num_steps), process, "the fitted grid")
    if spec.kind is not None:
        return process.time_grid(num_steps, spec.kind, rho=rho, dtype=torch.float64)
    if spec.log_snr is not None:
        return _times_from_log_snr(spec.log_snr, process, spec.label, spec.made_for)
    return _check_times(spec.times, process, label=spec.label)


# ---------------------------------------------------------------------------------------------- base class
class GridSampler(Sampler):
    """Base of the samplers that run on a fixed time grid (options ``num_steps``, ``grid``, ``rho``, ``to_zero``).

    ``to_zero`` (False): after ``t_min``, take the probability-flow ODE to noise level zero with one more score
    evaluation (:func:`step_to_zero`); exclusive with ``denoise`` (Tweedie's step, which also shrinks the spread).

    Subclasses implement :meth:`_integrate` (from the prior at ``ts[0] = 1`` to ``ts[-1] = t_min``) and set
    ``nfe_per_step``. :meth:`_integrate` must be differentiable in ``ts`` when ``ts`` requires grad (so that
    :func:`optimize_grid` can optimise the grid): compute step coefficients with torch ops from ``ts``.
    """

    options: ClassVar[Mapping[str, Any]] = {"num_steps": 20, "grid": "log_sigma", "rho": 7.0, "to_zero": False}
    #: score evaluations per step (multistep: 1; single-step s-stage: s)
    nfe_per_step: ClassVar[int] = 1

    def __init__(self, **options: Any):
        self._given = frozenset(options)
        super().__init__(**options)

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        if cfg["denoise"] is True and cfg["to_zero"] is True and "to_zero" not in self._given:
            cfg["to_zero"] = False  # a to_zero default gives way to an explicit denoise=True
        check_to_zero(cfg, self.name)
        spec = _parse_grid(cfg["grid"], self.name)
        check_float(cfg, "rho", self.name)
        if spec.kind != "karras" and "rho" in self._given:
            raise ValueError(f"sampler {self.name!r}: option rho is used only with grid='karras', found grid={cfg['grid']!r}")
        if spec.num_steps is not None:
            if "num_steps" in self._given and cfg["num_steps"] != spec.num_steps:
                raise ValueError(
                    f"sampler {self.name!r}: option num_steps={cfg['num_steps']!r} disagrees with the {spec.num_steps} steps "
                    f"of {spec.label}; leave num_steps out"
                )
            cfg["num_steps"] = spec.num_steps
            if spec.times is not None:
                cfg["grid"] = list(spec.times)
        check_int(cfg, "num_steps", self.name)
        self._grid_spec = spec

    def _num_progress_steps(self) -> int | None:
        return int(self.config["num_steps"])

    @property
    def nfe(self) -> int:
        """Score evaluations of one run: ``num_steps * nfe_per_step``, plus one for ``to_zero`` or ``denoise``."""
        return self.config["num_steps"] * self.nfe_per_step + self._final_steps_nfe()

    def time_grid(self, process: Process) -> torch.Tensor:
        """The float64 times ``t_0 = 1 > ... > t_n = t_min`` this sampler runs on under ``process``."""
        return resolve_grid(self._grid_spec, process, int(self.config["num_steps"]), float(self.config["rho"]))

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        x = self._integrate(ctx, x, self.time_grid(ctx.process))
        if self.config["to_zero"]:
            x = step_to_zero(ctx, x, ctx.process.t_min)
        return x

    def _integrate(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def check_to_zero(cfg: Mapping[str, Any], sampler: str) -> None:
    """Validate the ``to_zero`` option (a bool, exclusive with ``denoise``)."""
    if not isinstance(cfg["to_zero"], bool):
        raise TypeError(f"sampler {sampler!r}: expected option to_zero to be a bool, found {cfg['to_zero']!r}")
    if cfg["to_zero"] and cfg["denoise"]:
        raise ValueError(
            f"sampler {sampler!r}: options denoise and to_zero are exclusive final steps (denoise: Tweedie's E[x_0 | x_t]; "
            "to_zero: the probability-flow ODE to noise level 0); pass one of them"
        )


def step_to_zero(ctx: SamplingContext, x: torch.Tensor, t_end: float) -> torch.Tensor:
    """The probability-flow ODE from ``t_end`` to noise level zero in one Euler step in ``sigma~^2``
    (``sigma~ = sigma / alpha``), one score evaluation.

    In ``x~ = x / alpha`` the PF-ODE reads ``dx~ / d(sigma~^2) = -s~ / 2`` with ``s~ = alpha s`` bounded as the
    noise vanishes, so ``x_0 = x~ + sigma~^2 s~ / 2 = (x + sigma^2 s / 2) / alpha = (x~ + D) / 2`` (``D``: Tweedie's
    denoiser), exact up to O(sigma~^4). Tweedie's ``x <- D`` (option ``denoise``) instead removes the noise
    *and* shrinks the spread (by ``C / (C + sigma~^2)`` for a Gaussian of covariance C); this step keeps it.
    Recorded at ``t = 0`` (noise level zero)."""
    alpha, sigma = ctx.process.marginal(torch.tensor([float(t_end)], dtype=torch.float64))
    s = ctx.score(x, float(t_end))
    x = torch.add(x, s, alpha=0.5 * float(sigma) ** 2).div_(float(alpha))
    ctx.record(x, 0.0)
    return x


def _lincomb(pairs):
    """sum c * tensor over (c, tensor) pairs; fused in-place on a fresh tensor when the c are Python floats."""
    (c0, t0), *rest = pairs
    if isinstance(c0, float):
        out = t0 * c0
        for c, t in rest:
            out.add_(t, alpha=c)
        return out
    out = c0 * t0
    for c, t in rest:
        out = out + c * t
    return out


def _floats(*tensors: torch.Tensor):
    """Per-step coefficients as Python floats (fast path), or the tensors themselves when they carry grad."""
    if any(t.requires_grad for t in tensors):
        return tensors
    return tuple(t.tolist() for t in tensors)


# ---------------------------------------------------------------------------------------------- reference problems
def fit_mixture(
    data: torch.Tensor,
    num_components: int = 8,
    *,
    covariance: str = "full",
    iterations: int = 100,
    seed: int = 0,
    reg: float = 1e-6,
):
    """Fit a :class:`~score_toolkit.analytic.GaussianMixture` to ``data`` (N, ...) by EM (k-means++ start,
    float64). ``covariance``: ``"full"`` or ``"diag"``; ``reg`` (times the mean data variance) is added to every
    covariance's diagonal. Used as the reference problem of :func:`optimize_grid`."""
    from ..analytic import GaussianMixture

    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise TypeError(f"expected data as a float tensor (N, ...), found {type(data).__name__}")
    if covariance not in ("full", "diag"):
        raise ValueError(f"expected covariance 'full' or 'diag', found {covariance!r}")
    x = data.detach().reshape(data.shape[0], -1).to("cpu", torch.float64)
    n, d = x.shape
    k = int(num_components)
    if not 1 <= k <= n:
        raise ValueError(f"expected 1 <= num_components <= number of data points ({n}), found {num_components!r}")
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):  # k-means++
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        centers.append(x[torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n) / n, 1, generator=g)].squeeze(0))
    means = torch.stack(centers)
    ridge = reg * float(x.var(0).mean()) + 1e-12
    var0 = x.var(0) + ridge
    covs = torch.diag(var0).expand(k, d, d).clone()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(int(iterations)):
        # E-step (log-domain through Cholesky factors)
        chol = torch.linalg.cholesky(covs)
        diff = x[None] - means[:, None]  # (k, n, d)
        sol = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # (k, d, n)
        maha = (sol**2).sum(1)  # (k, n)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        logp = -0.5 * (maha + logdet[:, None] + d * math.log(2 * math.pi)) + torch.log(weights)[:, None]
        resp = torch.softmax(logp, 0)  # (k, n)
        # M-step
        nk = resp.sum(1) + 1e-12
        weights = nk / n
        means = (resp @ x) / nk[:, None]
        diff = x[None] - means[:, None]
        if covariance == "full":
            covs = torch.einsum("kn,knd,kne->kde", resp, diff, diff) / nk[:, None, None] + ridge * eye
        else:
            covs = torch.diag_embed((resp[..., None] * diff**2).sum(1) / nk[:, None] + ridge)
        covs = 0.5 * (covs + covs.transpose(1, 2))
    return GaussianMixture(means, covs, weights.clamp_min(1e-12))


@dataclass
class GridOptimizationResult:
    """What :func:`optimize_grid` found.

    Attributes:
        times: the optimised grid (float64, ``t_0 = 1 > ... > t_n = t_min``); pass it as ``grid=`` (or the saved
            grid's ``name`` / ``path``).
        log_snr: the same grid in lambda = ln(alpha / sigma).
        loss: the best training loss.
        validation: the loss on held-out draws for the optimised grid and the built-in kinds
            (``{"optimized": ..., "log_sigma": ..., "karras": ..., "uniform": ...}``). A few samples near the
            boundaries between modes (where the flow is chaotic) can dominate it: read it with ``median_error``.
        median_error: the median per-sample squared distance to the reference solution on the held-out draws,
            for the same grids.
        history: the training loss at every evaluation.
        path, name: where and under which name the grid was saved (``save_as``), else ``None``.
    """

    times: torch.Tensor
    log_snr: torch.Tensor
    loss: float
    validation: dict[str, float]
    median_error: dict[str, float]
    history: list[float]
    path: Path | None = None
    name: str | None = None


def _reference_score(mixture, data, num_components, score_fn, process, covariance="full"):
    given = [v is not None for v in (mixture, data, score_fn)]
    if sum(given) != 1:
        raise ValueError("optimize_grid: pass exactly one of mixture=, data= (a mixture is fitted by EM) or score_fn=")
    if score_fn is not None:
        if not callable(score_fn):
            raise TypeError(f"optimize_grid: expected score_fn to be callable, found {type(score_fn).__name__}")
        return score_fn, None
    if data is not None:
        mixture = fit_mixture(data, num_components, covariance=covariance)
    from ..analytic import GaussianMixture

    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"optimize_grid: expected mixture to be a GaussianMixture, found {type(mixture).__name__}")
    return mixture.score_fn(process), mixture


def optimize_grid(
    sampler: GridSampler,
    process: Process,
    *,
    mixture=None,
    data: torch.Tensor | None = None,
    num_components: int = 8,
    covariance: str = "full",
    score_fn=None,
    shape: Sequence[int] | None = None,
    num_samples: int = 1024,
    iterations: int = 100,
    lr: float = 0.05,
    init: str = "best",
    reference_steps: int = 250,
    seed: int = 0,
    save_as: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    overwrite: bool = False,
    loss: str = "mse",
    method: str = "lbfgs",
    dtype: torch.dtype = torch.float64,
    device=None,
) -> GridOptimizationResult:
    """Choose the ``n + 1`` time points of ``sampler``'s grid (``n = sampler.config["num_steps"]``) that minimise
    its discretisation error on a reference problem.

    Reference problem: a Gaussian mixture with exact scores (``mixture=``; or ``data=``, a held-out batch of the
    user's data to which a ``num_components``-component mixture is fitted by EM, :func:`fit_mixture`, with
    ``covariance="full"`` or ``"diag"``: prefer ``"diag"`` when the batch is small for the dimension), or any
    differentiable ``score_fn`` with the sample ``shape`` (e.g. the user's trained network).

    Objective: from ``num_samples`` prior draws (seed ``seed``), the sampler's output is compared with a
    high-accuracy solution of the same probability-flow ODE from the same draws (DPM-Solver++(3M), ``reference_steps``
    log-SNR steps). Per sample the squared distance ``e^2`` enters as ``c e^2 / (c + e^2)``, with ``c`` one
    feature's spread within a mode: a sample that ends in another mode than its reference (near a boundary between
    modes the flow is chaotic, no grid fixes that) costs a constant, while one that a bad grid throws off stays
    expensive. ``loss="mse"`` is the mean of that; ``loss="nll"`` (mixtures only) divides it by the mean component
    variance and adds the squared mean log-density bias of the samples (what the mean-NLL metric sees).

    Parametrisation and optimiser: the log-SNR span is split by softmax fractions (monotone, ends fixed, every step
    at least 0.1 % of an even share), initialised at ``init`` (a built-in kind, or ``"best"``: the kind with the
    smallest training loss, so the result is never worse than every built-in kind on the training draws), and
    minimised through autograd
    with L-BFGS (``method="lbfgs"``, strong-Wolfe line search, at most ``iterations`` evaluations) or Adam
    (``method="adam"``, ``lr``, cosine decay); the best iterate is kept. The result is compared on fresh draws
    with the built-in kinds, and with ``save_as`` saved as a named grid, usable as ``grid="<name>"`` by every
    fixed-grid sampler of this family (its stochastic variants included) under the same process.

    Only deterministic samplers (``properties.stochastic`` False) of :class:`GridSampler` are optimised: a pathwise
    error against the ODE solution is not defined for a stochastic sampler.

    Cost: about ``iterations`` forward and backward runs of the sampler on ``num_samples`` draws (on 2 CPU cores:
    about 5 s for 2M with 14 steps on the 2-d ring, about 1 minute for 3M with 39 steps on a 16-d mixture of 10
    components).
    """
    if not isinstance(sampler, GridSampler):
        raise TypeError(
            f"optimize_grid: expected a fixed-grid sampler of score_toolkit.samplers (a GridSampler instance), found "
            f"{type(sampler).__name__}"
        )
    if sampler.properties.stochastic:
        raise ValueError(
            f"optimize_grid: sampler {sampler.name!r} is stochastic; the grid optimiser measures the pathwise error of a "
            "deterministic sampler against the ODE solution (optimise the grid of its ODE counterpart instead)"
        )
    if not isinstance(process, Process):
        raise TypeError(f"optimize_grid: expected a score_toolkit Process, found {type(process).__name__}")
    if init != "best" and init not in TIME_GRIDS:
        raise ValueError(f"optimize_grid: expected init 'best' or one of {TIME_GRIDS}, found {init!r}")
    for key, value, minimum in (("num_samples", num_samples, 1), ("iterations", iterations, 0),
                                ("reference_steps", reference_steps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"optimize_grid: expected {key} to be an int >= {minimum}, found {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"optimize_grid: expected lr > 0, found {lr!r}")
    if save_as is not None:
        path = _file_for(save_as, directory)
        if path.exists() and not overwrite:
            raise FileExistsError(f"grid {os.fspath(save_as)!r} already exists at {path}; pass overwrite=True to replace it")
    if loss not in ("mse", "nll"):
        raise ValueError(f"optimize_grid: expected loss 'mse' or 'nll', found {loss!r}")
    if method not in ("lbfgs", "adam"):
        raise ValueError(f"optimize_grid: expected method 'lbfgs' or 'adam', found {method!r}")
    if covariance not in ("full", "diag"):
        raise ValueError(f"optimize_grid: expected covariance 'full' or 'diag', found {covariance!r}")
    score, mix = _reference_score(mixture, data, num_components, score_fn, process, covariance)
    if loss == "nll" and mix is None:
        raise ValueError("optimize_grid: loss='nll' needs a mixture reference problem (mixture= or data=), not score_fn=")
    mean_var = float(mix.eigvals.mean()) if mix is not None else 1.0
    if mix is not None:
        sample_shape = (mix.dim,)
    elif data is not None:
        sample_shape = tuple(data.shape[1:])
    elif shape is not None:
        sample_shape = tuple(int(s) for s in shape)
    else:
        raise ValueError("optimize_grid: pass shape= (one sample's shape) together with score_fn=")

    from .dpm_solver import DPMSolverPP3M

    n = int(sampler.config["num_steps"])
    reference = DPMSolverPP3M(num_steps=reference_steps, grid="log_sigma", lower_order_final=False)

    def draws(s):
        return process.prior_sample((num_samples, *sample_shape), generator=torch.Generator().manual_seed(s),
                                    device=device, dtype=dtype)

    def solve(smp, x, ts=None):
        ctx = SamplingContext(smp, score, process, None, None, False, False, None)
        return smp._integrate(ctx, x, smp.time_grid(process) if ts is None else ts)

    def loss_of(x, ref):
        # saturating per-sample loss c e^2 / (c + e^2): a sample that lands in another mode than the reference
        # (near a boundary between modes the flow is chaotic: no grid fixes that) costs a constant, while a
        # sample that goes astray because of the grid stays expensive
        per = (x - ref).flatten(1).pow(2).sum(1)
        weight = saturation / (saturation + per)
        robust = (per * weight).mean()
        if loss == "mse":
            return robust
        # loss == "nll": the same in units of the mixture's mean component variance (about the mean squared error
        # of the log-density per sample) plus the squared mean log-density bias of the samples that stay in mode
        dnll = mix.log_prob(x.flatten(1).to(mix.dtype)) - mix.log_prob(ref.flatten(1).to(mix.dtype))
        bias = (weight.detach() * dnll).sum() / weight.detach().sum()
        return robust / mean_var + bias**2

    with torch.no_grad():
        x_train, x_val = draws(seed), draws(seed + 7919)
        ref_train, ref_val = solve(reference, x_train), solve(reference, x_val)
    # the saturation scale: one feature's spread within a mode (far above the errors of a usable grid, far below
    # the distance between modes)
    if mix is not None:
        saturation = float(mix.eigvals.mean())
    else:
        saturation = 0.01 * float(ref_train.flatten(1).var(0).mean())

    ends = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    lam0, lam1 = float(ends[0]), float(ends[1])
    if init == "best":  # start from the built-in kind with the smallest training loss
        with torch.no_grad():
            init_losses = {k: float(loss_of(solve(sampler, x_train, process.time_grid(n, k, dtype=torch.float64)), ref_train))
                           for k in TIME_GRIDS}
        init = min(init_losses, key=lambda k: init_losses[k] if math.isfinite(init_losses[k]) else math.inf)
    lam_init = process.log_snr(process.time_grid(n, init, dtype=torch.float64))
    theta = torch.log(torch.diff(lam_init).clamp_min(1e-12)).clone().requires_grad_(True)
    t_ends = (torch.tensor([process.t_max], dtype=torch.float64), torch.tensor([process.t_min], dtype=torch.float64))

    def times_of(th):
        # every step keeps at least 0.1 % of an even share (distinct nodes for the multistep interpolation)
        frac = torch.softmax(th, 0) * (1 - 1e-3) + 1e-3 / n
        lam = lam0 + (lam1 - lam0) * torch.cumsum(frac, 0)[:-1]
        return torch.cat([t_ends[0], process.t_from_log_snr(lam), t_ends[1]])

    history: list[float] = []
    best = [math.inf, theta.detach().clone()]

    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            value_t = loss_of(solve(sampler, x_train, times_of(theta)), ref_train)
            value = float(value_t.detach())
            history.append(value)
            if math.isfinite(value) and value < best[0]:
                best[0], best[1] = value, theta.detach().clone()
            if not math.isfinite(value):  # a grid the sampler cannot run on: push back towards the best one
                return value_t.detach().nan_to_num(posinf=1e30, nan=1e30).requires_grad_()
            value_t.backward()
        return value_t

    if method == "lbfgs":
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)
        opt.step(closure)
    else:
        opt = torch.optim.Adam([theta], lr=float(lr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iterations))
        for _ in range(iterations):
            opt.step(closure)
            sched.step()
        closure()
    with torch.no_grad():
        ts = times_of(best[1])
        grids = {"optimized": ts, **{kind: process.time_grid(n, kind, dtype=torch.float64) for kind in TIME_GRIDS}}
        validation, median = {}, {}
        for key, grid in grids.items():
            out = solve(sampler, x_val, grid)
            validation[key] = float(loss_of(out, ref_val))
            median[key] = float((out - ref_val).flatten(1).pow(2).sum(1).median())
    result = GridOptimizationResult(times=ts, log_snr=process.log_snr(ts), loss=best[0], validation=validation,
                                    median_error=median, history=history)
    if save_as is not None:
        options = {k: v for k, v in sampler.config.items() if isinstance(v, (int, float, str, bool))}
        info = {"loss": best[0], "validation": validation, "median_error": median, "num_samples": num_samples,
                "iterations": iterations, "loss_kind": loss, "method": method, "init": init, "seed": seed,
                "sampler_options": options, "reference": "mixture" if mix is not None else "score_fn"}
        result.path = save_grid(save_as, ts, process, sampler=sampler.name, info=info, directory=directory,
                                overwrite=overwrite)
        result.name = result.path.stem
    return result
