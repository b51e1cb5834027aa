"""The sample-set distances of score_toolkit.metrics against their closed forms between two Gaussians.

Each estimator is a V-statistic (or a sorted-sample W2) of finite samples, so the test compares the mean over
independent repeats with the exact expectation of the estimator, within 4 standard errors of that mean:

* energy distance: E|X - Y| for X - Y ~ N(mu, s^2) is s sqrt(2/pi) exp(-mu^2 / 2s^2) + mu (1 - 2 Phi(-mu/s)),
  and E||Z|| = s sqrt(2) Gamma((d+1)/2) / Gamma(d/2) for Z ~ N(0, s^2 I_d); the V-statistic's diagonal
  zeros give E[ED_V] = 2 E|X-Y| - (1 - 1/n) E|X-X'| - (1 - 1/m) E|Y-Y'|;
* MMD with one Gaussian kernel exp(-r^2 / 2h^2): E k(X, Y) = (h^2 / (h^2 + s^2))^(d/2) exp(-|mu|^2 / 2(h^2 + s^2))
  for X - Y ~ N(mu, s^2 I_d), and E[MMD_V] adds the diagonal terms k(x, x) = 1;
* sliced W2: on a unit direction theta, N(m1, s1^2 I) and N(m2, s2^2 I) project to 1-D Gaussians with
  W2^2 = (theta . (m1 - m2))^2 + (s1 - s2)^2, averaged over the estimator's own directions (reproduced from
  its generator); the finite-sample bias is bounded by the metric between two samples of one law.
"""

from __future__ import annotations

import math

import pytest
import torch

from score_toolkit.metrics import energy_distance, mmd, sliced_wasserstein

REPEATS = 24


def _gauss(n, mean, std, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return mean + std * torch.randn(n, mean.numel(), generator=g, dtype=torch.float64)


def _mean_and_se(values):
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def _abs_mean_1d(mu, s):
    phi = 0.5 * (1 + math.erf(-mu / s / math.sqrt(2)))
    return s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * (1 - 2 * phi)


def _norm_mean(s, d):
    return s * math.sqrt(2) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


@pytest.mark.parametrize("case", ["1d_shift", "3d_scale"])
def test_energy_distance_matches_the_closed_form(case):
    if case == "1d_shift":
        m1, m2, s1, s2, n, m = [0.0], [1.5], 1.0, 0.5, 300, 200
        exy = _abs_mean_1d(1.5, math.hypot(s1, s2))
        exx, eyy = _abs_mean_1d(0.0, s1 * math.sqrt(2)), _abs_mean_1d(0.0, s2 * math.sqrt(2))
    else:
        d = 3
        m1 = m2 = [0.0] * d
        s1, s2, n, m = 1.0, 2.0, 300, 250
        exy = _norm_mean(math.hypot(s1, s2), d)
        exx, eyy = _norm_mean(s1 * math.sqrt(2), d), _norm_mean(s2 * math.sqrt(2), d)
    expected = 2 * exy - (1 - 1 / n) * exx - (1 - 1 / m) * eyy
    values = [energy_distance(_gauss(n, m1, s1, 2 * r), _gauss(m, m2, s2, 2 * r + 1)) for r in range(REPEATS)]
    mean, se = _mean_and_se(values)
    assert abs(mean - expected) < 4 * se, (mean, se, expected)
    assert se < 0.1 * expected  # the comparison has teeth: the error bar is small next to the value


def _k(delta_sq, var, h, d):
    return (h * h / (h * h + var)) ** (d / 2) * math.exp(-delta_sq / (2 * (h * h + var)))


@pytest.mark.parametrize("d, h", [(1, 0.7), (4, 2.0)])
def test_mmd_with_a_gaussian_kernel_matches_the_closed_form(d, h):
    m1, m2 = [0.0] * d, [0.8] + [0.0] * (d - 1)
    s1, s2, n, m = 1.0, 1.3, 250, 300
    expected = (1 / n + (1 - 1 / n) * _k(0.0, 2 * s1 * s1, h, d)
                + 1 / m + (1 - 1 / m) * _k(0.0, 2 * s2 * s2, h, d)
                - 2 * _k(0.64, s1 * s1 + s2 * s2, h, d))
    values = [mmd(_gauss(n, m1, s1, 100 + 2 * r), _gauss(m, m2, s2, 101 + 2 * r), bandwidths=(h,))
              for r in range(REPEATS)]
    mean, se = _mean_and_se(values)
    assert abs(mean - expected) < 4 * se, (mean, se, expected)
    assert se < 0.15 * expected


@pytest.mark.parametrize("n, m", [(2000, 2000), (2000, 1500)])
def test_sliced_wasserstein_matches_the_closed_form(n, m):
    d, projections = 2, 64
    m1, m2, s1, s2 = [0.0, 0.0], [1.0, -2.0], 1.0, 0.4
    g = torch.Generator().manual_seed(0)  # the estimator's default directions
    theta = torch.randn(d, projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    delta = torch.tensor(m1, dtype=torch.float64) - torch.tensor(m2, dtype=torch.float64)
    exact_sq = float(((delta @ theta) ** 2).mean()) + (s1 - s2) ** 2
    values = [sliced_wasserstein(_gauss(n, m1, s1, 300 + 2 * r), _gauss(m, m2, s2, 301 + 2 * r),
                                 num_projections=projections) ** 2 for r in range(8)]
    mean, se = _mean_and_se(values)
    # finite-sample bias of the sorted-sample W2: at most the squared metric between two samples of one law
    floor = max(sliced_wasserstein(_gauss(n, m1, s1, 900), _gauss(m, m1, s1, 901), num_projections=projections),
                sliced_wasserstein(_gauss(n, m2, s2, 902), _gauss(m, m2, s2, 903), num_projections=projections)) ** 2
    assert abs(mean - exact_sq) < 4 * se + floor, (mean, se, floor, exact_sq)
    assert floor + 4 * se < 0.05 * exact_sq  # the comparison has teeth
