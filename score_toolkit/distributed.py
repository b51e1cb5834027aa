"""Sampling to a folder, on one process or many (Accelerate), in resumable shards, reproducible bit for bit.

:func:`sample_to_folder` draws ``num_samples`` samples of a :class:`~score_toolkit.pipeline.ScorePipeline` and
writes, from the main process only:

* ``samples.safetensors``: the samples (tensor ``samples``, (N, ...), in model space; run record in metadata);
* ``samples.png``: an image grid (image data, values in [-1, 1]), or a scatter plot next to a 2-D histogram
  (2-D points); no picture for other shapes;
* ``manifest.json``: the run (checkpoint fingerprint, sampler and options, seed, shapes) and its shards;
* with ``image_files=True`` (images only): ``images/000000.png ...`` (one 8-bit PNG per sample) and
  ``samples.npz`` (``arr_0``: uint8 (N, H, W, C)), the inputs FID tools read (clean-fid and torch-fidelity take
  the folder, guided-diffusion's evaluator the ``.npz``). Pixels are ``round((x + 1) * 127.5)`` clipped to
  0..255, as diffusers' ``numpy_to_pil``.

How samples are made (why the output is identical for any number of processes):

* Sample ``i`` (global index) gets its own ``torch.Generator`` seeded by ``(seed, i)`` through numpy's
  ``SeedSequence`` (entropy ``seed``, spawn key ``(i,)``: :func:`score_toolkit._utils.per_sample_generators`), so
  that no two (seed, index) pairs share a stream, for its initial noise and every step's noise.
* Indices are grouped into blocks of ``batch_size`` consecutive indices (block ``b`` holds indices
  ``b * batch_size ...``); a block is always sampled as one sampler batch, whatever process draws it. The
  blocks of a shard are split across processes (``accelerator.split_between_processes``), drawn, gathered,
  sorted by index, and the main process writes the shard (the samples travel as tensors, gathered to the main
  process only: ``torch.distributed.gather``, not pickled copies on every rank). So every sample sees exactly the same
  computation for 1, 2 or any number of processes: identical bit for bit, for every sampler, even one that
  couples the samples of a batch.
* With ``network_batch_size`` (default 32) the network is evaluated on chunks of exactly that many samples
  (the last padded), because CPU/GPU kernels round differently for different batch sizes. Then, for samplers
  whose ``properties.per_sample`` holds, the output is also identical for any ``batch_size``. Samplers that
  couple samples (``predictor_corrector`` with ``snr_rule="batch"``; ``pf_ode`` with an adaptive method,
  whose steps are shared by the batch) give results that depend on ``batch_size`` (not on the number of
  processes).

Shards: the run is cut into shards of ``shard_size`` samples (a multiple of ``batch_size``); each complete
shard is written atomically (``shards/shard-NNNNN.safetensors`` and an updated manifest). A re-run with the
same settings skips the complete shards; once all are there they are merged into ``samples.safetensors``
and removed. A run with other settings in the same folder is refused unless ``overwrite=True``.

Nothing the function did not write is ever deleted or replaced: only the files recorded in its manifest (the
shards, ``samples.safetensors``, ``samples.png``, the manifest) are removed, with or without ``overwrite``;
``shards/`` is removed only when it is then empty, and a file already at a shard's path that the manifest
does not record is an error. Shard paths read from a manifest must be the names this function writes
(``shards/shard-NNNNN.safetensors``); anything else (``../x``, an absolute path) is a corrupt manifest.

Under ``accelerate launch`` on CPU, use ``--multi_gpu --num_processes N`` and ``Accelerator(cpu=True)``
(``accelerate launch --cpu --num_processes 2`` silently starts one process).

Why one module of this length: it is one workflow, writing a sample folder that survives crashes and re-runs
(shard plan, per-sample seeds, atomic shard files, the manifest that makes a re-run skip finished work, the
final merge and picture) and reading it back; the pieces only make sense together and share the manifest
format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, probe_writable, relative_inside, remove_written, sha256_file, write_json_atomic
from ._utils import per_sample_generators

__all__ = ["sample_to_folder", "SampleRunResult", "load_samples", "MANIFEST_NAME", "SAMPLES_NAME", "PICTURE_NAME",
           "IMAGES_DIR", "NPZ_NAME", "DEFAULT_NETWORK_BATCH_SIZE", "to_uint8_images"]

MANIFEST_NAME = "manifest.json"
SAMPLES_NAME = "samples.safetensors"
PICTURE_NAME = "samples.png"
SHARD_DIR = "shards"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
DEFAULT_NETWORK_BATCH_SIZE = 32
_FORMAT = "score_toolkit.sample_run"


@dataclass
class SampleRunResult:
    """What :func:`sample_to_folder` did (the same on every process)."""

    output_dir: Path
    samples_file: Path
    picture: Path | None
    num_samples: int
    num_processes: int
    shards_written: int
    shards_skipped: int
    #: the sampler's ``properties.per_sample``: whether the samples are also the same for any ``batch_size``
    batch_independent: bool = True
    nfe_per_batch: list[int] = field(default_factory=list)
    #: ``images/`` and ``samples.npz`` when written (``image_files=True``)
    images_dir: Path | None = None
    npz_file: Path | None = None


def sample_to_folder(
    pipeline,
    output_dir: str | os.PathLike,
    num_samples: int,
    *,
    sampler: str = "dpmpp_2m",
    sampler_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    network_batch_size: int | None = DEFAULT_NETWORK_BATCH_SIZE,
    shard_size: int | None = None,
    accelerator=None,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint: str | None = None,
    max_grid: int = 64,
    class_labels: int | None = None,
    guidance_scale: float = 1.0,
    image_files: bool = False,
) -> SampleRunResult:
    """Draw ``num_samples`` samples with ``sampler`` and write them to ``output_dir`` (see the module docs).

    Args:
        pipeline: a :class:`~score_toolkit.pipeline.ScorePipeline` (moved to the accelerator's device).
        sampler, sampler_options: a registered sampler name and its options (validated before anything runs).
        seed: base seed; sample ``i`` is seeded by ``(seed, i)``.
        batch_size: samples drawn together (memory); ``network_batch_size``: rows per network call (None: the
            whole batch; then the output may differ in the last bits between batch sizes).
        shard_size: samples per shard (a multiple of ``batch_size``; default: the largest multiple <= 4096).
        accelerator: an ``accelerate.Accelerator`` (default: a new one; on CPU pass ``Accelerator(cpu=True)``).
        overwrite: replace a different run found in ``output_dir`` (only the files this function writes).
        checkpoint: how the model is named in the manifest (e.g. its folder); the weights are fingerprinted too.
        max_grid: at most this many images in the picture.
        class_labels, guidance_scale: one class for every sample, with classifier-free guidance (see
            ``ScorePipeline.__call__`` and docs/conditioning.md); recorded in the manifest.
        image_files: also write one PNG per sample (``images/``) and ``samples.npz`` (image samples only).
    """
    from .pipeline import ScorePipeline
    from .registry import get_sampler

    if not isinstance(pipeline, ScorePipeline):
        raise TypeError(f"expected a ScorePipeline, found {type(pipeline).__name__}")
    for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                             ("max_grid", max_grid, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"expected {name} to be an int >= {low}, found {value!r}")
    if network_batch_size is not None and (not isinstance(network_batch_size, int) or isinstance(network_batch_size, bool)
                                           or network_batch_size < 1):
        raise ValueError(f"expected network_batch_size to be a positive int or None, found {network_batch_size!r}")
    if shard_size is None:
        shard_size = max(batch_size, (4096 // batch_size) * batch_size)
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1 or shard_size % batch_size:
        raise ValueError(f"expected shard_size to be a positive multiple of batch_size={batch_size}, found {shard_size!r}")
    options = dict(sampler_options or {})
    sampler_obj = get_sampler(sampler, **options)  # unknown sampler or option: an error before any output
    sample_shape = tuple(pipeline.sample_shape)
    if image_files and not (len(sample_shape) == 3 and sample_shape[0] in (1, 3)):
        raise ValueError(f"image_files needs image samples (1 or 3 channels, H, W), found samples of shape {sample_shape}")
    _, prediction_type, _ = pipeline.spec
    if sampler_obj.properties.needs_energy and prediction_type != "energy":
        raise ValueError(f"sampler {sampler!r} needs an energy network; this one predicts {prediction_type!r}")

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    pipeline.to(accelerator.device)
    out = Path(output_dir)
    is_main = accelerator.is_main_process
    run = {
        "checkpoint": checkpoint,
        "weights_sha256": _fingerprint(pipeline) if is_main else None,
        "sampler": sampler,
        "sampler_options": options,
        "seed": seed,
        "num_samples": num_samples,
        "sample_shape": list(sample_shape),
        "batch_size": batch_size,
        "network_batch_size": network_batch_size,
        "shard_size": shard_size,
        "dtype": str(pipeline.unet.dtype),
    }
    if class_labels is not None or guidance_scale != 1.0:
        from .conditioning import conditional_score

        process, _, time_input = pipeline.spec  # a label outside the network's classes: an error before any output
        conditional_score(lambda x, t: x, process, model=pipeline.unet, prediction_type=prediction_type,
                          time_input=time_input, class_labels=class_labels, guidance_scale=guidance_scale)
        run["class_labels"] = class_labels
        run["guidance_scale"] = float(guidance_scale)
    num_shards = math.ceil(num_samples / shard_size)

    # the main process checks the folder and reads what is done; every process learns the outcome
    created = is_main and not out.exists()
    try:
        plan = _on_main(accelerator, _prepare_folder, out, run, num_shards, overwrite)
    except BaseException:
        if created:  # e.g. the folder was made but cannot be written: leave nothing behind
            _remove_if_nothing_kept(out, created)
        raise
    nfe: list[int] = []
    written = 0
    rank, nproc = accelerator.process_index, accelerator.num_processes
    bar_config = getattr(pipeline, "_progress_bar_config", None)
    try:
        todo = [] if plan["complete"] else [s for s in range(num_shards) if s not in set(plan["done"])]
        shard_blocks = {s: _blocks(s, shard_size, num_samples, batch_size) for s in todo}
        bar = _progress(progress and is_main, sum(_share(len(b), nproc, rank) for b in shard_blocks.values()))
        if hasattr(pipeline, "set_progress_bar_config"):  # one bar over the batches here, not one per batch
            pipeline.set_progress_bar_config(disable=True)
        for s, blocks in shard_blocks.items():
            mine = []
            with accelerator.split_between_processes(blocks) as my_blocks:
                for b0, b1 in my_blocks:
                    res = pipeline(shape=(b1 - b0, *sample_shape), sampler=sampler_obj,
                                   generator=per_sample_generators(seed, range(b0, b1)), output_type="pt",
                                   network_batch_size=network_batch_size, class_labels=class_labels,
                                   guidance_scale=guidance_scale)
                    mine.append((b0, res.samples.detach().to("cpu"), res.nfe, rank))
                    if bar is not None:
                        bar.update(1)
            gathered = _gather(accelerator, mine, sample_shape)
            nfe += _on_main(accelerator, _write_shard, out, s, blocks, gathered, nproc)["nfe"]
            written += 1
        if bar is not None:
            bar.close()
        final = _on_main(accelerator, _finish, out, num_shards, max_grid, image_files)
    except BaseException:
        if is_main:
            _remove_if_nothing_kept(out, created)
        raise
    finally:
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline._progress_bar_config = bar_config if bar_config is not None else {}
    picture = Path(final["picture"]) if final.get("picture") else None
    return SampleRunResult(output_dir=out, samples_file=out / SAMPLES_NAME, picture=picture, num_samples=num_samples,
                           num_processes=nproc, shards_written=written, shards_skipped=num_shards - written,
                           batch_independent=bool(sampler_obj.properties.per_sample), nfe_per_batch=nfe,
                           images_dir=out / IMAGES_DIR if image_files else None,
                           npz_file=out / NPZ_NAME if image_files else None)


def _blocks(shard: int, shard_size: int, num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """The blocks ``[b0, b1)`` of global indices of a shard: ``batch_size`` consecutive indices each (the
    last one of the run may be shorter), aligned to multiples of ``batch_size``."""
    start, stop = shard * shard_size, min((shard + 1) * shard_size, num_samples)
    return [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]


def load_samples(folder_or_file: str | os.PathLike) -> torch.Tensor:
    """The samples written by :func:`sample_to_folder` (a folder or its ``samples.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(folder_or_file)
    if path.is_dir():
        path = path / SAMPLES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"expected the samples file {path}, found nothing there")
    return load_file(str(path))["samples"]


# ---------------------------------------------------------------------------------------------- helpers
class _RemoteError(RuntimeError):
    """An error of the main process, re-raised on the other processes."""


def _on_main(accelerator, fn, *args) -> dict[str, Any]:
    """Run ``fn`` on the main process only and hand its result (a dict) to every process; an exception on the
    main process is raised on every process (so that none waits forever for the others)."""
    result: dict[str, Any] = {}
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            result = fn(*args)
        except Exception as err:
            error = err
            result = _status(err)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result]
        broadcast_object_list(box, from_process=0)
        result = box[0]
    if error is not None:
        raise error
    if "error" in result:
        raise _error(result)
    return result


