"""Conditional and controllable generation: score transforms and measurement operators (docs/conditioning.md).

Every method here maps the canonical ``score_fn(x, t)`` to a conditional one with the same signature, so every
sampler (built-in or plugin) samples conditionally without change:

* class guidance: :class:`ClassifierGuidance`, :class:`ClassifierFreeGuidance` (with :class:`LabelledScoreAdapter`
  for label-conditional networks);
* linear inverse problems ``y = A x + sigma_y n``: :class:`DPS`, :class:`PiGDM`, :class:`Replacement` (each with its
  likelihood ``log p~_t(y | x_t)``: ``twist(x, t).log_likelihood``, :meth:`~InverseProblemScore.twist`);
* operators ``A``: :class:`Mask`, :class:`Downsample`, :class:`Greyscale`, :class:`GaussianBlur`,
  :class:`MatrixOperator` (:func:`make_operator` by name).

Methods that change the state between steps are registered samplers: ``imputation`` (score_sde's predictor-corrector
imputation) and ``repaint`` (RePaint's resampling); ``tds`` (the twisted diffusion sampler, sequential Monte Carlo
with DPS, PiGDM or replacement as the proposal and twist) makes those approximate methods asymptotically exact.
"""

from .classifier import NoisyClassifierMLP, noise_conditional_classifier_loss
from .compose import INVERSE_METHODS, conditional_score
from .correction import ObservationLikelihood, sample_with_final_correction
from .guidance import ClassifierFreeGuidance, ClassifierGuidance, LabelledScoreAdapter, check_labels, drop_labels
from .inverse import DPS, InverseProblemScore, PiGDM, Replacement, Twist
from .operators import Downsample, GaussianBlur, Greyscale, LinearOperator, Mask, MatrixOperator, make_operator

__all__ = [
    "ClassifierGuidance",
    "ClassifierFreeGuidance",
    "LabelledScoreAdapter",
    "check_labels",
    "drop_labels",
    "DPS",
    "PiGDM",
    "Replacement",
    "InverseProblemScore",
    "Twist",
    "LinearOperator",
    "Mask",
    "Downsample",
    "Greyscale",
    "GaussianBlur",
    "MatrixOperator",
    "make_operator",
    "conditional_score",
    "noise_conditional_classifier_loss",
    "NoisyClassifierMLP",
    "INVERSE_METHODS",
    "ObservationLikelihood",
    "sample_with_final_correction",
]
