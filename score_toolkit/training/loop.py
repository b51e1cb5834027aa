"""The training loop: :func:`train` runs a run on Accelerate (see :mod:`score_toolkit.training`) after
:func:`~score_toolkit.training.prepare.prepare_run` has validated it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._warnings import caller_stacklevel
from ..threads import cpu_threads
from .checkpoints import (
    _write_json_atomic,
    save_checkpoint,
)
from .components import _build_model
from .config import ConfigError, RunConfig
from .data_stream import _mix
from .ema import EMA
from .export import _export_run
from .network_checks import _label_table, _labelled_score, check_compile
from .prepare import _flatten, claim_run, prepare_run, release_run
from .run_records import _MainProcessLog, _record_command, _scheduler_state, _truncate_metrics, _warn_if_rate_changed

__all__ = ["train", "TrainResult"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the last step, the logged history (one dict per log
    step: step, loss, lr, steps_per_s, samples_per_s), the exported folder (or None), the model (EMA
    weights when EMA is on) and the resolved config."""

    run_dir: Path
    step: int
    history: list[dict[str, Any]]
    export_folder: Path | None
    model: torch.nn.Module
    config: RunConfig
    resumed_from: Path | None = None
    num_processes: int = 1


def _resolve_mixed_precision(requested: str | None, use_cpu: bool) -> str | None:
    """The precision to hand to ``Accelerator``: the config's, or None to let Accelerate read its own setting
    (launcher flag, config file, ``ACCELERATE_MIXED_PRECISION``). fp16 on a CPU is refused with a warning."""
    effective = requested if requested is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if effective == "fp16" and (use_cpu or not torch.cuda.is_available()):
        where = "train.mixed_precision" if requested is not None else "Accelerate's mixed_precision setting"
        warnings.warn(
            f"{where} = 'fp16' has no effect on CPU (Accelerate silently trains in float32 there): "
            "training in float32; use 'bf16' for mixed precision on CPU",
            stacklevel=caller_stacklevel(),
        )
        return "no"
    return requested