def _gather(accelerator, items: list, sample_shape: tuple[int, ...]) -> list:
    """The ``(b0, samples, nfe, rank)`` blocks of every process, on the main process (an empty list elsewhere).
    Samples travel as one padded tensor per process through ``torch.distributed.gather`` (to rank 0 only)."""
    if accelerator.num_processes == 1:
        return items
    import torch.distributed as dist
    from accelerate.utils import gather

    device = accelerator.device
    dtype = items[0][1].dtype if items else torch.float32
    x = torch.cat([it[1] for it in items]) if items else torch.empty((0, *sample_shape), dtype=dtype)
    meta = torch.tensor([[b0, it.shape[0], nfe, r] for b0, it, nfe, r in items], dtype=torch.long).reshape(-1, 4)
    sizes = gather(torch.tensor([[x.shape[0], meta.shape[0]]], dtype=torch.long, device=device)).cpu()
    rows, blocks = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    xp = torch.zeros((rows, *sample_shape), dtype=dtype, device=device)
    xp[: x.shape[0]] = x.to(device)
    mp = torch.zeros((blocks, 4), dtype=torch.long, device=device)
    mp[: meta.shape[0]] = meta.to(device)
    main = accelerator.is_main_process
    xs = [torch.empty_like(xp) for _ in range(accelerator.num_processes)] if main else None
    ms = [torch.empty_like(mp) for _ in range(accelerator.num_processes)] if main else None
    dist.gather(xp, xs, dst=0)
    dist.gather(mp, ms, dst=0)
    if not main:
        return []
    out = []
    for r in range(accelerator.num_processes):
        n_rows, n_blocks = (int(v) for v in sizes[r])
        rank_rows = xs[r][:n_rows].cpu()
        offset = 0
        for b0, n, nfe, rk in ms[r][:n_blocks].cpu().tolist():
            out.append((b0, rank_rows[offset:offset + n], nfe, rk))
            offset += n
    return out


