"""score_toolkit's fixed-grid samplers as diffusers schedulers (``SchedulerMixin`` + ``ConfigMixin``).

Each class here runs one step of a score_toolkit sampler inside any diffusers denoising loop::

    from diffusers import DDPMPipeline
    from score_toolkit.diffusers_schedulers import ScoreDPMSolverScheduler

    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.scheduler = ScoreDPMSolverScheduler.from_config(pipe.scheduler.config)
    images = pipe(num_inference_steps=25).images

=============================  ===========================  ==========================================
scheduler                      sampler it mirrors           update (shared code)
=============================  ===========================  ==========================================
:class:`ScoreAncestralScheduler`       ``ancestral``        exact Gaussian posterior (``forward_transition``)
:class:`ScoreEulerMaruyamaScheduler`   ``euler_maruyama``   Euler-Maruyama step of the reverse SDE
:class:`ScoreDPMSolverScheduler`       ``dpmpp_2m`` (order  DPM-Solver++ multistep (``multistep_coefficients``)
                                       1 = DDIM, 2, 3)
=============================  ===========================  ==========================================

The process, the prediction type and the network's time input come from the config exactly as
:func:`score_toolkit.schedulers.read_scheduler_config` reads them, so ``from_config`` accepts a
``DDPMScheduler``/``DDIMScheduler`` config (discrete VP table, the network receives the table index), a
``ScoreSdeVeScheduler`` config (VE, the network receives sigma and returns the score) or a
:class:`~score_toolkit.schedulers.ScoreSDEScheduler` config (any process). Heuristics of the source scheduler
that are not part of the model (``clip_sample``, ``thresholding``, ``timestep_spacing``, ``variance_type``)
are not applied: the update is the sampler's.

**Explicit step state.** ``timesteps`` are the network inputs at the grid times ``t_0 = 1 > ... > t_{n-1}``
(``set_timesteps`` fixes the grid; ``time_grid`` holds all ``n + 1`` times). ``step(model_output, timestep,
sample)`` finds the step by looking ``timestep`` up in ``timesteps``; there is no hidden step counter. The
multistep solver keeps the denoiser values it needs keyed by step index, each with the sample it produced,
and checks that the ``sample`` it is given at step ``i`` is the one it returned at step ``i - 1``; anything
else (a skipped step, a restarted loop, two interleaved loops) is an error instead of a silently wrong
update.

This module path is recorded in saved pipelines (``model_index.json``): keep it stable. diffusers' loader
needs the name ``SchedulerMixin`` in it, hence the module-level import; the module must be imported before
``DiffusionPipeline.from_pretrained`` loads such a pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ._config import config_keys, init_keys, strict_config
from ._utils import randn
from .processes import TIME_GRIDS, Process
from .samplers.ancestral import forward_transition
from .samplers.dpm_solver import _denoise, _lincomb, multistep_coefficients, multistep_orders
from .schedulers import _DDPM_STYLE, read_scheduler_config
from .scores import ScoreAdapter, prediction_to_score

__all__ = [
    "ScoreAncestralScheduler",
    "ScoreEulerMaruyamaScheduler",
    "ScoreDPMSolverScheduler",
    "ScoreSchedulerOutput",
    "SCHEDULER_CLASSES",
    "SchedulerMixin",
]


@dataclass
class ScoreSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next grid time (feed it to the next ``step``);
    ``pred_original_sample``: Tweedie's denoiser ``E[x_0 | x_t]`` at the current time (for previews)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _no_energy(process: Process, prediction_type: str) -> None:
    if prediction_type == "energy":
        raise ValueError(
            "scheduler config field 'prediction_type': an energy network's score needs autograd through the "
            "network, which a scheduler's step() cannot do; sample it with score_toolkit.pipeline.ScorePipeline"
        )


def resolve_scheduler_spec(
    *,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas,
    prediction_type: str | None,
    rescale_betas_zero_snr: bool,
    sigma_min: float | None,
    sigma_max: float | None,
    sampling_eps: float | None,
    process: Mapping[str, Any] | None,
    time_input: str | None,
) -> tuple[Process, str, str]:
    """``(process, prediction_type, time_input)`` of a scheduler config whose ``_class_name`` is gone
    (``from_config`` does not pass it on). Which family the fields describe, in order: a ``process`` dict
    (a :class:`~score_toolkit.schedulers.ScoreSDEScheduler` config), ``sigma_min``/``sigma_max`` (a
    ``ScoreSdeVeScheduler`` config), else the DDPM beta table. The mapping itself is
    :func:`~score_toolkit.schedulers.read_scheduler_config`'s."""
    if process is not None:
        cfg: dict[str, Any] = {"_class_name": "ScoreSDEScheduler", "process": process,
                               "prediction_type": prediction_type or "score", "time_input": time_input or "t"}
    elif sigma_min is not None or sigma_max is not None:
        if prediction_type not in (None, "score") or time_input not in (None, "sigma"):
            raise ValueError(
                "scheduler config with sigma_min/sigma_max (ScoreSdeVeScheduler): the network receives sigma and "
                f"returns the score; expected prediction_type 'score' and time_input 'sigma', found "
                f"prediction_type={prediction_type!r}, time_input={time_input!r} (use a 'process' config for others)"
            )
        cfg = {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": num_train_timesteps,
               "sigma_min": 0.01 if sigma_min is None else sigma_min,
               "sigma_max": 1348.0 if sigma_max is None else sigma_max,
               "sampling_eps": 1e-5 if sampling_eps is None else sampling_eps}
    else:
        if time_input not in (None, "index"):
            raise ValueError(
                f"scheduler config field 'time_input': a DDPM beta-table config feeds the network the table index; "
                f"expected 'index' or None, found {time_input!r} (use a 'process' config for other time inputs)"
            )
        cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
               "beta_end": beta_end, "beta_schedule": beta_schedule, "trained_betas": trained_betas,
               "prediction_type": prediction_type or "epsilon", "rescale_betas_zero_snr": rescale_betas_zero_snr}
    proc, pred, ti = read_scheduler_config(cfg)
    _no_energy(proc, pred)
    return proc, pred, ti


