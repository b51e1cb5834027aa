"""Hyper-parameters of noise-conditional score networks, following Song & Ermon 2020, "Improved techniques for
training score-based generative models" (NCSNv2), Section 3.

* Technique 1 (initial noise scale): ``sigma_1`` = the largest pairwise Euclidean distance in the data
  (:func:`suggest_sigma_max`).
* Technique 2 (other noise scales): a geometric sequence with ratio ``gamma = sigma_{i-1} / sigma_i`` such that
  ``Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) ~= 0.5``
  (:func:`suggest_gamma`, :func:`suggest_num_levels`, :func:`level_overlap`).
* Technique 4 (Langevin step size): with T steps per level, the eps that makes their Eq. (6)
  (Proposition 3, :func:`langevin_variance_ratio`) as close to 1 as possible (:func:`suggest_langevin_step_size`).

Step-size conventions (ARCHITECTURE.md asks every Langevin step to say which one it uses). At level i the step is
``alpha_i = eps sigma_i^2 / sigma_L^2`` and the update is

* ``convention="eps"``: ``x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z`` (NCSN, Song & Ermon 2019,
  Algorithm 1; FORMULAS.md);
* ``convention="eta"``: ``x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z`` (the form NCSNv2's Eq. (6) and its
  released code use; its configs' ``step_lr`` is this eps).

The same chain has ``eps_eps = 2 eps_eta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._utils import GeneratorLike, check_positive

__all__ = [
    "NCSNHyperParameters",
    "suggest_sigma_max",
    "level_overlap",
    "suggest_gamma",
    "suggest_num_levels",
    "langevin_variance_ratio",
    "suggest_langevin_step_size",
    "suggest_ncsn_hparams",
    "STEP_CONVENTIONS",
]

STEP_CONVENTIONS = ("eps", "eta")
# Phi(3) - Phi(-3): the overlap at gamma = 1. Targets at or above it have no (or two) solutions.
_OVERLAP_AT_ONE = math.erf(3 / math.sqrt(2))


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected {name} to be an int >= {minimum}, found {value!r}")
    return value


def _check_convention(convention: str) -> None:
    if convention not in STEP_CONVENTIONS:
        raise ValueError(f"expected convention in {STEP_CONVENTIONS}, found {convention!r}")


def _as_points(data) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        try:
            data = torch.as_tensor(data)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"expected data to be a tensor or an array (N, ...), found {type(data).__name__}") from None
    if data.ndim < 2:
        raise ValueError(f"expected data of shape (N, ...) with a batch dimension, found shape {tuple(data.shape)}")
    if data.shape[0] < 2:
        raise ValueError(f"expected at least 2 data points, found {data.shape[0]}")
    if data.is_complex() or data.dtype == torch.bool:
        raise TypeError(f"expected real data, found dtype {data.dtype}")
    flat = data.reshape(data.shape[0], -1).to(torch.float64)
    if flat.shape[1] == 0:
        raise ValueError(f"expected data with at least one feature, found shape {tuple(data.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("expected finite data, found NaN or inf")
    return flat


def suggest_sigma_max(
    data,
    *,
    max_points: int | None = None,
    generator: GeneratorLike = None,
    chunk_size: int = 1024,
) -> float:
    """Technique 1 of NCSNv2: the largest Euclidean distance between two data points, as the largest noise level.

    Args:
        data: (N, ...) tensor or array; each sample is flattened.
        max_points: ``None`` (default) computes the exact maximum over all N(N-1)/2 pairs (in float64, by chunks of
            ``chunk_size`` rows, O(N^2 D) time, O(chunk_size N) memory). For large N, an int: if N is larger, use a
            uniform random subset of ``max_points`` points drawn with ``generator`` (a ``torch.Generator``). The
            result is then a lower bound of the true maximum.
        chunk_size: rows per ``torch.cdist`` call.
    """
    flat = _as_points(data)
    _check_int(chunk_size, "chunk_size", 1)
    if max_points is not None:
        _check_int(max_points, "max_points", 2)
        if isinstance(generator, (list, tuple)):
            raise TypeError("expected generator to be one torch.Generator (subsampling draws one permutation)")
        if flat.shape[0] > max_points:
            gen_device = generator.device if generator is not None else "cpu"
            idx = torch.randperm(flat.shape[0], generator=generator, device=gen_device)[:max_points]
            flat = flat[idx.to(flat.device)]
    elif generator is not None:
        raise ValueError("generator is only used with max_points (random subsampling); found max_points=None")
    n = flat.shape[0]
    best = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for start in range(0, n - 1, chunk_size):
        rows = flat[start : start + chunk_size]
        # each pair once: compare the chunk with itself and everything after it
        dist = torch.cdist(rows, flat[start:])
        best = torch.maximum(best, dist.max())
    return float(best)


def _std_normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def level_overlap(gamma: float, dim: int) -> float:
    """NCSNv2 technique 2: ``Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma)``.

    The approximate probability that a sample of ``N(0, sigma_i^2 I_D)`` has its norm in the high-density shell
    ``[sqrt(D) sigma_{i-1} -+ 3 sigma_{i-1} / sqrt(2)]`` of the previous (larger) level, ``gamma =
    sigma_{i-1} / sigma_i``, using ``||x|| ~ N(sqrt(D) sigma, sigma^2 / 2)`` (their Proposition 2)."""
    gamma = check_positive(gamma, "gamma")
    _check_int(dim, "dim", 1)
    a = math.sqrt(2 * dim) * (gamma - 1)
    return _std_normal_cdf(a + 3 * gamma) - _std_normal_cdf(a - 3 * gamma)


def suggest_gamma(dim: int, *, target: float = 0.5) -> float:
    """Technique 2 of NCSNv2: the largest ratio ``gamma* = sigma_{i-1} / sigma_i`` of adjacent noise levels with
    ``level_overlap(gamma*, dim) = target`` (0.5 in the paper), solved by Brent's method to ~1e-15.

    The Gaussian approximation behind the formula needs ``sqrt(2D) > 3``: for ``dim <= 4`` the overlap never
    drops to 0.5 and a ValueError is raised (choose the levels by hand for low-dimensional data)."""
    _check_int(dim, "dim", 1)
    if dim <= 4:
        raise ValueError(
            f"expected dim >= 5 for NCSNv2 technique 2 (its Gaussian approximation of ||x|| needs sqrt(2D) > 3; "
            f"the overlap never falls to 0.5 below), found dim={dim}: choose the number of levels by hand"
        )
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (0 < target < _OVERLAP_AT_ONE):
        raise ValueError(f"expected target in (0, {_OVERLAP_AT_ONE:.4f}) (Phi(3) - Phi(-3)), found {target!r}")
    return _solve_gamma(dim, float(target))


def _scipy_optimize():
    """scipy.optimize, or an ImportError saying which extra installs it (scipy is not a core dependency)."""
    try:
        import scipy.optimize
    except ImportError as err:
        raise ImportError("score_toolkit.hparams needs scipy: pip install 'score-toolkit[hparams]'") from err
    return scipy.optimize


def _solve_gamma(dim: int, target: float) -> float:
    brentq = _scipy_optimize().brentq

    def f(g):
        return level_overlap(g, dim) - target

    # The overlap rises slightly above Phi(3) - Phi(-3) right after gamma = 1, then falls to 0 (for D >= 5):
    # with target < Phi(3) - Phi(-3) the root on [1, hi] is unique.
    hi = 2.0
    while f(hi) > 0:
        hi = 1 + 2 * (hi - 1)
        if hi > 1e6:  # pragma: no cover - excluded by the dim check
            raise ValueError(f"found no gamma with overlap {target} for dim={dim}")
    return brentq(f, 1.0, hi, xtol=1e-15, maxiter=500)


def suggest_num_levels(sigma_max: float, sigma_min: float, dim: int, *, target: float = 0.5) -> tuple[int, float]:
    """Technique 2 of NCSNv2: the number of geometric noise levels between ``sigma_max`` and ``sigma_min``.

    Takes the ratio ``gamma*`` of :func:`suggest_gamma` (``level_overlap(gamma*, dim) = target``), then returns ``(L, gamma)`` with ``L = ceil(1 + ln(sigma_max / sigma_min) / ln gamma*)`` levels and
    the ratio ``gamma = (sigma_max / sigma_min)^(1 / (L - 1)) <= gamma*`` of that grid (so every pair of adjacent
    levels overlaps at least ``target``): ``sigma_i = sigma_max gamma^-(i-1)``, ``sigma_L = sigma_min``.

    For ``dim <= 4`` the technique does not apply (ValueError, see :func:`suggest_gamma`).

    NCSNv2's released configurations (e.g. CIFAR-10: D = 3072, sigma 50 -> 0.01, L = 232) have an overlap of
    about 0.567 at their ratio: ``target=0.567`` reproduces their L; ``target=0.5`` gives L = 220 for CIFAR-10.
    """
    sigma_max = check_positive(sigma_max, "sigma_max")
    sigma_min = check_positive(sigma_min, "sigma_min")
    if not sigma_max > sigma_min:
        raise ValueError(f"expected sigma_max > sigma_min, found sigma_max={sigma_max:g}, sigma_min={sigma_min:g}")
    gamma_star = suggest_gamma(dim, target=target)
    levels = 1 + math.log(sigma_max / sigma_min) / math.log(gamma_star)
    num_levels = max(2, math.ceil(levels - 1e-9))
    gamma = (sigma_max / sigma_min) ** (1.0 / (num_levels - 1))
    return num_levels, gamma


def langevin_variance_ratio(
    step_size: float, sigma_min: float, gamma: float, steps_per_level: int, *, convention: str = "eps"
) -> float:
    """``s_T^2 / sigma_i^2`` of NCSNv2's Proposition 3 / Eq. (6): the variance, relative to ``sigma_i^2``, after T
    annealed Langevin steps on ``N(0, sigma_i^2 I)`` started from ``N(0, sigma_{i-1}^2 I)`` (``gamma =
    sigma_{i-1} / sigma_i``, exact score). In the ``eta`` form, with ``q = 1 - eps / sigma_L^2``:

    ``q^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 q^2)) + 2 eps / (sigma_L^2 - sigma_L^2 q^2)``.

    ``step_size`` is eps in ``convention`` (see the module docstring: an ``eps``-form step is halved first)."""
    step_size = check_positive(step_size, "step_size")
    sigma_min = check_positive(sigma_min, "sigma_min")
    gamma = check_positive(gamma, "gamma")
    _check_int(steps_per_level, "steps_per_level", 1)
    _check_convention(convention)
    eps = step_size / 2 if convention == "eps" else step_size
    u = eps / sigma_min**2
    # 2 eps / (sigma_L^2 - sigma_L^2 q^2) = 2 / (2 - u), written without the cancellation in 1 - q^2
    stationary = 2 / (2 - u)
    return (1 - u) ** (2 * steps_per_level) * (gamma**2 - stationary) + stationary


def suggest_langevin_step_size(
    sigma_min: float, gamma: float, steps_per_level: int, *, convention: str = "eps"
) -> float:
    """Technique 4 of NCSNv2: the step size eps that makes :func:`langevin_variance_ratio` closest to 1.

    In the ``eta`` form, with ``u = eps / sigma_L^2`` the ratio is ``q^(2T) (gamma^2 - c) + c``, ``q = 1 - u``,
    ``c = 2 / (2 - u)``: a convex combination of ``c > 1`` and ``gamma^2 > 1`` for ``0 < u < 2``, so it never
    reaches 1 exactly (the paper asks for it to be "maximally close" to 1). This function minimises it over
    ``0 < u <= 1`` (bounded Brent search in ``log u`` after a grid scan) and returns eps in ``convention``.

    For CIFAR-10 (sigma_L = 0.01, L = 232 levels from 50, T = 5) this gives 6.18e-6 (``eta``), against the
    6.2e-6 of NCSNv2's configuration.
    """
    sigma_min = check_positive(sigma_min, "sigma_min")
    gamma = check_positive(gamma, "gamma")
    if not gamma > 1:
        raise ValueError(f"expected gamma > 1 (the ratio sigma_(i-1) / sigma_i), found {gamma!r}")
    _check_int(steps_per_level, "steps_per_level", 1)
    _check_convention(convention)
    minimize_scalar = _scipy_optimize().minimize_scalar

    two_t = 2 * steps_per_level

    def ratio(log_u: float) -> float:
        u = math.exp(log_u)
        c = 2 / (2 - u)
        return (1 - u) ** two_t * (gamma**2 - c) + c

    # grid scan first: the bracket then holds the global minimum even if the curve is flat in places
    grid = [-40 + 40 * k / 400 for k in range(401)]
    values = [ratio(v) for v in grid]
    k = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = minimize_scalar(ratio, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12, "maxiter": 500})
    log_u = res.x if res.fun <= values[k] else grid[k]
    eps_eta = math.exp(log_u) * sigma_min**2
    return 2 * eps_eta if convention == "eps" else eps_eta


@dataclass(frozen=True)
class NCSNHyperParameters:
    """The noise levels and annealed-Langevin settings suggested by NCSNv2's techniques 1, 2 and 4."""

    sigma_max: float
    sigma_min: float
    num_levels: int
    gamma: float
    steps_per_level: int
    step_size: float
    convention: str

    def sigmas(self, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """The ``num_levels`` geometric noise levels from ``sigma_max`` down to ``sigma_min``."""
        return torch.exp(
            torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), self.num_levels, dtype=torch.float64)
        ).to(dtype=dtype, device=device)