def _status(err: Exception) -> dict[str, Any]:
    if isinstance(err, OSError) and err.errno is not None:
        return {"error": err.strerror or str(err), "error_type": "OSError", "errno": err.errno}
    return {"error": str(err), "error_type": type(err).__name__}


def _error(status: Mapping[str, Any]) -> Exception:
    if status.get("errno") is not None:
        return OSError(status["errno"], status["error"])
    kinds = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError,
             "FileExistsError": FileExistsError, "NotADirectoryError": NotADirectoryError, "OSError": OSError}
    return kinds.get(status.get("error_type"), _RemoteError)(status["error"])


def _progress(enabled: bool, total: int):
    if not enabled or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling (batches)", leave=False)


def _share(num_blocks: int, num_processes: int, rank: int) -> int:
    """How many of ``num_blocks`` blocks ``split_between_processes`` gives to ``rank``."""
    q, r = divmod(num_blocks, num_processes)
    return q + (1 if rank < r else 0)


def _fingerprint(pipeline) -> str:
    """sha256 of the network's weights (in state-dict order) and of the scheduler config."""
    h = hashlib.sha256()
    for name, tensor in pipeline.unet.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_json_atomic(path, data, indent=1, default=str)


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt run manifest {path}: {err}; pass overwrite=True (--overwrite) to start the run again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a score_toolkit sample-run manifest (expected format {_FORMAT!r})")
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
    """The per-sample PNGs and the .npz an earlier run recorded (names this module writes, nothing else)."""
    rec = (manifest or {}).get("image_files")
    if not isinstance(rec, Mapping) or not isinstance(rec.get("count"), int) or rec["count"] < 0:
        return []
    return [_png_name(i) for i in range(rec["count"])] + [NPZ_NAME]


