"""Class guidance as score transforms: each maps a score function to a conditional one with the canonical
signature ``score_fn(x, t)`` (so every sampler, built-in or plugin, samples conditionally unchanged).

* :class:`ClassifierGuidance` (Song et al. 2021, Sec. 5 / eq. 48; Dhariwal & Nichol 2021):
  ``s(x, t) + scale * grad_x log p_t(y | x)`` from a noise-conditional classifier ``classifier(x, t) -> logits``.
  ``scale = 1`` is the exact conditional score ``grad log p_t(x | y)``; ``scale = w > 1`` is the score of the
  tempered ``p_t(x) p_t(y | x)^w / Z_t`` at every t (a density of its own at each t, but not the marginals of one
  diffusion: at t -> 0 it is ``p(x) p(y | x)^w / Z``).
* :class:`ClassifierFreeGuidance` (Ho & Salimans 2022): ``s_u + gamma (s_c - s_u)`` with the conditional and
  unconditional scores from ONE batched call of a label-conditional score function; ``gamma`` is diffusers'
  ``guidance_scale`` (the paper's ``w = gamma - 1``). With exact scores it equals classifier guidance with
  ``scale = gamma``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._utils import as_time, check_tensor
from ..samplers.langevin import energy_or_none

__all__ = ["ClassifierGuidance", "ClassifierFreeGuidance", "LabelledScoreAdapter", "check_labels", "drop_labels"]


def check_labels(labels, batch: int | None, num_classes: int | None, *, device=None, allow_null: int | None = None) -> torch.Tensor:
    """Class labels as a long tensor (B,) (an int or a (1,) tensor is repeated): every label in
    ``[0, num_classes)`` (or equal to ``allow_null``)."""
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = torch.tensor([labels])
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"expected class labels as an int or a 1-D integer tensor, found dtype {labels.dtype} "
                         f"and shape {tuple(labels.shape)}")
    if batch is not None:
        if labels.shape[0] == 1:
            labels = labels.expand(batch)
        elif labels.shape[0] != batch:
            raise ValueError(f"expected one class label per sample ({batch}) or a single label, found {labels.shape[0]}")
    if num_classes is not None:
        ok = (labels >= 0) & (labels < num_classes)
        if allow_null is not None:
            ok |= labels == allow_null
        if not bool(ok.all()):
            bad = sorted(set(labels[~ok].tolist()))
            raise ValueError(f"class label(s) {bad} outside the model's classes 0..{num_classes - 1}")
    return labels.to(device=device, dtype=torch.long) if device is not None else labels.long()


def _finite(value, name: str, owner: str) -> float:
    """A guidance scale: a finite real number (negative values are allowed: they push away from the class)."""
    try:
        v = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise ValueError(f"{owner}: expected {name} to be a finite number, found {value!r}")
    return v


def drop_labels(labels: torch.Tensor, null_label: int, p: float, generator=None) -> torch.Tensor:
    """Label dropout for classifier-free guidance training (Ho & Salimans 2022): each label is replaced by
    ``null_label`` with probability ``p`` (uniforms from ``generator``), so one network learns the conditional and the
    unconditional score."""
    from .. import _utils
    from ..samplers.base import time_dtype

    if not 0 <= float(p) <= 1:
        raise ValueError(f"expected a dropout probability in [0, 1], found {p!r}")
    # float64 uniforms, float32 on devices without float64 (MPS), as the samplers' times
    u = _utils.rand((labels.shape[0],), generator=generator, device=labels.device, dtype=time_dtype(labels))
    return torch.where(u < float(p), torch.full_like(labels, int(null_label)), labels)


class ClassifierGuidance:
    """``score_fn(x, t) + scale * grad_x log p_t(labels | x)``.

    Args:
        score_fn: the unconditional canonical score function.
        classifier: a noise-conditional classifier ``classifier(x, t) -> logits (B, K)`` (log-probabilities up to a
            per-sample constant), differentiable in x; e.g. :class:`score_toolkit.analytic.MixtureClassifier`.
        labels: the requested class per sample (B,) or one int for all.
        scale: guidance scale ``w`` (1: the exact conditional score when the classifier is exact).

    Cost per call: one score evaluation, one classifier evaluation and one backward pass through the classifier.

    When ``score_fn`` has an energy (``-log p_t`` up to a constant: an analytic score, a ScoreAdapter with
    ``prediction_type="energy"``), so has the guided score: ``energy(x, t) = E(x, t) - scale * log p_t(labels | x)``,
    the energy of ``p_t(x) p_t(labels | x)^scale`` (what MALA needs, e.g. in
    :func:`~score_toolkit.conditioning.sample_with_final_correction`).
    """

    def __init__(self, score_fn: Callable, classifier: Callable, labels, scale: float = 1.0):
        if not callable(score_fn) or not callable(classifier):
            raise TypeError("expected callable score_fn and classifier")
        self.score_fn, self.classifier, self.scale = score_fn, classifier, _finite(scale, "scale", "ClassifierGuidance")
        self.labels = check_labels(labels, None, getattr(classifier, "num_classes", None))
        self._base_energy = energy_or_none(score_fn)
        if self._base_energy is not None:
            self.energy = self._energy

    def _log_prob(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x, t)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"expected the classifier to return logits of shape ({x.shape[0]}, K), "
                             f"found {tuple(logits.shape)}")
        if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
            raise ValueError(f"class label(s) outside the classifier's classes 0..{logits.shape[1] - 1}")
        return torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]

    def _energy(self, x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x", min_rank=2)
        t = as_time(t, x.shape[0], like=x)
        labels = check_labels(self.labels, x.shape[0], None, device=x.device)
        return self._base_energy(x, t) - self.scale * self._log_prob(x, t, labels).to(x.dtype)

    def log_likelihood_grad(self, x: torch.Tensor, t) -> torch.Tensor:
        """``grad_x log p_t(labels | x)`` (shaped like x)."""
        t = as_time(t, x.shape[0], like=x)
        labels = check_labels(self.labels, x.shape[0], None, device=x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = self._log_prob(xg, t, labels).sum()
            (grad,) = torch.autograd.grad(logp, xg)
        return grad.to(x.dtype)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x", min_rank=2)
        return self.score_fn(x, t) + self.scale * self.log_likelihood_grad(x, t)

    def __repr__(self):
        return f"ClassifierGuidance(scale={self.scale:g})"


class ClassifierFreeGuidance:
    """Classifier-free guidance: ``s_u + guidance_scale * (s_c - s_u)``.

    Args:
        conditional_score_fn: ``f(x, t, labels) -> score`` of a network trained with label dropout
            (:class:`LabelledScoreAdapter` wraps a network; an analytic one is
            :meth:`score_toolkit.analytic.ClassConditionalMixture.score_fn`), where the label ``null_label`` means
            "no label" (the unconditional score).
        labels: the requested class per sample (B,) or one int.
        guidance_scale: diffusers' convention (1: the conditional score; 0: the unconditional one; the paper's
            ``w = guidance_scale - 1``).
        null_label: the label value of the unconditional prediction (default: ``conditional_score_fn.null_label``).

    Each call evaluates the conditional and the unconditional score in one batched call of ``2B`` samples (one
    network evaluation of twice the batch); at ``guidance_scale == 1`` only the conditional one (B samples).

    When ``conditional_score_fn`` has ``energy(x, t, labels)`` (``-log p_t(x | labels)``, e.g. the analytic
    :meth:`~score_toolkit.analytic.ClassConditionalMixture.score_fn`), so has the guided score:
    ``energy(x, t) = (1 - gamma) E_u + gamma E_c``, the energy of ``p_t(x)^{1 - gamma} p_t(x | c)^gamma`` (for MALA).
    """

    def __init__(self, conditional_score_fn: Callable, labels, guidance_scale: float = 1.0, null_label: int | None = None):
        if not callable(conditional_score_fn):
            raise TypeError("expected a callable conditional_score_fn(x, t, labels)")
        null = null_label if null_label is not None else getattr(conditional_score_fn, "null_label", None)
        if null is None:
            raise ValueError("pass null_label (the label of the unconditional prediction): the score function does "
                             "not declare one")
        self.fn, self.null_label = conditional_score_fn, int(null)
        self.guidance_scale = _finite(guidance_scale, "guidance_scale", "ClassifierFreeGuidance")
        self.labels = check_labels(labels, None, getattr(conditional_score_fn, "num_classes", None))
        if energy_or_none(conditional_score_fn) is not None:
            self.energy = self._energy

    def _energy(self, x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x", min_rank=2)
        t = as_time(t, x.shape[0], like=x)
        labels = check_labels(self.labels, x.shape[0], None, device=x.device)
        cond = self.fn.energy(x, t, labels)
        if self.guidance_scale == 1.0:
            return cond
        uncond = self.fn.energy(x, t, torch.full_like(labels, self.null_label))
        return (1.0 - self.guidance_scale) * uncond + self.guidance_scale * cond

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x", min_rank=2)
        b = x.shape[0]
        t = as_time(t, b, like=x)
        labels = check_labels(self.labels, b, None, device=x.device)
        if self.guidance_scale == 1.0:
            return self.fn(x, t, labels)
        null = torch.full_like(labels, self.null_label)
        both = self.fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both[:b], both[b:]
        return uncond + self.guidance_scale * (cond - uncond)

    def __repr__(self):
        return f"ClassifierFreeGuidance(guidance_scale={self.guidance_scale:g}, null_label={self.null_label})"


def _num_class_embeds(model) -> int | None:
    cfg = getattr(model, "config", None)
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    if cfg is None:
        return None
    n = get("num_class_embeds")
    if n is None:
        n = get("num_classes")
    return int(n) if n is not None else None


class LabelledScoreAdapter:
    """A label-conditional network as ``f(x, t, labels) -> score`` (for :class:`ClassifierFreeGuidance`).

    The network is called as ``model(x, time_input, class_labels=labels)`` (diffusers' ``UNet2DModel`` with
    ``num_class_embeds``, or the vector networks with ``num_classes``); the prediction is converted by a
    :class:`~score_toolkit.scores.ScoreAdapter` with the same ``process``, ``prediction_type`` and ``time_input``.

    The network's label table has ``num_classes`` rows (its config's ``num_class_embeds`` / ``num_classes``); the
    last one is the null label of label dropout (``null_label = num_classes - 1``), so the requestable classes are
    ``0..num_classes - 2`` unless ``null_label`` is given. A network without a label table is an error.
    """

    def __init__(self, model, process, prediction_type: str = "epsilon", time_input="t", *, null_label: int | None = None):
        from ..scores import ScoreAdapter

        n = _num_class_embeds(model)
        if n is None:
            raise ValueError(
                f"{type(model).__name__} was built without class labels (no num_class_embeds / num_classes in its "
                "config): class guidance needs a network trained with labels"
            )
        self.model = model
        self.null_label = n - 1 if null_label is None else int(null_label)
        self.num_classes = n - 1 if null_label is None else n
        self._labels: torch.Tensor | None = None
        self._adapter = ScoreAdapter(self._call_model, process, prediction_type, time_input)

    def _call_model(self, x, time):
        return self.model(x, time, class_labels=self._labels)

    def __call__(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        labels = check_labels(labels, x.shape[0], self.num_classes, device=x.device, allow_null=self.null_label)
        self._labels = labels
        try:
            return self._adapter(x, t)
        finally:
            self._labels = None
