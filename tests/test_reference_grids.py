"""The data-free reference grids (score_toolkit.samplers.reference_grids): the reference family, the objective the
shipped table was fitted with (it judges what the sampler returns), the fit, and the shipped grids' carry-over."""

from __future__ import annotations

import math

import pytest
import torch

from score_toolkit.analytic import gaussian
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers import reference_grids as R


def test_reference_family_is_fixed_and_spans_the_stated_ranges():
    fam, again = R.reference_family(), R.reference_family()
    assert [m.dim for m in fam] == [2, 2, 4, 4, 8, 8]
    for m, m2 in zip(fam, again):
        assert torch.equal(m.means, m2.means) and torch.equal(m.eigvals, m2.eigvals)
        std = m.eigvals.sqrt()
        assert float(std.min()) >= 0.05 - 1e-12 and float(std.max()) <= 1.0 + 1e-12
        # isotropic components
        assert torch.allclose(m.eigvals, m.eigvals[:, :1].expand_as(m.eigvals))
        r = m.means.norm(dim=1)
        assert float(r.min()) >= 1.5 - 1e-12 and float(r.max()) <= 4.0 + 1e-12


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_objective_is_the_capped_error_of_what_the_sampler_returns(name):
    """Without the tail and NLL terms, on one mixture, the objective is the capped pathwise error of sampler.sample's
    output (to_zero; unipc's final corrector) against the converged ODE from the same draws taken to noise level 0."""
    mix = gaussian(torch.zeros(2), torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=torch.float64))
    process = VPSDE(0.1, 20.0)
    sampler = get_sampler(name, num_steps=6)
    obj = R.family_objective(sampler, process, [mix], num_samples=32, reference_steps=300, tail_weight=0.0,
                             nll_weight=0.0, combine="mean")
    x = process.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler.sample(mix.score_fn(process), process, x_init=x.clone()).samples
    ref = get_sampler("dpmpp_3m", num_steps=300, grid="log_sigma", lower_order_final=False, to_zero=True).sample(
        mix.score_fn(process), process, x_init=x.clone()).samples
    c = float(mix.eigvals.mean())
    per = (out - ref).pow(2).sum(1)
    expected = float((per * c / (c + per)).mean() / c)
    with torch.no_grad():
        assert math.isclose(float(obj(sampler.time_grid(process))), expected, rel_tol=1e-9)


def test_objective_vanishes_as_the_grid_converges_on_gaussian_data():
    """Closed form: on one Gaussian the probability-flow ODE is linear; the sampler's error against the converged
    reference (and so the objective) falls with the step count, at the method's order."""
    mix = gaussian(torch.zeros(2), torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64))
    process = VPSDE(0.1, 20.0)
    values = []
    for n in (16, 32, 64):
        sampler = get_sampler("dpmpp_2m", num_steps=n, grid="log_sigma")
        obj = R.family_objective(sampler, process, [mix], num_samples=64, reference_steps=800, combine="mean")
        with torch.no_grad():
            values.append(float(obj(sampler.time_grid(process))))
    assert values[0] > values[1] > values[2] > 0
    # squared error of a second-order method: about 2^-4 per halving (allow 2^-3)
    assert values[2] / values[1] < 0.125 and values[1] / values[0] < 0.125


def test_fit_lowers_the_objective_from_the_uniform_grid():
    mix = R.reference_family(dims=(2,), components=4)
    process = VPSDE(0.1, 20.0)
    sampler = get_sampler("dpmpp_2m", num_steps=5)
    obj = R.family_objective(sampler, process, mix, num_samples=64)
    lam = R.fit_reference_grid(sampler, process, mix, iterations=15, num_samples=64)
    uniform = torch.linspace(*process.log_snr(torch.tensor([1.0, process.t_min], dtype=torch.float64)).tolist(), 6,
                             dtype=torch.float64)

    def times(lam_):
        ts = process.t_from_log_snr(lam_)
        ts[0], ts[-1] = process.t_max, process.t_min
        return ts

    assert lam.numel() == 6 and bool((torch.diff(lam) > 0).all())
    with torch.no_grad():
        assert float(obj(times(lam))) < float(obj(times(uniform)))


