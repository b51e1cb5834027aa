"""What a training run writes beside its checkpoints and how it reports: ``metrics.jsonl`` cut back to the step a
run resumes from, ``commands.txt``, the learning-rate schedule's saved position and the warning when it changed,
and the main process's log."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from .._warnings import caller_stacklevel


class _MainProcessLog(logging.LoggerAdapter):
    """The training loop's logger (``score_toolkit.training.loop``) on the main process only, messages unchanged
    (accelerate's adapter would prefix ``[RANK 0]`` even to a single process's messages)."""

    def __init__(self, is_main_process: bool):
        super().__init__(logging.getLogger("score_toolkit.training.loop"), {})
        self._main = is_main_process

    def isEnabledFor(self, level: int) -> bool:
        return self._main and super().isEnabledFor(level)


def _scheduler_state(lr_scheduler) -> dict[str, Any]:
    """The learning-rate schedule's position and rate (its shape comes from the config)."""
    return {"name": type(lr_scheduler).__name__, "last_epoch": int(lr_scheduler.last_epoch),
            "lr": [float(v) for v in lr_scheduler.get_last_lr()]}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (those after the checkpoint a run resumes from are
    logged again), so a resumed run's file holds each step once, as an uninterrupted run's does."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{ln}\n" for ln in kept))


def _warn_if_rate_changed(saved, now, start: int, tc) -> None:
    """Warn when the learning rate of the next step differs from the one the run saved (a resume with another
    ``train.steps`` stretches a decaying schedule, which then jumps)."""
    if not (isinstance(saved, list) and saved and all(isinstance(v, (int, float)) for v in saved)):
        return
    if any(not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(saved, now)):
        warnings.warn(f"the learning-rate schedule changed since the checkpoint (train.lr_scheduler "
                      f"{tc.lr_scheduler!r} over train.steps = {tc.steps}): step {start + 1} trains at {now[0]:.6g} where "
                      f"the run would have used {saved[0]:.6g}", stacklevel=caller_stacklevel())


def _record_command(path: Path, command: str | None, *, resumed: bool) -> None:
    """Add ``command`` to ``commands.txt`` (rewritten atomically; a new run starts it afresh)."""
    old = path.read_text(encoding="utf-8") if resumed and path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    if command or path.exists():
        write_text_atomic(path, old + (command + "\n" if command else ""))
