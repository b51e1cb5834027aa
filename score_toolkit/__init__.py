"""score_toolkit: score-based generative models on the diffusers ecosystem.

Public API (see README.md and docs/):

* processes: :class:`VESDE`, :class:`VPSDE`, :class:`SubVPSDE`, :class:`DiscreteVP`,
  :func:`process_from_scheduler_config`
* score adapters: :class:`ScoreAdapter`
* analytic test bed: :class:`GaussianMixture`, :func:`gaussian`, :func:`ring_mixture`,
  :func:`anisotropic_mixture`
* samplers: :func:`list_samplers`, :func:`get_sampler`, :func:`register_sampler`, :class:`Sampler`

``import score_toolkit`` is enough for diffusers' ``DiffusionPipeline.from_pretrained`` to load folders
whose ``model_index.json`` names score_toolkit's networks and schedulers (see :data:`COMPONENT_MODULES`),
and it stays light: nothing heavier than the standard library is imported until a name is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
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


# diffusers' DiffusionPipeline.from_pretrained resolves a third-party component ["module.path", "Class"] of
# model_index.json with sys.modules.get("module.path") (it never imports a module a folder names), then
# getattr(module, "Class") and getattr(module, "ModelMixin" / "SchedulerMixin"). These are the modules whose
# classes score_toolkit writes there (diffusers records a class's full defining module path). They are put
# in sys.modules now, as deferred modules: the module object exists (with __name__, __file__, __spec__) and
# its code runs, importing torch and diffusers, on the first access to a name it does not hold yet. So
# `import score_toolkit` stays fast and imports no sampler. (importlib.util.LazyLoader is not usable here:
# it runs the module on ANY attribute access, and inspect.getmodule, which torch calls while it is being
# imported, reads __file__ of every module in sys.modules, which would re-enter the half-done torch import.)
COMPONENT_MODULES = (
    "score_toolkit.models.mlp",  # ScoreMLP, EnergyMLP
    "score_toolkit.schedulers",  # ScoreSDEScheduler
    "score_toolkit.diffusers_schedulers",  # ScoreAncestralScheduler, ScoreEulerMaruyamaScheduler, ScoreDPMSolverScheduler
)

_load_lock = threading.RLock()


class _DeferredModule(types.ModuleType):
    """A module registered in sys.modules whose code runs on first use of one of its names."""

    def __getattr__(self, name: str) -> Any:
        # only called for names the module does not hold; dunder probes (__path__, __warningregistry__,
        # __wrapped__, ...) never trigger the import, except __all__ (read by `from module import *`)
        if name.startswith("__") and name.endswith("__") and name != "__all__":
            raise AttributeError(name)
        _run_deferred(self)
        return getattr(self, name)


def _run_deferred(module: types.ModuleType) -> None:
    with _load_lock:
        if type(module) is not _DeferredModule:  # another thread (or a re-entrant access) got here first
            return
        module.__class__ = types.ModuleType
        try:
            module.__spec__.loader.exec_module(module)
        except BaseException:
            module.__class__ = _DeferredModule  # the next access tries again and raises the same error
            raise


def _register_deferred_module(name: str) -> None:
    if name in sys.modules:
        return
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name)  # score_toolkit / score_toolkit.models: both light
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken installation
        raise ImportError(f"score_toolkit is incomplete: cannot find the module {name}")
    module = importlib.util.module_from_spec(spec)  # sets __name__, __file__, __spec__, __loader__
    module.__class__ = _DeferredModule
    sys.modules[name] = module
    setattr(parent, child, module)


for _name in COMPONENT_MODULES:
    _register_deferred_module(_name)
del _name
