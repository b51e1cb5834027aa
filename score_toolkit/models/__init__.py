"""Networks: vector score and energy MLPs (diffusers ``ModelMixin``/``ConfigMixin``) with strict loading.

Image networks are diffusers' own ``UNet2DModel`` configurations; :func:`load_model` loads those strictly too.
"""

from .base import CheckpointError, StrictLoadingMixin, load_model, strict_from_pretrained
from .mlp import EnergyMLP, GaussianFourierEmbedding, ScoreMLP

__all__ = [
    "ScoreMLP",
    "EnergyMLP",
    "GaussianFourierEmbedding",
    "CheckpointError",
    "StrictLoadingMixin",
    "strict_from_pretrained",
    "load_model",
]
