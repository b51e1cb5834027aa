"""Validating a run before any work: :func:`prepare_run` checks the config, builds the components, and checks
the output folder (writable; with ``resume`` a complete checkpoint and a compatible saved config, without it
no checkpoint, and no run records other than those of an earlier run that saved no checkpoint) and the export
folder (writable, not inside the run's checkpoints).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._io import probe_writable, process_exists
from .._warnings import caller_stacklevel
from .checkpoints import (
    CHECKPOINT_DIR,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
)
from .components import Components, build_components
from .config import ConfigError, RunConfig, _check_export_config, _check_train_config

__all__ = ["prepare_run"]


# keys that may change between a run and its resume
_RESUME_MUTABLE = {"output_dir", "train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                   "train.progress", "train.log_with", "train.mixed_precision", "train.compile",
                   "train.gradient_checkpointing", "export"}


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in ("data.options", "process.options", "model.options", "objective.options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_resume_compatible(saved: Mapping, current: Mapping) -> None:
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in _RESUME_MUTABLE or key.split(".")[0] in _RESUME_MUTABLE:
            continue
        if json.dumps(a.get(key), sort_keys=True) != json.dumps(b.get(key), sort_keys=True):
            diffs.append(f"{key}: run has {a.get(key)!r}, config has {b.get(key)!r}")
    if diffs:
        raise ConfigError(
            "cannot resume: the config differs from the run's saved config.json in keys that change the model "
            "(only train.steps, checkpoint_every, keep_checkpoints, log_every, progress, log_with and export.* may "
            "change):\n  " + "\n  ".join(diffs)
        )


#: the files a run writes at the top of its folder (besides checkpoints/, logs/ and the export)
RUN_RECORDS = ("config.json", "metrics.jsonl", "commands.txt")


def _is_run_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON
        return False
    return isinstance(saved, dict) and {"output_dir", "data", "model", "train"} <= set(saved)


def _check_new_run_records(run_dir: Path) -> None:
    """A new run (no checkpoint in ``run_dir``) starts ``metrics.jsonl`` and ``commands.txt`` afresh and writes
    ``config.json``: allowed over the records of an earlier run (its ``config.json`` is a run config) that saved no
    checkpoint (killed before its first one, or its checkpoints removed), with a warning; files of those names
    next to no run config are not a run's and are an error (they would be appended to or replaced)."""
    present = [name for name in RUN_RECORDS if os.path.lexists(run_dir / name)]
    if not present:
        return
    if _is_run_config(run_dir / "config.json"):
        warnings.warn(f"output_dir {run_dir} holds the records of an earlier run that has no checkpoint "
                      f"({', '.join(present)}): this new run replaces them", stacklevel=caller_stacklevel())
        return
    raise ConfigError(
        f"output_dir {run_dir} holds {', '.join(present)}, files a training run writes, but no run config.json (they "
        f"were not written by a run): move them away or choose another output_dir"
    )


#: the file that names the process training in a run folder (written by the main process while it trains)
RUN_LOCK = ".training.json"


