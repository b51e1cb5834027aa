"""A grid that needs no data but adapts to the model: :func:`pilot_grid`.

The shipped grids (``grid="fitted"``, ``grid="reference"``) are fixed in advance, so they must hedge across data
scales: a grid good for narrow modes wastes steps on wide ones and the other way round. ``pilot_grid`` instead asks
the model itself where its data lie:

1. **Pilot**: ``num_pilot`` prior draws (a private generator seeded with ``seed``, so they are independent of the
   user's own draws) are taken through the converged probability-flow ODE of the user's score: DPM-Solver++(3M) on
   ``pilot_steps`` uniform log-SNR steps, ending with ``to_zero``'s step to noise level 0.
2. **Stand-in**: a Gaussian mixture (``num_components``, EM: :func:`~score_toolkit.samplers.grids.fit_mixture`,
   the most likely of ``EM_STARTS`` starts) is fitted to the pilot outputs. It is a stand-in for the model's distribution whose score is exact and cheap.
3. **Fit**: :func:`~score_toolkit.samplers.grids.optimize_grid` fits the sampler's grid for its budget on that
   stand-in (its default objective: pathwise error, tail term and mean log-density bias), with its held-out report.

No data is read and no network evaluation is made after the pilot: the score is evaluated ``num_pilot *
(pilot_steps + 1)`` times (in batches of ``batch_size``), all in step 1. The result's ``times`` go to any
fixed-grid sampler as ``grid=``. With ``cache=`` (a ``.json`` path the user chooses) the grid is saved as a named-grid
file (usable as ``grid=<path>`` too) together with the settings it was made with; a later call with the same
settings reads it instead of fitting again, a call with other settings refuses to replace it unless
``overwrite=True``. Nothing is written anywhere else. Measured: docs/fast_samplers.md, "Pilot grid".
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..processes import Process
from .fixed_grid import GridSampler
from .grid_store import load_grid, save_grid

__all__ = ["PilotGrid", "pilot_grid", "pilot_samples", "pilot_settings", "stand_in_mixture"]

#: optimize_grid's options that pilot_grid sets otherwise (measured on the ring at 11-12 NFE: one refit when the
#: held-out report flags the first fit, and 2048 training draws, keep dpmpp_2m within the criterion)
FIT_DEFAULTS = {"num_samples": 2048, "tail_retries": 1}

#: EM starts of the stand-in mixture (the most likely one is kept)
EM_STARTS = 4

#: the key under which the settings of a pilot grid are kept in its cache file's ``info``
_INFO_KEY = "pilot_grid"


@dataclass
class PilotGrid:
    """What :func:`pilot_grid` returns.

    Attributes:
        times: the grid (float64, ``t_0 = 1 > ... > t_n = t_min``): pass it as ``grid=`` with the same sampler.
        log_snr: the same grid in lambda = ln(alpha / sigma).
        score_evaluations: evaluations of the user's score (one per sample and time), all made by the pilot; 0 when
            the grid was read from the cache.
        score_calls: batched calls of the score behind them.
        pilot_seconds, fit_seconds: wall time of the pilot and of the mixture and grid fits (0 when cached).
        settings: the settings the grid was made with (what the cache compares).
        fit: :func:`optimize_grid`'s result (held-out report in ``fit.validation``), ``None`` when cached.
        mixture: the stand-in mixture fitted to the pilot outputs, ``None`` when cached.
        cached: the grid was read from ``cache``; path: the cache file, if any.
    """

    times: torch.Tensor
    log_snr: torch.Tensor
    score_evaluations: int
    score_calls: int
    pilot_seconds: float
    fit_seconds: float
    settings: dict[str, Any]
    fit: Any = None
    mixture: Any = None
    cached: bool = False
    path: Path | None = None

    def __repr__(self) -> str:  # the tensors in full are noise here
        n = self.times.numel() - 1
        how = f"read from {self.path}" if self.cached else (
            f"pilot {self.score_evaluations} score evaluations in {self.score_calls} calls, {self.pilot_seconds:.1f} s; "
            f"fit {self.fit_seconds:.1f} s")
        return f"PilotGrid({self.settings['sampler']}, {n} steps, {how})"


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"pilot_grid: expected {name} to be an integer >= {minimum}, found {value!r}")
    return int(value)


def pilot_solver(pilot_steps: int):
    """The pilot's converged PF-ODE integrator: DPM-Solver++(3M) on ``pilot_steps`` uniform log-SNR steps, then
    ``to_zero``'s step (also the reference of :func:`score_toolkit.model_grids.fit_model_grids`' validation)."""
    from .dpm_solver import DPMSolverPP3M

    return DPMSolverPP3M(num_steps=pilot_steps, grid="log_sigma", to_zero=True)


def pilot_samples(
    score_fn,
    process: Process,
    shape: Sequence[int],
    *,
    num_pilot: int = 2048,
    pilot_steps: int = 100,
    batch_size: int | None = None,
    seed: int = 271_828,
    device=None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> tuple[torch.Tensor, int, int]:
    """The pilot of :func:`pilot_grid`: ``num_pilot`` prior draws of one-sample ``shape`` taken through the converged
    PF-ODE of ``score_fn`` (DPM-Solver++(3M), ``pilot_steps`` uniform log-SNR steps, then ``to_zero``'s step).
    Returns (samples (num_pilot, *shape), score evaluations, batched score calls). ``progress``: a progress bar over
    the ODE steps of all batches."""
    num_pilot = _positive_int("num_pilot", num_pilot, 2)
    pilot_steps = _positive_int("pilot_steps", pilot_steps, 2)
    batch_size = num_pilot if batch_size is None else _positive_int("batch_size", batch_size, 1)
    solver = pilot_solver(pilot_steps)
    gen = torch.Generator(device=device or "cpu").manual_seed(int(seed))
    outs, evaluations, calls = [], 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=math.ceil(num_pilot / batch_size) * (pilot_steps + 1), desc="pilot ODE (steps x batches)")
    try:
        for start in range(0, num_pilot, batch_size):
            b = min(batch_size, num_pilot - start)
            x1 = process.prior_sample((b, *shape), generator=gen, device=device, dtype=dtype)
            out = solver.sample(score_fn, process, x_init=x1, callback=(lambda info: bar.update()) if bar else None)
            outs.append(out.samples.detach())
            evaluations += b * out.nfe
            calls += out.nfe
    finally:
        if bar is not None:
            bar.close()
    samples = torch.cat(outs)
    if not torch.isfinite(samples).all():
        raise ValueError("pilot_grid: the pilot ODE produced non-finite samples; check the score function and process")
    return samples, evaluations, calls


def pilot_grid(
    sampler: GridSampler,
    score_fn,
    process: Process,
    shape: Sequence[int],
    *,
    num_pilot: int = 2048,
    pilot_steps: int = 100,
    batch_size: int | None = None,
    num_components: int = 8,
    covariance: str = "auto",
    seed: int = 271_828,
    cache: str | os.PathLike | None = None,
    overwrite: bool = False,
    device=None,
    dtype: torch.dtype = torch.float64,
    **fit_options: Any,
) -> PilotGrid:
    """Fit ``sampler``'s grid for its budget (``sampler.config["num_steps"]``) to the model behind ``score_fn``,
    without data (module docstring: pilot, stand-in mixture, :func:`optimize_grid`).

    Args:
        sampler: a deterministic fixed-grid sampler, e.g. ``get_sampler("unipc", num_steps=11)``; use the grid with
            the same sampler and options (``get_sampler("unipc", grid=result.times)``).
        score_fn, process: the user's score ``score_fn(x, t)`` and its forward process.
        shape: one sample's shape (without the batch dimension).
        num_pilot, pilot_steps, batch_size: the pilot's draws, ODE steps and batch (default: all at once).
        num_components, covariance: the stand-in mixture (``"full"``, ``"diag"``, or ``"auto"``: full while the
            pilot has on average at least 4 draws per dimension and component, else diagonal (on the 64-D mixture a
            diagonal stand-in from 2048 draws failed at 30 NFE where the full one passed: docs/fast_samplers.md).
        seed: seeds the pilot's draws (and, through ``optimize_grid``'s ``seed``, the fit's own draws).
        cache: a ``.json`` path of the user's choice: read if it holds a grid made with the same settings, else the
            grid is fitted and saved there (a file made with other settings is replaced only with ``overwrite=True``).
        device, dtype: of the pilot (the fit runs in float64 on the stand-in).
        fit_options: passed to :func:`optimize_grid` (``iterations``, ``num_samples``, ``loss``, ...; pilot_grid's
            defaults: ``FIT_DEFAULTS``, and ``seed=seed``); not
            ``mixture``, ``data``, ``score_fn``, ``shape``, ``save_as``, ``directory`` or ``overwrite``.
    """
    from .grids import optimize_grid

    if not isinstance(sampler, GridSampler) or sampler.properties.stochastic:
        raise TypeError(f"pilot_grid: expected a deterministic fixed-grid sampler (e.g. get_sampler('unipc', "
                        f"num_steps=11)), found {type(sampler).__name__}")
    if not isinstance(process, Process):
        raise TypeError(f"pilot_grid: expected a score_toolkit Process, found {type(process).__name__}")
    if not callable(score_fn):
        raise TypeError(f"pilot_grid: expected score_fn to be callable score_fn(x, t), found {type(score_fn).__name__}")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"pilot_grid: expected shape to be one sample's shape (positive sizes), found {shape}")
    taken = sorted({"mixture", "data", "score_fn", "shape", "save_as", "directory", "overwrite"} & set(fit_options))
    if taken:
        raise TypeError(f"pilot_grid: {taken} are set by pilot_grid itself and cannot be passed on to optimize_grid")
    if covariance not in ("auto", "full", "diag"):
        raise ValueError(f"pilot_grid: expected covariance 'auto', 'full' or 'diag', found {covariance!r}")
    num_components = _positive_int("num_components", num_components, 1)
    num_pilot = _positive_int("num_pilot", num_pilot, 2)
    pilot_steps = _positive_int("pilot_steps", pilot_steps, 2)
    settings = pilot_settings(sampler, process, shape, num_pilot=num_pilot, pilot_steps=pilot_steps,
                              num_components=num_components, covariance=covariance, seed=seed, **fit_options)
    covariance, fit_options = settings["covariance"], {**FIT_DEFAULTS, "seed": int(seed), **fit_options}
    path = None
    if cache is not None:
        path = Path(cache)
        if path.suffix != ".json":
            raise ValueError(f"pilot_grid: expected cache to be a path ending in .json, found {os.fspath(cache)!r}")
        if path.exists():
            found = _cached_settings(path)
            if found == settings:
                times = load_grid(path, process)
                return PilotGrid(times, process.log_snr(times), 0, 0, 0.0, 0.0, settings, cached=True, path=path)
            if not overwrite:
                raise FileExistsError(f"pilot_grid: {path} holds a grid made with other settings ({found}); pass "
                                      f"overwrite=True to replace it, or another cache path")

    t0 = time.perf_counter()
    samples, evaluations, calls = pilot_samples(score_fn, process, shape, num_pilot=num_pilot, pilot_steps=pilot_steps,
                                                batch_size=batch_size, seed=seed, device=device, dtype=dtype)
    t1 = time.perf_counter()
    mixture = stand_in_mixture(samples, num_components, covariance, seed)
    fit = optimize_grid(sampler, process, mixture=mixture, **fit_options)
    t2 = time.perf_counter()
    result = PilotGrid(fit.times, fit.log_snr, evaluations, calls, t1 - t0, t2 - t1, settings, fit=fit,
                       mixture=mixture, path=path)
    if path is not None:
        save_grid(path, fit.times, process, sampler=sampler.name, overwrite=True,
                  info={_INFO_KEY: settings, "score_evaluations": evaluations, "pilot_seconds": round(t1 - t0, 3),
                        "fit_seconds": round(t2 - t1, 3)})
    return result


def pilot_settings(sampler: GridSampler, process: Process, shape: Sequence[int], *, num_pilot: int = 2048,
                   pilot_steps: int = 100, num_components: int = 8, covariance: str = "auto", seed: int = 271_828,
                   **fit_options: Any) -> dict[str, Any]:
    """The settings a pilot grid is made with, as :func:`pilot_grid` records them in its cache file (``"auto"``
    covariance resolved by the pilot's draws per dimension and component; ``fit_options`` with ``FIT_DEFAULTS`` and
    ``seed``). Two grids made with equal settings from the same score are the same grid."""
    dim = math.prod(int(s) for s in shape)
    if covariance == "auto":
        covariance = "full" if num_pilot >= 4 * num_components * dim else "diag"
    fit_options = {**FIT_DEFAULTS, "seed": int(seed), **fit_options}
    config = {k: v for k, v in sampler.config.items() if k != "progress"}
    return {"sampler": sampler.name, "sampler_config": _jsonable(config), "process": repr(process),
            "shape": [int(s) for s in shape], "num_pilot": int(num_pilot), "pilot_steps": int(pilot_steps),
            "num_components": int(num_components), "covariance": covariance, "seed": int(seed),
            "fit_options": _jsonable(fit_options)}


def stand_in_mixture(samples: torch.Tensor, num_components: int, covariance: str, seed: int):
    """Step 2 of :func:`pilot_grid`: the Gaussian mixture fitted by EM to the pilot's outputs (flattened, float64), the
    most likely of ``EM_STARTS`` k-means++ starts (one start can merge two modes into one component)."""
    from .grids import fit_mixture

    flat = samples.reshape(samples.shape[0], -1).to("cpu", torch.float64)
    fits = [fit_mixture(flat, num_components, covariance=covariance, seed=int(seed) + k) for k in range(EM_STARTS)]
    return max(fits, key=lambda m: float(m.log_prob(flat).mean()))


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, other objects by repr), so settings compare equal."""
    return json.loads(json.dumps(obj, default=repr))


def _cached_settings(path: Path) -> Any:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"pilot_grid: cannot read the cache file {path}: {exc}") from exc
    info = record.get("info") if isinstance(record, dict) else None
    if not isinstance(info, dict) or _INFO_KEY not in info:
        raise ValueError(f"pilot_grid: {path} is not a pilot-grid cache file; it is left untouched, choose another path")
    return info[_INFO_KEY]
