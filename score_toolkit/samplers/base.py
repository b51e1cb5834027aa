"""The one shared shape of every sampler.

A sampler is a class with a ``name``, a one-line ``description``, declared :class:`SamplerProperties`
and a dict of ``options`` with their defaults. It is built with ``Sampler(**options)`` (an unknown
option is a ``TypeError``) and run with :meth:`Sampler.sample`, which every sampler shares:

    out = sampler.sample(score_fn, process, shape=(16, 2), generator=g)
    out.samples, out.nfe, out.trajectory

Subclasses implement :meth:`Sampler._run` only; validation, initial state, final denoising
(Tweedie), finiteness checks and progress bars live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import _utils
from .._utils import GeneratorLike, as_time, check_generator, check_tensor, resolve_device, resolve_torch_dtype
from ..processes import Process
from ..threads import cpu_threads

__all__ = ["Sampler", "SamplerOutput", "SamplerProperties", "SamplingContext", "NonFiniteError", "NFEBudgetError"]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """The sampler's state became NaN or infinite."""


class NFEBudgetError(RuntimeError):
    """A sampler needed more score evaluations than its ``max_nfe`` option allows."""


#: floating dtypes integrated in float32 (their own precision cannot carry a solver's state)
_HALF = (torch.float16, torch.bfloat16)


