"""The data-free grid (``grid="fitted"``) and dpmpp_2m's defaults: well-formed for every process, transfers across
processes of a family, and beats the uniform log-SNR grid against the converged ODE from the same draws."""

from __future__ import annotations

import pytest
import torch

from score_toolkit.analytic import anisotropic_mixture, ring_mixture
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP, SubVPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.grids import fitted_log_snr

PROCESSES = {"ve10": lambda: VESDE(0.01, 10.0), "ve50": lambda: VESDE(0.01, 50.0), "vp": lambda: VPSDE(0.1, 20.0),
             "subvp": lambda: SubVPSDE(), "ddpm": lambda: DiscreteVP()}


@pytest.mark.parametrize("key", sorted(PROCESSES))
@pytest.mark.parametrize("n", [1, 2, 5, 14, 40])
def test_fitted_grid_is_well_formed(key, n):
    process = PROCESSES[key]()
    lam = fitted_log_snr(process, n)
    ends = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
    assert lam.shape == (n + 1,) and lam.dtype == torch.float64
    assert float(lam[0]) == float(ends[0]) and float(lam[-1]) == float(ends[1])
    assert bool((torch.diff(lam) > 0).all())
    ts = get_sampler("dpmpp_2m", num_steps=n).time_grid(process)
    assert bool((ts[1:] < ts[:-1]).all()) and float(ts[0]) == process.t_max and float(ts[-1]) == process.t_min


def test_fitted_grid_lives_in_absolute_log_snr():
    """Processes of one family share the grid's shape: VE with sigma_max 40 and 50 place their interior points at
    nearly the same log-SNR (mean shift 0.04; the uniform log-SNR grid's is 0.11)."""
    a, b = fitted_log_snr(VESDE(0.01, 40.0), 20), fitted_log_snr(VESDE(0.01, 50.0), 20)
    assert float((a[1:-1] - b[1:-1]).abs().mean()) < 0.05
    # while the uniform log-SNR grid shifts its points by the range's change over the whole span
    u40, u50 = (VESDE(0.01, s).log_snr(VESDE(0.01, s).time_grid(20, "log_sigma", dtype=torch.float64))
                for s in (40.0, 50.0))
    assert float((u40[1:-1] - u50[1:-1]).abs().mean()) > 0.09


def _pathwise_error(mix, process, sampler, n_samples=512):
    x1 = process.prior_sample((n_samples, mix.dim), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    score = mix.score_fn(process)
    ref = get_sampler("dpmpp_3m", num_steps=300, grid="log_sigma", to_zero=True).sample(score, process, x_init=x1)
    out = sampler.sample(score, process, x_init=x1)
    return float((out.samples - ref.samples).pow(2).sum(1).median())


@pytest.mark.parametrize("case,key,n", [("ring", "ve10", 14), ("ring", "ve50", 14), ("ring", "vp", 14),
                                        ("aniso16", "vp", 19)])
def test_default_grid_beats_uniform_log_snr(case, key, n):
    mix = ring_mixture() if case == "ring" else anisotropic_mixture()
    process = PROCESSES[key]()
    default = _pathwise_error(mix, process, get_sampler("dpmpp_2m", num_steps=n))
    uniform = _pathwise_error(mix, process, get_sampler("dpmpp_2m", num_steps=n, grid="log_sigma"))
    assert default < 0.5 * uniform, (default, uniform)


def test_to_zero_default_gives_way_to_denoise():
    s = get_sampler("dpmpp_2m", denoise=True)
    assert s.config["to_zero"] is False and s.config["denoise"] is True
    assert get_sampler("dpmpp_2m").config["to_zero"] is True
    with pytest.raises(ValueError, match="exclusive"):
        get_sampler("dpmpp_2m", denoise=True, to_zero=True)
