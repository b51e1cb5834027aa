"""A model's own time grids: fitted once by the pilot (:mod:`score_toolkit.samplers.pilot_grid`), stored in the
model folder, and used by :class:`~score_toolkit.pipeline.ScorePipeline` by default.

A shipped grid cannot know the data's scales; a grid fitted to the model can, but its pilot costs about 200,000
score evaluations plus minutes of fitting, too much to spend silently at the first ``sample()`` call. So, as
"Align Your Steps" does for its models, the grid is optimised once per model and kept with the model:

* :func:`fit_model_grids` (``score-toolkit fit-grid MODEL_DIR``; ``score-toolkit train`` at the end of a run) runs
  ONE pilot of the model's score and fits the grid of each budget on its stand-in mixture, writing
  ``<folder>/grids/<sampler>_<num_steps>.json`` (saved-grid files, usable as ``grid="<path>"``). Each file records
  the pilot's settings (as :func:`~score_toolkit.samplers.pilot_grid.pilot_grid` records them, so the file is also
  a valid ``pilot_grid`` cache), the sampler's options, the process and the sha256 of the weights files.
* Each fitted grid is then **validated on the model's own ODE**: a held-out set of prior draws (its own seed) goes
  through the converged PF-ODE of the network (the pilot's integrator and steps); the sampler runs from the same
  draws on the fitted grid and on its built-in default grid, and the per-sample errors to the ODE's endpoints
  (divided by sqrt(dim): rms, median, 99 %) of both are recorded in the file (``info["validation"]``) with the
  winner (the fitted grid wins only with a strictly smaller rms) and the cost.
* :func:`model_grid_for` is what the pipeline asks before sampling: the stored grid for this sampler, budget and
  options, or ``None`` with the reason (a :class:`ModelGridWarning` when a stored grid is there but does not fit:
  other weights, another process, another sample shape, other sampler options, a damaged record; no warning, only
  the reason, when the stored grid lost its validation to the built-in grid). A file without a validation record
  (e.g. from a fit-grid run stopped before its validation), or validated against another built-in grid than the
  sampler's current one, is not used either, and the reason says it is unvalidated; ``score-toolkit fit-grid``
  adds the validation without refitting.

Measured: docs/fast_samplers.md, "The model's grid (the pipeline's default)".

Why one module of this length: the fit, the validation and the lookup all read and write the one file record
defined here; split, they would share its private keys across modules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._defaults import DEFAULT_SAMPLER, DEFAULT_STEPS
from ._io import sha256_file

__all__ = ["GRIDS_DIR", "DEFAULT_GRID_STEPS", "ModelGridWarning", "ModelGridFit", "fit_model_grids",
           "model_grid_for", "model_grid_path", "weights_sha256"]

logger = logging.getLogger(__name__)

#: the subfolder of a model folder that holds its grids
GRIDS_DIR = "grids"
#: the budgets fitted by default: the default sampler's default steps (25 NFE) and 14 steps (15 NFE)
DEFAULT_GRID_STEPS = (DEFAULT_STEPS, 14)
#: the key of a grid file's ``info`` that marks it as written by :func:`fit_model_grids` (with the weights' hashes)
_KEY = "model_grid"
#: sampler options that do not change the method (left out when a stored grid's options are compared)
_NOT_METHOD = ("grid", "num_steps", "progress")
#: the pilot's network batch when none is given
PILOT_BATCH = 512
#: the held-out draws of the validation and their seed (another seed than the pilot's: draws the fit never saw)
VALIDATION_DRAWS = 256
VALIDATION_SEED = 314_159
#: ``info["validation"]["winner"]`` values
_WINNERS = ("model_grid", "built_in")


class ModelGridWarning(UserWarning):
    """A model folder's stored grid was not used (fitted for other weights, another process, another sample shape
    or other sampler options, or its file is damaged): the sampler runs on its built-in default grid. It names the
    caller's line outside score_toolkit, whichever entry point chose the grid."""