class _ScoreScheduler(SchedulerMixin, ConfigMixin):
    """Shared machinery: the process from the config, the time grid, the timestep table, the score of a
    model output, ``add_noise``. Subclasses implement :meth:`_update` (one step from grid index ``i``)."""

    config_name = "scheduler_config.json"
    order = 1
    # The diffusers schedulers whose configs we read: their sampling knobs that are not ours (clip_sample,
    # thresholding, timestep_spacing, ...) are set aside silently and kept in the config, as diffusers does between
    # its own compatible schedulers (they belong to those schedulers' update rules, not to the model).
    _compatibles = [*_DDPM_STYLE, "ScoreSdeVeScheduler"]
    #: the registered sampler whose update this scheduler runs
    sampler_name: ClassVar[str] = ""
    #: whether the update draws fresh noise
    stochastic: ClassVar[bool] = True

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # diffusers drops the keys a source scheduler left at its own defaults (``_use_default_values``) so that the
        # target's defaults apply. Here the source's values describe the model (a default ScoreSdeVeScheduler's
        # sigma range, a default DDPMScheduler's table): keep every one of them.
        # Unknown keys (typos) are errors, as in network configs (score_toolkit._config).
        config_dict = strict_config(config_dict, score_scheduler_config_keys(cls) | set(kwargs), f"the {cls.__name__} config")
        # the one field of the compatible schedulers that changes what the network receives
        timestep_type = kwargs.get("timestep_type", config_dict.get("timestep_type", "discrete"))
        if timestep_type != "discrete":
            raise ValueError(
                f"scheduler config field 'timestep_type': expected 'discrete' (the network receives the table index), "
                f"found {timestep_type!r}"
            )
        return super().extract_init_dict(config_dict, **kwargs)

    def _setup(self, spec_kwargs: dict[str, Any], grid: str, rho: float) -> None:
        self.process, self.prediction_type, self.time_input = resolve_scheduler_spec(**spec_kwargs)
        # store what the fields resolved to, so that the saved config says it explicitly
        resolved: dict[str, Any] = {"prediction_type": self.prediction_type, "time_input": self.time_input}
        if spec_kwargs["process"] is None and (spec_kwargs["sigma_min"] is not None or spec_kwargs["sigma_max"] is not None):
            c = self.process.config
            resolved.update(sigma_min=float(c.sigma_min), sigma_max=float(c.sigma_max), sampling_eps=float(c.t_min))
        self.register_to_config(**resolved)
        if grid not in TIME_GRIDS:
            raise ValueError(f"scheduler config field 'grid': expected one of {TIME_GRIDS}, found {grid!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"scheduler config field 'rho': expected a number > 0, found {rho!r}")
        # the network-time map is the score adapter's, so the network sees what a score_toolkit sampler feeds it
        self._adapter = ScoreAdapter(_no_model, self.process, self.prediction_type, self.time_input,
                                     check_inputs=False)
        self.init_noise_sigma = float(self.process.prior_std)
        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self._t: list[float] = []

    # ------------------------------------------------------------------ the diffusers contract
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Fix the grid: ``time_grid`` (float64, ``n + 1`` times from 1 down to ``t_min``) and ``timesteps``
        (float32, the network inputs at the first ``n`` of them, in the order the loop visits them)."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"expected num_inference_steps to be a positive int, found {num_inference_steps!r}")
        cfg = self.config
        grid = self.process.time_grid(num_inference_steps, cfg.grid, rho=float(cfg.rho), dtype=torch.float64)
        self.num_inference_steps = num_inference_steps
        self.time_grid = grid
        self._t = grid.tolist()
        t32 = grid[:-1].to(torch.float32)
        self.timesteps = self._adapter.network_time(t32).to(device=device, dtype=torch.float32)
        self._on_set_timesteps(grid)

    def _on_set_timesteps(self, grid: torch.Tensor) -> None:
        """Hook for per-grid precomputation."""

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the network receives the state as is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **ddim_kwargs: Any,
    ) -> ScoreSchedulerOutput | tuple[torch.Tensor]:
        """One step of the sampler from the grid time whose network input is ``timestep`` to the next one.

        ``model_output`` is the network's prediction at (``sample``, ``timestep``) in the config's prediction
        type; ``generator`` (one, or a list with one per sample) draws the step's noise.
        Returns :class:`ScoreSchedulerOutput` (or ``(prev_sample,)``).

        ``DDIMPipeline`` also passes ``eta`` and ``use_clipped_model_output``: accepted only at values this
        update honours (``eta=0`` for a deterministic scheduler; no clipping); anything else is a ``TypeError``."""
        self._check_ddim_kwargs(ddim_kwargs)
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.ndim < 1:
            raise TypeError(f"expected sample to be a float tensor (B, ...), found {type(sample).__name__}")
        if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
            found = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
            raise ValueError(
                f"{type(self).__name__}.step: expected model_output of the sample's shape {tuple(sample.shape)} "
                f"(a {self.prediction_type} prediction; learned-variance outputs are not supported), found {found}"
            )
        i = self.step_index_of(timestep)
        t_cur = self._t[i]
        tt = self.process.clamp_t(torch.full((sample.shape[0],), t_cur, dtype=sample.dtype, device=sample.device))
        alpha, sigma = self.process.marginal(tt)
        score = prediction_to_score(model_output, sample, alpha, sigma, self.prediction_type)
        prev, denoised = self._update(i, sample, score, generator)
        if not return_dict:
            return (prev,)
        return ScoreSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _check_ddim_kwargs(self, kwargs: dict[str, Any]) -> None:
        eta = kwargs.pop("eta", None)
        clipped = kwargs.pop("use_clipped_model_output", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.step got unexpected keyword arguments {sorted(kwargs)}")
        if eta is not None and not (eta == 0 and not self.stochastic):
            raise TypeError(
                f"{type(self).__name__}.step: eta={eta!r} is a DDIM setting; this scheduler runs score_toolkit's "
                f"{self.sampler_name!r} update ({'stochastic' if self.stochastic else 'deterministic'}), which has no "
                f"eta. Use it in DDPMPipeline, or use ScoreDPMSolverScheduler (eta=0) in DDIMPipeline"
            )
        if clipped:
            raise TypeError(f"{type(self).__name__}.step: use_clipped_model_output=True is not supported (no clipping)")

    def step_index_of(self, timestep) -> int:
        """The grid index ``i`` with ``timesteps[i] == timestep`` (a number or a tensor whose entries are all
        that value); a ``ValueError`` if it is not one of this scheduler's timesteps."""
        if isinstance(timestep, torch.Tensor):
            flat = timestep.detach().flatten()
            if flat.numel() == 0 or not bool((flat == flat[0]).all()):
                raise ValueError(f"expected one timestep for the whole batch, found {timestep.tolist()!r}")
            value = float(flat[0])
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            value = float(timestep)
        else:
            raise TypeError(f"expected timestep to be a number or a tensor, found {type(timestep).__name__}")
        table = self.timesteps.detach().to("cpu", torch.float64)
        hits = torch.nonzero(table == value).flatten()
        if hits.numel() == 0:  # e.g. a timestep that went through another dtype
            err = (table - value).abs()
            j = int(err.argmin())
            if float(err[j]) <= 1e-6 * max(1.0, abs(value)):
                hits = torch.tensor([j])
        if hits.numel() != 1:
            shown = ", ".join(f"{v:.6g}" for v in table[:6].tolist()) + (", ..." if table.numel() > 6 else "")
            raise ValueError(
                f"{type(self).__name__}.step: timestep {value!r} is not one of this scheduler's timesteps "
                f"[{shown}] (set_timesteps({self.num_inference_steps}) made them); pass the values of "
                f"scheduler.timesteps unchanged"
            )
        return int(hits[0])

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward marginal ``x_t = alpha(t) x_0 + sigma(t) noise`` at network inputs ``timesteps`` (a number,
        or one per sample: e.g. training indices of a DDPM table), for samples of any rank."""
        x0 = original_samples
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        if ts.numel() == 1:
            ts = ts.expand(x0.shape[0])
        if ts.numel() != x0.shape[0]:
            raise ValueError(f"expected one timestep or one per sample ({x0.shape[0]}), found {ts.numel()}")
        t = self.t_from_network_time(ts)
        return self.process.perturb(x0.to(torch.float64), t, noise.to(torch.float64)).to(x0.dtype)

    def t_from_network_time(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of the network-time map (continuous time ``t`` of network inputs; float64)."""
        v = torch.as_tensor(values, dtype=torch.float64)
        if self.time_input == "t":
            t = v
        elif self.time_input == "index":  # the index map is affine in t
            lo, hi = self._adapter.network_time(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
            t = (v - lo) / (hi - lo)
        else:  # sigma(t) increases in t: bisection
            ends = self.process.sigma(torch.tensor([self.process.t_min, self.process.t_max], dtype=torch.float64))
            s_lo, s_hi = ends.tolist()
            if not bool(((v >= s_lo * (1 - 1e-6)) & (v <= s_hi * (1 + 1e-6))).all()):
                raise ValueError(
                    f"expected timesteps (sigma, the network's time input) in [{s_lo:.6g}, {s_hi:.6g}], found values in "
                    f"[{float(v.min()):.6g}, {float(v.max()):.6g}]"
                )
            lo = torch.full_like(v, self.process.t_min)
            hi = torch.full_like(v, self.process.t_max)
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                below = self.process.sigma(mid) < v
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            t = 0.5 * (lo + hi)
        self.process.check_t(t, name="the time of timesteps", tol=1e-6)
        return self.process.clamp_t(t)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ------------------------------------------------------------------ subclass hook
    def _update(self, i: int, x: torch.Tensor, score: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _tweedie(self, i: int, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(torch.tensor(self._t[i], dtype=torch.float64))
        return (x + float(sigma) ** 2 * score) / float(alpha)


def _no_model(x, t):  # pragma: no cover - the schedulers only use the adapter's time map
    raise RuntimeError("a scheduler never calls the network itself")


# The config fields every scheduler here accepts (those of the configs it can be built from).
_SPEC_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "rescale_betas_zero_snr", "sigma_min", "sigma_max", "sampling_eps", "process", "time_input")


def _spec(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in _SPEC_FIELDS}


class ScoreAncestralScheduler(_ScoreScheduler):
    """Ancestral sampling with the process's exact Gaussian posterior (score_toolkit's ``ancestral`` sampler:
    DDPM, Ho et al. 2020, Algorithm 2, for VP; its SMLD counterpart for VE) as a diffusers scheduler.

    From ``t = t_i`` to ``s = t_{i+1}``: ``x_s = (x_t + sigma_{t|s}^2 s(x_t, t)) / alpha_{t|s} + sqrt(var) z`` with
    ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` (``variance="posterior"``) or ``sigma_{t|s}^2`` (``"forward"``).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
        rescale_betas_zero_snr: a DDPM beta-table config (as ``DDPMScheduler``'s).
        sigma_min, sigma_max, sampling_eps: a ``ScoreSdeVeScheduler`` config (VE).
        process, time_input: a :class:`~score_toolkit.schedulers.ScoreSDEScheduler` config (any process).
        grid: the time grid kind (``uniform`` in t, ``log_sigma``, ``karras``); rho: Karras' exponent.
        variance: ``posterior`` or ``forward``.
    """

    sampler_name = "ancestral"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
        process: dict[str, Any] | None = None,
        time_input: str | None = None,
        grid: str = "uniform",
        rho: float = 7.0,
        variance: str = "posterior",
    ):
        if variance not in ("posterior", "forward"):
            raise ValueError(f"scheduler config field 'variance': expected 'posterior' or 'forward', found {variance!r}")
        self._setup(_spec(locals()), grid, rho)

    def _on_set_timesteps(self, grid):
        self._coefs = [forward_transition(self.process, t, s) for t, s in zip(self._t[:-1], self._t[1:])]

    def _update(self, i, x, score, generator):
        # the ancestral sampler's step (score_toolkit.samplers.ancestral), operation for operation
        _, s_t, _, s_s, a_ts, var_ts = self._coefs[i]
        mean = (x + var_ts * score) / a_ts
        var = var_ts * s_s**2 / s_t**2 if self.config.variance == "posterior" else var_ts
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + var**0.5 * noise, self._tweedie(i, x, score)


class ScoreEulerMaruyamaScheduler(_ScoreScheduler):
    """One Euler-Maruyama step of the reverse-time SDE (Song et al. 2021, eq. 6; score_toolkit's
    ``euler_maruyama`` sampler with ``method="euler"``) as a diffusers scheduler:

        x_{i+1} = x_i + [g(t_i)^2 s(x_i, t_i) - f(t_i) x_i] h_i + g(t_i) sqrt(h_i) z,   h_i = t_i - t_{i+1}.

    Args: as :class:`ScoreAncestralScheduler` (without ``variance``).
    """

    sampler_name = "euler_maruyama"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
        process: dict[str, Any] | None = None,
        time_input: str | None = None,
        grid: str = "uniform",
        rho: float = 7.0,
    ):
        self._setup(_spec(locals()), grid, rho)

    def _on_set_timesteps(self, grid):
        # coefficients on the grid computed as the sampler computes them (one vectorised call)
        self._f = self.process.drift_coef(grid).tolist()
        self._g2 = self.process.diffusion_squared(grid).clamp_min(0).tolist()

    def _update(self, i, x, score, generator):
        h = self._t[i] - self._t[i + 1]
        f_t, g2 = self._f[i], self._g2[i]
        drift = (g2 * h) * score - (f_t * h) * x
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + drift + (g2 * h) ** 0.5 * noise, self._tweedie(i, x, score)


class ScoreDPMSolverScheduler(_ScoreScheduler):
    """DPM-Solver++ multistep (Lu et al. 2022) on the probability-flow ODE, any process, as a diffusers
    scheduler: ``solver_order=1`` is DDIM (the first-order exponential integrator), ``2`` is DPM-Solver++(2M)
    (score_toolkit's ``dpmpp_2m`` sampler), ``3`` is DPM-Solver++(3M) (``dpmpp_3m``). The coefficients are
    :func:`score_toolkit.samplers.dpm_solver.multistep_coefficients`, the samplers' own.

    The previous denoiser values are kept keyed by step index together with the state each step returned;
    a step of order ``k > 1`` at index ``i`` needs steps ``i - k + 1 .. i - 1`` of the same trajectory just
    before it (else ``ValueError``). Step 0 starts a new trajectory.

    Args: as :class:`ScoreAncestralScheduler` (without ``variance``; ``grid`` defaults to ``log_sigma``), and
        solver_order (1, 2 or 3), lower_order_final (the last steps use lower orders, as in the samplers).
    """

    sampler_name = "dpmpp_2m"
    stochastic = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sampling_eps: float | None = None,
        process: dict[str, Any] | None = None,
        time_input: str | None = None,
        grid: str = "log_sigma",
        rho: float = 7.0,
        solver_order: int = 2,
        lower_order_final: bool = True,
    ):
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"scheduler config field 'solver_order': expected 1, 2 or 3, found {solver_order!r}")
        if not isinstance(lower_order_final, bool):
            raise TypeError(f"scheduler config field 'lower_order_final': expected a bool, found {lower_order_final!r}")
        self._setup(_spec(locals()), grid, rho)
        self._history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on_set_timesteps(self, grid):
        n = grid.numel() - 1
        self._orders = multistep_orders(n, int(self.config.solver_order), bool(self.config.lower_order_final))
        co = multistep_coefficients(self.process, grid, self._orders)
        self._a, self._w = co["a"].tolist(), co["w"].tolist()
        self._sigma2, self._inv_alpha = co["sigma2"].tolist(), co["inv_alpha"].tolist()
        self._history = {}

    def _update(self, i, x, score, generator):
        k = self._orders[i]
        if i == 0:
            self._history = {}
        previous = []
        handed = x  # the state handed to step i - j + 1, which step i - j must have returned
        for j in range(1, k):
            entry = self._history.get(i - j)
            if entry is None or not _same(entry[2], handed):
                why = ("they are missing (steps skipped, or the loop did not start at timesteps[0])" if entry is None
                       else f"the sample given to step {i - j + 1} is not the one step {i - j} returned")
                raise ValueError(
                    f"ScoreDPMSolverScheduler.step at step {i} (order {k}) needs the denoiser values of steps "
                    f"{i - k + 1}..{i - 1} of this trajectory; {why}. Run the steps in order from timesteps[0] "
                    "on the returned samples, or use solver_order=1"
                )
            previous.append(entry[0])
            handed = entry[1]
        denoised = _denoise(x, score, self._sigma2[i], self._inv_alpha[i])
        history = [denoised, *previous]
        x_next = _lincomb([(self._a[i], x)] + [(self._w[i][j], history[j]) for j in range(k)])
        self._history[i] = (denoised, x, x_next)
        for old in [j for j in self._history if j <= i - int(self.config.solver_order)]:
            del self._history[old]
        return x_next, denoised


def score_scheduler_config_keys(cls: type) -> set[str]:
    """The keys a config of one of these schedulers may hold: its own, those of the diffusers schedulers it reads,
    and those of the other schedulers here (a config converted between them keeps the others' keys)."""
    keys = config_keys(cls)
    for other in SCHEDULER_CLASSES.values():
        keys |= init_keys(other)
    return keys


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b))


#: scheduler class by the sampler name whose update it runs
SCHEDULER_CLASSES: dict[str, type[_ScoreScheduler]] = {
    cls.sampler_name: cls for cls in (ScoreAncestralScheduler, ScoreEulerMaruyamaScheduler, ScoreDPMSolverScheduler)
}


def is_score_scheduler(obj) -> bool:
    """Whether ``obj`` is one of the schedulers of this module (they carry their process)."""
    return isinstance(obj, _ScoreScheduler)

