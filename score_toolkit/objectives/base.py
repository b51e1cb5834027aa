"""What every objective shares: the :class:`Objective` base class (call shape, reduction, input checks) and
the small helpers the objectives are written with (see :mod:`score_toolkit.objectives`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .._utils import GeneratorLike, check_tensor
from ..processes import Process
from ..scores import ScoreAdapter

__all__ = ["Objective", "REDUCTIONS"]


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REDUCTIONS = ("mean", "none")




def _check_time_value(t, name: str = "t") -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"expected {name} to be a float, found {type(t).__name__}")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"expected a finite {name}, found {t!r}")
    return t


def _check_process(process) -> Process:
    if not isinstance(process, Process):
        raise TypeError(f"expected process to be a score_toolkit Process, found {type(process).__name__}")
    return process


def _check_generator(generator, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"expected one generator per sample ({batch}), found a list of {len(generator)}")
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"expected a list of torch.Generator, found an element of type {bad[0]}")
        return
    raise TypeError(
        f"expected generator to be None, a torch.Generator or a list of them, found {type(generator).__name__}"
    )


def _check_same_process(score_fn, process: Process) -> None:
    """A ScoreAdapter converts its network's prediction with its own process: it must be ours."""
    if isinstance(score_fn, ScoreAdapter) and score_fn.process != process:
        raise ValueError(
            f"the ScoreAdapter's process {score_fn.process!r} differs from the objective's process {process!r}"
        )


def _score(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = score_fn(x, t)
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"expected score_fn to return a tensor, found {type(s).__name__}")
    if s.shape != x.shape:
        raise ValueError(f"expected score_fn to return a tensor of shape {tuple(x.shape)} (like x), found {tuple(s.shape)}")
    return s


def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Euclidean norm over all features, shape (B,)."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _input_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_(True)


def _needs_x_graph(s: torch.Tensor, objective: str) -> None:
    if not s.requires_grad:
        raise ValueError(
            f"{objective} differentiates the score with respect to x, but score_fn returned a tensor without an "
            "autograd graph (was it computed under torch.no_grad() or detached?)"
        )


class Objective:
    """Base class: validation of the call, reduction and ``repr``. Subclasses implement
    :meth:`_per_sample` and return per-sample losses (B,)."""

    name: ClassVar[str] = ""

    def __init__(self, *, reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"expected reduction in {REDUCTIONS}, found {reduction!r}")
        self.reduction = reduction

    @property
    def options(self) -> dict[str, Any]:
        """The constructor options (for logging and ``repr``)."""
        return {**self._options(), "reduction": self.reduction}

    def _options(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"

    def __call__(self, score_fn: ScoreFn, x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
        """The loss of ``score_fn`` on the data batch ``x`` (a scalar, or (B,) with ``reduction="none"``)."""
        if not callable(score_fn):
            raise TypeError(f"expected score_fn to be callable as score_fn(x, t), found {type(score_fn).__name__}")
        check_tensor(x, "x")
        if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
            raise ValueError(
                f"expected x of shape (B, ...) with B >= 1 and at least one feature (rank >= 2; use x[:, None] for "
                f"scalar data), found shape {tuple(x.shape)}"
            )
        _check_generator(generator, x.shape[0])
        losses = self._per_sample(score_fn, x, generator)
        return losses.mean() if self.reduction == "mean" else losses

    def _per_sample(self, score_fn, x, generator) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _time(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((x.shape[0],), value, dtype=x.dtype, device=x.device)
