"""Crash-safe checkpoints of a run: :func:`save_checkpoint` writes ``run_dir/checkpoints/step_XXXXXXX``
through a temporary folder, fsync, a manifest with the size and sha256 of every file and one atomic rename;
:func:`verify_checkpoint` checks a folder against its manifest, :func:`latest_checkpoint` finds the newest
one that verifies, :func:`list_checkpoints` lists them; the oldest beyond ``keep`` are pruned.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

from .._io import fsync_dir, relative_inside, sha256_file, write_json_atomic
from .._warnings import caller_stacklevel
from .ema import EMA

__all__ = ["CHECKPOINT_DIR", "MANIFEST", "save_checkpoint", "verify_checkpoint", "latest_checkpoint", "list_checkpoints",
           "remove_stale_temporaries"]


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


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name (``step_0001400`` -> 1400), or None for any other name."""
    digits = name[len(_CKPT_PREFIX):]
    return int(digits) if name.startswith(_CKPT_PREFIX) and digits.isdigit() else None


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint folder in ``run_dir/checkpoints`` (complete or not), oldest
    first. Temporary folders of interrupted writes are not listed, nor symbolic links (the writer makes real
    folders; a link is the user's, and is never loaded, pruned or moved)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = checkpoint_step(p.name)
        if step is not None and p.is_dir() and not p.is_symlink():
            out.append((step, p))
    return sorted(out)


# the temporary names save_checkpoint and _remove_tree use (nothing else in checkpoints/ is ever removed)
_OWN_TEMPORARY = re.compile(rf"\.(tmp|trash)-{_CKPT_PREFIX}\d{{7}}(-\d+)?")


def remove_stale_temporaries(run_dir) -> list[str]:
    """Remove what interrupted checkpoint writes and removals of an earlier process left in
    ``run_dir/checkpoints`` (``.tmp-step_XXXXXXX``, ``.trash-step_XXXXXXX-PID``: only these names, which only
    :func:`save_checkpoint` creates), so that a crash or a full disk never needs manual cleanup before
    ``--resume``. Call it before a run starts (not while another process writes checkpoints there). Returns
    the removed names."""
    root = Path(run_dir) / CHECKPOINT_DIR
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if _OWN_TEMPORARY.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return sorted(removed)


_NO_SPACE_TEXT = ("no space left", "storagefull", "os error 28", "code: 28", "unexpected pos", "disk quota")
_TOO_LARGE_TEXT = ("file too large", "filetoolarge", "os error 27", "code: 27")


def _write_failure(err: BaseException, folder: Path, step: int) -> BaseException:
    """A clear error for a failed checkpoint write, naming a full disk when that is the cause. Libraries do not
    always keep the errno (torch: "unexpected pos ..." when a write comes up short; safetensors: its own error
    type), so their messages are read too, and the free space is reported."""
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    where = f"writing the checkpoint of step {step} in {folder} failed"
    after = ("the partial checkpoint was removed and the earlier checkpoints are intact; free some space and "
             "continue with --resume")
    if codes & {errno.ENOSPC, errno.EDQUOT} or any(t in text for t in _NO_SPACE_TEXT):
        free_text = f" ({free:,} bytes free)" if free is not None else ""
        return OSError(errno.ENOSPC, f"{where}: no space left on the device{free_text}; {after} "
                                     f"(original error: {type(err).__name__}: {err})")
    if errno.EFBIG in codes or any(t in text for t in _TOO_LARGE_TEXT):
        return OSError(errno.EFBIG, f"{where}: a file exceeded the file-size limit (ulimit -f); {after} "
                                    f"(original error: {type(err).__name__}: {err})")
    return err


def verify_checkpoint(folder) -> tuple[bool, str]:
    """Check a checkpoint against its manifest: every listed file present with its size and sha256.
    Returns ``(ok, reason)``."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False, f"no {MANIFEST} (the write did not complete)"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
            raise TypeError(f"expected an object with a 'files' object, found {type(info).__name__}")
        files = info["files"]
        int(info["step"])
        for name, meta in files.items():
            relative_inside(folder, name, f"{MANIFEST} file entry")
            if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
                raise TypeError(f"expected {{size, sha256}} for {name!r}, found {meta!r}")
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
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
            warnings.warn(f"checkpoint {folder} is unusable ({reason}); falling back to an older one",
                          stacklevel=caller_stacklevel())
    return None


def save_checkpoint(accelerator, run_dir, step: int, *, ema: EMA | None, keep: int, extra_state: Mapping | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically; call on every process.

    ``accelerator.save_state`` writes into a temporary sibling folder; then the main process adds the EMA
    weights (safetensors) and ``trainer_state.json``, fsyncs every file, writes the manifest (step, size
    and sha256 of each file) and renames the folder into place. A crash at any point leaves either no new
    folder or a complete one; the previous checkpoints are untouched. The oldest complete checkpoints
    beyond ``keep`` are then removed.

    A failed write (a full disk, say) removes its temporary folder and raises an ``OSError`` that says "no space
    left" when that is the cause."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / _checkpoint_name(step)
    tmp = root / f".tmp-{_checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(accelerator, tmp, final, root, run_dir, step, ema=ema, keep=keep, extra_state=extra_state)
    except Exception as err:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # no residue: a partial checkpoint only fills the disk
        failure = _write_failure(err, root, step)
        if failure is err:
            raise
        raise failure from err
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator, tmp: Path, final: Path, root: Path, run_dir, step: int, *, ema, keep: int,
                      extra_state) -> None:
    from safetensors.torch import save_file

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
        if p.name.startswith(".trash-") and _OWN_TEMPORARY.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