def time_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the times passed to a score function: float64 (a float32 ``t`` rounds the times the
    solvers' float64 coefficients are computed at), float32 on devices without float64 (MPS)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


@dataclass(frozen=True)
class SamplerProperties:
    """What a sampler is, as data (checked by the conformance suite and read by pipelines).

    Attributes:
        stochastic: injects fresh noise while sampling (beyond the initial state).
        order: declared convergence order in the step size (weak order for stochastic samplers,
            as measured on a Gaussian problem); ``None`` when it does not converge to the target
            as steps are refined (e.g. annealed Langevin with a fixed number of levels).
        adaptive: chooses its own steps (``num_steps`` not used).
        fixed_grid: runs on a fixed time grid of ``num_steps`` steps.
        per_sample: a sample's result does not depend on the other samples of its batch (given
            a generator list); ``False`` flags samplers that couple samples.
        needs_energy: needs an energy-parameterised model (e.g. MALA's accept/reject).
        final_time: where the sampler ends: ``"t_min"`` (the process's t_min) or ``"fixed"``
            (a fixed noise level, e.g. Langevin).
    """

    stochastic: bool
    order: float | None
    adaptive: bool = False
    fixed_grid: bool = True
    per_sample: bool = True
    needs_energy: bool = False
    final_time: str = "t_min"

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SamplerOutput:
    """``samples`` (final state), ``nfe`` (number of score evaluations), and, when requested,
    ``trajectory`` (states, first the initial one) with ``times`` (the matching times)."""

    samples: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = None
    times: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # allows ``samples, nfe = sampler.sample(...)``
        yield self.samples
        yield self.nfe


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite. A finite sum means every entry is finite (a NaN or inf entry makes
    the sum NaN or inf): one reduction, where ``isfinite(x).all()`` makes three passes and a bool tensor; the exact
    check runs only when the sum is not finite (a NaN/inf entry, or a sum that overflows although every entry is
    finite)."""
    return math.isfinite(float((x.detach() if x.requires_grad else x).sum())) or bool(torch.isfinite(x).all())


class SamplingContext:
    """What a sampler's ``_run`` receives: the counted score function, the process, the generator,
    helpers for noise, callbacks, trajectories and the finiteness check."""

    def __init__(self, sampler: Sampler, score_fn: ScoreFn, process: Process, generator: GeneratorLike,
                 callback: Callable | None, return_trajectory: bool, progress: bool, total: int | None,
                 max_nfe: int | None = None):
        self.sampler = sampler
        self.process = process
        self.generator = generator
        self._score_fn = score_fn
        self._callback = callback
        self.nfe = 0
        #: a cap on score evaluations (``NFEBudgetError`` beyond it), or None
        self.max_nfe = max_nfe
        #: per-run statistics a sampler reports (copied into ``SamplerOutput.info``)
        self.info: dict[str, Any] = {}
        self.trajectory: list[torch.Tensor] | None = [] if return_trajectory else None
        self.times: list[float] | None = [] if return_trajectory else None
        self.step = 0
        # the process's time range, to clamp float times in Python (None if the process clamps in its own way)
        self._t_bounds = (process.t_min, process.t_max) if type(process).clamp_t is Process.clamp_t else None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=sampler.name, leave=False)

    @property
    def score_fn(self) -> ScoreFn:
        """The user's score function as given (for samplers that need its other views, e.g. an
        ``energy(x, t)`` method for Metropolis adjustment). Evaluations through it are not counted:
        count them in ``nfe`` yourself."""
        return self._score_fn

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """Evaluate the score at (x, t) with t a scalar or (B,) (clamped into the process's range,
        since solvers may overshoot), counting one NFE.

        ``t`` reaches the score function in float64 (:func:`time_dtype`), so that it is the time the
        solver's coefficients were computed at; the score is returned in ``x``'s dtype whatever the
        score function returned (a float64 result for a float32 state is cast back)."""
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise NFEBudgetError(
                f"sampler {self.sampler.name!r}: needs more than max_nfe={self.max_nfe} score evaluations; raise "
                "max_nfe, loosen the tolerances, or check that the score function is smooth"
            )
        bounds = self._t_bounds
        if bounds is not None and isinstance(t, (int, float)):  # the fixed-grid path: clamp the float, one tensor
            t = x.new_full((x.shape[0],), min(max(float(t), bounds[0]), bounds[1]),
                           dtype=torch.float32 if x.is_mps else torch.float64)  # time_dtype(x), without a device object
        else:
            t = self.process.clamp_t(as_time(t, x.shape[0], like=torch.empty(0, device=x.device, dtype=time_dtype(x))))
        s = self._score_fn(x, t)
        self.nfe += 1
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            found = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"sampler {self.sampler.name!r}: expected score_fn to return a tensor of shape {tuple(x.shape)}, found {found}"
            )
        if s.dtype != x.dtype:
            if not s.is_floating_point():
                raise TypeError(
                    f"sampler {self.sampler.name!r}: expected score_fn to return a floating tensor, found {s.dtype}"
                )
            s = s.to(x.dtype)
        return s

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return _utils.randn_like(x, self.generator)

    def rand(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        from .._utils import rand

        return rand(shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def record(self, x: torch.Tensor, t: float, *, step: int | None = None) -> None:
        """Call after each step: checks finiteness, records the trajectory, calls the callback,
        advances the progress bar."""
        if step is None:
            self.step += 1
            step = self.step
        else:
            self.step = step
        if not all_finite(x):
            bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
            raise NonFiniteError(
                f"sampler {self.sampler.name!r}: state became NaN or infinite at step {step} (t = {float(t):.6g}) "
                f"in {bad} of {x.shape[0]} samples; reduce the step size or check the score function"
            )
        if self.trajectory is not None:
            self.trajectory.append(x.detach().clone())
            self.times.append(float(t))
        if self._callback is not None:
            self._callback({"step": step, "t": float(t), "x": x, "nfe": self.nfe})
        if self._bar is not None:
            self._bar.update(1)

    def close(self):
        if self._bar is not None:
            self._bar.close()


class Sampler:
    """Base class of all samplers (built-in and plugins).

    Class attributes to set in a subclass: ``name``, ``description`` (one line), ``properties``
    (:class:`SamplerProperties`) and ``options`` (a dict of option name -> default). Options common to every sampler
    and handled here: ``denoise`` (final Tweedie step, bool) and ``progress`` (tqdm bar, bool). Subclasses implement
    ``_run(ctx, x)`` and return the final state; they may override ``_validate_options`` and ``_check_process``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=None)
    options: ClassVar[Mapping[str, Any]] = {}
    common_options: ClassVar[Mapping[str, Any]] = {"denoise": False, "progress": False}
    #: Settings for :class:`score_toolkit.testing.SamplerConformance` (keys: sampler_options,
    #: accuracy_options, accuracy_factor, accuracy_processes, accuracy_num_samples, skip).
    conformance: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **options: Any):
        allowed = {**self.common_options, **self.options}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            import difflib

            hints = []
            for u in unknown:
                close = difflib.get_close_matches(u, list(allowed), n=1)
                hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"sampler {self.name!r}: unknown option(s) {', '.join(hints)}; its options are {sorted(allowed)}"
            )
        self.config: dict[str, Any] = {**allowed, **options}
        self._validate_options(self.config)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({opts})"

    # ------------------------------------------------------------------ hooks
    def _validate_options(self, cfg: dict[str, Any]) -> None:
        """Raise ValueError/TypeError on bad option values. Default: check common ones."""
        for key in ("denoise", "progress"):
            if not isinstance(cfg[key], bool):
                raise TypeError(f"sampler {self.name!r}: expected option {key} to be a bool, found {cfg[key]!r}")

    def _check_process(self, process: Process) -> None:
        """Raise ValueError if this sampler cannot handle ``process``."""

    def _num_progress_steps(self) -> int | None:  # steps _run's main loop records (not the final ones); None: not fixed
        n = self.config.get("num_steps")
        return int(n) if isinstance(n, int) else None

    def _progress_total(self, process=None) -> int | None:  # the bar's total: every recorded step, final ones included
        return None if (n := self._num_progress_steps()) is None else n + self._final_steps_nfe()

    def _final_time(self, process: Process) -> float:
        return process.t_min

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def initial_state(self, process: Process, shape, *, generator: GeneratorLike = None, device=None, dtype=None) -> torch.Tensor:
        """Draw the starting state (default: the process's prior at t = 1)."""
        return process.prior_sample(shape, generator=generator, device=device, dtype=dtype)

    # ------------------------------------------------------------------ public
    def sample(
        self,
        score_fn: ScoreFn,
        process: Process,
        x_init: torch.Tensor | None = None,
        *,
        shape: Sequence[int] | None = None,
        generator: GeneratorLike = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        return_trajectory: bool = False,
        device=None,
        dtype=None,
    ) -> SamplerOutput:
        """Draw samples.

        Args:
            score_fn: ``score_fn(x, t) -> tensor like x`` with ``t`` of shape (B,)
                (a :class:`~score_toolkit.scores.ScoreAdapter`, an analytic score, any callable).
            process: the forward process the score belongs to.
            x_init: the initial state (B, ...), or ``None`` to draw it from the prior with ``shape``.
            shape: (B, ...) when ``x_init`` is not given.
            generator: a ``torch.Generator`` or a list of one per sample (per-sample noise: batch-independent).
            callback: called after every step with a dict (step, t, x, nfe).
            return_trajectory: also return the states after every step.
            device, dtype: of the state drawn from ``shape`` (floating dtype or its name); agree with ``x_init``.
        """
        if not callable(score_fn):
            raise TypeError(f"sampler {self.name!r}: expected score_fn to be callable, found {type(score_fn).__name__}")
        if (callback is not None and not callable(callback)) or not isinstance(return_trajectory, bool):
            raise TypeError(f"sampler {self.name!r}: expected a callable (or None) callback and a bool return_trajectory, "
                            f"found callback={callback!r}, return_trajectory={return_trajectory!r}")
        if not isinstance(process, Process):
            raise TypeError(f"sampler {self.name!r}: expected a score_toolkit Process, found {type(process).__name__}")
        self._check_process(process)
        check_generator(generator)
        dtype, device = resolve_torch_dtype(dtype, f"{self.name}: dtype"), resolve_device(device, f"{self.name}: device")
        if x_init is None:
            if shape is None:
                raise ValueError(f"sampler {self.name!r}: pass x_init or shape")
            shape = tuple(shape) if isinstance(shape, Sequence) else shape
            if not isinstance(shape, tuple) or len(shape) < 2 or any(type(s) is not int or s < 1 for s in shape):
                raise ValueError(f"sampler {self.name!r}: expected shape to be positive ints (B, d, ...): a batch of "
                                 f"samples of at least one dimension (scalars are (B, 1)), found {shape!r}")
            x = self.initial_state(process, shape, generator=generator, device=device, dtype=dtype)
        else:
            if shape is not None and tuple(shape) != tuple(x_init.shape):
                raise ValueError(f"sampler {self.name!r}: shape {tuple(shape)} disagrees with x_init {tuple(x_init.shape)}")
            x = check_tensor(x_init, "x_init").clone()
            same_device = device is None or (device.type == x.device.type and device.index in (None, x.device.index))
            if dtype not in (None, x.dtype) or not same_device:
                raise ValueError(f"sampler {self.name!r}: dtype {dtype} / device {device} disagree with x_init's "
                                 f"{x.dtype} / {x.device} (they apply to a state drawn from shape; convert x_init)")
            _utils.check_state(x, "x_init", f"sampler {self.name!r}")
        check_generator(generator, x.shape[0])  # a list: one generator per sample
        # the output has the input's dtype; half precision is integrated in float32 (the score sees float32
        # states), since float16 cannot carry the small per-step updates (nor torchdiffeq's times)
        out_dtype = x.dtype
        if x.dtype in _HALF:
            x = x.float()
        ctx = SamplingContext(self, score_fn, process, generator, callback, return_trajectory,
                              bool(self.config["progress"]), self._progress_total(process), max_nfe=self.config.get("max_nfe"))
        try:
            if ctx.trajectory is not None:
                ctx.trajectory.append(x.detach().clone())
                ctx.times.append(process.t_max)
            with torch.no_grad(), cpu_threads(device=x.device):  # the thread policy: score_toolkit/threads.py
                x = self._run(ctx, x)
                if self.config["denoise"]:
                    x = self._denoise(ctx, x)
        finally:
            ctx.close()
        if x.dtype != out_dtype:
            x = x.to(out_dtype)
            if ctx.trajectory is not None:
                ctx.trajectory = [v.to(out_dtype) for v in ctx.trajectory]
        info = {"sampler": self.name, **{k: v for k, v in self.config.items() if k != "progress"}, **ctx.info}
        return SamplerOutput(samples=x, nfe=ctx.nfe, trajectory=ctx.trajectory, times=ctx.times, info=info)

    @property
    def nfe(self) -> int | None:
        """Score evaluations of one run as fixed by the options (final steps such as ``denoise`` and
        ``to_zero`` included), or ``None`` when the sampler chooses them itself (adaptive samplers). The
        tests check it against counted calls for every registered sampler."""
        return None

    def _final_steps_nfe(self) -> int:
        """Evaluations of the final steps handled outside ``_run``'s main loop (``denoise``, ``to_zero``)."""
        return int(bool(self.config.get("denoise"))) + int(bool(self.config.get("to_zero")))

    def _denoise(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        """Final Tweedie step at the sampler's final time: x <- (x + sigma^2 s(x, t)) / alpha."""
        t_end = self._final_time(ctx.process)
        alpha, sigma = ctx.process.marginal(torch.tensor([t_end], dtype=torch.float64))
        a, s2 = float(alpha), float(sigma) ** 2
        x = torch.add(x, ctx.score(x, t_end), alpha=s2).div_(a)
        ctx.record(x, t_end)
        return x


def check_max_nfe(cfg: Mapping[str, Any], sampler: str) -> None:
    """Validate a ``max_nfe`` option (None, or an int >= 1)."""
    if cfg["max_nfe"] is not None:
        check_int(cfg, "max_nfe", sampler)


def check_int(cfg: Mapping[str, Any], key: str, sampler: str, minimum: int = 1) -> int:
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"sampler {sampler!r}: expected option {key} to be an int >= {minimum}, found {v!r}")
    return v


def check_float(cfg: Mapping[str, Any], key: str, sampler: str, *, positive: bool = True, allow_zero: bool = False) -> float:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"sampler {sampler!r}: expected option {key} to be a finite number, found {v!r}")
    if positive and not (v > 0 or (allow_zero and v == 0)):
        raise ValueError(f"sampler {sampler!r}: expected option {key} {'>= 0' if allow_zero else '> 0'}, found {v!r}")
    return float(v)


def check_choice(cfg: Mapping[str, Any], key: str, sampler: str, choices: Sequence[str]) -> str:
    v = cfg[key]
    if v not in choices:
        raise ValueError(f"sampler {sampler!r}: expected option {key} in {tuple(choices)}, found {v!r}")
    return v
