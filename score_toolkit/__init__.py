"""score_toolkit: score-based generative models on the diffusers ecosystem.

Public API (see README.md and docs/):

* processes: :class:`VESDE`, :class:`VPSDE`, :class:`SubVPSDE`, :class:`DiscreteVP`,
  :func:`process_from_scheduler_config`
* score adapters: :class:`ScoreAdapter`
* analytic test bed: :class:`GaussianMixture`, :func:`gaussian`, :func:`ring_mixture`,
  :func:`anisotropic_mixture`
* samplers: :func:`list_samplers`, :func:`get_sampler`, :func:`register_sampler`, :class:`Sampler`
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # processes
    "Process": "score_toolkit.processes",
    "VESDE": "score_toolkit.processes",
    "VPSDE": "score_toolkit.processes",
    "SubVPSDE": "score_toolkit.processes",
    "DiscreteVP": "score_toolkit.processes",
    "process_from_config": "score_toolkit.processes",
    "process_from_scheduler_config": "score_toolkit.processes",
    # scores
    "ScoreAdapter": "score_toolkit.scores",
    "PREDICTION_TYPES": "score_toolkit.scores",
    # analytic test bed
    "GaussianMixture": "score_toolkit.analytic",
    "gaussian": "score_toolkit.analytic",
    "ring_mixture": "score_toolkit.analytic",
    "anisotropic_mixture": "score_toolkit.analytic",
    # samplers
    "Sampler": "score_toolkit.samplers.base",
    "SamplerOutput": "score_toolkit.samplers.base",
    "SamplerProperties": "score_toolkit.samplers.base",
    "list_samplers": "score_toolkit.registry",
    "get_sampler": "score_toolkit.registry",
    "register_sampler": "score_toolkit.registry",
    "get_sampler_class": "score_toolkit.registry",
    "sampler_info": "score_toolkit.registry",
    # objectives
    "get_objective": "score_toolkit.objectives",
    "OBJECTIVES": "score_toolkit.objectives",
    "ESM": "score_toolkit.objectives",
    "ISM": "score_toolkit.objectives",
    "SSM": "score_toolkit.objectives",
    "DSM": "score_toolkit.objectives",
    "NCSN": "score_toolkit.objectives",
    "ContinuousDSM": "score_toolkit.objectives",
    "EpsilonLoss": "score_toolkit.objectives",
    # pipeline and distributed sampling
    "ScorePipeline": "score_toolkit.pipeline",
    "sample_to_folder": "score_toolkit.distributed",
    # models
    "ScoreMLP": "score_toolkit.models",
    "EnergyMLP": "score_toolkit.models",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'score_toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__

