"""score-toolkit-edm: the shared conformance suite, registration, EDM's Algorithm 1 as reference, order 2."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from score_toolkit_edm import EDMHeunSampler

from score_toolkit.analytic import AnalyticScore, gaussian
from score_toolkit.registry import get_sampler, get_sampler_class, list_samplers, sampler_info
from score_toolkit.testing import SamplerConformance, conformance_mixture, conformance_processes


class TestEDMHeunConformance(SamplerConformance):
    sampler_name = "edm_heun"


def test_registered_through_its_entry_point():
    assert "edm_heun" in list_samplers(origin="score-toolkit-edm")
    assert get_sampler_class("edm_heun") is EDMHeunSampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other plugins' state is not this test's business
        record = next(r for r in sampler_info() if r["name"] == "edm_heun")
    assert record["origin"] == "score-toolkit-edm" and record["status"] == "ok"
    assert record["properties"]["order"] == 2.0 and not record["properties"]["stochastic"]


def edm_algorithm1(denoiser, x, sigmas):
    """Karras et al. 2022, Algorithm 1, written as in the paper for s(t) = 1, sigma(t) = t (VE form)."""
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoiser(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next != 0:
            d_prime = (x_next - denoiser(x_next, t_next)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("process_key", ["ve", "vp"])
def test_matches_algorithm1(process_key):
    """On VE the plugin is Algorithm 1 itself; on VP it is Algorithm 1 on y = x / alpha with
    sigma = sigma_t / alpha, scaled back by alpha(t_min)."""
    process = conformance_processes()[process_key]
    mixture = conformance_mixture()
    n, rho = 12, 7.0
    ends = torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    s_max, s_min = process.noise_to_signal(ends).tolist()
    a_max, a_min = process.alpha(ends).tolist()
    i = torch.arange(n + 1, dtype=torch.float64)
    sigmas = ((s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho).tolist()  # EDM eq. 5

    def denoiser(y, sigma):  # exact E[x_0 | x_0 + sigma z = y]
        return y + sigma**2 * mixture.perturbed(1.0, sigma).score(y)

    x_init = process.prior_sample((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = a_min * edm_algorithm1(denoiser, x_init / a_max, sigmas)
    out = get_sampler("edm_heun", num_steps=n, rho=rho).sample(AnalyticScore(mixture, process), process, x_init=x_init)
    assert out.nfe == 2 * n
    torch.testing.assert_close(out.samples, reference, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("process_key", ["ve", "vp"])
def test_second_order_on_a_gaussian(process_key):
    """Against the exact probability-flow map of N(m, diag(c2)): y - m scales as sqrt(c2 + sigma^2).
    Observed orders 2.16, 2.12, 2.06 (VE) and 2.17, 2.14, 2.07 (VP) for 5 -> 10 -> 20 -> 40 steps."""
    process = conformance_processes()[process_key]
    m = torch.tensor([1.0, -0.5], dtype=torch.float64)
    c2 = torch.tensor([0.3, 0.8], dtype=torch.float64)
    data = gaussian(m, c2)
    ends = torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    s_max, s_min = process.noise_to_signal(ends).tolist()
    a_max, a_min = process.alpha(ends).tolist()
    x_init = process.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = a_min * (m + (x_init / a_max - m) * torch.sqrt((c2 + s_min**2) / (c2 + s_max**2)))
    errors = []
    for n in (5, 10, 20, 40):
        out = get_sampler("edm_heun", num_steps=n).sample(AnalyticScore(data, process), process, x_init=x_init)
        errors.append(float((out.samples - exact).abs().max()))
    orders = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(1.8 < p < 2.4 for p in orders), (errors, orders)
    assert abs(orders[-1] - EDMHeunSampler.properties.order) < 0.15, orders


def test_bad_options():
    with pytest.raises(ValueError, match="num_steps"):
        get_sampler("edm_heun", num_steps=0)
    with pytest.raises(ValueError, match="rho"):
        get_sampler("edm_heun", rho=-1.0)
    with pytest.raises(TypeError, match="s_churn"):
        get_sampler("edm_heun", s_churn=1.0)
