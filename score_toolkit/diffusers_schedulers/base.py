"""The machinery every scheduler here shares (:class:`ScoreSchedulerBase`): the process from the config,
the time grid and diffusers' step counter, the score of a model output, one ``step``. A scheduler family
subclasses it and implements ``_update`` (one step from grid index ``i``).

Why one module of this length: it is one class, diffusers' scheduler contract around one sampling loop
(config reading, ``set_timesteps``, the step counter, ``step``), whose parts all read and advance the same
loop state; what stands apart from that state is already in ``grid``, ``config``, ``knobs`` and ``forward``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.utils import BaseOutput

from .._config import config_keys, init_keys, strict_from_config
from .._utils import check_generator, randn
from ..samplers.base import NonFiniteError, all_finite
from ..scheduler_configs import _DDPM_STYLE
from ..scores import ScoreAdapter, prediction_to_score
from .config import ALL_FIELDS, SHARED_ARGS_DOC, resolve_scheduler_spec
from .forward import ForwardProcessMixin
from .grid import custom_values, grid_times
from .knobs import DIFFUSERS_KNOBS, MODEL_FIELDS, check_knobs, warn_not_applied

#: scheduler class by the sampler name whose update it runs (each scheduler class here registers itself)
SCHEDULER_CLASSES: dict[str, type[ScoreSchedulerBase]] = {}


class ScoreSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next grid time (feed it to the next ``step``);
    ``pred_original_sample``: Tweedie's denoiser ``E[x_0 | x_t]`` at the current time (for previews)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _non_finite_rows(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())


def _scalar(value) -> float:
    """A timestep given as a number or as a tensor whose entries are all one value."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise ValueError(f"expected one timestep for the whole batch, found {value.tolist()!r}")
        return float(flat[0])
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected timestep to be a number or a tensor, found {type(value).__name__}")