def _png_name(i: int) -> str:
    return f"{IMAGES_DIR}/{i:06d}.png"


def _clear(out: Path) -> None:
    """Remove what an earlier run recorded in its manifest (shards, merged samples, picture, image files,
    manifest), nothing else."""
    names = [SAMPLES_NAME, PICTURE_NAME]
    try:
        manifest = _read_manifest(out)
        recorded = _recorded_shards(manifest, out / MANIFEST_NAME) if manifest is not None else {}
    except ValueError:  # not ours or unreadable: the shards it names are not known to be ours
        manifest, recorded = None, {}
    remove_written(out, [rec["file"] for rec in recorded.values()] + names + _image_file_names(manifest)
                   + [MANIFEST_NAME], prune=(SHARD_DIR, IMAGES_DIR))


def _prepare_folder(out: Path, run: dict[str, Any], num_shards: int, overwrite: bool) -> dict[str, Any]:
    _check_writable(out)
    manifest = _read_manifest(out) if not overwrite else None
    if overwrite:
        _clear(out)
    elif manifest is None:
        for name in (SAMPLES_NAME, PICTURE_NAME):
            if (out / name).exists():
                raise FileExistsError(f"{out / name} exists without a run manifest; pass overwrite=True (--overwrite) "
                                      f"to replace it")
    if manifest is not None and manifest.get("run") != run:
        old = manifest.get("run") or {}
        diff = [f"{k}: {old.get(k)!r} -> {run[k]!r}" for k in run if old.get(k) != run[k]]
        raise ValueError(
            f"the folder {out} holds another sampling run ({'; '.join(diff) or 'different settings'}); "
            f"choose another folder or pass overwrite=True (--overwrite) to replace it"
        )
    if manifest is None:
        manifest = {"format": _FORMAT, "version": 1, "run": run, "shards": {}, "complete": False}
        _write_json(out / MANIFEST_NAME, manifest)
    if manifest.get("complete"):
        samples = out / SAMPLES_NAME
        if samples.is_file() and sha256_file(samples) == manifest.get("samples_sha256"):
            return {"done": list(range(num_shards)), "complete": True}
        manifest.update(complete=False, shards={})  # the merged file is gone or changed: sample again
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


