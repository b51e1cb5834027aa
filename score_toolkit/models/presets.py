"""Image network presets: diffusers ``UNet2DModel`` configurations of published score / diffusion models.

==========================  =====================================================================================
``ddpm_cifar10``            the layout of google/ddpm-cifar10-32 (Ho et al. 2020): widths 128-256-256-256, two
                            residual blocks per level, self-attention at 16x16, sinusoidal time embedding;
                            35,746,307 parameters at 3 channels (35.7M). Trained with epsilon prediction on the
                            DDPM linear table (``DiscreteVP``, 1000 steps); the network receives the table index.
``ddpm_cifar10_small``      the same layout at 1/4 width (32-64-64-64): 2.25M parameters, trains on a CPU.
``ncsnpp_32``               an NCSN++-style VE network (Song et al. 2021) as diffusers builds the google/ncsnpp-*
                            models: Gaussian Fourier time embedding of log(sigma), progressive skip blocks
                            (``SkipDownBlock2D`` / ``SkipUpBlock2D``, FIR resampling), attention at 16x16, mid
                            block scaled by 1/sqrt(2); at 32x32 with widths 128-256-256-256 and two residual blocks
                            per level (score_sde's CIFAR-10 NCSN++ uses four): 39.5M parameters. diffusers divides
                            the output by the time input, so with ``time_input: sigma`` it is the score of a
                            ``VESDE`` (``prediction_type: score``).
``ncsnpp_32_small``         the same at 1/4 width (32-64-64-64): 2.49M parameters, trains on a CPU.
==========================  =====================================================================================

``sample_size``, ``in_channels`` and ``out_channels`` are not part of a preset: training fills them in from the
data. :data:`PRESET_RECIPES` gives each preset's process, prediction type, time input and objective, as the
training configs in ``hub_cards/configs/`` use them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["UNET_PRESETS", "PRESET_RECIPES", "unet_preset", "build_unet", "count_parameters"]

# what the two 32x32 presets share: widths and depth, GroupNorm's epsilon, SiLU
_UNET_32: dict[str, Any] = {"block_out_channels": [128, 256, 256, 256], "layers_per_block": 2, "norm_eps": 1e-6,
                            "act_fn": "silu"}

_DDPM_CIFAR10: dict[str, Any] = {
    **_UNET_32,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_num_groups": 32,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
}

_NCSNPP_32: dict[str, Any] = {
    **_UNET_32,
    "down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"],
    "up_block_types": ["SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": math.sqrt(2.0),
    "time_embedding_type": "fourier",
}

_SMALL = {"block_out_channels": [32, 64, 64, 64]}

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "ddpm_cifar10": _DDPM_CIFAR10,
    "ddpm_cifar10_small": {**_DDPM_CIFAR10, **_SMALL},
    "ncsnpp_32": _NCSNPP_32,
    "ncsnpp_32_small": {**_NCSNPP_32, **_SMALL},
}

_DDPM_RECIPE = {
    "process": {"name": "DiscreteVP",
                "options": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                            "beta_end": 0.02}},
    "prediction_type": "epsilon",
    "time_input": "index",
    "objective": {"name": "epsilon", "options": {}},
}
_VE_RECIPE = {
    "process": {"name": "VESDE", "options": {"sigma_min": 0.01, "sigma_max": 50.0}},
    "prediction_type": "score",
    "time_input": "sigma",
    "objective": {"name": "continuous_dsm", "options": {}},
}

PRESET_RECIPES: dict[str, dict[str, Any]] = {
    "ddpm_cifar10": _DDPM_RECIPE,
    "ddpm_cifar10_small": _DDPM_RECIPE,
    "ncsnpp_32": _VE_RECIPE,
    "ncsnpp_32_small": _VE_RECIPE,
}


def unet_preset(name: str, **overrides) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of preset ``name`` with ``overrides`` applied (a new dict)."""
    if name not in UNET_PRESETS:
        import difflib

        close = difflib.get_close_matches(str(name), UNET_PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown UNet preset {name!r}.{hint} Available: {', '.join(UNET_PRESETS)}")
    out = {k: list(v) if isinstance(v, list) else v for k, v in UNET_PRESETS[name].items()}
    out.update(overrides)
    return out


def build_unet(name: str, *, sample_size: int = 32, in_channels: int = 3, out_channels: int | None = None,
               **overrides):
    """A freshly initialised diffusers ``UNet2DModel`` of preset ``name``."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=sample_size, in_channels=in_channels,
                       out_channels=in_channels if out_channels is None else out_channels,
                       **unet_preset(name, **overrides))


def count_parameters(model) -> int:
    """Number of parameters of a network."""
    return sum(p.numel() for p in model.parameters())
