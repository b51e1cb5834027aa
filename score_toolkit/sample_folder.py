"""The folder :func:`~score_toolkit.distributed.sample_to_folder` writes, and reading it back
(:func:`load_samples`). Written from the main process only:

* ``samples.safetensors``: the samples (tensor ``samples``, (N, ...), in model space; run record in metadata);
* ``samples.png``: an image grid (image data, values in [-1, 1]), or a scatter plot next to a 2-D histogram
  (2-D points); no picture for other shapes;
* ``manifest.json``: the run (checkpoint fingerprint, sampler and options, seed, shapes) and its shards;
* with ``image_files=True`` (images only): ``images/000000.png ...`` (one 8-bit PNG per sample) and
  ``samples.npz`` (``arr_0``: uint8 (N, H, W, C)), the inputs FID tools read (clean-fid and torch-fidelity take
  the folder, guided-diffusion's evaluator the ``.npz``). Pixels are ``round((x + 1) * 127.5)`` clipped to
  0..255, as diffusers' ``numpy_to_pil``.

Shards: the run is cut into shards of ``shard_size`` samples (a multiple of ``batch_size``); each complete
shard is written atomically (``shards/shard-NNNNN.safetensors`` and an updated manifest, :func:`write_shard`).
A re-run with the same settings skips the complete shards (:func:`prepare_folder` reads which); once all are
there they are merged into ``samples.safetensors`` and removed (:func:`finish`). A run with other settings in
the same folder is refused unless ``overwrite=True``.

Nothing the run did not write is ever deleted or replaced: only the files recorded in a manifest of this
module (the shards, ``samples.safetensors``, ``samples.png``, the image files, the manifest) are removed, with
or without ``overwrite``; ``shards/`` is removed only when it is then empty. A file already at a shard's path
that the manifest does not record, ``samples.safetensors`` or ``samples.png`` without a manifest, and a
``manifest.json`` that is not this module's (or is unreadable) are errors, also with ``overwrite``. A shard and
the image files are recorded in the manifest before they are written, so that a run killed while writing them
finds them recorded as its own (and writes them again) when it is re-run. Shard paths read from a manifest must be the names written here
(``shards/shard-NNNNN.safetensors``); anything else (``../x``, an absolute path) is a corrupt manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, probe_writable, relative_inside, remove_written, sha256_file, write_json_atomic

__all__ = ["load_samples", "to_uint8_images", "prepare_folder", "write_shard", "finish", "remove_if_nothing_kept",
           "MANIFEST_NAME", "SAMPLES_NAME", "PICTURE_NAME", "IMAGES_DIR", "NPZ_NAME"]

MANIFEST_NAME = "manifest.json"
SAMPLES_NAME = "samples.safetensors"
PICTURE_NAME = "samples.png"
SHARD_DIR = "shards"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
_FORMAT = "score_toolkit.sample_run"


def load_samples(folder_or_file: str | os.PathLike) -> torch.Tensor:
    """The samples written by :func:`sample_to_folder` (a folder or its ``samples.safetensors``). A file that is not
    a readable safetensors file holding a tensor ``samples`` is a ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder_or_file)
    if path.is_dir():
        path = path / SAMPLES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"expected the samples file {path}, found nothing there")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"corrupt or truncated samples file {path} (expected a safetensors file): {err}") from err
    if "samples" not in tensors:
        raise ValueError(f"expected a tensor 'samples' in {path}, found {sorted(tensors) or 'no tensors'}")
    return tensors["samples"]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_json_atomic(path, data, indent=1, default=str)


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable run manifest {path} (expected JSON; this module writes it atomically, so it may "
                         f"not be ours): {err}; it is not replaced, also not with overwrite: move it away or choose "
                         f"another folder") from err
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a score_toolkit sample-run manifest (expected format {_FORMAT!r}); it is not "
                         f"replaced, also not with overwrite: move it away or choose another folder")
    return manifest


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot write samples to {out}: it is a file, expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as err:  # OSError(errno, ...) is PermissionError, NotADirectoryError, ... as the errno says
        raise OSError(err.errno, f"cannot write samples to the folder {out}: {err.strerror or err}") from err


def _shard_name(s: int) -> str:
    return f"{SHARD_DIR}/shard-{s:05d}.safetensors"