def _write_shard(out: Path, s: int, blocks: list[tuple[int, int]], gathered, num_processes: int) -> dict[str, Any]:
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
    atomic_write(path, lambda tmp: save_file({"samples": samples.contiguous()}, tmp,
                                              metadata={"start": str(start), "stop": str(stop)}))
    ranks: dict[str, int] = {}
    for _, x, _, r in parts:
        ranks[str(r)] = ranks.get(str(r), 0) + int(x.shape[0])
    manifest = _read_manifest(out)
    manifest["shards"][str(s)] = {"file": name, "start": start, "stop": stop, "sha256": sha256_file(path),
                                  "num_processes": num_processes, "samples_per_rank": ranks,
                                  "nfe_per_batch": [int(p[2]) for p in parts]}
    _write_json(out / MANIFEST_NAME, manifest)
    return {"nfe": [int(p[2]) for p in parts]}


def to_uint8_images(samples: torch.Tensor):
    """Images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C): ``round((x + 1) * 127.5)`` clipped to 0..255."""
    x = ((samples.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _write_image_files(out: Path, samples: torch.Tensor, manifest: dict[str, Any]) -> None:
    import io

    import numpy as np
    from PIL import Image

    ours = set(_image_file_names(manifest))
    folder = out / IMAGES_DIR
    if folder.exists():
        foreign = sorted(p.name for p in folder.iterdir() if f"{IMAGES_DIR}/{p.name}" not in ours)
        if foreign:
            raise FileExistsError(f"{folder} holds files this run did not write ({foreign[:3]}...): move them away "
                                  f"or choose another folder")
    if (out / NPZ_NAME).exists() and NPZ_NAME not in ours:
        raise FileExistsError(f"{out / NPZ_NAME} exists and was not written by this run: move it away")
    arrays = to_uint8_images(samples)
    folder.mkdir(exist_ok=True)
    for i, arr in enumerate(arrays):
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        atomic_write(out / _png_name(i), lambda tmp, img=img: img.save(tmp, format="PNG"))
    old = _image_file_names(manifest)
    stale = [n for n in old if n.startswith(f"{IMAGES_DIR}/") and int(n[len(IMAGES_DIR) + 1:-4]) >= len(arrays)]
    remove_written(out, stale)

    def save_npz(tmp):
        buf = io.BytesIO()
        np.savez(buf, arr_0=arrays)
        Path(tmp).write_bytes(buf.getvalue())

    atomic_write(out / NPZ_NAME, save_npz)
    manifest["image_files"] = {"count": len(arrays), "folder": IMAGES_DIR, "npz": NPZ_NAME}
    _write_json(out / MANIFEST_NAME, manifest)


def _finish(out: Path, num_shards: int, max_grid: int, image_files: bool = False) -> dict[str, Any]:
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
        remove_written(out, [recorded[s]["file"] for s in range(num_shards)], prune=(SHARD_DIR,))
        # the shard files are gone: keep what the records say about the run, but no path to a deleted file
        manifest["merged_shards"] = {k: {f: v for f, v in rec.items() if f != "file"} for k, rec in manifest["shards"].items()}
        manifest["shards"] = {}
        _write_json(out / MANIFEST_NAME, manifest)
    else:
        samples = load_file(str(samples_path))["samples"]
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


def _remove_if_nothing_kept(out: Path, created: bool) -> None:
    """After a failed run: remove the manifest if no complete shard is kept for resuming, and the folder too if
    this run created it and nothing else is in it."""
    try:
        manifest = _read_manifest(out)
    except (ValueError, OSError):
        return
    if manifest is not None and (manifest.get("shards") or manifest.get("complete")):
        return
    remove_written(out, [MANIFEST_NAME], prune=(SHARD_DIR,))
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
