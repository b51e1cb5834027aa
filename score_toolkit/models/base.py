"""Strict checkpoint loading for diffusers models.

diffusers' ``ModelMixin.from_pretrained`` is lenient (CONVENTIONS.md, "Traps in from_pretrained"): without
``use_safetensors=True`` it falls back to a pickled ``.bin``; missing weights are only a warning and stay
uninitialised (or on the ``meta`` device); unknown config keys are warned about and kept. Here every one of
those is an error, raised before a half-loaded network can reach a sampler.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

from diffusers import ModelMixin

__all__ = ["CheckpointError", "StrictLoadingMixin", "strict_from_pretrained"]

_SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
_SAFETENSORS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# Keyword arguments forwarded to diffusers unchanged (Hub resolution, dtype, mmap).
_PASSTHROUGH = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder",
                "variant", "torch_dtype", "dtype", "disable_mmap")
# Keyword arguments that DiffusionPipeline.from_pretrained hands to every ModelMixin component (mostly None);
# strict loading accepts them only at values that do not weaken it.
_PIPELINE_ONLY_NONE = ("device_map", "max_memory", "offload_folder", "offload_state_dict", "quantization_config")


class CheckpointError(ValueError):
    """A checkpoint that strict loading refuses: missing, unexpected or mis-shaped weights, a corrupt weight
    file, or a config that does not match the class."""


def _add_variant(name: str, variant: str | None) -> str:
    # same rule as diffusers' _add_variant: the variant goes before the last extension
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _check_local_weights(folder: str, variant: str | None) -> None:
    """Refuse a local folder without safetensors weights, and a safetensors file whose header is corrupt."""
    from safetensors import safe_open

    single = os.path.join(folder, _add_variant(_SAFETENSORS_NAME, variant))
    index = os.path.join(folder, _add_variant(_SAFETENSORS_INDEX_NAME, variant))
    if os.path.isfile(single):
        try:
            with safe_open(single, framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error type (and OSError for unreadable files)
            raise CheckpointError(f"corrupt or truncated weight file {single}: {err}") from err
        return
    if os.path.isfile(index):
        return
    others = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".safetensors")))
    hint = ""
    if any(not n.endswith(".safetensors") for n in others):
        hint = (" Pickled weight files are refused (loading them can run arbitrary code); convert them once with "
                "torch.load + safetensors.torch.save_file in a trusted environment.")
    raise FileNotFoundError(
        f"expected the weight file {single} (safetensors), found {others if others else 'no weight file'} "
        f"in {folder}.{hint}"
    )


def _init_keys(cls) -> set[str] | None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"self"} - set(getattr(cls, "ignore_for_config", []) or [])


def _check_config(cls, config: dict[str, Any], where: str) -> None:
    name = config.get("_class_name")
    if name is not None and name != cls.__name__:
        raise CheckpointError(
            f"expected a {cls.__name__} checkpoint in {where}, found a {name} checkpoint (config.json _class_name); "
            f"load it with {name}.from_pretrained or score_toolkit.models.load_model(None, folder)"
        )
    allowed = _init_keys(cls)
    if allowed is None:
        return
    allowed |= set(getattr(cls, "_deprecated_kwargs", []) or [])
    unknown = sorted(k for k in config if not k.startswith("_") and k not in allowed)
    if unknown:
        raise CheckpointError(
            f"unknown config keys {unknown} in {where}/config.json for {cls.__name__} "
            f"(expected a subset of {sorted(allowed)})"
        )


def strict_from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
    """Load ``cls`` (any diffusers ``ModelMixin`` subclass) from a folder or Hub repository, strictly.

    * weights must be safetensors (``use_safetensors=False`` is refused; a folder holding only a ``.bin`` is a
      ``FileNotFoundError`` naming the expected file);
    * every weight of the model must be in the checkpoint with the right shape, and every weight of the
      checkpoint must be used: otherwise a :class:`CheckpointError` (a ``ValueError``) names the folder and the
      missing, unexpected and mis-shaped keys;
    * a corrupt or truncated weight file is a :class:`CheckpointError` naming the file;
    * ``config.json`` must name ``cls`` (``_class_name``) and hold no keys that ``cls.__init__`` does not take.

    Accepts diffusers' Hub arguments (``subfolder``, ``variant``, ``revision``, ``cache_dir``,
    ``local_files_only``, ``token``, ...), ``torch_dtype`` and ``output_loading_info`` (then returns
    ``(model, info)`` as diffusers does). The memory-saving options that ``DiffusionPipeline`` always passes are
    accepted at their defaults (``device_map=None`` ...); ``low_cpu_mem_usage`` is accepted for that reason but
    loading always materialises every weight (``low_cpu_mem_usage=False``), so that nothing stays on ``meta``.
    Any other keyword is a ``TypeError``.
    """
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise TypeError(f"expected a diffusers ModelMixin subclass, found {cls!r}")
    if pretrained_model_name_or_path is None:
        raise ValueError("expected a folder or a Hub repository id, found None")
    kwargs = dict(kwargs)
    output_loading_info = bool(kwargs.pop("output_loading_info", False))
    use_safetensors = kwargs.pop("use_safetensors", None)
    if use_safetensors is not None and use_safetensors is not True:
        raise ValueError(f"strict loading reads safetensors only: expected use_safetensors None or True, "
                         f"found {use_safetensors!r}")
    if kwargs.pop("ignore_mismatched_sizes", False):
        raise ValueError("strict loading refuses ignore_mismatched_sizes=True (mis-shaped weights are errors)")
    if kwargs.pop("use_flashpack", False):
        raise ValueError("strict loading reads safetensors only: use_flashpack=True is not supported")
    kwargs.pop("low_cpu_mem_usage", None)
    for key in _PIPELINE_ONLY_NONE:
        if kwargs.pop(key, None) is not None:
            raise ValueError(f"strict loading does not support {key}= (load the model, then move it with .to())")
    unknown = sorted(set(kwargs) - set(_PASSTHROUGH))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword arguments {unknown} "
                        f"(accepted: {sorted(_PASSTHROUGH + ('output_loading_info', 'use_safetensors'))})")

    path = os.fspath(pretrained_model_name_or_path)
    subfolder = kwargs.get("subfolder") or ""
    local = os.path.join(path, subfolder)
    where = local if os.path.isdir(path) else f"{path}{'/' + subfolder if subfolder else ''}"
    if os.path.isdir(path):
        if not os.path.isdir(local):
            raise FileNotFoundError(f"expected the folder {local}, found nothing there")
        config_file = os.path.join(local, cls.config_name or "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"expected the config file {config_file}, found nothing there")
        _check_local_weights(local, kwargs.get("variant"))
    config_kwargs = {k: kwargs[k] for k in ("cache_dir", "force_download", "proxies", "local_files_only",
                                            "token", "revision", "subfolder") if k in kwargs}
    try:
        config = cls.load_config(path, **config_kwargs)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt config.json in {where}: {err}") from err
    _check_config(cls, dict(config), where)

    try:
        model, info = ModelMixin.from_pretrained.__func__(
            cls, path, use_safetensors=True, low_cpu_mem_usage=False, ignore_mismatched_sizes=True,
            output_loading_info=True, **kwargs,
        )
    except OSError as err:
        if "Unable to load weights" in str(err):
            raise CheckpointError(f"corrupt or unreadable weight file in {where}: {err}") from err
        raise
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing weights {sorted(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected weights {sorted(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shapes = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in info["mismatched_keys"]]
        problems.append(f"mis-shaped weights [{'; '.join(shapes)}]")
    if info.get("error_msgs"):
        problems.append(f"errors {info['error_msgs']}")
    if problems:
        raise CheckpointError(f"the checkpoint in {where} does not match {cls.__name__}: " + "; ".join(problems))
    return (model, info) if output_loading_info else model


class StrictLoadingMixin:
    """Mixin (listed before ``ModelMixin``) that makes ``from_pretrained`` strict: see
    :func:`strict_from_pretrained`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return strict_from_pretrained(cls, pretrained_model_name_or_path, **kwargs)
