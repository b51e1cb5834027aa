"""NCSNv2 hyper-parameter helpers (Song & Ermon 2020, techniques 1, 2 and 4): closed forms, the equations they
solve, Monte Carlo checks of the formulas behind them, and the values of NCSNv2's released configurations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chi

from score_toolkit.hparams import (
    NCSNHyperParameters,
    langevin_variance_ratio,
    level_overlap,
    suggest_gamma,
    suggest_langevin_step_size,
    suggest_ncsn_hparams,
    suggest_num_levels,
    suggest_sigma_max,
)

# NCSNv2's released configurations (github.com/ermongroup/ncsnv2, configs/*.yml): data dimension, sigma_begin,
# num_classes (L), n_steps_each (T), step_lr (eps in the x + eps s + sqrt(2 eps) z form); sigma_end = 0.01.
NCSNV2_CONFIGS = {
    "cifar10": (3 * 32 * 32, 50.0, 232, 5, 6.2e-6),
    "celeba": (3 * 64 * 64, 90.0, 500, 5, 3.3e-6),
    "ffhq": (3 * 256 * 256, 348.0, 2311, 3, 9e-7),
}


# --------------------------------------------------------------------------------------------- technique 1
def test_sigma_max_of_two_points_is_their_distance():
    r = 3.7
    direction = torch.randn(5, dtype=torch.float64)
    a = torch.randn(5, dtype=torch.float64)
    b = a + r * direction / direction.norm()
    assert suggest_sigma_max(torch.stack([a, b])) == pytest.approx(r, rel=1e-12)


def test_sigma_max_matches_brute_force_over_pairs_any_rank_and_chunking():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(37, 1, 2, 3, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 6).reshape(1, 1, 2, 3)
    flat = data.reshape(37, -1)
    brute = max(float((flat[i] - flat[j]).norm()) for i, j in itertools.combinations(range(37), 2))
    for chunk in (1, 5, 36, 37, 1000):
        assert suggest_sigma_max(data, chunk_size=chunk) == pytest.approx(brute, rel=1e-12)
    # numpy arrays and float32 tensors are accepted (the computation runs in float64)
    assert suggest_sigma_max(data.numpy()) == pytest.approx(brute, rel=1e-12)
    assert suggest_sigma_max(data.float()) == pytest.approx(brute, rel=1e-6)


def test_sigma_max_subsampling_is_seeded_and_a_lower_bound():
    data = torch.randn(500, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = suggest_sigma_max(data)
    sub1 = suggest_sigma_max(data, max_points=50, generator=torch.Generator().manual_seed(7))
    sub2 = suggest_sigma_max(data, max_points=50, generator=torch.Generator().manual_seed(7))
    assert sub1 == sub2
    assert sub1 <= exact
    assert sub1 > 0.5 * exact
    # max_points >= N: exact
    assert suggest_sigma_max(data, max_points=500, generator=torch.Generator().manual_seed(7)) == exact


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        (torch.zeros(1, 3), {}, ValueError, "at least 2"),
        (torch.zeros(4), {}, ValueError, "batch dimension"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), {}, ValueError, "finite"),
        (torch.zeros(4, 2), {"max_points": 1}, ValueError, "max_points"),
        (torch.zeros(4, 2), {"generator": torch.Generator()}, ValueError, "max_points"),
        (torch.zeros(4, 2), {"chunk_size": 0}, ValueError, "chunk_size"),
        ("not data", {}, TypeError, "tensor or an array"),
    ],
)
def test_sigma_max_bad_inputs(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        suggest_sigma_max(data, **kwargs)


# --------------------------------------------------------------------------------------------- technique 2
@pytest.mark.parametrize("dim", [5, 10, 100, 3072, 196608])
def test_num_levels_ratio_solves_the_overlap_equation(dim):
    sigma_max, sigma_min = 50.0, 0.01
    num_levels, gamma = suggest_num_levels(sigma_max, sigma_min, dim)
    # the returned grid is geometric from sigma_max to sigma_min
    assert gamma ** (num_levels - 1) == pytest.approx(sigma_max / sigma_min, rel=1e-12)
    # one level fewer would need a ratio whose overlap falls below 0.5; the chosen one stays above it
    assert level_overlap(gamma, dim) >= 0.5
    assert level_overlap((sigma_max / sigma_min) ** (1 / (num_levels - 2)), dim) < 0.5
    # the continuous solution gamma* satisfies the equation to 1e-6, and L is the smallest count it allows
    gamma_star = suggest_gamma(dim)
    assert abs(level_overlap(gamma_star, dim) - 0.5) < 1e-6
    assert gamma <= gamma_star < (sigma_max / sigma_min) ** (1 / (num_levels - 2))


def test_overlap_formula_matches_the_exact_chi_distribution_in_high_dimension():
    # level_overlap uses ||x|| ~ N(sqrt(D) sigma, sigma^2 / 2) (NCSNv2 Proposition 2); ||x|| / sigma is chi(D)
    for dim in (1000, 3072, 12288):
        gamma = suggest_gamma(dim)
        lo = (math.sqrt(dim) - 3 / math.sqrt(2)) * gamma
        hi = (math.sqrt(dim) + 3 / math.sqrt(2)) * gamma
        exact = chi.cdf(hi, dim) - chi.cdf(lo, dim)
        assert abs(level_overlap(gamma, dim) - exact) < 0.01, (dim, exact)


def test_overlap_monte_carlo():
    dim, gamma, n = 3072, 1.04, 4000
    norms = torch.randn(n, dim, generator=torch.Generator().manual_seed(0)).norm(dim=1).double()
    inside = (norms > (math.sqrt(dim) - 3 / math.sqrt(2)) * gamma) & (norms < (math.sqrt(dim) + 3 / math.sqrt(2)) * gamma)
    frequency = float(inside.double().mean())
    # Monte Carlo standard error ~ 0.008, plus the O(1/sqrt(D)) approximation error ~ 0.004
    assert abs(frequency - level_overlap(gamma, dim)) < 0.035


def test_levels_grow_with_dimension_and_range():
    dims = [5, 10, 100, 1000, 3072, 12288, 196608]
    gammas = [suggest_gamma(d) for d in dims]
    assert all(a > b for a, b in zip(gammas, gammas[1:]))
    levels = [suggest_num_levels(50.0, 0.01, d)[0] for d in dims]
    assert all(a <= b for a, b in zip(levels, levels[1:])) and levels[-1] > levels[0]
    ranges = [suggest_num_levels(s, 0.01, 3072)[0] for s in (1.0, 10.0, 50.0, 1000.0)]
    assert all(a < b for a, b in zip(ranges, ranges[1:]))
    # a lower target overlap allows a larger ratio: fewer levels
    assert suggest_num_levels(50.0, 0.01, 3072, target=0.3)[0] < suggest_num_levels(50.0, 0.01, 3072)[0]


@pytest.mark.parametrize("name", sorted(NCSNV2_CONFIGS))
def test_num_levels_close_to_ncsnv2_configs(name):
    dim, sigma_max, paper_levels, _, _ = NCSNV2_CONFIGS[name]
    num_levels, _ = suggest_num_levels(sigma_max, 0.01, dim)
    # the released configs sit at an overlap of ~0.567 instead of 0.5: about 6% more levels
    assert 0.9 * paper_levels < num_levels <= paper_levels
    assert abs(suggest_num_levels(sigma_max, 0.01, dim, target=0.567)[0] - paper_levels) <= 1


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0.01, 50.0, 100), {}, "sigma_max > sigma_min"),
        ((50.0, 0.0, 100), {}, "sigma_min"),
        ((50.0, 0.01, 4), {}, "dim >= 5"),
        ((50.0, 0.01, 2), {}, "by hand"),
        ((50.0, 0.01, 10.0), {}, "dim"),
        ((50.0, 0.01, 100), {"target": 0.999}, "target"),
        ((50.0, 0.01, 100), {"target": 0.0}, "target"),
    ],
)
def test_num_levels_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        suggest_num_levels(*args, **kwargs)


# --------------------------------------------------------------------------------------------- technique 4
def _paper_eq6(eps, sigma_l, gamma, steps):
    """NCSNv2 Eq. (6) written literally (eta form)."""
    q = 1 - eps / sigma_l**2
    k = 2 * eps / (sigma_l**2 - sigma_l**2 * q**2)
    return q ** (2 * steps) * (gamma**2 - k) + k


def test_variance_ratio_is_the_papers_equation_in_both_conventions():
    for eps, sigma_l, gamma, steps in [(6.2e-6, 0.01, 1.0376, 5), (3e-3, 0.1, 1.5, 1), (0.5, 1.0, 3.0, 20)]:
        expected = _paper_eq6(eps, sigma_l, gamma, steps)
        assert langevin_variance_ratio(eps, sigma_l, gamma, steps, convention="eta") == pytest.approx(expected, rel=1e-9)
        assert langevin_variance_ratio(2 * eps, sigma_l, gamma, steps, convention="eps") == pytest.approx(
            expected, rel=1e-9
        )


@pytest.mark.parametrize("convention", ["eps", "eta"])
def test_variance_ratio_matches_a_simulated_annealed_langevin_level(convention):
    """Run T Langevin steps at level i on N(0, sigma_i^2) (exact score) from N(0, sigma_{i-1}^2) and compare the
    final variance with Proposition 3. Dimensions are independent, so one coordinate suffices."""
    sigma_l, sigma_i, gamma, steps, eps = 0.01, 0.3, 1.3, 4, 2e-5
    alpha = eps * sigma_i**2 / sigma_l**2
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = gamma * sigma_i * torch.randn(n, generator=g, dtype=torch.float64)
    for _ in range(steps):
        score = -x / sigma_i**2
        z = torch.randn(n, generator=g, dtype=torch.float64)
        if convention == "eps":
            x = x + alpha / 2 * score + math.sqrt(alpha) * z
        else:
            x = x + alpha * score + math.sqrt(2 * alpha) * z
    empirical = float(x.var()) / sigma_i**2
    predicted = langevin_variance_ratio(eps, sigma_l, gamma, steps, convention=convention)
    # relative standard error of a variance estimate: sqrt(2 / n) ~ 0.0022
    assert empirical == pytest.approx(predicted, rel=0.01)
    assert abs(predicted - 1) > 0.05  # the check discriminates: the chain has not reached stationarity


@pytest.mark.parametrize("gamma, steps", [(1.0376, 5), (1.01, 1), (1.5, 3), (3.0, 100)])
def test_step_size_minimises_the_variance_ratio(gamma, steps):
    sigma_min = 0.01
    eps = suggest_langevin_step_size(sigma_min, gamma, steps, convention="eta")
    best = langevin_variance_ratio(eps, sigma_min, gamma, steps, convention="eta")
    assert best > 1  # Eq. (6) never reaches 1 exactly (a convex combination of 2/(2-u) > 1 and gamma^2 > 1)
    for factor in (0.9, 0.99, 0.999, 1.001, 1.01, 1.1):
        assert langevin_variance_ratio(eps * factor, sigma_min, gamma, steps, convention="eta") >= best - 1e-15
    # dense scan in u = eps / sigma_min^2 on (0, 1]
    grid = [10 ** (-12 + 12 * k / 3000) for k in range(3001)]
    scan = min(langevin_variance_ratio(u * sigma_min**2, sigma_min, gamma, steps, convention="eta") for u in grid)
    assert best <= scan + 1e-12
    # first-order condition: the derivative vanishes at the optimum
    h = eps * 1e-4
    slope = (langevin_variance_ratio(eps + h, sigma_min, gamma, steps, convention="eta")
             - langevin_variance_ratio(eps - h, sigma_min, gamma, steps, convention="eta")) / (2 * h)
    assert abs(slope * eps) < 1e-6
    # conventions describe the same chain
    assert suggest_langevin_step_size(sigma_min, gamma, steps, convention="eps") == pytest.approx(2 * eps, rel=1e-9)


def test_step_size_scales_with_sigma_min_squared_and_shrinks_with_more_steps():
    base = suggest_langevin_step_size(0.01, 1.04, 5)
    assert suggest_langevin_step_size(0.1, 1.04, 5) == pytest.approx(100 * base, rel=1e-6)
    steps = [1, 2, 5, 10, 50, 200]
    sizes = [suggest_langevin_step_size(0.01, 1.04, t) for t in steps]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    # more steps per level get the chain closer to the target variance
    ratios = [langevin_variance_ratio(e, 0.01, 1.04, t) for e, t in zip(sizes, steps)]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    # a larger ratio between levels needs larger steps to move the variance further
    assert suggest_langevin_step_size(0.01, 1.2, 5) > suggest_langevin_step_size(0.01, 1.04, 5)


@pytest.mark.parametrize("name", sorted(NCSNV2_CONFIGS))
def test_step_size_reproduces_ncsnv2_configs(name):
    dim, sigma_max, paper_levels, steps, paper_step = NCSNV2_CONFIGS[name]
    gamma = (sigma_max / 0.01) ** (1 / (paper_levels - 1))
    eps = suggest_langevin_step_size(0.01, gamma, steps, convention="eta")
    assert eps == pytest.approx(paper_step, rel=0.02)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0.0, 1.04, 5), {}, ValueError, "sigma_min"),
        ((0.01, 1.0, 5), {}, ValueError, "gamma > 1"),
        ((0.01, 0.9, 5), {}, ValueError, "gamma > 1"),
        ((0.01, 1.04, 0), {}, ValueError, "steps_per_level"),
        ((0.01, 1.04, 2.5), {}, ValueError, "steps_per_level"),
        ((0.01, 1.04, 5), {"convention": "half"}, ValueError, "convention"),
        (("a", 1.04, 5), {}, TypeError, "sigma_min"),
    ],
)
def test_step_size_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        suggest_langevin_step_size(*args, **kwargs)


def test_variance_ratio_bad_inputs():
    with pytest.raises(ValueError, match="step_size"):
        langevin_variance_ratio(-1.0, 0.01, 1.04, 5)
    with pytest.raises(ValueError, match="convention"):
        langevin_variance_ratio(1e-6, 0.01, 1.04, 5, convention="ETA")


# --------------------------------------------------------------------------------------------- all together
def test_suggest_ncsn_hparams_combines_the_three_techniques():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(300, 1, 4, 4, generator=g)
    hp = suggest_ncsn_hparams(data, sigma_min=0.02, steps_per_level=3)
    assert isinstance(hp, NCSNHyperParameters)
    assert hp.sigma_max == suggest_sigma_max(data)
    assert (hp.num_levels, hp.gamma) == suggest_num_levels(hp.sigma_max, 0.02, 16)
    assert hp.step_size == suggest_langevin_step_size(0.02, hp.gamma, 3, convention="eps")
    assert hp.convention == "eps" and hp.steps_per_level == 3
    sigmas = hp.sigmas()
    assert sigmas.shape == (hp.num_levels,) and sigmas.dtype == torch.float64
    assert float(sigmas[0]) == pytest.approx(hp.sigma_max, rel=1e-12)
    assert float(sigmas[-1]) == pytest.approx(0.02, rel=1e-12)
    torch.testing.assert_close(sigmas[:-1] / sigmas[1:], torch.full((hp.num_levels - 1,), hp.gamma, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim >= 5"):
        suggest_ncsn_hparams(torch.randn(10, 2))
    with pytest.raises(ValueError, match="exceed sigma_min"):
        suggest_ncsn_hparams(torch.zeros(10, 8) + torch.arange(10.0)[:, None] * 1e-4)


def test_without_scipy_the_error_names_the_extra(monkeypatch):
    """scipy is optional (the ``hparams`` extra): without it techniques 2 and 4 say what to install."""
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes ``import scipy.optimize`` fail
    with pytest.raises(ImportError, match=r"score-toolkit\[hparams\]"):
        suggest_gamma(100)
    with pytest.raises(ImportError, match=r"score-toolkit\[hparams\]"):
        suggest_langevin_step_size(0.01, 1.1, 5)