def _recorded_shards(manifest: Mapping[str, Any], path: Path) -> dict[int, dict[str, Any]]:
    """The shard records of a manifest, checked: each key a shard number, each file exactly the name this module
    writes for it (so that a manifest can never point outside the folder)."""
    shards = manifest.get("shards", {})
    if not isinstance(shards, Mapping):
        raise ValueError(f"corrupt run manifest {path}: expected 'shards' to be an object, found {type(shards).__name__}; "
                         f"pass overwrite=True (--overwrite) to start the run again")
    out = {}
    for key, rec in shards.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(rec, Mapping)):
            raise ValueError(f"corrupt run manifest {path}: expected shard records {{number: {{...}}}}, found {key!r}: {rec!r}")
        s = int(key)
        if rec.get("file") != _shard_name(s):
            raise ValueError(f"corrupt run manifest {path}: shard {s}: expected the file {_shard_name(s)!r}, "
                             f"found {rec.get('file')!r}; pass overwrite=True (--overwrite) to start the run again")
        relative_inside(path.parent, rec["file"], f"run manifest {path}, shard {s}")
        out[s] = dict(rec)
    return out


def _image_file_names(manifest: Mapping[str, Any] | None) -> list[str]:
    """The per-sample PNGs and the .npz an earlier run recorded, or is writing (names this module writes, nothing
    else)."""
    rec = (manifest or {}).get("image_files")
    if not isinstance(rec, Mapping) or not isinstance(rec.get("count"), int) or rec["count"] < 0:
        return []
    return [_png_name(i) for i in range(rec["count"])] + [NPZ_NAME]


def _png_name(i: int) -> str:
    return f"{IMAGES_DIR}/{i:06d}.png"


def _refuse_unrecorded_outputs(out: Path) -> None:
    """``samples.safetensors`` / ``samples.png`` without a run manifest were not written by this module."""
    for name in (SAMPLES_NAME, PICTURE_NAME):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists without a run manifest: it was not written by sample_to_folder "
                                  f"and is not replaced, also not with overwrite; move it away or choose another folder")


def _clear(out: Path) -> None:
    """Remove what an earlier run recorded in its manifest (shards, merged samples, picture, image files,
    manifest), nothing else. A manifest that is not ours and outputs without a manifest are errors."""
    manifest = _read_manifest(out)
    if manifest is None:
        _refuse_unrecorded_outputs(out)
        return
    try:
        recorded = _recorded_shards(manifest, out / MANIFEST_NAME)
    except ValueError:  # our manifest, edited: the shards it names are not known to be ours
        recorded = {}
    remove_written(out, [rec["file"] for rec in recorded.values()] + [SAMPLES_NAME, PICTURE_NAME]
                   + _image_file_names(manifest) + [MANIFEST_NAME], prune=(SHARD_DIR, IMAGES_DIR))


def _check_subfolders(out: Path, image_files: bool) -> None:
    """``shards/`` (and ``images/`` when written) are written as real folders inside ``out`` (a manifest never names a
    path leading out of it): a symbolic link or a file in their place is refused before any work."""
    for name in (SHARD_DIR, IMAGES_DIR) if image_files else (SHARD_DIR,):
        p = out / name
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            kind = "a symbolic link" if p.is_symlink() else "a file"
            raise FileExistsError(f"{p} is {kind}: sample_to_folder writes {name}/ as a folder inside {out} (the files "
                                  f"it records never lead out of it); move it away or choose another folder")


def prepare_folder(out: Path, run: dict[str, Any], num_shards: int, overwrite: bool,
                   image_files: bool = False) -> dict[str, Any]:
    _check_writable(out)
    _check_subfolders(out, image_files)
    manifest = _read_manifest(out) if not overwrite else None
    if overwrite:
        _clear(out)
    elif manifest is None:
        _refuse_unrecorded_outputs(out)
    if manifest is not None and manifest.get("run") != run:
        old = manifest.get("run") or {}
        diff = [f"{k}: {old.get(k)!r} -> {run[k]!r}" for k in run if old.get(k) != run[k]]
        raise ValueError(
            f"the folder {out} holds another sampling run ({'; '.join(diff) or 'different settings'}); "
            f"choose another folder or pass overwrite=True (--overwrite) to replace it"
        )
    if image_files:
        _check_image_files(out, manifest)
    if manifest is None:
        manifest = {"format": _FORMAT, "version": 1, "run": run, "shards": {}, "complete": False}
        _write_json(out / MANIFEST_NAME, manifest)
    if manifest.get("complete"):
        samples = out / SAMPLES_NAME
        if samples.is_file() and sha256_file(samples) == manifest.get("samples_sha256"):
            return {"done": list(range(num_shards)), "complete": True}
        manifest.update(complete=False)  # the merged file is gone or changed: sample again (shards still there count)
        _write_json(out / MANIFEST_NAME, manifest)
    done = []
    for s, rec in _recorded_shards(manifest, out / MANIFEST_NAME).items():
        path = out / rec["file"]
        if s < num_shards and path.is_file() and sha256_file(path) == rec.get("sha256"):
            done.append(s)
    for s in range(num_shards):  # never replace a file this run did not write
        if s not in done and (out / _shard_name(s)).exists() and str(s) not in manifest.get("shards", {}):
            raise FileExistsError(
                f"{out / _shard_name(s)} exists but the run manifest does not record it (it was not written by this "
                f"run): move it away or choose another folder"
            )
    return {"done": sorted(done), "complete": False}