def suggest_ncsn_hparams(
    data,
    sigma_min: float = 0.01,
    steps_per_level: int = 5,
    *,
    convention: str = "eps",
    target: float = 0.5,
    max_points: int | None = None,
    generator: GeneratorLike = None,
) -> NCSNHyperParameters:
    """NCSNv2 techniques 1, 2 and 4 in one call: ``sigma_max`` from the data (:func:`suggest_sigma_max`, with its
    ``max_points``/``generator`` subsampling option), the number of levels and their ratio for the data dimension
    (:func:`suggest_num_levels`, which needs dim >= 5), and the Langevin step size for ``steps_per_level`` steps
    (:func:`suggest_langevin_step_size`, in ``convention``)."""
    flat = _as_points(data)
    sigma_max = suggest_sigma_max(flat, max_points=max_points, generator=generator)
    sigma_min = check_positive(sigma_min, "sigma_min")
    if not sigma_max > sigma_min:
        raise ValueError(
            f"expected the largest pairwise distance of the data ({sigma_max:g}) to exceed sigma_min ({sigma_min:g})"
        )
    num_levels, gamma = suggest_num_levels(sigma_max, sigma_min, flat.shape[1], target=target)
    step = suggest_langevin_step_size(sigma_min, gamma, steps_per_level, convention=convention)
    return NCSNHyperParameters(sigma_max, sigma_min, num_levels, gamma, steps_per_level, step, convention)
