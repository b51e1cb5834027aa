"""Build a conditional score function from plain arguments (what ``ScorePipeline(..., class_labels=, guidance_scale=,
operator=, observation=, mask=)`` and the command line use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .guidance import ClassifierFreeGuidance, LabelledScoreAdapter
from .inverse import DPS, PiGDM, Replacement
from .operators import LinearOperator, Mask

__all__ = ["INVERSE_METHODS", "conditional_score"]

INVERSE_METHODS: dict[str, type] = {"pigdm": PiGDM, "dps": DPS, "replacement": Replacement}


def conditional_score(
    score_fn: Callable,
    process,
    *,
    model: Any = None,
    prediction_type: str = "epsilon",
    time_input: Any = "t",
    class_labels=None,
    guidance_scale: float = 1.0,
    operator: LinearOperator | None = None,
    observation: torch.Tensor | None = None,
    mask=None,
    noise_std: float = 0.0,
    inverse_method: str = "pigdm",
    inverse_options: dict[str, Any] | None = None,
) -> Callable:
    """The score function ``score_fn`` conditioned on class labels (classifier-free guidance with the label-conditional
    ``model``) and/or on an observation ``y = A x + noise_std n`` (``operator`` and ``observation``, or ``mask`` and
    ``observation`` for inpainting), with the inverse-problem method ``inverse_method`` (``pigdm``, ``dps``,
    ``replacement``; options such as ``scale`` or ``data_variance`` in ``inverse_options``). With nothing to condition
    on, ``score_fn`` is returned unchanged. Bad combinations are errors: ``guidance_scale`` without ``class_labels``,
    both ``mask`` and ``operator``, an operator without an observation or the reverse, ``noise_std`` or
    ``inverse_options`` without an observation."""
    guidance_scale = float(guidance_scale)
    if class_labels is None and guidance_scale != 1.0:
        raise ValueError("guidance_scale needs class_labels (the classes to generate)")
    if mask is not None:
        if operator is not None:
            raise ValueError("pass either mask (inpainting) or operator, not both")
        operator = Mask(torch.as_tensor(mask))
    if (operator is None) != (observation is None):
        raise ValueError("pass an observation together with operator or mask (and neither for unconditional sampling)")
    if operator is not None and not isinstance(operator, LinearOperator):
        raise TypeError(f"expected operator to be a score_toolkit.conditioning LinearOperator, found {type(operator).__name__}")
    if inverse_method not in INVERSE_METHODS:
        raise ValueError(f"expected inverse_method in {sorted(INVERSE_METHODS)}, found {inverse_method!r}")
    if operator is None and (noise_std != 0 or inverse_options):
        raise ValueError(f"noise_std and inverse_options describe an observation (operator= or mask=, with "
                         f"observation=); found noise_std={noise_std!r}, inverse_options={inverse_options!r} without one")
    out = score_fn
    if class_labels is not None:
        if model is None:
            raise ValueError("class_labels need the label-conditional network (model=)")
        labelled = LabelledScoreAdapter(model, process, prediction_type, time_input)
        out = ClassifierFreeGuidance(labelled, class_labels, guidance_scale=guidance_scale)
    if operator is not None:
        if not isinstance(observation, torch.Tensor):
            observation = torch.as_tensor(observation)
        out = INVERSE_METHODS[inverse_method](out, process, operator, observation, noise_std, **(inverse_options or {}))
    return out
