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

from .._utils import resolve_torch_dtype
from .._warnings import caller_stacklevel

__all__ = ["CheckpointError", "CheckpointDtypeWarning", "StrictLoadingMixin", "strict_from_pretrained"]

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


_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class CheckpointDtypeWarning(UserWarning):
    """Weights stored in another floating-point dtype than the one they are loaded in (converted)."""


def _weight_files(folder: str, variant: str | None) -> list[str]:
    single = os.path.join(folder, _add_variant(_SAFETENSORS_NAME, variant))
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, _add_variant(_SAFETENSORS_INDEX_NAME, variant))
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(folder, os.path.basename(str(v))) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"corrupt weight index {index}: {err}") from err
    return files


def _header(files: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` read from the headers only (no tensor is loaded)."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
        except Exception as err:  # safetensors raises its own error type (and OSError for unreadable files)
            raise CheckpointError(f"corrupt or truncated weight file {file}: {err}") from err
    return out


def _check_against_weights(cls, config: dict[str, Any], folder: str, variant: str | None, torch_dtype) -> None:
    """Compare the network that ``config`` describes, built on the ``meta`` device (no memory), with the weight
    file's header: names, shapes and dtypes. So an untrusted config cannot make loading allocate more than the
    weight file holds, and weights stored as integers or booleans are refused instead of cast to floats."""
    import warnings

    import torch

    header = _header(_weight_files(folder, variant))
    default_dtype = torch.get_default_dtype()
    try:  # built as loading builds it: in torch_dtype, except what the network keeps in float32
        if torch_dtype is not None:
            torch.set_default_dtype(torch_dtype)
        with torch.device("meta"):
            skeleton = cls.from_config(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json does not describe a valid {cls.__name__}: {err}") from err
    finally:
        torch.set_default_dtype(default_dtype)
    expected = {k: v for k, v in skeleton.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing:
        problems.append(f"missing weights {missing}")
    if unexpected:
        problems.append(f"unexpected weights {unexpected}")
    shapes = [f"{k}: checkpoint {header[k][0]} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in header and header[k][0] != tuple(v.shape)]
    if shapes:
        problems.append(f"mis-shaped weights [{'; '.join(shapes)}] (config.json describes another network than "
                        f"the weight file holds)")
    bad_dtypes = [f"{k}: {header[k][1]}" for k, v in expected.items()
                  if k in header and v.is_floating_point() and header[k][1] not in _FLOAT_DTYPES]
    if bad_dtypes:
        problems.append(f"weights stored as non-floating-point types [{'; '.join(bad_dtypes)}] where the network "
                        f"holds floating-point tensors")
    if problems:
        raise CheckpointError(f"the checkpoint in {folder} does not match {cls.__name__}: " + "; ".join(problems))
    if torch_dtype is not None:  # the conversion asked for (tensors the network keeps in their own dtype, such as
        return  # the float32 Fourier frequencies of a half-precision MLP, are loaded in that dtype)
    converted = {}
    for k, v in expected.items():
        target = v.dtype
        stored = _FLOAT_DTYPES.get(header[k][1])
        if v.is_floating_point() and stored is not None and stored != str(target).removeprefix("torch."):
            converted.setdefault(stored, []).append(k)
    if converted:
        target_name = str(torch.get_default_dtype()).removeprefix("torch.")
        what = "; ".join(f"{len(keys)} tensor(s) stored as {dt} (e.g. {keys[0]})" for dt, keys in converted.items())
        warnings.warn(f"{folder}: {what} are loaded as {target_name}; pass torch_dtype= to load them in "
                      f"another dtype", CheckpointDtypeWarning, stacklevel=caller_stacklevel())


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
    ``local_files_only``, ``token``, ...), ``torch_dtype`` (a floating-point ``torch.dtype`` or its name, such as
    ``"bfloat16"``) and ``output_loading_info`` (then returns
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
    for key in ("torch_dtype", "dtype"):
        if key in kwargs:
            kwargs[key] = resolve_torch_dtype(kwargs[key], key)
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
    if os.path.isdir(path):
        config = _read_config_file(config_file)
    else:
        try:
            config = cls.load_config(path, **config_kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"corrupt config.json in {where}: {err}") from err
    _check_config(cls, dict(config), where)
    if os.path.isdir(path):
        _check_against_weights(cls, dict(config), local, kwargs.get("variant"),
                               kwargs.get("torch_dtype", kwargs.get("dtype")))

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


def _read_config_file(config_file: str) -> dict[str, Any]:
    """A local ``config.json``: a JSON object in UTF-8, else a :class:`CheckpointError` saying what was found."""
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt config file {config_file} (expected JSON text in UTF-8): {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"expected config file {config_file} to hold a JSON object, found {type(config).__name__}")
    return config