class ScoreSchedulerBase(ForwardProcessMixin, SchedulerMixin, ConfigMixin):
    """Shared machinery: the process from the config, the time grid and the diffusers step counter, the timestep
    table, the score of a model output, ``add_noise``/``get_velocity``. Subclasses implement :meth:`_update`
    (one step from grid index ``i``)."""

    config_name = "scheduler_config.json"
    order = 1
    # diffusers' schedulers whose configs round-trip through ours (and back) with every value kept, for the
    # beta-table configs ours are usually built from; ``compatibles`` narrows this to the instance's family
    _compatibles = list(_DDPM_STYLE)
    #: the registered sampler whose update this scheduler runs
    sampler_name: ClassVar[str] = ""
    #: whether the update draws fresh noise
    stochastic: ClassVar[bool] = True
    #: which diffusers formulas ``timestep_spacing`` follows ("ddpm": DDPMScheduler's, "dpm": DPM-Solver's)
    _spacing_style: ClassVar[str] = "ddpm"
    #: the diffusers settings this class maps besides the ones every scheduler here maps (``knobs.MAPPED``)
    _own_knobs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "sampler_name" in vars(cls) and (cls.__module__ + ".").startswith(__package__ + "."):
            SCHEDULER_CLASSES[cls.sampler_name] = cls
            cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Shared args:" + SHARED_ARGS_DOC + "\n"

    # ------------------------------------------------------------------ config reading
    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        defaulted = set(dict(config_dict).get("_use_default_values", None) or [])
        # Unknown keys (typos) are errors, in the config and in the keyword arguments, as in network configs
        # (score_toolkit._config); _use_default_values goes.
        config_dict, kwargs = strict_from_config(config_dict, kwargs, score_scheduler_config_keys(cls), cls.__name__)
        # diffusers semantics for the sampling settings: those the source left at its defaults (in memory:
        # diffusers never writes that list to a file) take ours. The fields that describe the model are kept
        # whatever their origin (a default ScoreSdeVeScheduler's sigma range, a default DDPMScheduler's table
        # describe the model as much as explicit ones).
        config_dict = {k: v for k, v in config_dict.items() if k not in defaulted or k in MODEL_FIELDS}
        timestep_type = kwargs.get("timestep_type", config_dict.get("timestep_type", "discrete"))
        if timestep_type != "discrete":
            raise ValueError(
                f"scheduler config field 'timestep_type': expected 'discrete' (the network receives the table index), "
                f"found {timestep_type!r}"
            )
        merged = {**config_dict, **kwargs}
        # set_alpha_to_one (DDIM, PNDM): the last step ends at alpha = 1 (zero noise) or at the first table entry
        if "set_alpha_to_one" in merged and "final_sigmas_type" not in merged:
            final = "zero" if merged["set_alpha_to_one"] else "sigma_min"
            config_dict["final_sigmas_type"] = final
        warn_not_applied(cls.__name__, merged, maps_multistep="solver_order" in cls._own_knobs)
        return super().extract_init_dict(config_dict, **kwargs)

    def _setup(self, spec_kwargs: dict[str, Any], knobs: dict[str, Any]) -> None:
        self.process, self.prediction_type, self.time_input = resolve_scheduler_spec(**spec_kwargs)
        # store what the fields resolved to, so that the saved config says it explicitly
        resolved: dict[str, Any] = {"prediction_type": self.prediction_type, "time_input": self.time_input}
        if spec_kwargs["process"] is None and (spec_kwargs["sigma_min"] is not None or spec_kwargs["sigma_max"] is not None):
            c = self.process.config
            resolved.update(sigma_min=float(c.sigma_min), sigma_max=float(c.sigma_max), sampling_eps=float(c.t_min))
        self.register_to_config(**resolved)
        self._zero_snr = bool(getattr(self.process, "zero_terminal_snr", False))
        if self._zero_snr and self.prediction_type not in ("v_prediction", "sample"):
            raise ValueError(
                f"scheduler config field 'prediction_type': with a zero-terminal-SNR table (rescale_betas_zero_snr) "
                f"alpha(1) = 0, where an {self.prediction_type} prediction does not determine the denoised sample; "
                "expected 'v_prediction' or 'sample'"
            )
        check_knobs(knobs, self.process, self.time_input, self._has_table())
        # the network-time map is the score adapter's, so the network sees what a score_toolkit sampler feeds it
        self._adapter = ScoreAdapter(_no_model, self.process, self.prediction_type, self.time_input,
                                     check_inputs=False)
        self.init_noise_sigma = float(self.process.prior_std)
        self.num_inference_steps: int | None = None
        self.time_grid: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        if self._has_table():
            ac = self.process.alphas_cumprod
            self.sigmas = ((1 - ac) / ac).sqrt().to(torch.float32)
        self._t: list[float] = []
        self._final_zero = False
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def compatibles(self) -> list[type]:
        """The schedulers whose configs round-trip through this one's with every value kept: ours, and the
        diffusers schedulers of the same family (the beta-table ones for a table config, ``ScoreSdeVeScheduler``
        for a VE config of that form, none for a process config)."""
        import diffusers

        cfg = self.config
        if cfg.get("process") is not None:
            names: list[str] = []
        elif cfg.get("sigma_min") is not None:
            names = ["ScoreSdeVeScheduler"]
        else:
            names = list(_DDPM_STYLE)
        found = [getattr(diffusers, n) for n in names if hasattr(diffusers, n)]
        return [*SCHEDULER_CLASSES.values(), *found]

    # ------------------------------------------------------------------ the grid
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """Fix the grid of the sampling loop (diffusers' signature; give exactly one of the three).

        Args:
            num_inference_steps: the number of steps; the grid comes from the config (``grid`` and ``rho``, or
                diffusers' ``timestep_spacing``/``steps_offset``, ``use_karras_sigmas``, ``use_exponential_sigmas``,
                ``use_lu_lambdas``) and ends as ``final_sigmas_type`` says (``sigma_min``: at ``t_min``;
                ``zero``: the last step returns the denoised sample).
            device: where ``timesteps`` go.
            timesteps: custom network inputs (decreasing; e.g. table indices), the last step ending as
                ``final_sigmas_type`` says.
            sigmas: custom noise-to-signal ratios ``sigma / alpha`` (decreasing, k-diffusion's convention), one more
                than the steps: the last is where the loop ends (0: the denoised sample).

        Sets ``timesteps`` (float32 network inputs), ``sigmas`` (float32, with the final one), ``time_grid``
        (float64 times, the final one 0.0 when the loop ends denoised), and resets the step counter.
        """
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: expected exactly one of num_inference_steps, timesteps or "
                f"sigmas, found {given or 'none'}"
            )
        net: torch.Tensor | None = None
        if timesteps is not None:
            net = custom_values(timesteps, "timesteps")
            ts = self.t_from_network_time(net).tolist()
            final_zero = self.config.final_sigmas_type == "zero"
            final = None if final_zero else self.process.t_min
        elif sigmas is not None:
            s = custom_values(sigmas, "sigmas", allow_last_zero=True)
            if s.numel() < 2:
                raise ValueError(f"expected sigmas to hold the steps' values and the final one (>= 2), found {s.numel()}")
            t = self.process.t_from_noise_to_signal(s[:-1].clamp_min(1e-300))
            self.process.check_t(t, name="the times of sigmas", tol=1e-6)
            ts = self.process.clamp_t(t).tolist()
            final_zero = float(s[-1]) == 0.0
            if final_zero:
                final = None
            else:
                tf = self.process.t_from_noise_to_signal(s[-1:])
                self.process.check_t(tf, name="the time of the final sigma", tol=1e-6)
                final = float(self.process.clamp_t(tf))
        else:
            n = num_inference_steps
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise ValueError(f"expected num_inference_steps to be a positive int, found {num_inference_steps!r}")
            ts, final, net = grid_times(self.process, self.config, int(n), zero_snr=self._zero_snr,
                                        spacing_style=self._spacing_style, owner=type(self).__name__)
            final_zero = self.config.final_sigmas_type == "zero"
            if final_zero:
                final = None
        if any(b >= a for a, b in zip(ts, ts[1:])) or (final is not None and final > ts[-1]):
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: expected strictly decreasing times, found {ts} "
                f"(final {final})"
            )
        self.num_inference_steps = len(ts)
        self._final_zero = final_zero
        self._t = [*ts, 0.0 if final is None else final]
        self.time_grid = torch.tensor(self._t, dtype=torch.float64)
        t_steps = torch.tensor(ts, dtype=torch.float64)
        if net is None:
            net = self._adapter.network_time(t_steps.to(torch.float32))
        self.timesteps = net.to(device=device, dtype=torch.float32)
        nts = self.process.noise_to_signal(t_steps)
        last = torch.zeros(1, dtype=torch.float64) if final is None else self.process.noise_to_signal(
            torch.tensor([final], dtype=torch.float64))
        self.sigmas = torch.cat([nts, last]).to(torch.float32)
        self._step_index = None
        self._begin_index = None
        grid = torch.tensor(self._t[:-1] if final_zero else self._t, dtype=torch.float64)
        self._on_set_timesteps(grid)

    def _on_set_timesteps(self, grid: torch.Tensor) -> None:
        """Hook for per-grid precomputation (``grid``: the times of the regular steps and their end)."""

    # ------------------------------------------------------------------ the step counter (diffusers' semantics)
    @property
    def step_index(self) -> int | None:
        """The index of the next step in ``timesteps`` (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where the first ``step`` starts (set by pipelines that start mid-schedule), or ``None``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at ``timesteps[begin_index]`` (img2img and inpainting pipelines call this)."""
        if not isinstance(begin_index, (int, np.integer)) or isinstance(begin_index, bool) or begin_index < 0:
            raise ValueError(f"expected begin_index to be an int >= 0, found {begin_index!r}")
        if self.timesteps is not None and begin_index > len(self.timesteps):
            raise ValueError(f"expected begin_index <= {len(self.timesteps)} (the number of steps), found {begin_index}")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The index of ``timestep`` (a number or a tensor whose entries are all that value) in
        ``schedule_timesteps`` (default ``timesteps``); when it occurs twice, the second (diffusers' rule).
        A ``ValueError`` if it is not there."""
        table = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if table is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")
        value = _scalar(timestep)
        t64 = torch.as_tensor(table).detach().to("cpu", torch.float64).flatten()
        hits = torch.nonzero((t64 - value).abs() <= 1e-6 * max(1.0, abs(value))).flatten()
        if hits.numel() == 0:
            shown = ", ".join(f"{v:.6g}" for v in t64[:6].tolist()) + (", ..." if t64.numel() > 6 else "")
            raise ValueError(
                f"{type(self).__name__}: timestep {value!r} is not one of this scheduler's timesteps [{shown}] "
                f"(set_timesteps({self.num_inference_steps}) made them); pass the values of scheduler.timesteps "
                "unchanged"
            )
        return int(hits[1] if hits.numel() > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        self._on_loop_start()

    def _on_loop_start(self) -> None:
        """Hook: a loop starts (the first step after set_timesteps)."""

    # ------------------------------------------------------------------ the step
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
        """One step of the sampler from ``timesteps[step_index]`` (which ``timestep`` must be) to the next grid time.

        ``model_output`` is the network's prediction at (``sample``, ``timestep``) in the config's prediction
        type (with ``variance_type`` ``learned``/``learned_range``, the first half of its channels);
        ``generator`` (one, or a list with one per sample) draws the step's noise. Half-precision inputs are
        computed in float32 and returned in the sample's dtype. A list of generators must hold one per sample, for
        every scheduler (also those that draw no noise). A NaN or infinite ``model_output``, or a step that makes the
        sample NaN or infinite, is a :class:`~score_toolkit.samplers.base.NonFiniteError`, as in the samplers.
        Returns :class:`ScoreSchedulerOutput` (or ``(prev_sample,)``).

        ``DDIMPipeline`` also passes ``eta`` and ``use_clipped_model_output``: accepted only at values this
        update honours (``eta=0`` for a deterministic scheduler; no clipping); anything else is a ``TypeError``."""
        self._check_ddim_kwargs(ddim_kwargs)
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point() or sample.ndim < 1:
            raise TypeError(f"expected sample to be a float tensor (B, ...), found {type(sample).__name__}")
        if (isinstance(model_output, torch.Tensor) and self.config.variance_type in ("learned", "learned_range")
                and sample.ndim > 1 and model_output.shape[1] == 2 * sample.shape[1]):
            model_output = model_output[:, : sample.shape[1]]
        if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
            found = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
            raise ValueError(
                f"{type(self).__name__}.step: expected model_output of the sample's shape {tuple(sample.shape)} "
                f"(a {self.prediction_type} prediction; for learned-variance outputs set variance_type='learned'), "
                f"found {found}"
            )
        # the same rules for every scheduler, whether or not this one draws noise
        check_generator(generator, sample.shape[0])
        if not all_finite(model_output):
            raise NonFiniteError(f"{type(self).__name__}.step: model_output holds NaN or infinite values in "
                                 f"{_non_finite_rows(model_output)} of {sample.shape[0]} samples at timestep "
                                 f"{_scalar(timestep):.6g}; check the network (sampling stops here as the samplers do)")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        n = self.num_inference_steps
        if i >= n:
            raise ValueError(
                f"{type(self).__name__}.step: all {n} steps of this schedule were taken; call set_timesteps again to "
                "start a new loop"
            )
        expected = float(self.timesteps[i])
        value = _scalar(timestep)
        if abs(value - expected) > 1e-6 * max(1.0, abs(expected)):
            raise ValueError(
                f"{type(self).__name__}.step: expected timestep {expected:.6g} (timesteps[{i}], step {i - (self._begin_index or 0) + 1} "
                f"of this loop), found {value:.6g}; run the loop over scheduler.timesteps in order, or call "
                "set_timesteps (and set_begin_index) to start another loop"
            )
        out_dtype = sample.dtype
        work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
        x, pred = sample.to(work), model_output.to(work)
        t_cur = self._t[i]
        tt = self.process.clamp_t(torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device))
        alpha, sigma = self.process.marginal(tt)
        if self._zero_snr and float(self.process.alpha(torch.tensor(t_cur, dtype=torch.float64))) == 0.0:
            # alpha = 0 (zero terminal SNR): the score is -x / sigma^2 whatever the network says; the update uses the
            # denoised sample, which a v or x0 prediction gives directly (x0 = alpha x - sigma v)
            d0 = pred if self.prediction_type == "sample" else -pred  # sigma = 1 where alpha = 0
            prev, denoised = self._update_at_zero_alpha(i, x, d0, generator)
            self._record(i, denoised)
        else:
            score = prediction_to_score(pred, x, alpha, sigma, self.prediction_type)
            if self._final_zero and i == n - 1:
                denoised = self._tweedie(i, x, score)
                self._record(i, denoised)
                prev = denoised
            else:
                prev, denoised = self._update(i, x, score, generator)
        if not all_finite(prev):
            raise NonFiniteError(f"{type(self).__name__}.step: the sample became NaN or infinite at timestep "
                                 f"{_scalar(timestep):.6g} (step {i + 1} of {n}) in {_non_finite_rows(prev)} of "
                                 f"{sample.shape[0]} samples; check the input sample and the schedule")
        self._step_index = i + 1
        prev, denoised = prev.to(out_dtype), denoised.to(out_dtype)
        if not return_dict:
            return (prev,)
        return ScoreSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _record(self, i: int, denoised: torch.Tensor) -> None:
        """Hook: the denoised value of step ``i`` (the multistep solver keeps it)."""

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

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # ------------------------------------------------------------------ subclass hook
    def _update(self, i: int, x: torch.Tensor, score: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _update_at_zero_alpha(self, i, x, denoised, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The step from a time where alpha = 0 (zero terminal SNR), given the denoised sample: the exact
        posterior q(x_s | x_t, x_0 = denoised) = N(alpha_s x_0, sigma_s^2), which is also the DPM-Solver step
        there (h = infinity); the last step returns the denoised sample."""
        if self._final_zero and i == self.num_inference_steps - 1:
            return denoised, denoised
        alpha_s, sigma_s = (float(v) for v in self.process.marginal(torch.tensor(self._t[i + 1], dtype=torch.float64)))
        noise = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if self.stochastic else None
        if noise is None:  # the probability-flow ODE keeps the noise it has: x_t is pure noise here
            return alpha_s * denoised + sigma_s * x, denoised
        return alpha_s * denoised + sigma_s * noise, denoised

    def _tweedie(self, i: int, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(torch.tensor(self._t[i], dtype=torch.float64))
        return (x + float(sigma) ** 2 * score) / float(alpha)


def _no_model(x, t):  # pragma: no cover - the schedulers only use the adapter's time map
    raise RuntimeError("a scheduler never calls the network itself")


def score_scheduler_config_keys(cls: type) -> set[str]:
    """The keys a config of one of these schedulers may hold: its own, those of the diffusers schedulers it reads,
    and those of the other schedulers here (a config converted between them keeps the others' keys)."""
    from diffusers import ScoreSdeVeScheduler

    return config_keys(cls) | init_keys(ScoreSdeVeScheduler) | set(DIFFUSERS_KNOBS) | ALL_FIELDS


def is_score_scheduler(obj) -> bool:
    """Whether ``obj`` is one of the schedulers of :mod:`score_toolkit.diffusers_schedulers` (they carry their
    process)."""
    return isinstance(obj, ScoreSchedulerBase)
