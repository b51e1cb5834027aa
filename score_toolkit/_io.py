"""Crash-safe file writing shared by every module that writes files (no torch import).

:func:`atomic_write` writes into a temporary file in the target's folder, gives it the permissions a
plain ``open(path, "w")`` would have (``0666 & ~umask``; temporary files are created private), fsyncs it,
renames it over the target (atomic on POSIX and Windows) and fsyncs the folder, so that a crash or a
``kill -9`` at any point leaves either the old file or the new one, never a mixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["relative_inside", "remove_written", "probe_writable", "atomic_write", "process_exists", "on_own_file_system", "write_json_atomic", "write_text_atomic", "fsync_dir", "sha256_file", "default_file_mode",
           "replace_files"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a small file in ``folder``; raises the ``OSError`` if that is not possible (a check to
    run before long work whose results will be written there)."""
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(probe)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *, mkdir: bool = True) -> Path:
    """Call ``write(tmp_path)`` to produce the file's contents, then move it over ``path`` atomically.

    ``write`` gets the name of a temporary file in the same folder (so the rename cannot cross file
    systems) and must write the complete contents to it. On any error the temporary file is removed and the
    previous ``path``, if any, is left untouched. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return path


def process_exists(pid: int) -> bool:
    """Whether a process of id ``pid`` runs on this machine (one of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def on_own_file_system(folder: str | os.PathLike) -> bool:
    """Whether the existing folder ``folder`` is on another file system than its parent (a mount point, such as a
    container's volume): a temporary sibling could not then be renamed into it."""
    folder = Path(folder)
    return folder.is_dir() and os.stat(folder).st_dev != os.stat(folder.parent).st_dev


def replace_files(source: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Move every file of the folder ``source`` (written completely, e.g. by a library's ``save_pretrained``) to the
    same relative path in ``target``: each is fsynced, given the permissions of a plain ``open``, and renamed over its
    target in one step, so that an interruption leaves every file of ``target`` whole (the old one or the new one).
    Other files of ``target`` are left as they are. Files in subfolders go first and the top-level ones (e.g. a
    pipeline's ``model_index.json``) last. ``source`` must be on the same file system. Returns the target paths."""
    source, target = Path(source), Path(target)
    moved, folders = [], set()
    mode = default_file_mode()
    for p in sorted(source.rglob("*"), key=lambda q: (-len(q.relative_to(source).parts), q)):
        if p.is_symlink() or not p.is_file():
            continue
        dest = target / p.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        os.replace(p, dest)
        moved.append(dest)
        folders.add(dest.parent)
    for folder in sorted(folders):
        fsync_dir(folder)
    return moved


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``dump_kwargs`` go to :func:`json.dump`, e.g. ``indent``)."""
    dump_kwargs.setdefault("indent", 2)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, **dump_kwargs)
            f.write("\n")

    return atomic_write(path, write)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def relative_inside(root: str | os.PathLike, name: Any, what: str) -> Path:
    """``root / name`` for a relative path ``name`` read from a file of ours (a manifest), after checking that it
    stays inside ``root``: an absolute path, ``..`` or a symbolic link leading out is a ``ValueError``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what}: expected a relative file name, found {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what}: expected a path inside {root}, found {name!r}")
    root_real = Path(os.path.realpath(root))
    target_real = Path(os.path.realpath(Path(root) / rel))
    if target_real != root_real and root_real not in target_real.parents:
        raise ValueError(f"{what}: expected a path inside {root}, found {name!r} (it leads to {target_real})")
    return Path(root) / rel


def remove_written(root: str | os.PathLike, names: list[str], *, prune: tuple[str, ...] = ()) -> None:
    """Remove the files ``names`` (relative to ``root``) that this tool wrote and recorded, and nothing else:
    each is checked to stay inside ``root``; a folder in ``prune`` (relative to ``root``) is removed afterwards
    only if it is then empty. Missing files are fine."""
    for name in names:
        path = relative_inside(root, name, "a file to remove")
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
    for folder in prune:
        try:
            (Path(root) / folder).rmdir()
        except OSError:  # not empty (holds files we did not write), or not there
            pass