def write_shard(out: Path, s: int, blocks: list[tuple[int, int]], gathered, num_processes: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    start, stop = blocks[0][0], blocks[-1][1]
    parts = sorted({b0: (b0, x, n, r) for b0, x, n, r in gathered}.values(), key=lambda p: p[0])
    samples = torch.cat([p[1] for p in parts])
    expected = list(range(start, stop))
    got = [i for b0, x, _, _ in parts for i in range(b0, b0 + x.shape[0])]
    if got != expected:  # pragma: no cover - guards the block bookkeeping
        raise RuntimeError(f"shard {s}: gathered indices do not cover {start}..{stop - 1}")
    (out / SHARD_DIR).mkdir(exist_ok=True)
    name = _shard_name(s)
    path = out / name
    manifest = _read_manifest(out)
    # recorded (without a checksum: not complete) before it is written, so that a kill after the write and before
    # the record below leaves a file the re-run knows as its own
    manifest["shards"][str(s)] = {"file": name, "start": start, "stop": stop, "sha256": None}
    _write_json(out / MANIFEST_NAME, manifest)
    try:
        atomic_write(path, lambda tmp: save_file({"samples": samples.contiguous()}, tmp,
                                                  metadata={"start": str(start), "stop": str(stop)}))
    except BaseException:
        if not path.exists():  # nothing was written (atomic_write removed its temporary file): no record either
            del manifest["shards"][str(s)]
            _write_json(out / MANIFEST_NAME, manifest)
        raise
    ranks: dict[str, int] = {}
    for _, x, _, r in parts:
        ranks[str(r)] = ranks.get(str(r), 0) + int(x.shape[0])
    manifest["shards"][str(s)] = {"file": name, "start": start, "stop": stop, "sha256": sha256_file(path),
                                  "num_processes": num_processes, "samples_per_rank": ranks,
                                  "nfe_per_batch": [int(p[2]) for p in parts]}
    _write_json(out / MANIFEST_NAME, manifest)
    return {"nfe": [int(p[2]) for p in parts]}


def to_uint8_images(samples: torch.Tensor):
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C): ``round((x + 1) * 127.5)`` clipped to 0..255."""
    x = ((samples.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _check_image_files(out: Path, manifest: Mapping[str, Any] | None) -> None:
    """``images/`` and ``samples.npz`` may hold only what ``manifest`` records (checked before the sampling and again
    before writing): a file this run did not write is never replaced."""
    ours = set(_image_file_names(manifest))
    folder = out / IMAGES_DIR
    if folder.exists():
        foreign = sorted(p.name for p in folder.iterdir() if f"{IMAGES_DIR}/{p.name}" not in ours)
        if foreign:
            raise FileExistsError(f"{folder} holds files this run did not write ({foreign[:3]}...): move them away "
                                  f"or choose another folder")
    if (out / NPZ_NAME).exists() and NPZ_NAME not in ours:
        raise FileExistsError(f"{out / NPZ_NAME} exists and was not written by this run: move it away")


def _write_image_files(out: Path, samples: torch.Tensor, manifest: dict[str, Any]) -> None:
    import io

    import numpy as np
    from PIL import Image

    _check_image_files(out, manifest)
    folder = out / IMAGES_DIR
    arrays = to_uint8_images(samples)
    old = _image_file_names(manifest)
    # recorded before they are written (the larger of the old and new counts: all of those names are ours), so that
    # a run killed midway finds them as its own when it is re-run
    old_count = (manifest.get("image_files") or {}).get("count", 0) if old else 0
    manifest["image_files"] = {"count": max(old_count, len(arrays)), "folder": IMAGES_DIR, "npz": NPZ_NAME,
                               "complete": False}
    _write_json(out / MANIFEST_NAME, manifest)
    folder.mkdir(exist_ok=True)
    for i, arr in enumerate(arrays):
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        atomic_write(out / _png_name(i), lambda tmp, img=img: img.save(tmp, format="PNG"))
    stale = [n for n in old if n.startswith(f"{IMAGES_DIR}/") and int(n[len(IMAGES_DIR) + 1:-4]) >= len(arrays)]
    remove_written(out, stale)

    def save_npz(tmp):
        buf = io.BytesIO()
        np.savez(buf, arr_0=arrays)
        Path(tmp).write_bytes(buf.getvalue())

    atomic_write(out / NPZ_NAME, save_npz)
    manifest["image_files"] = {"count": len(arrays), "folder": IMAGES_DIR, "npz": NPZ_NAME, "complete": True}
    _write_json(out / MANIFEST_NAME, manifest)


def finish(out: Path, num_shards: int, max_grid: int, image_files: bool = False) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    manifest = _read_manifest(out)
    samples_path = out / SAMPLES_NAME
    if not manifest.get("complete"):
        recorded = _recorded_shards(manifest, out / MANIFEST_NAME)
        shards = [load_file(str(out / recorded[s]["file"]))["samples"] for s in range(num_shards)]
        samples = torch.cat(shards).contiguous()
        meta = {"format": _FORMAT, "run": json.dumps(manifest["run"], default=str)}
        atomic_write(samples_path, lambda tmp: save_file({"samples": samples}, tmp, metadata=meta))
        manifest.update(complete=True, samples_sha256=sha256_file(samples_path))
        _write_json(out / MANIFEST_NAME, manifest)
    else:
        samples = load_file(str(samples_path))["samples"]
    if manifest["shards"]:  # merged (now, or by a run killed before it removed them): the shard files go
        recorded = _recorded_shards(manifest, out / MANIFEST_NAME)
        remove_written(out, [rec["file"] for rec in recorded.values()], prune=(SHARD_DIR,))
        # keep what the records say about the run, but no path to a deleted file
        manifest["merged_shards"] = {k: {f: v for f, v in rec.items() if f != "file"} for k, rec in manifest["shards"].items()}
        manifest["shards"] = {}
        _write_json(out / MANIFEST_NAME, manifest)
    picture = _write_picture(out / PICTURE_NAME, samples, max_grid)
    if image_files:
        _write_image_files(out, samples, _read_manifest(out))
    return {"picture": str(picture) if picture else None}


def _write_picture(path: Path, samples: torch.Tensor, max_grid: int) -> Path | None:
    """An image grid (Pillow only) or, for 2-D points, a scatter next to a histogram (matplotlib: without it the
    picture is skipped with a warning, the samples are written all the same)."""
    from . import plotting as P

    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        return P.save_png(P.image_grid(samples[:max_grid].float(), value_range=(-1.0, 1.0)), path)
    if samples.ndim == 2 and samples.shape[1] == 2:
        grid = P.figure_grid_or_warn(2, f"no {path.name} for the 2-D samples")
        if grid is None:
            return None
        fig, axes = grid
        pts = samples.double()
        finite = pts[torch.isfinite(pts).all(1)]
        lo = float(torch.quantile(finite, 0.005)) if finite.numel() else -1.0
        hi = float(torch.quantile(finite, 0.995)) if finite.numel() else 1.0
        pad = 0.1 * max(hi - lo, 1e-6)
        extent = (lo - pad, hi + pad, lo - pad, hi + pad)
        P.scatter_panel(finite, extent, title="samples", ax=axes[0])
        P.histogram_panel(finite, extent, title="histogram", ax=axes[1])
        return P.save_png(fig, path)
    return None


def remove_if_nothing_kept(out: Path, created: bool) -> None:
    """After a failed run: remove the manifest if no complete shard is kept for resuming, and the folder too if
    this run created it and nothing else is in it."""
    try:
        manifest = _read_manifest(out)
    except (ValueError, OSError):
        return
    try:
        recorded = _recorded_shards(manifest, out / MANIFEST_NAME) if manifest is not None else {}
    except ValueError:
        return
    if manifest is not None and (manifest.get("complete") or any(rec.get("sha256") for rec in recorded.values())):
        return
    # no complete shard (records of shards being written at most): their files, if any, and the manifest go
    remove_written(out, [rec["file"] for rec in recorded.values()] + [MANIFEST_NAME], prune=(SHARD_DIR,))
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