def test_reference_log_snr_carries_the_shipped_fit_over():
    if not R.REFERENCE_GRIDS:
        pytest.skip("no shipped reference grid")
    name = sorted(R.REFERENCE_GRIDS)[0]
    fits = R.REFERENCE_GRIDS[name]
    n = sorted(fits)[0]
    vp = VPSDE(0.1, 20.0)
    assert torch.allclose(R.reference_log_snr(vp, n, name), torch.tensor(fits[n], dtype=torch.float64), atol=1e-3)
    ve = VESDE(0.01, 50.0)
    lam = R.reference_log_snr(ve, n + 3, name)
    ends = ve.log_snr(torch.tensor([1.0, ve.t_min], dtype=torch.float64))
    assert lam.numel() == n + 4 and bool((torch.diff(lam) > 0).all())
    assert math.isclose(float(lam[0]), float(ends[0]), abs_tol=1e-9) and math.isclose(float(lam[-1]), float(ends[1]), abs_tol=1e-9)


def test_reference_log_snr_refuses_unknown_sampler_and_bad_steps():
    with pytest.raises(ValueError, match="no reference grid is shipped for sampler 'heun'"):
        R.reference_log_snr(VPSDE(), 10, "heun")
    if R.REFERENCE_GRIDS:
        with pytest.raises(ValueError, match="num_steps >= 1"):
            R.reference_log_snr(VPSDE(), 0, sorted(R.REFERENCE_GRIDS)[0])


def test_family_objective_refuses_an_empty_family():
    with pytest.raises(ValueError, match="at least one mixture"):
        R.family_objective(get_sampler("dpmpp_2m", num_steps=3), VPSDE(), [])


def test_grid_option_reference_runs_the_shipped_grid():
    process = VESDE(0.01, 50.0)
    sampler = get_sampler("unipc", num_steps=14, grid="reference")
    expected = process.t_from_log_snr(R.reference_log_snr(process, 14, "unipc"))
    ts = sampler.time_grid(process)
    assert ts.numel() == 15 and math.isclose(float(ts[0]), 1.0) and math.isclose(float(ts[-1]), process.t_min)
    assert torch.allclose(ts[1:-1], expected[1:-1], atol=1e-12, rtol=0)
    mix = gaussian(torch.zeros(2), 0.3)
    out = sampler.sample(mix.score_fn(process), process, shape=(8, 2), generator=torch.Generator().manual_seed(0))
    assert out.nfe == 15 and bool(torch.isfinite(out.samples).all())


def test_grid_option_reference_refuses_a_sampler_without_a_shipped_grid():
    with pytest.raises(ValueError, match="no reference grid is shipped for this sampler"):
        get_sampler("heun", grid="reference")


def test_reference_is_a_reserved_grid_name(tmp_path):
    from score_toolkit.samplers.grids import save_grid

    with pytest.raises(ValueError, match="reserved"):
        save_grid("reference", torch.tensor([1.0, 0.5, VPSDE().t_min], dtype=torch.float64), VPSDE(), directory=tmp_path)


def test_family_objective_refuses_an_unknown_combine():
    with pytest.raises(ValueError, match="combine 'log' or 'mean'"):
        R.family_objective(get_sampler("dpmpp_2m", num_steps=3), VPSDE(), R.reference_family(dims=(2,)), combine="max")


def test_family_objective_refuses_samplers_it_cannot_judge():
    """It judges outputs at noise level zero against a deterministic reference: stochastic samplers, samplers that are
    not fixed-grid and samplers ending at t_min are refused (they would be scored against the wrong end)."""
    fam = R.reference_family(dims=(2,))
    for sampler in (get_sampler("dpmpp_2m_sde", num_steps=3), get_sampler("pf_ode")):
        with pytest.raises(TypeError, match="deterministic fixed-grid sampler"):
            R.family_objective(sampler, VPSDE(), fam)
    for sampler in (get_sampler("heun", num_steps=3), get_sampler("dpmpp_2m", num_steps=3, to_zero=False),
                    get_sampler("dpmpp_2m", num_steps=3, denoise=True)):
        with pytest.raises(ValueError, match="to_zero=True"):
            R.family_objective(sampler, VPSDE(), fam)