def _check_finite_before_checkpoint(accelerator, loss_sum: torch.Tensor, model, ema, step: int, last_saved: int) -> None:
    """Raise FloatingPointError (on every process) if the losses since the last log step, the weights or the EMA
    weights hold NaN or infinity."""
    ok = bool(torch.isfinite(loss_sum).all()) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if ok and ema is not None:
        ok = all(bool(torch.isfinite(v).all()) for v in ema.state_dict().values())
    flag = torch.tensor([1.0 if ok else 0.0], device=loss_sum.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    if float(flag) < 1.0:
        raise FloatingPointError(
            f"the training diverged before the checkpoint of step {step}: NaN or infinity in the loss since the last "
            f"log step or in the weights; nothing was saved for this step (the last checkpoint is {last_saved}); "
            f"lower train.learning_rate or set train.max_grad_norm"
        )


@cpu_threads()
def train(
    config: RunConfig | Mapping[str, Any],
    *,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
) -> TrainResult:
    """Train the run described by ``config`` (see module docstring and docs/training.md).

    ``resume``: continue from the latest complete checkpoint in ``output_dir`` (an error if there is
    none); without it ``output_dir`` must hold no checkpoint. ``callbacks`` are called on every process
    after every optimizer step with ``{"step", "loss", "model", "accelerator"}`` (``loss`` is this
    process's last micro-batch loss as a tensor); an exception raised there stops the run like a crash
    (nothing more is written)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    comps, run_dir, ckpt = prepare_run(config, resume=resume)
    cfg, tc = comps.config, comps.config.train
    use_cpu = tc.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    mixed = _resolve_mixed_precision(tc.mixed_precision, use_cpu)
    if tc.compile:
        check_compile(use_cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    try:
        accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=mixed,
            log_with=tc.log_with,
            dynamo_backend="inductor" if tc.compile else None,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        )
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        # Accelerate keeps one state (device, precision) per process
        raise ConfigError(
            f"this Python process already used Accelerate with another device or mixed precision; Accelerate "
            f"allows one per process: run this training in a new process (e.g. the score-toolkit command): {err}"
        ) from err
    # the run records the precision it trained in (the config's, or Accelerate's setting)
    if accelerator.is_main_process:
        claim_run(run_dir)  # another run in this folder is refused (prepare_run) until this one ends
    try:
        return _train_claimed(comps, cfg, tc, run_dir, ckpt, accelerator, callbacks)
    finally:  # however the run ends (an error, Ctrl-C in a notebook), the folder is free again
        if accelerator.is_main_process:
            release_run(run_dir)


def _train_claimed(comps, cfg, tc, run_dir: Path, ckpt, accelerator, callbacks) -> TrainResult:
    """The run, once the main process holds the folder's run record (:func:`train` releases it)."""
    import dataclasses

    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from ..data import training_batches
    from ..scores import ScoreAdapter

    tc = dataclasses.replace(tc, mixed_precision=accelerator.mixed_precision)
    cfg = dataclasses.replace(cfg, train=tc)
    comps.config = cfg
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * tc.gradient_accumulation_steps
    if tc.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size = {tc.batch_size} (global) must divide by num_processes x "
            f"gradient_accumulation_steps = {world} x {tc.gradient_accumulation_steps}"
        )
    local_batch = tc.batch_size // per_step
    micro_batch = tc.batch_size // tc.gradient_accumulation_steps

    # identical initial weights on every process (and DDP broadcasts rank 0's anyway)
    set_seed(cfg.seed)
    model = _build_model(cfg.model, comps.dataset.sample_shape)
    if tc.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, betas=tuple(tc.adam_betas),
                                  weight_decay=tc.weight_decay)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # step k (1-based) trains with the schedule's value at k: last_epoch=0 makes the first value the one at 1
    # (a linear warm-up reaches the full rate at step warmup_steps, as before the schedules were added)
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer, num_warmup_steps=tc.warmup_steps,
                                 num_training_steps=tc.steps, last_epoch=0, **tc.lr_scheduler_options)
    model, optimizer = accelerator.prepare(model, optimizer)
    if tc.compile:
        from accelerate.utils import is_compiled_module

        if not is_compiled_module(model):  # Accelerate's state came from an earlier run in this process
            model = torch.compile(model, backend="inductor")
    base_model = accelerator.unwrap_model(model)
    ema = EMA(base_model, tc.ema_decay) if tc.ema_decay is not None else None

    start = 0
    window_sums: list[float] | None = None
    window_count = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        start = int(state["step"])
        saved_world = state.get("num_processes")
        if isinstance(saved_world, int) and saved_world != world and not tc.per_sample_noise:
            warnings.warn(f"resuming a run of {saved_world} process(es) on {world}: from step {start + 1} on the noise "
                          f"differs from the uninterrupted run's (it is drawn per process; train.per_sample_noise makes "
                          f"it independent of the number of processes)", stacklevel=caller_stacklevel())
        window = state.get("log_window") or {}
        window_sums, window_count = window.get("loss_sums"), int(window.get("count", 0))
        if state.get("lr_scheduler") is not None:
            # the restored position; the rate is recomputed there (the schedule spans train.steps, which a resume
            # may change)
            lr_scheduler.last_epoch = int(state["lr_scheduler"]["last_epoch"]) - 1
            with warnings.catch_warnings():  # torch warns about a scheduler step before any optimizer step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                lr_scheduler.step()
            _warn_if_rate_changed(state["lr_scheduler"].get("lr"), lr_scheduler.get_last_lr(), start, tc)
        else:  # a checkpoint written before schedules were saved: the schedule is a function of the step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                for _ in range(start):
                    lr_scheduler.step()
        if ema is not None:
            from safetensors.torch import load_file

            ema_file = ckpt / "ema.safetensors"
            if not ema_file.is_file():
                raise ConfigError(f"cannot resume with train.ema_decay set: {ckpt} has no ema.safetensors")
            ema.load_state_dict(load_file(str(ema_file)), state["ema_updates"])
    if accelerator.is_main_process:
        # a new run (start 0) starts the records afresh: prepare_run let only an earlier run's without checkpoints be
        _truncate_metrics(run_dir / "metrics.jsonl", start)
        _write_json_atomic(run_dir / "config.json", cfg.to_dict())
        _record_command(run_dir / "commands.txt", cfg.export.command, resumed=ckpt is not None)
    if tc.log_with:
        # trackers accept scalars only
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
                   for k, v in _flatten(cfg.to_dict()).items()}
        accelerator.init_trackers("train", config=hparams | {"num_processes": world})

    accumulation = tc.gradient_accumulation_steps
    device = accelerator.device
    # this process's micro-batches, read (by DataLoader workers for image sets) and moved to the device
    # one batch at a time; the examples of a step do not depend on the number of processes
    batches = training_batches(comps.dataset, seed=cfg.seed, batch_size=tc.batch_size,
                               gradient_accumulation_steps=accumulation, rank=rank, num_processes=world,
                               start_step=start, stop_step=tc.steps, pin_memory=device.type == "cuda")
    score_fn = ScoreAdapter(model, comps.process, comps.prediction_type, comps.time_input, check_inputs=False)
    objective = comps.objective
    from ..data import Dataset

    label_table = _label_table(base_model)
    label_column = getattr(comps.dataset, "label_column", None)
    if label_table is not None:
        unlabelled = comps.dataset.labels is None if isinstance(comps.dataset, Dataset) else label_column is None
        if unlabelled:
            raise ValueError(f"the network has a class-label table ({label_table} rows) but the data set "
                             f"{getattr(comps.dataset, 'name', '')!r} has no labels (image folders: data option "
                             f"labels: true; datasets: label_column)")
        data_classes = getattr(comps.dataset, "num_classes", None)
        if data_classes is not None and data_classes > label_table - 1:
            raise ValueError(f"the data set has {data_classes} classes (labels {label_column or 'of the data'}) but the "
                             f"network's class-label table has {label_table} rows: classes 0..{label_table - 2} and the "
                             f"null label (set model.options num_class_embeds to {data_classes + 1})")

    logger = _MainProcessLog(accelerator.is_main_process)
    logger.info("training %s steps from step %d on %d process(es); run folder %s", tc.steps, start, world, run_dir)
    history: list[dict[str, Any]] = []
    metrics_path = run_dir / "metrics.jsonl"
    bar = None
    if tc.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    if window_sums:  # the log window a checkpoint cut in two: continue it, as the uninterrupted run does
        own = window_sums[rank] if len(window_sums) == world else sum(window_sums) / len(window_sums)
        loss_sum += torch.tensor(own, dtype=loss_sum.dtype, device=device)
        loss_count = window_count
    t_window, steps_window = time.perf_counter(), 0
    last_saved = start
    step = start
    for step in range(start + 1, tc.steps + 1):
        lr = lr_scheduler.get_last_lr()[0]
        for micro in range(tc.gradient_accumulation_steps):
            first = (step - 1) * tc.batch_size + micro * micro_batch + rank * local_batch
            x, labels = next(batches)
            x = x.to(device, non_blocking=True)
            if tc.per_sample_noise:
                from .._utils import per_sample_generators

                generator = per_sample_generators(_mix(cfg.seed, 0x5EED) % (1 << 40), range(first, first + local_batch),
                                                  device=device)
            else:
                generator = torch.Generator(device=device).manual_seed(_mix(cfg.seed, 0x5EED, step, micro, rank))
            sync = micro == tc.gradient_accumulation_steps - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                step_score = score_fn
                if label_table is not None:  # class-conditional: the labels (with dropout) go into the network
                    step_score = _labelled_score(model, comps, labels, label_table, tc.label_dropout, device,
                                                 _mix(cfg.seed, 0x1AB, step, micro, rank), label_column)
                loss = objective(step_score, x, generator=generator)
                accelerator.backward(loss / accumulation if accumulation > 1 else loss)
            loss_sum += loss.detach()
            loss_count += 1
        if tc.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf/NaN gradients
            lr_scheduler.step()
        if ema is not None:
            ema.update(base_model)
        steps_window += 1
        for cb in callbacks:
            cb({"step": step, "loss": loss.detach(), "model": base_model, "accelerator": accelerator})
        if step % tc.log_every == 0 or step == tc.steps:
            mean_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean")
            elapsed = time.perf_counter() - t_window
            rec = {"step": step, "loss": float(mean_loss), "lr": lr,
                   "steps_per_s": steps_window / elapsed if elapsed > 0 else float("nan"),
                   "samples_per_s": steps_window * tc.batch_size / elapsed if elapsed > 0 else float("nan")}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(
                    f"the training loss became {rec['loss']} at step {step}; lower train.learning_rate or set "
                    f"train.max_grad_norm (the last checkpoint is {last_saved})"
                )
            history.append(rec)
            if accelerator.is_main_process:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", it_s=f"{rec['steps_per_s']:.1f}",
                                    samples_s=f"{rec['samples_per_s']:.0f}")
            if tc.log_with:
                accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
            logger.debug("step %d: loss %.5g, %.1f steps/s", step, rec["loss"], rec["steps_per_s"])
            loss_sum.zero_()
            loss_count, steps_window, t_window = 0, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            # the log steps check the loss too, but a checkpoint may come first: never save (and rotate the good
            # checkpoints out for) a diverged state
            _check_finite_before_checkpoint(accelerator, loss_sum, base_model, ema, step, last_saved)
            sums = accelerator.gather(loss_sum.detach().reshape(1).to(torch.float64)).tolist() if world > 1 \
                else [float(loss_sum)]
            saved = save_checkpoint(accelerator, run_dir, step, ema=ema, keep=tc.keep_checkpoints,
                                    extra_state={"seed": cfg.seed, "lr_scheduler": _scheduler_state(lr_scheduler),
                                                 "log_window": {"loss_sums": sums, "count": loss_count}})
            logger.debug("checkpoint %s", saved)
            last_saved = step
    if bar is not None:
        bar.close()

    # the trained network without the mixed-precision forward (autocast) Accelerate wrapped it in: the export's
    # samples and the model returned run in the weights' float32, as the exported network loads
    final_model = base_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if ema is not None and cfg.export.use_ema:
        import copy

        final_model = copy.deepcopy(base_model)
        ema.copy_to(final_model)
    final_model.eval()
    export_folder = None
    if cfg.export.enabled:
        if accelerator.is_main_process:
            logger.info("exporting to %s (measuring %d samples of %s)",
                        cfg.export.folder or run_dir / "pipeline", cfg.export.num_samples, cfg.export.sampler)
            export_folder = _export_run(comps, final_model, run_dir, history, world, device)
        accelerator.wait_for_everyone()
        if export_folder is None:
            export_folder = Path(cfg.export.folder) if cfg.export.folder else run_dir / "pipeline"
    if tc.log_with:
        accelerator.end_training()
    return TrainResult(run_dir, step if tc.steps > start else start, history, export_folder, final_model, cfg,
                       resumed_from=ckpt, num_processes=world)

