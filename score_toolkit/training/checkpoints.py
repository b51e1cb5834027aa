"""Crash-safe checkpoints of a run: :func:`save_checkpoint` writes ``run_dir/checkpoints/step_XXXXXXX``
through a temporary folder, fsync, a manifest with the size and sha256 of every file and one atomic rename;
:func:`verify_checkpoint` checks a folder against its manifest, :func:`latest_checkpoint` finds the newest
one that verifies, :func:`list_checkpoints` lists them; the oldest beyond ``keep`` are pruned.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

from .._io import fsync_dir, sha256_file, write_json_atomic
from .ema import EMA

__all__ = ["CHECKPOINT_DIR", "MANIFEST", "save_checkpoint", "verify_checkpoint", "latest_checkpoint", "list_checkpoints"]


CHECKPOINT_DIR = "checkpoints"
MANIFEST = "MANIFEST.json"
_CKPT_PREFIX = "step_"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=2, sort_keys=True, default=str)


def _checkpoint_name(step: int) -> str:
    return f"{_CKPT_PREFIX}{step:07d}"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint folder in ``run_dir/checkpoints`` (complete or not), oldest
    first. Temporary folders of interrupted writes are not listed."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_CKPT_PREFIX) and p.name[len(_CKPT_PREFIX):].isdigit():
            out.append((int(p.name[len(_CKPT_PREFIX):]), p))
    return sorted(out)


def verify_checkpoint(folder) -> tuple[bool, str]:
    """Check a checkpoint against its manifest: every listed file present with its size and sha256.
    Returns ``(ok, reason)``."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False, f"no {MANIFEST} (the write did not complete)"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        files = info["files"]
        int(info["step"])
    except (ValueError, KeyError, TypeError) as err:
        return False, f"unreadable {MANIFEST}: {err}"
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return False, f"file {name} listed in the manifest is missing"
        if p.stat().st_size != meta["size"]:
            return False, f"file {name} has {p.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if sha256_file(p) != meta["sha256"]:
            return False, f"file {name} does not match its sha256 in the manifest (corrupt)"
    return True, "ok"


def latest_checkpoint(run_dir, *, warn: bool = True) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose manifest verifies, or None. Newer checkpoints that fail
    verification are skipped with a warning naming the reason."""
    for _step, folder in reversed(list_checkpoints(run_dir)):
        ok, reason = verify_checkpoint(folder)
        if ok:
            return folder
        if warn:
            warnings.warn(f"checkpoint {folder} is unusable ({reason}); falling back to an older one", stacklevel=2)
    return None


def save_checkpoint(accelerator, run_dir, step: int, *, ema: EMA | None, keep: int, extra_state: Mapping | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically; call on every process.

    ``accelerator.save_state`` writes into a temporary sibling folder; then the main process adds the EMA
    weights (safetensors) and ``trainer_state.json``, fsyncs every file, writes the manifest (step, size
    and sha256 of each file) and renames the folder into place. A crash at any point leaves either no new
    folder or a complete one; the previous checkpoints are untouched. The oldest complete checkpoints
    beyond ``keep`` are then removed."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / _checkpoint_name(step)
    tmp = root / f".tmp-{_checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        state = {"step": int(step), "ema_updates": ema.num_updates if ema is not None else None,
                 "num_processes": accelerator.num_processes, **(extra_state or {})}
        with open(tmp / "trainer_state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync_file(p)
                files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump({"step": int(step), "complete": True, "files": files}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # an unusable checkpoint of the same step from an earlier attempt
            _remove_tree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        _prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _remove_tree(path: Path) -> None:
    # rename first, so a crash during the removal never leaves a half-deleted folder under a checkpoint name
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune_checkpoints(run_dir, keep: int) -> None:
    root = Path(run_dir) / CHECKPOINT_DIR
    complete = [(s, p) for s, p in list_checkpoints(run_dir) if (p / MANIFEST).is_file()]
    for _, p in complete[: max(0, len(complete) - keep)]:
        _remove_tree(p)
    for p in root.iterdir():
        if p.name.startswith(".trash-"):
            shutil.rmtree(p, ignore_errors=True)
