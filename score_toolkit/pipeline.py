"""``ScorePipeline``: a diffusers ``DiffusionPipeline`` that samples any score network with any registered
sampler.

Components: ``unet`` (any diffusers ``ModelMixin``: a ``UNet2DModel``, our ``ScoreMLP``/``EnergyMLP``, ...) and
``scheduler`` (a diffusers scheduler config from which the process, the prediction type and the network's
time input are read: ``DDPMScheduler``/``DDIMScheduler`` and the other DDPM-table schedulers,
``ScoreSdeVeScheduler``, :class:`~score_toolkit.schedulers.ScoreSDEScheduler`, or one of
:mod:`score_toolkit.diffusers_schedulers`). The scheduler is only read, never stepped: the sampler does
the stepping::

    pipe = ScorePipeline.from_pretrained("digits")      # a shipped model by name; or a DDPMPipeline folder, a Hub id
    out = pipe(batch_size=16, sampler="dpmpp_2m", num_inference_steps=25,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("digit.png"); print(out.nfe)

Data flows one way: scheduler config -> (process, prediction type, time input) -> score adapter ->
sampler -> samples -> images. Finding and reading folders (a path, a cached Hub repository, a shipped model)
is :mod:`score_toolkit.folders`; its names ``scheduler_spec``, ``shipped_model_path`` and
``SHIPPED_MODELS_ENV_VAR`` are also importable from here.

Why one module of this length: it is one class, the diffusers pipeline, with the small helpers of its
``__call__`` (sampler choice with the model's stored grid, conditioning routes, fixed network batches, reduced
precision, image output); the folder reading that used to live here is in :mod:`score_toolkit.folders`, the model's
grids in :mod:`score_toolkit.model_grids`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.utils import BaseOutput

# Imported here so that ``import score_toolkit.pipeline`` makes every component class that score_toolkit writes
# into model_index.json loadable by DiffusionPipeline.from_pretrained (diffusers only looks in sys.modules).
from . import diffusers_schedulers as _diffusers_schedulers  # noqa: F401
from . import schedulers as _schedulers  # noqa: F401
from ._defaults import DEFAULT_SAMPLER, DEFAULT_STEPS
from ._utils import GeneratorLike
from ._warnings import caller_stacklevel
from .folders import (
    SHIPPED_MODELS_ENV_VAR,
    _read_json,
    _resolve_folder,
    load_components,
    scheduler_spec,
    shipped_model_path,
)
from .models import mlp as _mlp  # noqa: F401
from .processes import Process
from .threads import cpu_threads

__all__ = [
    "ScorePipeline",
    "ScorePipelineOutput",
    "scheduler_spec",
    "shipped_model_path",
    "SHIPPED_MODELS_ENV_VAR",
    "OUTPUT_TYPES",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
]


logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")
# what the pipeline's __call__ takes besides sampler options (named in errors about unknown options)
_CALL_ARGS = ("batch_size", "shape", "sampler", "sampler_options", "num_inference_steps", "generator", "output_type",
              "callback", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "return_dict",
              "network_batch_size", "value_range")


@dataclass
class ScorePipelineOutput(BaseOutput):
    """What :class:`ScorePipeline` returns.

    Attributes:
        samples: the samples in model space, (B, ...) (a ``torch.Tensor``; a numpy array for ``output_type="np"``).
        images: for image-shaped samples (B, C, H, W) with C in {1, 3}: the samples mapped from ``value_range``
            to [0, 1] as a list of PIL images (``"pil"``), a float array (B, H, W, C) (``"np"``) or a tensor
            (B, C, H, W) (``"pt"``); ``None`` for other data.
        nfe: the number of network evaluations of the run (for the whole batch).
        grid: the time grid the sampler ran on: the path of the model's stored grid (``<folder>/grids/...``, see
            :meth:`ScorePipeline.make_sampler`), a built-in kind (``"fitted"``, ...) or ``"option grid"`` for explicit
            times; ``None`` for samplers without a fixed grid.
    """

    samples: torch.Tensor | np.ndarray
    images: list | np.ndarray | torch.Tensor | None
    nfe: int
    grid: str | None = None


class _NullLabelNetwork:
    """Calls a label-conditional network with the null label (unconditional sampling of a network trained with label
    dropout)."""

    def __init__(self, model: Callable, null_label: int):
        self.model, self.null_label = model, null_label

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        kwargs.setdefault("class_labels", torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device))
        return self.model(x, t, **kwargs)


class _FixedBatchNetwork:
    """Calls ``model`` on chunks of exactly ``size`` rows (the last one padded by repeating its last row),
    so that a sample's network output does not depend on how many samples share its batch: CPU and GPU
    kernels pick different algorithms for different batch sizes, and the results differ in the last bits."""

    def __init__(self, model: Callable, size: int):
        self.model = model
        self.size = size

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **per_sample: torch.Tensor):
        # per_sample: keyword inputs with one row per sample (e.g. class_labels), chunked like x
        from .scores import _model_output

        outs = []
        for start in range(0, x.shape[0], self.size):
            xb, tb = x[start:start + self.size], t[start:start + self.size]
            kb = {k: v[start:start + self.size] for k, v in per_sample.items()}
            n = xb.shape[0]
            if n < self.size:
                pad = self.size - n
                xb = torch.cat([xb, xb[-1:].expand(pad, *xb.shape[1:])])
                tb = torch.cat([tb, tb[-1:].expand(pad)])
                kb = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in kb.items()}
            outs.append(_model_output(self.model(xb, tb, **kb))[:n])
        return torch.cat(outs)


class _ReducedPrecisionNetwork:
    """A bfloat16 / float16 network evaluated on float32 sampler states: the input goes to the network's dtype,
    the output comes back as float32, and the time stays float32 (a bfloat16 time cannot even hold the index
    999 of a DDPM table). The sampler's own arithmetic (step sizes, noise) stays in float32, as diffusers'
    schedulers upcast theirs."""

    def __init__(self, model: Callable, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype
        self.config = getattr(model, "config", None)  # read by the label-conditional wrappers (num_class_embeds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        # kwargs: the network's other inputs (class_labels, integer: passed as they are)
        from .scores import _model_output

        return _model_output(self.model(x.to(self.dtype), t, **kwargs)).float()


_REDUCED = (torch.bfloat16, torch.float16)


class ScorePipeline(DiffusionPipeline):
    """Sample a score network with any registered sampler.

    Args:
        unet: the network (any diffusers ``ModelMixin``), called as ``unet(x, time_input)``.
        scheduler: a diffusers scheduler whose config names the process, the prediction type and the time
            input (see :func:`scheduler_spec`); it is read, not stepped.

    Save with ``save_pretrained(folder)``; load with :meth:`from_pretrained` (local folders, and Hub
    repositories from the local cache). ``DiffusionPipeline.from_pretrained`` cannot load a ScorePipeline
    folder (it looks the pipeline class up in diffusers only); ``ScorePipeline.from_pretrained`` also loads
    diffusers' own ``DDPMPipeline``/``DDIMPipeline`` folders and score_toolkit's exports.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        if not isinstance(unet, ModelMixin):
            raise TypeError(f"expected unet to be a diffusers ModelMixin, found {type(unet).__name__}")
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(f"expected scheduler to be a diffusers SchedulerMixin, found {type(scheduler).__name__}")
        process = scheduler_spec(scheduler)[0]  # fail now, not at the first call
        if getattr(process, "zero_terminal_snr", False):
            raise ValueError(
                "scheduler config with rescale_betas_zero_snr=True: alpha(1) = 0, where score_toolkit's samplers "
                "cannot start (the score there is -x whatever the network predicts); sample it in a diffusers "
                "pipeline with a scheduler of score_toolkit.diffusers_schedulers (e.g. ScoreDPMSolverScheduler, "
                "v_prediction)"
            )
        self.register_modules(unet=unet, scheduler=scheduler)

    # ------------------------------------------------------------------ what the components say
    @property
    def spec(self) -> tuple[Process, str, str]:
        """``(process, prediction_type, time_input)`` read from the current scheduler."""
        return scheduler_spec(self.scheduler)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample, from the network's config: ``(in_channels, H, W)`` for image networks
        (``sample_size``), ``(dim,)`` for vector networks; a ``ValueError`` otherwise (pass ``shape=``)."""
        cfg = self.unet.config
        if "sample_size" in cfg and "in_channels" in cfg and cfg["sample_size"] is not None:
            size = cfg["sample_size"]
            hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            return (int(cfg["in_channels"]), *hw)
        if "dim" in cfg:
            return (int(cfg["dim"]),)
        raise ValueError(
            f"cannot tell the sample shape of {type(self.unet).__name__} from its config (expected sample_size and "
            f"in_channels, or dim); pass shape=(batch, ...)"
        )

    def score_function(self, network_batch_size: int | None = None):
        """The canonical ``score_fn(x, t)`` of the network (a :class:`~score_toolkit.scores.ScoreAdapter`).
        With ``network_batch_size`` the network is evaluated on chunks of exactly that many samples."""
        from .scores import ScoreAdapter

        process, prediction_type, time_input = self.spec
        model: Callable = self.unet
        if self.unet.dtype in _REDUCED:
            model = _ReducedPrecisionNetwork(model, self.unet.dtype)
        table = self.unet.config.get("num_class_embeds")
        if table is not None:  # a label-conditional UNet sampled without labels: the null label (its last row)
            model = _NullLabelNetwork(model, int(table) - 1)
        if network_batch_size is not None:
            if not isinstance(network_batch_size, int) or isinstance(network_batch_size, bool) or network_batch_size < 1:
                raise ValueError(f"expected network_batch_size to be a positive int or None, found {network_batch_size!r}")
            model = _FixedBatchNetwork(model, network_batch_size)
        return ScoreAdapter(model, process, prediction_type, time_input)

    # ------------------------------------------------------------------ sampling
    @cpu_threads()
    def __call__(
        self,
        batch_size: int = 1,
        *,
        shape: Sequence[int] | None = None,
        sampler: Any = DEFAULT_SAMPLER,
        sampler_options: Mapping[str, Any] | None = None,
        num_inference_steps: int | None = None,
        generator: GeneratorLike = None,
        output_type: str | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
        network_batch_size: int | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        class_labels: Any = None,
        guidance_scale: float = 1.0,
        operator: Any = None,
        observation: torch.Tensor | None = None,
        mask: Any = None,
        noise_std: float = 0.0,
        inverse_method: str = "pigdm",
        **sampler_kwargs: Any,
    ) -> ScorePipelineOutput | tuple:
        """Draw samples.

        Args:
            batch_size: number of samples (the shape of one comes from :attr:`sample_shape`).
            shape: the full shape (B, ...) instead of ``batch_size`` (e.g. images of another size).
            sampler: a registered sampler name (``score-toolkit samplers`` lists them) or a
                :class:`~score_toolkit.samplers.base.Sampler` instance; default :data:`DEFAULT_SAMPLER`
                (``unipc``) with :data:`DEFAULT_STEPS` (24) steps, as ``score-toolkit sample``.
            sampler_options: the sampler's options (``sampler_options={"num_steps": 50}``); options may also be
                given as keyword arguments (``num_steps=50``). Unknown options are errors.
            num_inference_steps: sets the sampler's ``num_steps`` (an error for samplers without one).
            generator: a ``torch.Generator`` or a list with one per sample (then each sample's noise comes from
                its own generator, and a sample does not depend on its batch for samplers whose
                ``properties.per_sample`` holds, up to the network's batch-size rounding: see
                ``network_batch_size``).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``; default ``"pil"`` for images, ``"pt"`` otherwise.
            callback: called after every sampler step with ``{"step", "t", "x", "nfe"}``.
            callback_on_step_end: diffusers' per-step callback, called after every sampler step as
                ``callback_on_step_end(pipe, i, t, callback_kwargs)`` with ``i`` the 0-based step, ``t`` the
                process time reached and ``callback_kwargs = {"latents": x}``; it returns a dict, and a
                ``"latents"`` tensor in it replaces the state (diffusers' semantics). A diffusers
                ``PipelineCallback``/``MultiPipelineCallbacks`` works too.
            callback_on_step_end_tensor_inputs: the tensors passed in ``callback_kwargs`` (only ``"latents"``).
            return_dict: return a :class:`ScorePipelineOutput`; else ``(images or samples, nfe)``.
            network_batch_size: evaluate the network on chunks of exactly this many samples (padding the
                last), which makes every sample's result bit-for-bit independent of the batch size.
            value_range: the model-space range mapped to [0, 1] for images (diffusers' convention: (-1, 1)).
            class_labels: classes to generate (an int or one per sample), with classifier-free guidance of scale
                ``guidance_scale`` (diffusers' convention; 1 = the conditional model); the network must have been
                trained with labels (its last label is the null label). See docs/conditioning.md.
            operator, observation, mask, noise_std, inverse_method: condition on a linear observation
                ``observation = A x + noise_std n`` (``operator``, a :class:`~score_toolkit.conditioning.LinearOperator`,
                or ``mask`` for inpainting) with ``inverse_method`` (``pigdm``, ``dps``, ``replacement``). Samplers
                that take an operator themselves (``repaint``, ``imputation``) receive it as their options instead.
        """
        if callback is not None and not callable(callback):
            raise TypeError(f"expected callback to be callable or None, found {type(callback).__name__}")
        sampler_kwargs = _route_operator(sampler, sampler_kwargs, operator, observation, mask)
        _check_observation_settings(sampler, sampler_kwargs, operator, mask, noise_std, inverse_method)
        if "operator" in sampler_kwargs:
            operator = observation = mask = None
        conditional = not (class_labels is None and operator is None and mask is None and observation is None
                           and guidance_scale == 1.0 and "operator" not in sampler_kwargs)
        shape = self._shape(batch_size, shape)
        sampler_obj = self.make_sampler(sampler, sampler_options, num_inference_steps, conditional=conditional,
                                        sample_shape=shape[1:], **sampler_kwargs)
        step_end = self._step_end_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"expected output_type in {OUTPUT_TYPES} or None, found {output_type!r}")
        is_image = len(shape) == 4 and shape[1] in (1, 3)
        if output_type is None:
            output_type = "pil" if is_image else "pt"
        if output_type == "pil" and not is_image:
            raise ValueError(
                f"output_type='pil' needs image-shaped samples (B, 1 or 3, H, W), found shape {shape}; use 'pt' or 'np'"
            )
        if is_image:
            _value_range(value_range)  # before sampling, not after
        score_fn = self.score_function(network_batch_size)
        if sampler_obj.properties.needs_energy and score_fn.prediction_type != "energy":
            raise ValueError(
                f"sampler {sampler_obj.name!r} needs an energy network (prediction_type 'energy'); this pipeline's "
                f"network predicts {score_fn.prediction_type!r}"
            )
        # a bfloat16 / float16 network samples float32 states (see _ReducedPrecisionNetwork)
        dtype = torch.float32 if self.unet.dtype in _REDUCED else self.unet.dtype
        score_fn = self._conditional(score_fn, shape, network_batch_size, class_labels, guidance_scale, operator,
                                     observation, mask, noise_std, inverse_method)
        total = sampler_obj._progress_total(self.spec[0])  # None for adaptive samplers: a bar that counts steps
        with (self.progress_bar(total=total) if total else self.progress_bar(iterable=itertools.count())) as bar:

            def on_step(info: dict[str, Any]) -> None:
                if callback is not None:
                    callback(info)
                if step_end is not None:
                    step_end(info)
                bar.update()

            out = sampler_obj.sample(score_fn, self.spec[0], shape=shape, generator=generator, callback=on_step,
                                     device=self._execution_device, dtype=dtype)
        samples = out.samples.detach()
        images = _to_images(samples, output_type, value_range) if is_image else None
        if output_type == "np":
            samples = samples.float().cpu().numpy() if samples.dtype == torch.bfloat16 else samples.cpu().numpy()
        if not return_dict:
            return (images if images is not None else samples, out.nfe)
        return ScorePipelineOutput(samples=samples, images=images, nfe=out.nfe, grid=_grid_label(sampler_obj))

    def make_sampler(self, sampler: Any = DEFAULT_SAMPLER, sampler_options: Mapping[str, Any] | None = None,
                     num_inference_steps: int | None = None, *, conditional: bool = False,
                     sample_shape: Sequence[int] | None = None, **options: Any):
        """The sampler :meth:`__call__` runs for these arguments (a :class:`~score_toolkit.samplers.base.Sampler`).

        **The model's grid.** When ``sampler`` is a name (default :data:`DEFAULT_SAMPLER`), no ``grid`` option is
        given, the sampling is unconditional (``conditional=False``) and the folder the pipeline was loaded from
        holds ``grids/<sampler>_<num_steps>.json`` written by ``score-toolkit fit-grid``
        (:func:`score_toolkit.model_grids.fit_model_grids`), that grid is used if it won its validation against this
        sampler's built-in grid (recorded in the file; a file without that record, e.g. from an interrupted fit, is
        not used; so is one that lost: an info message says why): ``sampler.config["grid"]`` is its path, and it is
        logged at info level. A stored grid fitted for other weights, another process, another sample shape
        (``sample_shape``, one sample's shape; default the pipeline's) or other sampler options (e.g. ``order``,
        ``to_zero``), or a file whose record is malformed, is not used: a
        :class:`~score_toolkit.model_grids.ModelGridWarning` says why and the sampler keeps its built-in default
        grid; so do budgets without a stored grid. An explicit ``grid=`` always wins. See docs/fast_samplers.md,
        "The model's grid".
        """
        sampler_obj, given = _make_sampler(sampler, sampler_options, num_inference_steps, options)
        if not isinstance(sampler, str) or "grid" in given:
            return sampler_obj
        from .model_grids import model_grid_for
        from .samplers.fixed_grid import GridSampler

        if not isinstance(sampler_obj, GridSampler):  # no time grid to choose (Langevin, adaptive solvers, ...)
            return sampler_obj
        folder = getattr(self, "_source_folder", None)
        if conditional:
            if folder is not None:
                logger.info("%s: conditional sampling uses the built-in grid (the model's grids are fitted to the "
                            "unconditional model)", sampler)
            return sampler_obj
        if sample_shape is not None:
            shape = tuple(sample_shape)
        else:
            try:
                shape = tuple(self.sample_shape)
            except ValueError:  # a network whose config does not tell: the stored grid's shape is not checked
                shape = None
        choice = model_grid_for(folder, sampler_obj, self.spec[0], shape)
        if choice.warning is not None:
            warnings.warn(choice.warning, _model_grid_warning(), stacklevel=caller_stacklevel())
        if choice.path is None:
            logger.info("%s: %s; the built-in grid %r is used", sampler, choice.reason, sampler_obj.config.get("grid"))
            return sampler_obj
        from .registry import get_sampler

        kept = {k: v for k, v in given.items() if k != "num_steps"}
        try:
            stored = get_sampler(sampler, grid=os.fspath(choice.path), **kept)
        except (ValueError, TypeError) as exc:  # a damaged grid file: sampling goes on on the built-in grid
            warnings.warn(f"stored grid {choice.path} not used: {exc}; the built-in default grid is used",
                          _model_grid_warning(), stacklevel=caller_stacklevel())
            return sampler_obj
        logger.info("%s with %d steps: using %s", sampler, sampler_obj.config["num_steps"], choice.reason)
        return stored

    def _conditional(self, score_fn, shape, network_batch_size, class_labels, guidance_scale, operator, observation,
                     mask, noise_std, inverse_method):
        if class_labels is None and operator is None and mask is None and observation is None and guidance_scale == 1.0:
            return score_fn
        from .conditioning import conditional_score

        process, prediction_type, time_input = self.spec
        model = self.unet
        if self.unet.dtype in _REDUCED:  # float32 states, as for the unconditional score (score_function)
            model = _ReducedPrecisionNetwork(model, self.unet.dtype)
        if network_batch_size is not None:
            model = _FixedBatchNetwork(model, network_batch_size)
            model.config = self.unet.config
        if observation is not None and not isinstance(observation, torch.Tensor):
            observation = torch.as_tensor(observation)
        if observation is not None:
            state_dtype = torch.float32 if self.unet.dtype in _REDUCED else self.unet.dtype
            observation = observation.to(device=self._execution_device, dtype=state_dtype)
        return conditional_score(score_fn, process, model=model, prediction_type=prediction_type, time_input=time_input,
                                 class_labels=class_labels, guidance_scale=guidance_scale, operator=operator,
                                 observation=observation, mask=mask, noise_std=noise_std, inverse_method=inverse_method)

    def _step_end_callback(self, fn, tensor_inputs) -> Callable[[dict[str, Any]], None] | None:
        """diffusers' ``callback_on_step_end`` as a sampler callback."""
        if fn is None:
            return None
        try:
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
        except ImportError:  # pragma: no cover - older diffusers
            MultiPipelineCallbacks = PipelineCallback = ()  # noqa: N806
        if PipelineCallback and isinstance(fn, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = fn.tensor_inputs
        if not callable(fn):
            raise TypeError(f"expected callback_on_step_end to be callable, found {type(fn).__name__}")
        tensor_inputs = list(tensor_inputs)
        unknown = sorted(set(tensor_inputs) - {"latents"})
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: ScorePipeline passes only 'latents' (the sampler's state), "
                f"found {unknown}"
            )

        def on_step(info: dict[str, Any]) -> None:
            x = info["x"]
            result = fn(self, int(info["step"]) - 1, info["t"], {k: x for k in tensor_inputs})
            if result is None:
                return
            if not isinstance(result, Mapping):
                raise TypeError(f"expected callback_on_step_end to return a dict, found {type(result).__name__}")
            new = result.get("latents", x)
            if new is not x:
                if not isinstance(new, torch.Tensor) or new.shape != x.shape:
                    found = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise ValueError(
                        f"callback_on_step_end returned 'latents' of shape {found}; expected the state's shape "
                        f"{tuple(x.shape)}"
                    )
                x.copy_(new)

        return on_step

    def _shape(self, batch_size, shape) -> tuple[int, ...]:
        if shape is not None:
            shape = tuple(shape)
            if len(shape) < 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
                raise ValueError(f"expected shape to be positive ints (batch, ...), found {shape}")
            if batch_size not in (1, shape[0]):
                raise ValueError(f"batch_size={batch_size} disagrees with shape={shape}; pass one of them")
            self._check_sample_shape(shape)
            return shape
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"expected batch_size to be a positive int, found {batch_size!r}")
        return (batch_size, *self.sample_shape)

    def _check_sample_shape(self, shape: tuple[int, ...]) -> None:
        """``shape`` (batch first) against the network: the same dim for a vector network, the same channels for an
        image network (its height and width may differ from ``sample_size``); unchecked when the config does not
        tell."""
        try:
            own = self.sample_shape
        except ValueError:
            return
        image = "sample_size" in self.unet.config
        fits = (len(shape) == 4 and shape[1] == own[0]) if image else tuple(shape[1:]) == own
        if not fits:
            expected = f"(batch, {own[0]}, H, W)" if image else f"(batch, {', '.join(map(str, own))})"
            raise ValueError(f"expected shape={expected} for this {type(self.unet).__name__} (one sample is {own}; "
                             f"shape includes the batch dimension), found shape={shape}")

    # ------------------------------------------------------------------ saving
    def diffusers_pipeline_name(self) -> str:
        """The pipeline class that ``save_pretrained`` names in ``model_index.json``: a diffusers pipeline that
        can load *and run* these components where there is one, so that the folder stays usable in plain
        diffusers; else ``ScorePipeline`` (load it with :meth:`from_pretrained`).

        * the pipeline class of the folder this pipeline was loaded from, when it was ``DDPMPipeline``,
          ``DDIMPipeline`` or ``ScoreSdeVePipeline`` and the components are still of the kinds it runs;
        * ``DDPMPipeline`` for an image network (``sample_size``, ``in_channels``) with a scheduler that steps and
          a unit-variance prior (DDPMPipeline draws N(0, I) noise);
        * ``ScorePipeline`` otherwise (a vector network, a scheduler without ``step()``, a VE prior).
        """
        cfg = self.unet.config
        image_net = cfg.get("sample_size") is not None and cfg.get("in_channels") is not None
        steps = callable(getattr(self.scheduler, "step", None))
        source = getattr(self, "_source_pipeline", None)
        if source == "ScoreSdeVePipeline" and type(self.scheduler).__name__ == "ScoreSdeVeScheduler" and image_net:
            return source
        unit_prior = float(getattr(self.scheduler, "init_noise_sigma", 1.0)) == 1.0
        if image_net and steps and unit_prior:
            return source if source in ("DDPMPipeline", "DDIMPipeline") else "DDPMPipeline"
        return type(self).__name__

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None, push_to_hub: bool = False,
                        **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, with ``model_index.json`` naming :meth:`diffusers_pipeline_name`: a
        folder that plain diffusers could load and run stays so (``ScorePipeline.from_pretrained`` loads any of
        them). diffusers writes into a temporary folder (``.NAME.tmp-PID`` beside the folder, or ``.save.tmp-PID``
        inside it when the folder is a mount point; removed by the next save or export once its process is gone),
        then each file is renamed over its target (:func:`score_toolkit._io.replace_files`), ``model_index.json``
        last: an interrupted save never leaves a half-written file, though it can leave some files new and some old
        (save again). Weight files of an earlier save of the same variant that this one did not write (the shards
        and index of a sharded save replaced by one file, or the reverse) are removed, so the folder loads the new
        weights; other files are left as they are."""
        import shutil

        from ._io import on_own_file_system, replace_files, write_json_atomic
        from .hub import _remove_stale_export_temporaries

        if safe_serialization is not True:
            raise ValueError(f"expected safe_serialization=True (weights are saved and loaded as safetensors only; "
                             f"from_pretrained refuses pickled weights), found {safe_serialization!r}")
        target = Path(os.path.abspath(os.fspath(save_directory)))
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"expected a folder to save the pipeline in, found the file {target}")
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_export_temporaries(target)
        mount_point = on_own_file_system(target)
        # the temporary folder on the folder's own file system, so that the renames cannot cross file systems
        tmp = target / f".save.tmp-{os.getpid()}" if mount_point else target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        if push_to_hub:
            kwargs.setdefault("repo_id", target.name)  # diffusers names the repository after the folder
        try:
            super().save_pretrained(str(tmp), safe_serialization=True, variant=variant, max_shard_size=max_shard_size,
                                    push_to_hub=push_to_hub, **kwargs)
            name = self.diffusers_pipeline_name()
            if name != type(self).__name__:
                index_file = tmp / "model_index.json"
                index = _read_json(index_file, "model_index.json")
                index["_class_name"] = name
                write_json_atomic(index_file, index, indent=2, sort_keys=True)
            target.mkdir(exist_ok=True)
            written = replace_files(tmp, target)
            _remove_replaced_weights(target, written, variant)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> ScorePipeline:
        """Load a pipeline folder strictly: a path; else the name of a shipped model (``"digits"``, ``"toy2d"``,
        ``"hub_cards/digits"``, from any directory: a folder of that name in the current directory wins, as in
        the commands); else a Hub repository (from the local cache when ``HF_HUB_OFFLINE=1``). When none is found,
        the ``FileNotFoundError`` lists the shipped models.

        Reads ``model_index.json`` (any pipeline class: ScorePipeline, DDPMPipeline, DDIMPipeline,
        ScoreSdeVePipeline, score_toolkit exports) with its ``unet`` and ``scheduler`` components. Only JSON and
        safetensors are read and no code named by the folder is imported: the network class must be a
        diffusers model or score_toolkit's own, the scheduler a diffusers scheduler or score_toolkit's. The
        network is loaded with :func:`score_toolkit.models.load_model` (a missing, unexpected or mis-shaped
        weight, or a corrupt weight file, is an error) and returned in ``eval()`` mode. ``torch_dtype`` is a
        floating-point ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``, ...); anything else is a
        ``TypeError``.
        """
        from ._utils import resolve_torch_dtype

        torch_dtype = resolve_torch_dtype(torch_dtype)
        folder = _resolve_folder(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only, token=token)
        pipe = cls(**load_components(folder, torch_dtype))
        source = _read_json(folder / "model_index.json", "model_index.json").get("_class_name")
        pipe._source_pipeline = source if isinstance(source, str) else None
        pipe._source_folder = folder  # where the model's own grids are looked up (grids/, see ScorePipeline.make_sampler)
        return pipe


def _route_operator(sampler, sampler_kwargs, operator, observation, mask):
    """Samplers with their own ``operator`` option (repaint, imputation) get the operator and observation as options."""
    if operator is None and mask is None:
        return sampler_kwargs
    from .registry import get_sampler_class
    from .samplers.base import Sampler

    cls = type(sampler) if isinstance(sampler, Sampler) else (get_sampler_class(sampler) if isinstance(sampler, str) else None)
    if cls is None or "operator" not in cls.options or isinstance(sampler, Sampler):
        return sampler_kwargs
    from .conditioning import Mask

    if mask is not None and operator is not None:
        raise ValueError("pass either mask (inpainting) or operator, not both")
    op = Mask(torch.as_tensor(mask)) if mask is not None else operator
    return {**sampler_kwargs, "operator": op, "observation": observation}


def _remove_replaced_weights(target: Path, written: list[Path], variant: str | None) -> None:
    """Remove from the component folders a save wrote into the weight files of the same variant
    (:func:`~score_toolkit.hub.weight_file_pattern`) that this save did not write: left there, a sharded save's index
    made the folder load the earlier weights."""
    from .hub import weight_file_pattern

    pattern = weight_file_pattern(variant)
    kept = set(written)
    for folder in {p.parent for p in written if p.parent != target}:
        for p in folder.iterdir():
            if p not in kept and pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()


def _check_observation_settings(sampler, sampler_kwargs, operator, mask, noise_std, inverse_method) -> None:
    """``noise_std`` and ``inverse_method`` apply to an observation handled by a score transform: an error (not
    ignored) without an observation, or when the sampler takes the operator itself (``repaint``, ``imputation``:
    a noise-free observation, no inverse method)."""
    from .conditioning import INVERSE_METHODS

    if inverse_method not in INVERSE_METHODS:
        raise ValueError(f"expected inverse_method in {sorted(INVERSE_METHODS)}, found {inverse_method!r}")
    changed = {k: v for k, v, default in (("noise_std", noise_std, 0.0), ("inverse_method", inverse_method, "pigdm"))
               if v != default}
    if not changed:
        return
    if "operator" in sampler_kwargs:
        name = sampler if isinstance(sampler, str) else sampler.name
        raise ValueError(f"sampler {name!r} takes the operator and a noise-free observation itself: noise_std and "
                         f"inverse_method do not apply to it, found {changed}")
    if operator is None and mask is None:
        raise ValueError(f"noise_std and inverse_method describe an observation (operator= or mask=, with "
                         f"observation=); found {changed} without one")


def _make_sampler(sampler, sampler_options, num_inference_steps, sampler_kwargs):
    from .registry import get_sampler
    from .samplers.base import Sampler

    options = dict(sampler_options or {})
    clash = sorted(set(options) & set(sampler_kwargs))
    if clash:
        raise ValueError(f"sampler option(s) {clash} given both in sampler_options and as keyword arguments")
    options.update(sampler_kwargs)
    if isinstance(sampler, Sampler):
        if options or num_inference_steps is not None:
            raise ValueError("pass sampler options to the sampler's constructor when giving a Sampler instance")
        return sampler, options
    if not isinstance(sampler, str):
        raise TypeError(f"expected sampler to be a registered name or a Sampler, found {type(sampler).__name__}")
    if num_inference_steps is not None:
        if "num_steps" in options:
            raise ValueError("pass num_inference_steps or the sampler option num_steps, not both")
        options["num_steps"] = num_inference_steps
    elif sampler == DEFAULT_SAMPLER and "num_steps" not in options and not _grid_sets_steps(options.get("grid")):
        options["num_steps"] = DEFAULT_STEPS
    try:
        return get_sampler(sampler, **options), options
    except TypeError as err:
        if "unknown option" not in str(err):
            raise
        if num_inference_steps is not None and not _has_num_steps(sampler):
            raise TypeError(f"sampler {sampler!r} has no num_steps option: num_inference_steps does not apply to "
                            f"it; {err}") from err
        raise TypeError(f"{err} (ScorePipeline's own arguments are {list(_CALL_ARGS)})") from err


def _grid_sets_steps(grid) -> bool:
    """Whether a ``grid`` option fixes the number of steps itself (a saved grid, explicit times), so that the
    default ``num_steps`` must not be added to it."""
    from .samplers.grid_store import GRID_KINDS, REFERENCE_GRID

    return grid is not None and not (isinstance(grid, str) and grid in (*GRID_KINDS, REFERENCE_GRID))


def _model_grid_warning():
    from .model_grids import ModelGridWarning

    return ModelGridWarning


def _grid_label(sampler) -> str | None:
    grid = getattr(sampler, "config", {}).get("grid")
    if grid is None or isinstance(grid, str):
        return grid
    return "option grid" if isinstance(grid, (list, tuple, torch.Tensor)) else str(grid)


def _has_num_steps(name: str) -> bool:
    from .registry import get_sampler_class

    try:
        cls = get_sampler_class(name)
    except (KeyError, ValueError, TypeError):
        return True  # an unknown sampler: the error from get_sampler says so
    return "num_steps" in {**cls.common_options, **cls.options}


def _value_range(value_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"expected value_range (low, high): two finite numbers with high > low, found {value_range!r}")
    return lo, hi


def _to_images(samples: torch.Tensor, output_type: str, value_range) -> Any:
    lo, hi = _value_range(value_range)
    images = ((samples.float() - lo) / (hi - lo)).clamp(0, 1)
    if output_type == "pt":
        return images
    arr = images.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    return DiffusionPipeline.numpy_to_pil(arr)
