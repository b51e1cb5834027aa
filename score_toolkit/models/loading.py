"""Loading a network whose class is named by its folder: :func:`load_model` reads ``config.json``'s
``_class_name`` (one of this package's networks or a diffusers model class) and loads it strictly
(:func:`~score_toolkit.models.base.strict_from_pretrained`)."""

from __future__ import annotations

import os

from diffusers import ModelMixin

from .base import CheckpointError, _read_config_file, strict_from_pretrained
from .mlp import EnergyMLP, ScoreMLP

__all__ = ["load_model"]


def _resolve_class(name: str):
    ours = {c.__name__: c for c in (ScoreMLP, EnergyMLP)}
    if name in ours:
        return ours[name]
    import diffusers

    try:
        candidate = getattr(diffusers, name)
    except AttributeError:
        candidate = None
    if isinstance(candidate, type) and issubclass(candidate, ModelMixin):
        return candidate
    raise CheckpointError(
        f"expected config.json _class_name to name one of {sorted(ours)} or a diffusers model class, found {name!r}"
    )


def load_model(cls, folder, **kwargs):
    """Strictly load a network from ``folder``. ``cls`` is a ``ModelMixin`` subclass, or ``None`` to take it from
    ``config.json`` (``_class_name``: :class:`ScoreMLP`, :class:`EnergyMLP` or a diffusers model such as
    ``UNet2DModel``). Same arguments and errors as :func:`strict_from_pretrained`."""
    if cls is None:
        path = os.path.join(os.fspath(folder), kwargs.get("subfolder") or "")
        config_file = os.path.join(path, "config.json")
        if os.path.isdir(os.fspath(folder)):
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"expected the config file {config_file}, found nothing there")
            config = _read_config_file(config_file)
        else:
            config = ModelMixin.load_config(folder, **{k: v for k, v in kwargs.items() if k in (
                "cache_dir", "local_files_only", "token", "revision", "subfolder")})
        name = config.get("_class_name") if isinstance(config, dict) else None
        if not name:
            raise CheckpointError(f"expected config file {config_file} to name its class (_class_name), found none")
        cls = _resolve_class(name)
    return strict_from_pretrained(cls, folder, **kwargs)