@dataclass
class ModelGridFit:
    """One budget's result of :func:`fit_model_grids`: the file, and whether it was fitted now (``fitted``), was
    already there with the same settings and weights (``up_to_date``), or was kept and only validated now
    (``validated``: a file written before the validation, or validated with other settings); ``validation``: the
    file's validation record (``winner``: ``"model_grid"`` or ``"built_in"``, the grid the pipeline uses)."""

    path: Path
    sampler: str
    num_steps: int
    status: str
    fit_seconds: float = 0.0
    validation: dict[str, Any] | None = None


def model_grid_path(folder: str | os.PathLike, sampler: str, num_steps: int) -> Path:
    """``<folder>/grids/<sampler>_<num_steps>.json``."""
    return Path(folder) / GRIDS_DIR / f"{sampler}_{int(num_steps)}.json"


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of the network's weights files (``unet/*.safetensors``), keyed by their path in the folder (a file's
    hash is computed once per size and modification time in a process)."""
    files = sorted((Path(folder) / "unet").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"expected the network's weights as {Path(folder) / 'unet'}/*.safetensors, found none")
    out = {}
    for f in files:
        st = f.stat()
        key = (os.fspath(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = sha256_file(f)
        out[f"unet/{f.name}"] = _HASHES[key]
    return out


def _method_options(config: Mapping[str, Any]) -> dict[str, Any]:
    from .samplers.pilot_grid import _jsonable

    return _jsonable({k: v for k, v in config.items() if k not in _NOT_METHOD})


def _read(path: Path) -> dict[str, Any] | None:
    """A grid file's record, or None when it is not one :func:`fit_model_grids` wrote."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    info = record.get("info") if isinstance(record, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get(_KEY), dict) or "pilot_grid" not in info:
        return None
    return record


def _steps(steps: Any) -> list[int]:
    values = [steps] if isinstance(steps, int) else list(steps) if isinstance(steps, Sequence) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"fit_model_grids: expected steps to be positive ints (the samplers' num_steps), found {steps!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"fit_model_grids: expected distinct steps, found {values}")
    return values


def check_fit_options(fit_options: Mapping[str, Any]) -> None:
    """The names of :func:`fit_model_grids`' ``fit_options`` (a TypeError for one that optimize_grid does not take
    here), checkable before any work (``score-toolkit train --grid-fit-option``)."""
    import inspect

    from .samplers.grids import optimize_grid

    allowed = set(inspect.signature(optimize_grid).parameters) - {"sampler", "process", "mixture", "data", "score_fn",
                                                                  "shape", "save_as", "directory", "overwrite"}
    unknown = sorted(set(fit_options) - allowed)
    if unknown:
        raise TypeError(f"fit_model_grids: unknown fit option(s) {unknown}; optimize_grid's options here are "
                        f"{sorted(allowed)}")


