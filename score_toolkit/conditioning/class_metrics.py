"""Class-conditional sample quality on the digits (docs/conditioning.md): for each requested class c, the share of
the samples the shipped digits classifier labels c, and the Frechet distance, in the classifier's penultimate
features (as :func:`score_toolkit.evaluation.evaluate_digits` computes the digits' distance), between the samples
and the real digits of class c; each next to its floor.

Floors, per class, from the real digits split as the unconditional floor splits them (even and odd indices of
scikit-learn's order, :data:`score_toolkit.evaluation.DIGITS_HALVES`): the reference is the odd half of class c;
the Frechet floor is the distance between the even half of class c and that reference (two disjoint real sets);
the accuracy floor is the classifier's accuracy on the even half of class c (80 % of the digits are its training
data, so this is an upper reference, not a held-out accuracy). With about 90 digits per half and 64 features, the
distances carry a large small-sample bias: compare a class's distance with its own floor, drawn at the same size
(:func:`class_sample_counts` gives the even half's size per class: draw that many samples of each class).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["ClassReport", "class_floors", "class_sample_counts", "evaluate_digits_classes"]


def _halves(targets: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(len(targets))
    return idx[(targets == c) & (idx % 2 == 0)], idx[(targets == c) & (idx % 2 == 1)]


def class_floors(classifier=None) -> dict[int, dict[str, Any]]:
    """Per class 0..9: ``size`` (the even half's size: draw that many samples), ``reference_size``,
    ``reference_features`` (odd half), ``frechet_distance`` (even vs odd half) and ``accuracy`` (the classifier on
    the even half)."""
    from ..digits_classifier import load_digits_classifier
    from ..evaluation import _real_digits, frechet_distance

    clf = load_digits_classifier() if classifier is None else classifier
    images, targets = _real_digits()
    labels, _, feats = clf.predict(images)
    out = {}
    for c in range(10):
        even, odd = _halves(targets, c)
        out[c] = {"size": len(even), "reference_size": len(odd), "reference_features": feats[odd],
                  "frechet_distance": frechet_distance(feats[even], feats[odd]),
                  "accuracy": float((labels[even] == c).double().mean())}
    return out


def class_sample_counts() -> dict[int, int]:
    """Samples to draw per class for a like-for-like comparison with the floors: the size of the class's even half
    of the real digits (88 to 92)."""
    from ..evaluation import _real_digits

    _, targets = _real_digits()
    return {c: len(_halves(targets, c)[0]) for c in range(10)}


@dataclass
class ClassReport:
    """Per-class results of class-conditional digit samples (:func:`evaluate_digits_classes`).

    ``rows``: one dict per requested class with ``class``, ``num_samples``, ``accuracy`` (share labelled as the
    class), ``accuracy_floor``, ``frechet_distance``, ``frechet_floor``, ``reference_size``. ``accuracy``: over all
    samples. ``nfe``, ``wall_time_s``: the sampling judged. ``details``: sampler, options, guidance scale."""

    rows: list[dict[str, Any]]
    accuracy: float
    num_samples: int
    nfe: int
    wall_time_s: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        scale = self.details.get("guidance_scale")
        head = (f"Class-conditional report (digits): {self.num_samples} samples"
                + (f", guidance scale {scale:g}" if scale is not None else "")
                + f", NFE {self.nfe}, sampling wall time {self.wall_time_s:.3g} s; classified as requested: "
                  f"{self.accuracy:.4f}")
        lines = [head, "", "| class | samples | classified as the class | floor (real digits) | Frechet distance | "
                           "floor (real vs real) |", "| --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            lines.append(f"| {r['class']} | {r['num_samples']} | {r['accuracy']:.3f} | {r['accuracy_floor']:.3f} | "
                         f"{r['frechet_distance']:.3f} | {r['frechet_floor']:.3f} |")
        return "\n".join(lines)

    def card_results(self, *, settings: dict[str, Any] | None = None, command: str | None = None) -> list[dict]:
        """Model-card results (:func:`score_toolkit.hub.update_model_card`): the overall share classified as
        requested, and per class its share and its Frechet distance, each with its floor; the class is the
        result's ``class_label`` setting (so one class's result replaces only that class's)."""
        base = {k: self.details[k] for k in ("sampler", "sampler_options", "guidance_scale") if k in self.details}
        base.update(nfe=self.nfe, **(settings or {}))
        classes = [r["class"] for r in self.rows]
        span = f"classes {classes[0]}..{classes[-1]}" if classes == list(range(classes[0], classes[-1] + 1)) \
            else "classes " + ",".join(map(str, classes))
        out = [{"type": "requested_class_accuracy", "value": _round(self.accuracy),
                "name": f"share of the class-conditional samples ({span}) the shipped digits classifier labels as "
                        f"the requested class",
                "settings": {**base, "class_label": span, "num_samples": self.num_samples}}]
        for r in self.rows:
            c, s = r["class"], {**base, "class_label": r["class"], "num_samples": r["num_samples"]}
            out.append({"type": "requested_class_accuracy", "value": _round(r["accuracy"]),
                        "floor": _round(r["accuracy_floor"]), "settings": dict(s),
                        "name": f"class {c}: share of the samples the shipped digits classifier labels {c}"})
            out.append({"type": "frechet_distance", "value": _round(r["frechet_distance"]),
                        "floor": _round(r["frechet_floor"]), "settings": dict(s),
                        "name": f"class {c}: Frechet distance to the real digits of class {c} (odd half, "
                                f"{r['reference_size']} images) in the shipped classifier's penultimate features"})
        if command:
            for r in out:
                r["command"] = command
        return out


def _round(v: float) -> float:
    return float(f"{float(v):.5g}")


def evaluate_digits_classes(samples: torch.Tensor, requested, *, nfe: int, wall_time_s: float, classifier=None,
                            details: dict[str, Any] | None = None) -> ClassReport:
    """Judge class-conditional digit samples (n, 1, 8, 8) in [-1, 1] whose requested classes are ``requested``
    (n labels in 0..9): per class, the share labelled as requested and the Frechet distance to the real digits of
    that class, with their floors (module docstring). Samples are clamped to [-1, 1] first, as when saved as
    images. A class needs at least 2 samples."""
    from ..digits_classifier import load_digits_classifier
    from ..evaluation import _check_timing, frechet_distance

    nfe, wall_time_s = _check_timing(nfe, wall_time_s)
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        found = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"expected digit samples of shape (n, 1, 8, 8), found {found}")
    requested = torch.as_tensor(requested).long().cpu()
    if requested.shape != (len(samples),):
        raise ValueError(f"expected one requested class per sample ({len(samples)}), found shape "
                         f"{tuple(requested.shape)}")
    if bool(((requested < 0) | (requested > 9)).any()):
        raise ValueError(f"expected requested classes in 0..9, found {sorted(set(requested.tolist()) - set(range(10)))}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("expected finite samples, found NaN or infinity")
    clf = load_digits_classifier() if classifier is None else classifier
    floors = class_floors(clf)
    labels, _, feats = clf.predict(samples.detach().float().cpu().clamp(-1, 1))
    rows = []
    for c in sorted(set(requested.tolist())):
        sel = requested == c
        if int(sel.sum()) < 2:
            raise ValueError(f"expected at least 2 samples of class {c}, found {int(sel.sum())}")
        fl = floors[c]
        rows.append({"class": c, "num_samples": int(sel.sum()), "accuracy": float((labels[sel] == c).double().mean()),
                     "accuracy_floor": fl["accuracy"],
                     "frechet_distance": frechet_distance(feats[sel], fl["reference_features"]),
                     "frechet_floor": fl["frechet_distance"], "floor_size": fl["size"],
                     "reference_size": fl["reference_size"]})
    accuracy = float((labels == requested).double().mean())
    return ClassReport(rows, accuracy, len(samples), nfe, wall_time_s, dict(details or {}))
