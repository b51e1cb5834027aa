"""One training loop on Accelerate for every score-matching objective.

:func:`train` takes a :class:`RunConfig` (or a dict, a YAML/JSON file through :func:`load_config`) and

1. validates everything before any work: the config (unknown keys are errors), the data, the process,
   the network (one forward call on two samples), the objective and their consistency, the output
   folder (writable; with ``resume`` it must hold a complete checkpoint, without it none);
2. trains with Accelerate (public API only): mixed precision (the config's, else Accelerate's own setting
   from ``accelerate launch``, its config file or the environment; ``fp16`` only on GPUs: on CPU it is a
   no-op, so it is refused with a warning and float32 is used), gradient accumulation, clipping, learning-rate
   schedules of ``diffusers.optimization.get_scheduler`` (saved with the checkpoints), an EMA of the weights,
   data parallelism over processes, batches read by a ``DataLoader`` (image sets are never held in memory or
   moved to the device whole), optional gradient checkpointing and ``torch.compile``, a tqdm bar with loss
   and throughput, ``metrics.jsonl`` and any tracker Accelerate supports;
3. writes crash-safe checkpoints (:func:`save_checkpoint`: temporary folder, fsync, a manifest with the
   sha256 of every file, then one atomic rename; the last ``keep_checkpoints`` are kept) and resumes
   from the latest one whose manifest verifies (:func:`latest_checkpoint`);
4. exports the EMA weights as a Hub-style folder with a model card (:mod:`score_toolkit.hub`).

Determinism: the data order and every noise draw are functions of ``(seed, step)`` only (no hidden
RNG state), so a resumed run reproduces the uninterrupted one exactly on the same hardware, and the
global batch of a step is the same whatever the number of processes. With
``train.per_sample_noise = true`` each sample's noise comes from its own generator (seeded by its
global position in the data stream), so one process with batch B and two processes with B/2 each
see identical data and noise: the models then agree up to float summation order.

The package's modules, one responsibility each: :mod:`.config` (the dataclasses of a run, :func:`load_config`,
:func:`apply_overrides`, the checks), :mod:`.components` (:func:`build_components`), :mod:`.ema`
(:class:`EMA`), :mod:`.checkpoints` (save, verify, list, find the latest, prune), :mod:`.data_stream` (data
order and noise seeds), :mod:`.prepare` (:func:`prepare_run`), :mod:`.loop` (:func:`train`) and :mod:`.export` (samples,
metrics and the Hub-style folder written after training).
"""

from .checkpoints import (
    CHECKPOINT_DIR,
    MANIFEST,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from .components import Components, build_components
from .config import (
    MIXED_PRECISION,
    MODEL_CLASSES,
    PROCESS_CLASSES,
    ConfigError,
    DataConfig,
    ExportConfig,
    ModelConfig,
    ObjectiveConfig,
    ProcessConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from .ema import EMA
from .export import evaluate_samples, sample_picture
from .loop import TrainResult, train
from .prepare import prepare_run

__all__ = [
    "RunConfig",
    "DataConfig",
    "ProcessConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "ExportConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "build_components",
    "Components",
    "train",
    "prepare_run",
    "TrainResult",
    "EMA",
    "save_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "evaluate_samples",
    "sample_picture",
    "MODEL_CLASSES",
    "PROCESS_CLASSES",
    "MIXED_PRECISION",
    "CHECKPOINT_DIR",
    "MANIFEST",
]