def fit_model_grids(
    pipeline,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | Sequence[int] = DEFAULT_GRID_STEPS,
    sampler_options: Mapping[str, Any] | None = None,
    num_pilot: int = 2048,
    pilot_steps: int = 100,
    batch_size: int | None = PILOT_BATCH,
    seed: int = 271_828,
    device=None,
    progress: bool = True,
    command: str | None = None,
    validation_draws: int = VALIDATION_DRAWS,
    validation_seed: int = VALIDATION_SEED,
    **fit_options: Any,
) -> list[ModelGridFit]:
    """Fit the model's own grid of ``sampler`` for each budget in ``steps`` and store it in the model folder's
    ``grids/``. ``pipeline``: a :class:`~score_toolkit.pipeline.ScorePipeline` loaded from that folder with
    ``ScorePipeline.from_pretrained(folder)`` (the grids belong to the weights files there).

    One pilot (``num_pilot`` draws through the model's converged PF-ODE, ``pilot_steps`` steps, network batches of
    ``batch_size``, private generator seeded with ``seed``) and one stand-in mixture serve every budget; then
    :func:`~score_toolkit.samplers.grids.optimize_grid` fits each budget (``fit_options``: as for ``pilot_grid``;
    its defaults otherwise). The pilot runs on ``device`` (default: CPU) in the dtype the pipeline samples in; the pipeline is moved there
    and left there (move it back with ``pipe.to(...)``).

    A budget whose file was written by this function with the same settings for the same weights is left as it is
    (status ``up_to_date``); one written by it with other settings or for other weights is refitted and replaced;
    a file it did not write is never replaced (``FileExistsError`` before any work). Files are written atomically.
    ``command``: how it was invoked, recorded in the files.

    Validation: ``validation_draws`` prior draws from a generator seeded with ``validation_seed`` (must differ from
    ``seed``) go through the model's converged PF-ODE (the pilot's integrator and ``pilot_steps``); the sampler runs
    from the same draws on the stored grid (read back from its file, as the pipeline reads it) and on its built-in
    default grid; the errors, the winner and the cost go into the file's ``info["validation"]``. A file that is up to
    date but has no validation with these settings is validated without refitting. Returns one
    :class:`ModelGridFit` per budget.
    """
    import torch

    from .registry import get_sampler
    from .samplers.fixed_grid import GridSampler
    from .samplers.grid_store import save_grid
    from .samplers.grids import optimize_grid
    from .samplers.pilot_grid import (
        _INFO_KEY,
        FIT_DEFAULTS,
        pilot_samples,
        pilot_settings,
        pilot_solver,
        stand_in_mixture,
    )

    folder = getattr(pipeline, "_source_folder", None)
    if not callable(getattr(pipeline, "score_function", None)):
        raise TypeError(f"fit_model_grids: expected a ScorePipeline, found {type(pipeline).__name__}")
    if folder is None or not (Path(folder) / "model_index.json").is_file():
        raise ValueError("fit_model_grids: expected a pipeline loaded from its folder with ScorePipeline.from_pretrained "
                         f"(the grids are stored there), found one without a folder ({folder})")
    folder = Path(folder)
    budgets = _steps(steps)
    for name, value, low in (("num_pilot", num_pilot, 2), ("pilot_steps", pilot_steps, 2), ("seed", seed, 0),
                             ("validation_draws", validation_draws, 2), ("validation_seed", validation_seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"fit_model_grids: expected {name} to be an int >= {low}, found {value!r}")
    if validation_seed == seed:
        raise ValueError(f"fit_model_grids: expected validation_seed to differ from the pilot's seed (held-out draws), "
                         f"found both {seed}")
    check_fit_options(fit_options)
    options = dict(sampler_options or {})
    taken = sorted(set(options) & set(_NOT_METHOD))
    if taken:
        raise ValueError(f"fit_model_grids: {taken} cannot be sampler options here (the budgets are steps=, the grid is "
                         "what is fitted)")
    samplers = {n: get_sampler(sampler, num_steps=n, **options) for n in budgets}  # unknown name or option: an error
    if not isinstance(samplers[budgets[0]], GridSampler) or samplers[budgets[0]].properties.stochastic:
        raise TypeError(f"fit_model_grids: expected a deterministic fixed-grid sampler (e.g. {DEFAULT_SAMPLER!r}), "
                        f"found {sampler!r}")
    for n in budgets:  # a file the tool did not write: refuse before any work
        path = model_grid_path(folder, sampler, n)
        if path.exists() and _read(path) is None:
            raise FileExistsError(f"fit_model_grids: {path} was not written by fit_model_grids; it is left untouched "
                                  "(move it away to fit this budget)")

    pipe = pipeline
    device = torch.device(device or "cpu")
    pipe.to(device)
    process, shape = pipe.spec[0], tuple(pipe.sample_shape)
    dtype = torch.float32 if pipe.unet.dtype in (torch.bfloat16, torch.float16) else pipe.unet.dtype
    hashes = weights_sha256(folder)
    settings = {n: pilot_settings(s, process, shape, num_pilot=num_pilot, pilot_steps=pilot_steps, seed=seed,
                                  **fit_options) for n, s in samplers.items()}
    results: dict[int, ModelGridFit] = {}
    for n in budgets:
        path = model_grid_path(folder, sampler, n)
        record = _read(path) if path.exists() else None
        if record is not None and record["info"]["pilot_grid"] == settings[n] and \
                record["info"][_KEY].get("weights_sha256") == hashes:
            results[n] = ModelGridFit(path, sampler, n, "up_to_date", validation=record["info"].get("validation"))
            logger.info("%s: up to date (same settings, same weights)", path)
    todo = [n for n in budgets if n not in results]
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else logger.info  # messages go to stderr
    score_fn = pipe.score_function()
    if todo:
        first = settings[todo[0]]
        say(f"fit-grid: pilot of {folder}: {num_pilot} draws x {pilot_steps + 1} score evaluations "
            f"({process!r}, {dtype}, {device})")
        t0 = time.perf_counter()
        with torch.no_grad():
            samples, evaluations, calls = pilot_samples(score_fn, process, shape, num_pilot=num_pilot,
                                                        pilot_steps=pilot_steps, batch_size=batch_size, seed=seed,
                                                        device=device, dtype=dtype, progress=progress)
        pilot_seconds = time.perf_counter() - t0
        say(f"fit-grid: stand-in mixture ({first['num_components']} components, {first['covariance']} covariance)")
        mixture = stand_in_mixture(samples, first["num_components"], first["covariance"], seed)
        fit_opts = {**FIT_DEFAULTS, "seed": int(seed), **fit_options}
        for n in todo:
            say(f"fit-grid: fitting {sampler} for {n} steps (optimize_grid on the stand-in)")
            t1 = time.perf_counter()
            fit = optimize_grid(samplers[n], process, mixture=mixture, **fit_opts)
            fit_seconds = time.perf_counter() - t1
            path = model_grid_path(folder, sampler, n)
            mark = {"weights_sha256": hashes, "sampler_options": _method_options(samplers[n].config),
                    "pilot_batch_size": batch_size, "pilot_dtype": str(dtype).replace("torch.", ""),
                    "pilot_device": str(device), "command": command}
            from . import __version__

            mark["score_toolkit_version"] = __version__
            save_grid(path, fit.times, process, sampler=sampler, overwrite=True,
                      info={_INFO_KEY: settings[n], _KEY: mark, "score_evaluations": evaluations,
                            "score_calls": calls, "pilot_seconds": round(pilot_seconds, 3),
                            "fit_seconds": round(fit_seconds, 3)})
            results[n] = ModelGridFit(path, sampler, n, "fitted", fit_seconds)
            say(f"fit-grid: wrote {path} ({fit_seconds:.0f} s)")
    reference = pilot_solver(pilot_steps)
    check = {"draws": validation_draws, "seed": validation_seed,
             "reference": {"sampler": reference.name, **{k: reference.config[k] for k in ("num_steps", "grid",
                                                                                         "to_zero")}}}
    unchecked = [n for n in budgets if (results[n].validation or {}).get("settings") != {
        **check, "built_in_grid": samplers[n].config.get("grid")}]
    if unchecked:
        _validate(results, unchecked, samplers, options, score_fn, process, shape, check, reference, batch_size, device,
                  dtype, say)
    return [results[n] for n in budgets]


def _validate(results, budgets, samplers, options, score_fn, process, shape, check, reference, batch_size, device, dtype,
              say) -> None:
    """Validate the stored grids of ``budgets`` on the model's converged ODE (``reference``, the pilot's integrator;
    see :func:`fit_model_grids`) and add the record to their files."""
    import torch

    from ._io import write_json_atomic
    from .registry import get_sampler

    draws = check["draws"]
    batch = batch_size or draws
    gen = torch.Generator(device="cpu").manual_seed(int(check["seed"]))
    x1 = process.prior_sample((draws, *shape), generator=gen, dtype=dtype).to(device)

    def run(sampler_obj):
        outs, evaluations = [], 0
        for start in range(0, draws, batch):
            out = sampler_obj.sample(score_fn, process, x_init=x1[start:start + batch])
            outs.append(out.samples.detach().double().reshape(out.samples.shape[0], -1))
            evaluations += out.samples.shape[0] * out.nfe
        return torch.cat(outs), evaluations

    say(f"fit-grid: validation: {draws} held-out prior draws (seed {check['seed']}) through the converged ODE "
        f"({reference.config['num_steps']} steps)")
    t0 = time.perf_counter()
    with torch.no_grad():
        ref, ref_evaluations = run(reference)
        if not torch.isfinite(ref).all():
            raise ValueError("fit_model_grids: the validation's converged ODE produced non-finite samples")
        ref_seconds = time.perf_counter() - t0
        dim = ref.shape[1]
        for n in budgets:
            fit = results[n]
            built_in = samplers[n].config.get("grid")
            t1 = time.perf_counter()
            stats, evaluations = {}, 0
            for key, obj in (("model_grid", get_sampler(samplers[n].name, num_steps=n, grid=os.fspath(fit.path),
                                                         **options)), ("built_in", samplers[n])):
                out, used = run(obj)
                evaluations += used
                d = (out - ref).norm(dim=1) / dim ** 0.5
                q = torch.quantile(d, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
                rms = float(d.pow(2).mean().sqrt())
                stats[key] = {k: v if math.isfinite(v) else None for k, v in (("rms", rms), ("median", q[0]),
                                                                                ("q99", q[1]))}
            mine, theirs = stats["model_grid"]["rms"], stats["built_in"]["rms"]
            winner = "model_grid" if mine is not None and (theirs is None or mine < theirs) else "built_in"
            record = json.loads(fit.path.read_text())
            validation = {"settings": {**check, "built_in_grid": built_in}, "model_grid": stats["model_grid"],
                          "built_in": stats["built_in"], "winner": winner,
                          "reference_score_evaluations": ref_evaluations, "reference_seconds": round(ref_seconds, 3),
                          "score_evaluations": evaluations, "seconds": round(time.perf_counter() - t1, 3)}
            record["info"]["validation"] = validation
            write_json_atomic(fit.path, record, indent=1)
            fit.validation = validation
            if fit.status == "up_to_date":
                fit.status = "validated"
            say(f"fit-grid: {fit.path}: rms error to the converged ODE {_fmt(mine)} (this grid) vs {_fmt(theirs)} "
                f"(built-in {built_in!r}): the pipeline uses "
                + ("this grid" if winner == "model_grid" else f"the built-in grid {built_in!r}"))


def _fmt(value) -> str:
    if value is None:
        return "non-finite"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected an rms value (a number or null), found {value!r}")
    return f"{value:.4g}"


@dataclass
class ModelGridChoice:
    """What :func:`model_grid_for` found: ``path`` (the stored grid to use) or ``None``, and why (``reason``);
    ``warning`` is set when a stored grid is there but does not fit."""

    path: Path | None
    reason: str
    warning: str | None = None


def model_grid_for(folder: str | os.PathLike | None, sampler, process, shape: Sequence[int] | None = None) -> ModelGridChoice:
    """The stored grid of ``folder`` for the sampler object ``sampler`` (its name, ``num_steps`` and other options)
    under ``process`` for samples of ``shape`` (one sample's shape; ``None``: not checked), or why there is none. A
    stored grid is used only when it was written by :func:`fit_model_grids` for the same weights (sha256 of the
    weights files), the same process, the same sample shape and the same sampler options other than ``num_steps``
    (e.g. ``order``, ``to_zero``), and won its validation against this sampler's built-in grid. A file that cannot be
    read as such a record gives a warning, never an error: sampling goes on on the built-in grid."""
    from .samplers.fixed_grid import GridSampler

    if folder is None:
        return ModelGridChoice(None, "the pipeline was not loaded from a folder")
    if not isinstance(sampler, GridSampler):
        return ModelGridChoice(None, f"{sampler.name} is not a fixed-grid sampler")
    path = model_grid_path(folder, sampler.name, sampler.config["num_steps"])
    if not path.is_file():
        return ModelGridChoice(None, f"no stored grid {path}")
    record = _read(path)
    if record is None:
        try:
            json.loads(path.read_text())
            why = "was not written by fit_model_grids (no weights hash)"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = f"is not valid JSON ({type(exc).__name__}: {exc})"
        return ModelGridChoice(None, f"{path}", f"{path} {why}: not used; the built-in default grid is used")
    try:
        return _choose(record, path, folder, sampler, process, shape)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return ModelGridChoice(None, f"{path}", f"stored grid {path} not used: its record is malformed "
                               f"({type(exc).__name__}: {exc}); the built-in default grid is used (refit with: "
                               f"score-toolkit fit-grid {folder} --sampler {sampler.name} --steps "
                               f"{sampler.config['num_steps']})")


def _choose(record, path, folder, sampler, process, shape) -> ModelGridChoice:
    mark, settings = record["info"][_KEY], record["info"]["pilot_grid"]
    try:
        hashes = weights_sha256(folder)
    except FileNotFoundError:
        hashes = None
    stored_options = mark.get("sampler_options") or {}
    why = None
    if mark.get("weights_sha256") != hashes:
        why = "it was fitted for other weights (the sha256 of the weights files differs)"
    elif settings.get("process") != repr(process):
        why = f"it was fitted under {settings.get('process')}, this pipeline's process is {process!r}"
    elif shape is not None and [int(v) for v in settings["shape"]] != [int(v) for v in shape]:
        why = f"it was fitted for samples of shape {tuple(settings['shape'])}, these are {tuple(shape)}"
    elif stored_options != _method_options(sampler.config):
        ours = _method_options(sampler.config)
        diff = {k: (stored_options.get(k), ours.get(k)) for k in sorted(set(ours) | set(stored_options))
                if stored_options.get(k) != ours.get(k)}
        why = f"it was fitted for other sampler options (stored, requested: {diff})"
    if why is not None:
        # only a refit for these weights is what fit-grid does for this file; other mismatches need another folder
        hint = (f" (fit one with: score-toolkit fit-grid {folder} --sampler {sampler.name} --steps "
                f"{sampler.config['num_steps']})") if why.startswith("it was fitted for other weights") else ""
        return ModelGridChoice(None, f"{path}", f"stored grid {path} not used: {why}; the built-in default grid is "
                               f"used{hint}")
    validation = record["info"].get("validation")
    if validation is None:  # an interrupted fit-grid leaves a fitted but unvalidated file: not used
        return ModelGridChoice(None, f"the model's grid {path} is not validated; the built-in grid is used "
                               f"('score-toolkit fit-grid {folder}' validates it without refitting)")
    winner = validation["winner"]
    mine, theirs = _fmt(validation["model_grid"]["rms"]), _fmt(validation["built_in"]["rms"])
    if winner not in _WINNERS:
        raise ValueError(f"validation winner {winner!r} is not one of {sorted(_WINNERS)}")
    built_in = validation["settings"]["built_in_grid"]
    if built_in != sampler.config.get("grid"):  # validated against another built-in grid: that decision is stale
        return ModelGridChoice(None, f"the model's grid {path} was validated against the built-in grid {built_in!r}, "
                               f"not this sampler's {sampler.config.get('grid')!r}; the built-in grid is used "
                               f"('score-toolkit fit-grid {folder}' re-validates it without refitting)")
    if winner == "built_in":
        return ModelGridChoice(None, f"the model's validation preferred the built-in grid: rms {theirs} vs {mine} "
                               f"(built-in vs {path}, per coordinate, against the model's converged ODE)")
    return ModelGridChoice(path, f"the model's grid {path} (validated: rms {mine} vs {theirs} for the built-in grid)")
