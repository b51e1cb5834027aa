"""The scaled-state likelihood ODE of benchmarks/bench_likelihood.py (``ScaledState``: the state x / alpha_t, whose
ODE has no linear part, plus the exact log-density term d ln alpha) against closed forms: the exact log p_{t_min} of
a Gaussian and of a 2-D mixture under VP, sub-VP and VE, in each clock, with the accuracy following the tolerance.

The variable is measured there against the default (docs/likelihood.md, results/likelihood_scaled.md); these
tests check that its derivation is right, so that what it costs is the cost of a correct solve.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch

from score_toolkit.analytic import gaussian, ring_mixture
from score_toolkit.likelihood.time_variable import _TimeVariable
from score_toolkit.processes import VESDE, VPSDE, SubVPSDE


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_likelihood.py"
    spec = importlib.util.spec_from_file_location("bench_likelihood_for_scaled_state_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


PROCESSES = {"VP": lambda: VPSDE(0.1, 20.0, t_min=1e-5), "subVP": lambda: SubVPSDE(0.1, 20.0, t_min=1e-5),
             "VE": lambda: VESDE(0.01, 50.0, t_min=1e-5)}
MODELS = {
    "gaussian": lambda: gaussian(torch.tensor([0.5, -1.0, 2.0]),
                                 torch.tensor([[0.3, 0.1, 0.0], [0.1, 0.2, -0.05], [0.0, -0.05, 0.8]])),
    "ring": ring_mixture,
}


@pytest.mark.parametrize("clock", ["t", "vp_t", "log_sigma"])
@pytest.mark.parametrize("pname", list(PROCESSES))
@pytest.mark.parametrize("mname", list(MODELS))
def test_scaled_state_gives_the_exact_log_density(mname, pname, clock):
    bench = _bench()
    proc, model = PROCESSES[pname](), MODELS[mname]()
    x = model.sample(12, generator=torch.Generator().manual_seed(3))
    exact = model.log_prob(x, proc.t_min, proc)
    prior = partial(model.log_prob, t=1.0, process=proc)  # the exact p_1: only the solver's error remains
    errs = {}
    for tol in (1e-4, 1e-7):
        lp, calls = bench.scaled_solve(model.score_fn(proc), proc, x, prior, clock, tol=tol)
        errs[tol] = float((lp - exact).abs().max())
        assert calls > 0
    # measured (max over the 12 points): 4.4e-7 to 1.3e-6 at 1e-7, 9.1e-4 to 5.8e-3 at 1e-4
    assert errs[1e-7] < 5e-6, errs
    assert errs[1e-4] < 2e-2, errs
    assert errs[1e-7] < errs[1e-4] / 100, errs  # the accuracy follows the tolerance


def test_scaled_state_removes_the_linear_part_and_keeps_the_clock():
    bench = _bench()
    proc = VPSDE(0.1, 20.0, t_min=1e-5)
    v = bench.ScaledState("t", proc, proc.t_min, 1.0)
    tau = torch.tensor([1e-3, 0.2, 0.7, 1.0], dtype=torch.float64)
    t, c, a, b = v.coefficients_rows(tau)
    alpha = proc.alpha(tau).double()
    torch.testing.assert_close(t, tau)
    torch.testing.assert_close(c, alpha)
    assert torch.all(a == 0)  # no linear part left
    torch.testing.assert_close(b, -0.5 * proc.diffusion_squared(tau).double() / alpha)  # dy/dt = -g^2 / (2 alpha) s
    # the exact log-density term d ln alpha(1) - d ln alpha(t_min) is there: ln alpha(1) = -(0.1 + 10) / 2 under VP
    assert abs(v.log_c_hi - (-(0.1 + 20.0) / 4)) < 1e-12 and abs(v.log_c_lo) < 1e-4
    # in ln(sigma / alpha) the library's variable already integrates x / alpha: the same coefficients
    lib, scaled = _TimeVariable("log_sigma", proc, proc.t_min, 1.0), bench.ScaledState("log_sigma", proc, proc.t_min, 1.0)
    tau = torch.linspace(lib.lo, lib.hi, 7, dtype=torch.float64)
    for u, w in zip(lib.coefficients_rows(tau), scaled.coefficients_rows(tau)):
        torch.testing.assert_close(u, w)


def test_scaled_state_with_the_state_only_error_ratio_still_solves():
    bench = _bench()
    proc, model = VPSDE(0.1, 20.0, t_min=1e-5), ring_mixture()
    x = model.sample(8, generator=torch.Generator().manual_seed(1))
    exact = model.log_prob(x, proc.t_min, proc)
    prior = partial(model.log_prob, t=1.0, process=proc)
    import score_toolkit.likelihood.ode as ode

    original = ode._two_part_rms
    lp, _ = bench.scaled_solve(model.score_fn(proc), proc, x, prior, "t", tol=1e-7, state_only=True)
    assert ode._two_part_rms is original  # put back
    assert float((lp - exact).abs().max()) < 1e-5
