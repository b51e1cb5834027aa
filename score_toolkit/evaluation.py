"""Sample-quality reports: vector data against a reference set or an analytic mixture, and the digits.

* :func:`evaluate_vectors`: sliced Wasserstein-2, energy distance, MMD, and mode coverage (against a
  :class:`~score_toolkit.analytic.GaussianMixture`: mode-weight error, modes covered, within-mode sliced W2;
  against a reference set: the coverage and density of Naeem et al. 2020, "Reliable fidelity and diversity
  metrics for generative models"), each next to its noise floor (the same metric between two independent
  sets drawn from the reference law, of the same size).
* :func:`evaluate_digits`: the Frechet distance in the penultimate feature space of the shipped digits
  classifier (:mod:`score_toolkit.digits_classifier`), the classifier's mean confidence, the class histogram of
  the samples and its total-variation distance from the data's class frequencies, with the floors measured
  between two halves of the real digits (:func:`digits_floor`).
* :func:`sample_and_evaluate`: draw with a registered sampler, time it, and evaluate.

Every report (:class:`EvaluationReport`) carries the NFE and the wall time of the sampling it judges.

Frechet distance (Heusel et al. 2017, eq. 6, as FID): ``||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^{1/2} C_b
C_a^{1/2})^{1/2})``, computed with symmetric eigendecompositions in float64 (no complex square roots).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import metrics as M
from ._utils import check_tensor
from .analytic import GaussianMixture

__all__ = [
    "EvaluationReport",
    "evaluate_vectors",
    "evaluate_digits",
    "digits_floor",
    "frechet_distance",
    "gaussian_frechet_distance",
    "coverage_density",
    "sample_and_evaluate",
    "DIGITS_HALVES",
]

#: how the real digits are split in two for the floors: even and odd indices of scikit-learn's order
DIGITS_HALVES = "even indices (899 images) vs odd indices (898 images) of scikit-learn's 1797 digits"


@dataclass
class EvaluationReport:
    """A sample-quality report.

    Attributes:
        kind: ``"vectors"`` or ``"digits"``.
        num_samples: samples judged.
        nfe: score evaluations of the sampling judged; wall_time_s: its wall time (seconds).
        metrics: name -> value.
        floors: name -> the same metric between two independent reference sets (what perfect samples score).
        details: anything else (class histogram, per-mode counts, the reference used, the sampler).
    """

    kind: str
    num_samples: int
    nfe: int
    wall_time_s: float
    metrics: dict[str, float]
    floors: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"Sample-quality report ({self.kind}): {self.num_samples} samples, NFE {self.nfe}, "
                 f"sampling wall time {self.wall_time_s:.3g} s", "", "| metric | value | floor |", "| --- | --- | --- |"]
        for k, v in self.metrics.items():
            fl = self.floors.get(k)
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(fl) if fl is not None else '-'} |")
        hist = self.details.get("class_histogram")
        if hist is not None:
            lines += ["", "Class histogram of the samples (classifier labels 0..9): " + ", ".join(map(str, hist))]
        return "\n".join(lines)


    def card_results(self, *, settings: dict[str, Any] | None = None, command: str | None = None) -> list[dict]:
        """The metrics as model-card results (:func:`score_toolkit.hub.check_result`): one per metric, its floor as
        the result's floor, the sampling (sampler, options, NFE, number of samples) plus ``settings`` as its
        settings, ``command`` as the command that measured it (for :func:`score_toolkit.hub.update_model_card`)."""
        base = {k: self.details[k] for k in ("sampler", "sampler_options") if k in self.details}
        base.update(nfe=self.nfe, num_samples=self.num_samples, **(settings or {}))
        out = []
        for key, value in self.metrics.items():
            kind, name = _CARD_NAMES.get(key, (key, key.replace("_", " ")))
            if "{reference}" in name:
                name = name.format(reference=self.details.get("reference", "the reference"))
            result: dict[str, Any] = {"type": kind, "name": name, "value": _round(value), "settings": dict(base)}
            if self.floors.get(key) is not None:
                result["floor"] = _round(self.floors[key])
            if command:
                result["command"] = command
            out.append(result)
        return out


#: report metric -> (model-card metric type, name)
_CARD_NAMES = {
    "frechet_distance": ("frechet_distance", "Frechet distance to the real digits (odd half, 898 images) in the "
                                             "shipped classifier's penultimate features"),
    "mean_confidence": ("mean_confidence", "mean top-class probability the shipped digits classifier gives the "
                                           "samples"),
    "class_histogram_tv": ("class_histogram_tv", "total variation between the samples' class shares (classifier "
                                                 "labels) and the digits' label frequencies"),
    "sliced_w2": ("sliced_wasserstein", "sliced W2 to {reference}"),
    "energy_distance": ("energy_distance", "energy distance to {reference}"),
    "mmd": ("mmd", "MMD to {reference}"),
    "coverage": ("coverage", "coverage of {reference}"),
    "density": ("density", "density around {reference}"),
    "mode_weight_error": ("mode_weight_error", "mode-weight error (TV) against the true mixture"),
    "modes_covered": ("modes_covered", "modes of the true mixture covered"),
    "within_mode_sliced_w2": ("within_mode_sliced_wasserstein", "within-mode sliced W2 against the true mixture"),
}


def _round(v):
    return v if isinstance(v, int) else float(f"{float(v):.5g}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _check_timing(nfe, wall_time_s) -> tuple[int, float]:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 0:
        raise ValueError(f"expected nfe (score evaluations of the sampling judged) to be an int >= 0, found {nfe!r}")
    if isinstance(wall_time_s, bool) or not isinstance(wall_time_s, (int, float)) or not 0 <= wall_time_s < math.inf:
        raise ValueError(f"expected wall_time_s (seconds spent sampling) to be a number >= 0, found {wall_time_s!r}")
    return nfe, float(wall_time_s)


# ============================================================================================ Frechet
def gaussian_frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    lam_a, vec_a = torch.linalg.eigh(0.5 * (cov_a + cov_a.T))
    root_a = vec_a @ torch.diag(lam_a.clamp_min(0).sqrt()) @ vec_a.T
    middle = root_a @ cov_b @ root_a
    tr_root = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_root
    return float(value.clamp_min(0))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (n, k) (unbiased covariances)."""
    check_tensor(feats_a, "feats_a", min_rank=2)
    check_tensor(feats_b, "feats_b", min_rank=2)
    if feats_a.shape[1:] != feats_b.shape[1:] or feats_a.ndim != 2:
        raise ValueError(f"expected two feature sets (n, k) with the same k, found {tuple(feats_a.shape)} and "
                         f"{tuple(feats_b.shape)}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("expected at least 2 samples in each feature set")
    a, b = feats_a.double(), feats_b.double()
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1), b.mean(0),
                                     torch.cov(b.T).reshape(b.shape[1], -1))


