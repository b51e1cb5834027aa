"""Sampling to a folder, on one process or many (Accelerate), in resumable shards, reproducible bit for bit.

:func:`sample_to_folder` draws ``num_samples`` samples of a :class:`~score_toolkit.pipeline.ScorePipeline` into a
folder (``samples.safetensors``, a picture, ``manifest.json``, optionally one PNG per sample and ``samples.npz``;
the layout, the shards and what a re-run skips are in :mod:`score_toolkit.sample_folder`, whose public names are
importable from here too).

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

Under ``accelerate launch`` on CPU, use ``--multi_gpu --num_processes N`` and ``Accelerator(cpu=True)``
(``accelerate launch --cpu --num_processes 2`` silently starts one process).
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

from ._defaults import DEFAULT_SAMPLER
from ._io import sha256_file
from ._utils import per_sample_generators
from .sample_folder import (
    IMAGES_DIR,
    MANIFEST_NAME,
    NPZ_NAME,
    PICTURE_NAME,
    SAMPLES_NAME,
    finish,
    load_samples,
    prepare_folder,
    remove_if_nothing_kept,
    to_uint8_images,
    write_shard,
)

__all__ = ["sample_to_folder", "SampleRunResult", "load_samples", "MANIFEST_NAME", "SAMPLES_NAME", "PICTURE_NAME",
           "IMAGES_DIR", "NPZ_NAME", "DEFAULT_NETWORK_BATCH_SIZE", "to_uint8_images"]


DEFAULT_NETWORK_BATCH_SIZE = 32


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
    sampler: str = DEFAULT_SAMPLER,
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
        sampler, sampler_options: a registered sampler name and its options (validated before anything runs); by
            default ``ScorePipeline``'s (``DEFAULT_SAMPLER`` with ``DEFAULT_STEPS`` steps unless options set them).
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
    for name, value in (("overwrite", overwrite), ("progress", progress), ("image_files", image_files)):
        if not isinstance(value, bool):  # overwrite="no" would replace another run's files
            raise TypeError(f"expected {name} to be a bool, found {value!r}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"expected checkpoint to be a name or path (str) or None, found {type(checkpoint).__name__}")
    checkpoint = os.fspath(checkpoint) if checkpoint is not None else None  # recorded in the JSON manifest
    if network_batch_size is not None and (not isinstance(network_batch_size, int) or isinstance(network_batch_size, bool)
                                           or network_batch_size < 1):
        raise ValueError(f"expected network_batch_size to be a positive int or None, found {network_batch_size!r}")
    if shard_size is None:
        shard_size = max(batch_size, (4096 // batch_size) * batch_size)
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1 or shard_size % batch_size:
        raise ValueError(f"expected shard_size to be a positive multiple of batch_size={batch_size}, found {shard_size!r}")
    options = dict(sampler_options or {})
    get_sampler(sampler, **options)  # unknown sampler or option: an error before any output
    # the sampler the pipeline runs for these options: on the model's stored grid when there is one that fits
    sampler_obj = pipeline.make_sampler(sampler, options, conditional=class_labels is not None or guidance_scale != 1.0)
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
    if "num_steps" in sampler_obj.config:  # what runs (the pipeline's default steps included), not only what was passed
        run["num_steps"] = sampler_obj.config["num_steps"]
    grid = sampler_obj.config.get("grid")
    if isinstance(grid, str) and grid.endswith(".json"):  # the model's stored grid: its file, and what it holds
        run["grid"] = {"path": grid, "sha256": sha256_file(grid)}
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
        plan = _on_main(accelerator, prepare_folder, out, run, num_shards, overwrite, image_files)
    except BaseException:
        if created:  # e.g. the folder was made but cannot be written: leave nothing behind
            remove_if_nothing_kept(out, created)
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
            nfe += _on_main(accelerator, write_shard, out, s, blocks, gathered, nproc)["nfe"]
            written += 1
        if bar is not None:
            bar.close()
        final = _on_main(accelerator, finish, out, num_shards, max_grid, image_files)
    except BaseException:
        if is_main:
            remove_if_nothing_kept(out, created)
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
