"""What a sampler step does per call, checked against its formula: the fused ancestral step rounds like the formula
evaluated in float64 and rounded (a few ulps), the fast noise path draws exactly :func:`score_toolkit._utils.randn`'s
numbers, and the per-process setup caches (ancestral grid and coefficients, single-step DPM-Solver++ coefficients)
are computed once per process and never leak from one process to another."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from score_toolkit import get_sampler
from score_toolkit._utils import randn, randn_like
from score_toolkit.analytic import ring_mixture
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.samplers import ancestral as ancestral_module
from score_toolkit.samplers import dpm_solver as dpm_module
from score_toolkit.samplers.ancestral import _posterior_step, forward_transition

F64 = torch.float64


@pytest.mark.parametrize("kind", ["none", "single", "list"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_randn_like_draws_the_numbers_of_randn(kind, layout, dtype):
    x = torch.zeros(6, 5, dtype=dtype) if layout == "contiguous" else torch.zeros(5, 6, dtype=dtype).t()

    def gen():
        if kind == "single":
            return torch.Generator().manual_seed(3)
        if kind == "list":
            return [torch.Generator().manual_seed(10 + i) for i in range(6)]
        torch.manual_seed(4)
        return None

    with torch.random.fork_rng(devices=[]):
        fast = randn_like(x, gen())
        ref = randn(x.shape, generator=gen(), dtype=dtype)
    assert fast.is_contiguous() and fast.dtype == dtype
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("process", [VESDE(0.01, 50.0), VPSDE()], ids=["VE", "VP"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ancestral_step_rounds_like_its_formula(process, dtype):
    """``(x + var s) / a + std z`` computed with fused adds is within a few ulps of the float64 value (three
    roundings, each at most half an ulp of its partial result)."""
    g = torch.Generator().manual_seed(0)
    x, s, z = (torch.randn(20000, 2, generator=g, dtype=F64) * c for c in (3.0, 5.0, 1.0))
    _, s_t, _, s_s, a_ts, var_ts = forward_transition(process, 0.4, 0.35)
    std = (var_ts * s_s**2 / s_t**2) ** 0.5
    exact = (x + var_ts * s) / a_ts + std * z
    xd, sd, zd = x.to(dtype), s.to(dtype), z.to(dtype)
    got = _posterior_step(xd, sd, a_ts, var_ts, std, lambda v: zd)
    # the float64 value of the rounded inputs, and the size of the partial results that are rounded
    ref = (xd.double() + var_ts * sd.double()) / a_ts + std * zd.double()
    scale = (xd.double().abs() + var_ts * sd.double().abs()) / a_ts + std * zd.double().abs()
    err = (got.double() - ref).abs() / scale
    assert float(err.max()) <= 3 * torch.finfo(dtype).eps
    if dtype == F64:
        torch.testing.assert_close(got, exact, rtol=1e-14, atol=1e-14)


def test_ancestral_keeps_its_setup_per_process():
    mix = ring_mixture()
    ve, vp = VESDE(0.01, 50.0), VPSDE()
    sampler = get_sampler("ancestral", num_steps=12)

    def run(s, proc):
        x0 = proc.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
        return s.sample(mix.score_fn(proc), proc, x0, generator=torch.Generator().manual_seed(2)).samples

    with mock.patch.object(ancestral_module, "forward_transitions", wraps=ancestral_module.forward_transitions) as ft:
        outs = [run(sampler, p) for p in (ve, ve, vp, ve)]
        assert ft.call_count == 3  # ve once, vp once, ve again after vp
        sampler.config["variance"] = "forward"  # a changed option is a new setup
        forward = run(sampler, ve)
        assert ft.call_count == 4
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[3])
    assert torch.equal(outs[2], run(get_sampler("ancestral", num_steps=12), vp))
    assert torch.equal(forward, run(get_sampler("ancestral", num_steps=12, variance="forward"), ve))


@pytest.mark.parametrize("name", ["dpmpp_2s", "dpmpp_sde", "dpmpp_3s"])
def test_single_step_solvers_keep_their_coefficients_per_process(name):
    mix = ring_mixture()
    ve, vp = VESDE(0.01, 50.0), VPSDE()
    sampler = get_sampler(name, num_steps=4)

    def run(s, proc):
        x0 = proc.prior_sample((16, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
        return s.sample(mix.score_fn(proc), proc, x0, generator=torch.Generator().manual_seed(2)).samples

    calls = mock.patch.object(dpm_module, "singlestep_coefficients", wraps=dpm_module.singlestep_coefficients)
    with calls as sc:
        outs = [run(sampler, p) for p in (ve, ve, vp, ve)]
        assert sc.call_count == 3
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[3])
    assert torch.equal(outs[2], run(get_sampler(name, num_steps=4), vp))