# ============================================================================================ vectors
def coverage_density(samples: torch.Tensor, reference: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Coverage and density of Naeem et al. 2020 with the ``k``-nearest-neighbour balls of the reference points:
    coverage = fraction of reference points whose ball holds at least one sample (1 for perfect samples up to
    sampling noise; low when modes are missed); density = mean number of balls a sample falls in, divided by k
    (about 1 for perfect samples; low when samples land off the data)."""
    x = samples.reshape(len(samples), -1).double()
    r = reference.reshape(len(reference), -1).double()
    if x.shape[1] != r.shape[1]:
        raise ValueError(f"expected samples and reference with the same number of features, found {x.shape[1]} "
                         f"and {r.shape[1]}")
    if len(r) <= k:
        raise ValueError(f"expected more than k={k} reference points, found {len(r)}")
    radii = torch.cdist(r, r).kthvalue(k + 1, dim=1).values  # the point itself is its own first neighbour
    d = torch.cdist(x, r)  # (n, m)
    inside = d <= radii[None]
    coverage = float((d.min(0).values <= radii).double().mean())
    density = float(inside.double().sum(1).mean() / k)
    return coverage, density


def _split_metrics(x, y, seed: int, num_projections: int) -> dict[str, float]:
    return {
        "sliced_w2": M.sliced_wasserstein(x, y, num_projections=num_projections,
                                          generator=torch.Generator().manual_seed(seed)),
        "energy_distance": M.energy_distance(x, y),
        "mmd": M.mmd(x, y),
    }


def _modes_covered(samples: torch.Tensor, mixture: GaussianMixture, min_share: float) -> tuple[int, list[int]]:
    labels = mixture.posterior(samples.reshape(len(samples), -1).to(mixture.dtype)).argmax(1)
    counts = torch.bincount(labels.cpu(), minlength=mixture.num_components)
    expected = mixture.weights.cpu() * len(samples)
    return int((counts >= min_share * expected).sum()), counts.tolist()


def evaluate_vectors(samples: torch.Tensor, *, nfe: int, wall_time_s: float, reference: torch.Tensor | None = None,
                     mixture: GaussianMixture | None = None, num_projections: int = 256, coverage_k: int = 5,
                     min_mode_share: float = 0.25, seed: int = 0, details: dict[str, Any] | None = None
                     ) -> EvaluationReport:
    """Judge vector samples (n, ...) against a reference set (m, ...) or an analytic mixture (or both).

    Metrics (smaller is better unless said): ``sliced_w2``, ``energy_distance``, ``mmd`` against ``reference``
    (or, with only a mixture, against ``n`` exact draws of it); with a mixture: ``mode_weight_error`` (TV between
    weights and sample shares), ``modes_covered`` (components holding at least ``min_mode_share`` of their
    expected count; larger is better, out of ``details['num_modes']``) and ``within_mode_sliced_w2``; with a
    reference set: ``coverage`` and ``density`` (:func:`coverage_density`; near 1 is best).

    With a reference set of at least ``2 n`` points, the samples are judged against ``n`` of them and the floors
    are the same metrics for another disjoint ``n`` of them (like for like: coverage in particular depends on the
    ratio of the two set sizes, ``1 - e^{-k}`` for equal sizes); with fewer, the samples are judged against the
    whole reference and floors are left out. With only a mixture, the reference is ``n`` exact draws and the floors
    compare two other independent sets of ``n`` exact draws.
    ``nfe`` and ``wall_time_s`` describe the sampling judged (pass 0 for real data)."""
    nfe, wall_time_s = _check_timing(nfe, wall_time_s)
    check_tensor(samples, "samples", min_rank=2)
    if reference is None and mixture is None:
        raise ValueError("expected a reference set or an analytic mixture to judge the samples against, found neither")
    n = len(samples)
    if n < 2:
        raise ValueError(f"expected at least 2 samples, found {n}")
    x = samples.reshape(n, -1).double()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise ValueError(f"expected finite samples, found NaN or infinity in {bad} of {n}")
    info: dict[str, Any] = dict(details or {})
    metrics: dict[str, float] = {}
    floors: dict[str, float] = {}
    if reference is not None:
        check_tensor(reference, "reference", min_rank=2)
        ref = reference.reshape(len(reference), -1).double()
        if ref.shape[1] != x.shape[1]:
            raise ValueError(f"expected samples and reference with the same number of features, found {x.shape[1]} "
                             f"and {ref.shape[1]}")
        if len(ref) >= 2 * n:
            # like for like: the samples and the floor's pair are all judged against the same n reference points
            perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed + 1))
            a, b = ref[perm[:n]], ref[perm[n:2 * n]]
            metrics.update(_split_metrics(x, b, seed, num_projections))
            metrics["coverage"], metrics["density"] = coverage_density(x, b, coverage_k)
            floors.update(_split_metrics(a, b, seed, num_projections))
            floors["coverage"], floors["density"] = coverage_density(a, b, coverage_k)
            info["reference"] = f"{n} of the {len(ref)} reference points"
            info["floor"] = f"another disjoint random subset of {n} reference points, judged the same way"
        else:
            metrics.update(_split_metrics(x, ref, seed, num_projections))
            metrics["coverage"], metrics["density"] = coverage_density(x, ref, coverage_k)
            info["reference"] = f"all {len(ref)} reference points"
            info["floor"] = f"none: the reference holds fewer than 2 x {n} points"
    if mixture is not None:
        if x.shape[1] != mixture.dim:
            raise ValueError(f"expected samples with {mixture.dim} features (the mixture's), found {x.shape[1]}")
        if reference is None:
            exact = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 2))
            metrics.update(_split_metrics(x, exact, seed, num_projections))
            other = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 3))
            floors.update(_split_metrics(other, exact, seed, num_projections))
            info["reference"] = f"{n} exact draws of the mixture"
            info["floor"] = f"two independent sets of {n} exact draws"
        a = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 4))
        b = mixture.sample(n, generator=torch.Generator().manual_seed(seed + 5))
        metrics["mode_weight_error"] = M.mode_weight_error(x, mixture)
        floors["mode_weight_error"] = M.mode_weight_error(a, mixture)
        covered, counts = _modes_covered(x, mixture, min_mode_share)
        metrics["modes_covered"] = covered
        floors["modes_covered"] = _modes_covered(a, mixture, min_mode_share)[0]
        metrics["within_mode_sliced_w2"] = M.within_mode_sliced_wasserstein(x, mixture, reference=b,
                                                                            num_projections=num_projections)
        floors["within_mode_sliced_w2"] = M.within_mode_sliced_wasserstein(a, mixture, reference=b,
                                                                           num_projections=num_projections)
        info.update(num_modes=mixture.num_components, mode_counts=counts, min_mode_share=min_mode_share)
    return EvaluationReport("vectors", n, nfe, wall_time_s, {k: _num(v) for k, v in metrics.items()},
                            {k: _num(v) for k, v in floors.items()}, info)


def _num(v):
    return int(v) if isinstance(v, int) else float(v)


# ============================================================================================ digits
# per classifier object (weak keys: a new classifier never inherits a dead one's floor)
_FLOOR_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _real_digits():
    from .data import load_digits

    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as err:  # load_digits raises the same, with the install hint
        raise ImportError("the digits evaluation needs scikit-learn (pip install scikit-learn)") from err
    return load_digits().data, torch.as_tensor(sk_load().target, dtype=torch.long)


def digits_floor(classifier=None) -> dict[str, Any]:
    """The floors of the digits metrics, between two halves of the real digits (:data:`DIGITS_HALVES`): the
    Frechet distance, mean confidence and class-histogram TV of the even half judged against the odd half.
    Also returns the odd half's features (the reference of :func:`evaluate_digits`)."""
    from .digits_classifier import load_digits_classifier

    clf = load_digits_classifier() if classifier is None else classifier
    key = clf
    if key not in _FLOOR_CACHE:
        images, targets = _real_digits()
        labels, conf, feats = clf.predict(images)
        even, odd = slice(0, None, 2), slice(1, None, 2)
        ref_freq = torch.bincount(targets, minlength=10).double() / len(targets)
        _FLOOR_CACHE[key] = {
            "frechet_distance": frechet_distance(feats[even], feats[odd]),
            "mean_confidence": float(conf[even].mean()),
            "class_histogram_tv": float(0.5 * (torch.bincount(labels[even], minlength=10).double() / len(labels[even])
                                               - ref_freq).abs().sum()),
            "accuracy_on_real": float((labels == targets).double().mean()),
            "reference_features": feats[odd],
            "class_frequencies": ref_freq,
            "halves": DIGITS_HALVES,
        }
    return _FLOOR_CACHE[key]


def evaluate_digits(samples: torch.Tensor, *, nfe: int, wall_time_s: float, classifier=None,
                    details: dict[str, Any] | None = None) -> EvaluationReport:
    """Judge digit samples (n, 1, 8, 8) in [-1, 1] with the shipped classifier.

    Metrics: ``frechet_distance`` between the samples' penultimate features and those of the odd half of the
    real digits (899 vs 898 for the floor: draw about 900 samples for a like-for-like comparison; the
    distance is biased upwards for fewer), ``mean_confidence`` (mean max softmax probability; real digits score
    about the floor), ``class_histogram_tv`` (total variation between the sample's class shares and the data's
    label frequencies; 0 is best). Floors: the even half of the real digits judged the same way.
    ``details['class_histogram']`` holds the counts per class 0..9. Samples are clamped to [-1, 1] first, as when
    they are saved as images."""
    nfe, wall_time_s = _check_timing(nfe, wall_time_s)
    check_tensor(samples, "samples", min_rank=2)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected digit samples of shape (n, 1, 8, 8), found {tuple(samples.shape)}")
    if len(samples) < 2:
        raise ValueError(f"expected at least 2 samples, found {len(samples)}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("expected finite samples, found NaN or infinity")
    from .digits_classifier import load_digits_classifier

    clf = load_digits_classifier() if classifier is None else classifier
    floor = digits_floor(clf)
    x = samples.detach().float().cpu().clamp(-1, 1)
    labels, conf, feats = clf.predict(x)
    counts = torch.bincount(labels, minlength=10)
    metrics = {
        "frechet_distance": frechet_distance(feats, floor["reference_features"]),
        "mean_confidence": float(conf.mean()),
        "class_histogram_tv": float(0.5 * (counts.double() / len(labels) - floor["class_frequencies"]).abs().sum()),
    }
    floors = {k: floor[k] for k in metrics}
    info = {"class_histogram": counts.tolist(), "reference": "odd half of the real digits (898 images)",
            "floor": floor["halves"], **(details or {})}
    return EvaluationReport("digits", len(samples), nfe, wall_time_s, metrics, floors, info)


# ============================================================================================ sampling
def sample_and_evaluate(score_fn: Callable, process, sampler, *, shape, kind: str = "vectors",
                        generator: torch.Generator | None = None, reference: torch.Tensor | None = None,
                        mixture: GaussianMixture | None = None, dtype=torch.float32, device=None,
                        **evaluate_options) -> tuple[EvaluationReport, Any]:
    """Draw ``shape`` samples with ``sampler`` (a :class:`~score_toolkit.samplers.base.Sampler` or a registered
    name), time the draw, and judge it (``kind`` ``"vectors"`` or ``"digits"``). Returns ``(report, output)``
    with the :class:`~score_toolkit.samplers.base.SamplerOutput`."""
    from .registry import get_sampler

    if kind not in ("vectors", "digits"):
        raise ValueError(f"expected kind 'vectors' or 'digits', found {kind!r}")
    smp = get_sampler(sampler) if isinstance(sampler, str) else sampler
    start = time.perf_counter()
    out = smp.sample(score_fn, process, shape=tuple(shape), generator=generator, dtype=dtype, device=device)
    wall = time.perf_counter() - start
    info = {"sampler": smp.name, "sampler_options": {k: v for k, v in smp.config.items() if k != "progress"}}
    if kind == "digits":
        report = evaluate_digits(out.samples, nfe=out.nfe, wall_time_s=wall, details=info, **evaluate_options)
    else:
        report = evaluate_vectors(out.samples, nfe=out.nfe, wall_time_s=wall, reference=reference, mixture=mixture,
                                  details=info, **evaluate_options)
    return report, out
