"""Samplers: one file each, all sharing :class:`~score_toolkit.samplers.base.Sampler`'s signature.
They are found by name through :mod:`score_toolkit.registry` (entry-point group
``score_toolkit.samplers``), never by importing this package."""

from .base import NonFiniteError, Sampler, SamplerOutput, SamplerProperties

__all__ = ["Sampler", "SamplerOutput", "SamplerProperties", "NonFiniteError"]