def _other_run(run_dir: Path) -> str | None:
    """The process, on this machine, that is training in ``run_dir`` now (from its :data:`RUN_LOCK`), or None: the
    lock of a process that is gone (killed), of this process, or of another machine (not checkable) is no run."""
    import socket

    try:
        lock = json.loads((run_dir / RUN_LOCK).read_text(encoding="utf-8"))
        pid, host = int(lock["pid"]), str(lock["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if host != socket.gethostname() or pid == os.getpid() or not process_exists(pid):
        return None
    return f"process {pid}"


def claim_run(run_dir: Path) -> None:
    """Record this (main) process as the one training in ``run_dir``; :func:`release_run` removes the record. Checked
    again here (a run that started since :func:`prepare_run` checked, e.g. a job submitted twice, is refused)."""
    import socket

    from .._io import write_json_atomic

    other = _other_run(run_dir)
    if other is not None:
        raise ConfigError(_busy(run_dir, other))
    write_json_atomic(run_dir / RUN_LOCK, {"pid": os.getpid(), "host": socket.gethostname()})


def _busy(run_dir: Path, other: str) -> str:
    return (f"output_dir {run_dir} is being trained in by {other} on this machine ({run_dir / RUN_LOCK}): wait for it "
            f"to end or stop it, or choose another output_dir (if that process is not training, delete {RUN_LOCK})")


def release_run(run_dir: Path) -> None:
    if _other_run(run_dir) is None:
        (run_dir / RUN_LOCK).unlink(missing_ok=True)


def _check_checkpoint_names(run_dir: Path) -> None:
    """A symbolic link or a file under a checkpoint's name (``checkpoints/step_XXXXXXX``) is not the writer's: it is
    never loaded or pruned, and the run is refused rather than move it away when it saves that step."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return
    foreign = sorted(p.name for p in root.iterdir()
                     if checkpoint_step(p.name) is not None and (p.is_symlink() or not p.is_dir()))
    if foreign:
        raise ConfigError(f"{root} holds {', '.join(foreign)} under the checkpoint writer's names, but not as folders it "
                          f"wrote (a symbolic link or a file): move them away or choose another output_dir")


def _check_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir}: cannot create it: {err}") from err
    if not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a folder")
    try:
        probe_writable(run_dir)
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir} is not writable: {err}") from err


def prepare_run(config: RunConfig | Mapping[str, Any], *, resume: bool = False) -> tuple[Components, Path, Path | None]:
    """Validate a run without starting it: the config, the components (:func:`build_components`) and the
    output folder. Returns ``(components, run_dir, checkpoint to resume from or None)``."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    if not cfg.output_dir:
        raise ConfigError("output_dir: expected the folder of the run, found none (set output_dir or --output-dir)")
    if isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
        # Accelerate's set_seed also seeds numpy, whose seeds are 32-bit
        raise ConfigError(f"seed: expected an int in [0, 2**32 - 1] = [0, 4294967295], found {cfg.seed!r}")
    _check_train_config(cfg.train)
    run_dir = Path(cfg.output_dir)
    other = _other_run(run_dir)
    if other is not None:  # checked first: nothing of a running run (its checkpoint being written) is touched
        raise ConfigError(_busy(run_dir, other))
    ckpt = None
    if resume:
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume: the run folder {run_dir} does not exist")
        if not list_checkpoints(run_dir):
            raise ConfigError(f"cannot resume: {run_dir / CHECKPOINT_DIR} holds no checkpoint")
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"cannot resume: no checkpoint in {run_dir / CHECKPOINT_DIR} passes verification")
        saved = run_dir / "config.json"
        if _is_run_config(saved):
            _check_resume_compatible(json.loads(saved.read_text(encoding="utf-8")), cfg.to_dict())
        else:
            warnings.warn(f"{saved} is missing or not a run config: the config cannot be checked against the run's "
                          f"(a changed network, data or objective would go unnoticed)", stacklevel=caller_stacklevel())
        step = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["step"]
        if step > cfg.train.steps:
            raise ConfigError(f"cannot resume: the checkpoint is at step {step}, past train.steps = {cfg.train.steps}")
    elif list_checkpoints(run_dir):
        raise ConfigError(
            f"output_dir {run_dir} already holds checkpoints of a run: pass --resume to continue it, or choose "
            f"another output_dir"
        )
    else:
        _check_new_run_records(run_dir)
    _check_output_dir(run_dir)
    _check_checkpoint_names(run_dir)
    remove_stale_temporaries(run_dir)
    comps = build_components(cfg)
    _check_export_config(cfg.export)
    if cfg.export.enabled:
        folder = Path(cfg.export.folder) if cfg.export.folder else run_dir / "pipeline"
        _check_export_not_overlapping(folder, run_dir)
        if folder.exists() and not cfg.export.overwrite:
            raise ConfigError(f"export folder {folder} already exists: remove it or set export.overwrite = true")
        if folder.is_dir():
            from ..hub import foreign_export_files

            foreign = foreign_export_files(folder)
            if foreign:
                raise ConfigError(f"export folder {folder} holds files an export does not write "
                                  f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
                                  f"export.overwrite replaces an earlier export only; move them away or choose "
                                  f"another export.folder")
        _check_export_folder(folder)
    return comps, run_dir, ckpt


def _check_export_not_overlapping(folder: Path, run_dir: Path) -> None:
    """The export replaces its folder as a whole (with ``export.overwrite``): it must not be the run folder, hold
    it (an ancestor: the run and its siblings would go), or sit in the run's own files (checkpoints, logs)."""
    exp, run = Path(os.path.realpath(folder)), Path(os.path.realpath(run_dir))
    problem = None
    if exp == run:
        problem = "is the run folder itself"
    elif exp in run.parents:
        problem = "holds the run folder (replacing it would delete the run and everything beside it)"
    elif run in exp.parents:
        first = exp.relative_to(run).parts[0]
        if first in (CHECKPOINT_DIR, "logs", "config.json", "metrics.jsonl", "commands.txt"):
            problem = f"is inside the run's own {first}"
    if problem is not None:
        raise ConfigError(
            f"export folder {folder} {problem} ({run_dir}); choose a folder outside the run, or leave export.folder "
            f"unset for {run_dir / 'pipeline'}"
        )


def _check_export_folder(folder: Path) -> None:
    """The export is written to a temporary sibling folder and renamed: its parent must be a writable folder
    (checked now, not after the training)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"export folder {folder} exists and is not a folder")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"export folder {folder}: cannot create the folder it goes in: {err}") from err
    try:
        probe_writable(parent)
    except OSError as err:
        raise ConfigError(f"export folder {folder}: {parent} is not writable: {err}") from err
