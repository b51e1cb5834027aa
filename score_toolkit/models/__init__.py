"""Networks: vector score and energy MLPs (diffusers ``ModelMixin``/``ConfigMixin``) with strict loading.

Image networks are diffusers' own ``UNet2DModel`` configurations (presets of published layouts in
:mod:`score_toolkit.models.presets`); :func:`load_model` loads those strictly too.

The names are resolved on first use (``from score_toolkit.models import ScoreMLP`` works as usual), so that
``import score_toolkit`` can make ``score_toolkit.models.mlp`` known to diffusers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "ScoreMLP": "mlp",
    "EnergyMLP": "mlp",
    "GaussianFourierEmbedding": "mlp",
    "CheckpointError": "base",
    "CheckpointDtypeWarning": "base",
    "StrictLoadingMixin": "base",
    "strict_from_pretrained": "base",
    "load_model": "loading",
    "UNET_PRESETS": "presets",
    "PRESET_RECIPES": "presets",
    "unet_preset": "presets",
    "build_unet": "presets",
}

__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'score_toolkit.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | set(globals()))
