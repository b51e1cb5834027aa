"""The per-sample Dormand-Prince stepper of the likelihood (score_toolkit.likelihood.stepper) and
``log_likelihood(method="dopri5_per_sample")``:

* the tableau's order: quadrature of polynomials exact up to degree 4, not 5;
* linear ODEs with a different rate per row against exp(lambda t): every row within its tolerance, the error
  shrinking with the tolerance, fast rows taking more steps than slow ones, each row's result independent of
  the other rows of the batch;
* the likelihood of the 2-D ring (VP, VE) against the exact mixture density, monotone in the tolerance and
  independent of the batch; the step budget and bad options.
"""

from __future__ import annotations

import pytest
import torch

from score_toolkit.analytic import anisotropic_mixture, ring_mixture
from score_toolkit.likelihood import SolverError, log_likelihood
from score_toolkit.likelihood.divergence import _two_part_rms
from score_toolkit.likelihood.stepper import solve_dopri5
from score_toolkit.likelihood.time_variable import _TimeVariable
from score_toolkit.processes import VESDE, VPSDE, DiscreteVP


def _row_rms(y: torch.Tensor) -> torch.Tensor:
    """The RMS over each row: scipy's RK45 norm applied to each row (the ratio these stepper tests run with, and the
    one the library's two-part ratio is compared with)."""
    return y.pow(2).mean(1).sqrt()


def _solve(func, y0, lo=0.0, hi=1.0, tol=1e-6, **kw):
    return solve_dopri5(func, y0, lo, hi, rtol=tol, atol=tol, ratio=_row_rms, max_num_steps=kw.pop("max_num_steps", 1000),
                        **kw)


@pytest.mark.parametrize("degree, exact", [(4, True), (5, False)])
def test_the_tableau_integrates_polynomials_exactly_up_to_degree_four(degree, exact):
    # y' = (p + 1) t^p, y(0) = 0: y(1) = 1; a fifth-order pair is exact for p <= 4 whatever its steps
    p = degree

    def func(tau, y, rows):
        return ((p + 1) * tau**p)[:, None].to(y.dtype)

    y1, stats = _solve(func, torch.zeros(1, 1, dtype=torch.float64), tol=1e-2)
    err = abs(float(y1[0, 0]) - 1.0)
    assert stats["attempts"] >= 1
    if exact:
        assert err < 1e-13, err
    else:
        assert err > 1e-9, err  # degree 5 is beyond the order: a real (small) error remains


def test_linear_odes_per_row_meet_the_tolerance_and_take_their_own_steps():
    lam = torch.tensor([-0.5, -2.0, 1.0, -8.0], dtype=torch.float64)

    def func(tau, y, rows):
        rates = lam if rows is None else lam[rows]
        return rates[:, None] * y

    y0 = torch.ones(4, 3, dtype=torch.float64)
    exact = torch.exp(lam)[:, None] * y0
    errors = []
    for tol in (1e-4, 1e-6, 1e-8):
        y1, stats = _solve(func, y0, tol=tol)
        rel = ((y1 - exact).abs() / (tol * (1 + exact.abs()))).max(1).values  # global error in units of tol
        assert torch.all(rel < 20), (tol, rel)
        errors.append(float((y1 - exact).abs().max()))
        steps = stats["accepted"]
        # the fastest decay needs the most steps, the slowest the fewest
        assert int(steps[3]) > int(steps[1]) > int(steps[0]), steps
    # the global error follows the tolerance (measured: 0.18 to 0.23 tol in all three)
    assert errors[0] > 10 * errors[1] > 100 * errors[2], errors

    # a row's result does not depend on the other rows of the batch
    together, _ = _solve(func, y0, tol=1e-6)
    lam_one = lam[1:2]

    def func_one(tau, y, rows):
        return lam_one[:, None] * y

    alone, _ = _solve(func_one, y0[1:2], tol=1e-6)
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-14)


def test_shared_steps_accept_every_row_together():
    lam = torch.tensor([-0.5, -8.0], dtype=torch.float64)

    def func(tau, y, rows):
        return (lam if rows is None else lam[rows])[:, None] * y

    _, own = _solve(func, torch.ones(2, 1, dtype=torch.float64))
    _, shared = _solve(func, torch.ones(2, 1, dtype=torch.float64), shared=True)
    assert int(own["accepted"][0]) < int(own["accepted"][1])
    assert int(shared["accepted"][0]) == int(shared["accepted"][1]) >= int(own["accepted"][1])


def test_the_step_budget_raises():
    def func(tau, y, rows):
        return torch.cos(50 * tau)[:, None].to(y.dtype) * torch.ones_like(y)

    with pytest.raises(SolverError, match="max_num_steps=3"):
        _solve(func, torch.zeros(2, 1, dtype=torch.float64), tol=1e-10, max_num_steps=3)


@pytest.mark.parametrize("proc, kind", [(VPSDE(0.1, 20.0), "t"), (VESDE(0.01, 50.0), "log_sigma"),
                                        (DiscreteVP(), "log_sigma"), (VESDE(0.01, 50.0), "vp_t"),
                                        (DiscreteVP(), "vp_t")])
def test_row_coefficients_equal_the_scalar_ones(proc, kind):
    var = _TimeVariable(kind, proc, proc.t_min, proc.t_max)
    taus = torch.linspace(var.lo, var.hi, 7, dtype=torch.float64)
    rows = var.coefficients_rows(taus)
    for i, tau in enumerate(taus.tolist()):
        one = var.coefficients(tau)
        for j in range(4):
            assert abs(float(rows[j][i]) - one[j]) <= 1e-12 * max(1.0, abs(one[j])), (tau, j)


@pytest.mark.parametrize("proc", [VPSDE(0.1, 20.0), VESDE(0.01, 50.0)], ids=["VP", "VE"])
def test_per_sample_likelihood_matches_the_mixture_and_tightens_with_the_tolerance(proc):
    m = ring_mixture()
    x = m.sample(40, generator=torch.Generator().manual_seed(1))
    sf = m.score_fn(proc)
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    exact = m.log_prob(x, proc.t_min, proc)
    errs = []
    for tol in (1e-3, 1e-4, 1e-5):
        res = log_likelihood(sf, proc, x, prior_log_prob=prior, method="dopri5_per_sample", rtol=tol, atol=tol)
        errs.append(float((res.log_prob - exact).abs().mean()))
        assert res.info["method"] == "dopri5_per_sample"
    assert errs[0] > errs[1] > errs[2], errs
    # measured at rtol = atol = 1e-5 on 500 points: mean 4e-5 (VP), 5e-5 (VE)
    assert errs[2] < 2e-4, errs


def test_per_sample_likelihood_does_not_depend_on_the_batch():
    proc = VPSDE(0.1, 20.0)
    m = ring_mixture()
    x = m.sample(9, generator=torch.Generator().manual_seed(2))
    sf = m.score_fn(proc)
    for kw in ({}, {"divergence": "hutchinson", "num_probes": 2, "seed": 3}):
        whole = log_likelihood(sf, proc, x, method="dopri5_per_sample", **kw)
        alone = log_likelihood(sf, proc, x, method="dopri5_per_sample", batch_size=1, **kw)
        torch.testing.assert_close(whole.log_prob, alone.log_prob, rtol=0, atol=1e-10)


def test_per_sample_method_refuses_a_batch_norm_and_respects_the_budget():
    proc = VPSDE()
    m = ring_mixture()
    x = m.sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="per_sample_norm=False"):
        log_likelihood(m.score_fn(proc), proc, x, method="dopri5_per_sample", per_sample_norm=False)
    with pytest.raises(SolverError, match="max_num_steps=2"):
        log_likelihood(m.score_fn(proc), proc, x, method="dopri5_per_sample", max_num_steps=2)
    assert _row_rms(torch.tensor([[3.0, 4.0, 1.0]])).item() == pytest.approx((26 / 3) ** 0.5)


def test_the_error_ratio_weighs_x_and_the_log_density_half_each_whatever_the_dimension():
    ratio = _two_part_rms(3)
    # x part RMS 2 (components 2, 2, 2), log-density part 1: sqrt((4 + 1) / 2)
    assert ratio(torch.tensor([[2.0, -2.0, 2.0, 1.0]])).item() == pytest.approx((5 / 2) ** 0.5)
    # a log-density error alone counts sqrt(1/2) in any dimension; in the row's RMS it would count 1 / sqrt(d + 1)
    for d in (2, 16, 64):
        e = torch.zeros(1, d + 1, dtype=torch.float64)
        e[0, d] = 1.0
        assert _two_part_rms(d)(e).item() == pytest.approx(0.5**0.5)
        assert _row_rms(e).item() == pytest.approx((d + 1) ** -0.5)
    # several log-density components (Hutchinson probes): their RMS
    assert _two_part_rms(1)(torch.tensor([[0.0, 3.0, 4.0]])).item() == pytest.approx(((25 / 2) / 2) ** 0.5)


@pytest.mark.parametrize("proc", [VPSDE(0.1, 20.0), VESDE(0.01, 50.0)], ids=["VP", "VE"])
def test_the_log_density_is_held_in_64_dimensions(proc):
    """The log-density is one component of 65: the row's RMS let its error reach 0.74 nats at rtol = atol = 1e-3
    under VE on these 16 points (0.11 at 1e-4); with each part weighing half, and against the exact mixture
    density, measured: max 0.35 (VE) and 0.14 (VP) at 1e-3, 0.050 and 0.053 at 1e-4, and the error shrinks with
    the tolerance."""
    m = anisotropic_mixture(64)
    x = m.sample(16, generator=torch.Generator().manual_seed(0))
    prior = lambda z: m.log_prob(z, 1.0, proc)  # noqa: E731
    exact = m.log_prob(x, proc.t_min, proc)
    errs = []
    for tol in (1e-3, 1e-4):
        res = log_likelihood(m.score_fn(proc), proc, x, prior_log_prob=prior, rtol=tol, atol=tol)
        errs.append(float((res.log_prob - exact).abs().max()))
    assert errs[0] < 0.5 and errs[1] < 0.1 and errs[1] < errs[0] / 2, errs


# ---------------------------------------------------------------------------------------- the stepper's bookkeeping
def _decaying(lam):
    """dy/dtau = lam y per row, recording what each call received."""
    seen = []

    def func(tau, y, rows):
        seen.append((tau, rows))
        rates = lam if rows is None else lam[rows]
        return rates[:, None] * y

    return func, seen


def test_the_rows_passed_are_those_still_integrating_one_tensor_until_some_finish():
    # the right-hand side may cache what depends on the rows (the Hutchinson probes) by the identity of ``rows``
    lam = -torch.linspace(0.5, 8.0, 9, dtype=torch.float64)
    func, seen = _decaying(lam)
    _, stats = _solve(func, torch.ones(9, 2, dtype=torch.float64))
    attempts = stats["accepted"] + stats["rejected"]  # a row's attempts: it leaves after its last one
    previous = None
    for call, (_, rows) in enumerate(seen[2:]):  # after the two calls of the first step
        attempt = call // 6 + 1
        still = (attempts >= attempt).nonzero().squeeze(1)
        if rows is None:
            assert len(still) == 9
        else:
            assert torch.equal(rows, still), (attempt, rows, still)
            if previous is not None and len(previous) == len(rows):
                assert rows is previous  # the same tensor until some rows finish
        previous = rows
    assert seen[-1][1] is not None and len(seen[-1][1]) < 9  # the slow rows finished first


def test_the_times_hook_changes_nothing_but_what_the_calls_receive():
    lam = -torch.linspace(0.5, 8.0, 9, dtype=torch.float64)
    func, seen = _decaying(lam)
    plain, plain_stats = _solve(func, torch.ones(9, 2, dtype=torch.float64))
    plain_taus = [tau for tau, _ in seen]
    batches = []

    def times(taus):
        batches.append(taus.shape[0])
        return [("stage", row) for row in taus]  # what the calls get: anything indexable per time

    def func_times(stage_time, y, rows):
        tag, tau = stage_time
        assert tag == "stage"
        return func(tau, y, rows)

    seen.clear()
    hooked, hooked_stats = _solve(func_times, torch.ones(9, 2, dtype=torch.float64), times=times)
    assert torch.equal(plain, hooked)
    assert all(torch.equal(a, b) for a, b in zip(plain_taus, (tau for tau, _ in seen)))
    assert torch.equal(plain_stats["accepted"], hooked_stats["accepted"])
    assert batches[:2] == [1, 1] and set(batches[2:]) == {6}  # the first step's two calls, then one per attempt


@pytest.mark.parametrize("proc, calls, accepted, rejected", [(VPSDE(0.1, 20.0), 116, 518, 37),
                                                             (VESDE(0.01, 50.0), 116, 498, 35)], ids=["VP", "VE"])
def test_calls_and_steps_on_a_fixed_case(proc, calls, accepted, rejected, monkeypatch):
    """The calls and the accepted and rejected steps over the 40 points, as recorded with the stepper before its
    bookkeeping was cut (commit 70f080a): the bookkeeping changes no decision."""
    import score_toolkit.likelihood.stepper as stepper

    m = ring_mixture()
    x = m.sample(40, generator=torch.Generator().manual_seed(1))
    stats, solve = {}, stepper.solve_dopri5

    def recording(*a, **kw):
        y, st = solve(*a, **kw)
        stats.update(st)
        return y, st

    monkeypatch.setattr(stepper, "solve_dopri5", recording)
    res = log_likelihood(m.score_fn(proc), proc, x)
    assert res.nfe == calls == 2 + 6 * stats["attempts"]
    assert int(stats["accepted"].sum()) == accepted and int(stats["rejected"].sum()) == rejected


@pytest.mark.parametrize("kind", ["vp_t", "log_sigma", "t"])
def test_the_reverse_direction_is_the_right_hand_side_negated_exactly(kind):
    from score_toolkit.likelihood.dynamics import _AugmentedDynamics
    from score_toolkit.likelihood.ode import _Reversed

    proc = VESDE(0.01, 50.0)
    m = ring_mixture()
    var = _TimeVariable(kind, proc, proc.t_min, proc.t_max)
    dyn = _AugmentedDynamics(m.score_fn(proc), proc, (5, 2), "exact", None, var, None)
    state = torch.cat([m.sample(5, generator=torch.Generator().manual_seed(0)), torch.zeros(5, 1,
                                                                                            dtype=torch.float64)], 1)
    taus = var.lo + (var.hi - var.lo) * torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    forward = [dyn.rows_call(times, state, None) for times in dyn.rows_times(taus)]
    backward = [_Reversed(dyn).rows_call(times, state, None) for times in _Reversed(dyn).rows_times(-taus)]
    for f, b in zip(forward, backward):
        assert torch.equal(b, -f)


def test_float32_and_image_shaped_data_through_the_per_sample_default():
    proc = VPSDE(0.1, 20.0)
    m = anisotropic_mixture(4)
    x = m.sample(12, generator=torch.Generator().manual_seed(0))

    def image_score(x4, t):
        return m.score_fn(proc)(x4.reshape(len(x4), 4), t).reshape(x4.shape)

    double = log_likelihood(m.score_fn(proc), proc, x)
    flat = log_likelihood(m.score_fn(proc), proc, x.float())
    image = log_likelihood(image_score, proc, x.float().reshape(12, 1, 2, 2))
    assert flat.log_prob.dtype == image.log_prob.dtype == torch.float32
    torch.testing.assert_close(image.log_prob, flat.log_prob, rtol=0, atol=0)
    # the same solve in float64: float32 rounding only (measured 1.5e-6, the same 98 calls)
    assert float((flat.log_prob.double() - double.log_prob).abs().max()) < 2e-5


def test_a_right_hand_side_that_promotes_the_state_keeps_the_promoted_dtype():
    # a float64 score of a float32 state makes the state float64 after the first step, as before the bookkeeping cut
    lam = -torch.linspace(0.5, 8.0, 5, dtype=torch.float64)
    func, _ = _decaying(lam)
    y1, stats = _solve(func, torch.ones(5, 2, dtype=torch.float32))
    assert y1.dtype == torch.float64 and stats["accepted"].shape == (5,)
    exact = torch.exp(lam)[:, None].expand(5, 2)
    assert float((y1 - exact).abs().max()) < 1e-4


def test_a_score_that_promotes_the_state_gets_float64_coefficients_and_divergence():
    # a float64 score of a float32 state: the calls after the promotion see the float64 coefficients (not float32
    # ones widened), and the exact divergence comes back in the score's dtype
    from score_toolkit.likelihood.dynamics import _AugmentedDynamics

    proc = VPSDE(0.1, 20.0)
    base = ring_mixture().score_fn(proc)

    def score64(x, t):
        return base(x.double(), t.double())

    var = _TimeVariable("vp_t", proc, proc.t_min, proc.t_max)
    taus = torch.tensor([[0.3, 0.55], [0.71, 0.9]], dtype=torch.float64)
    wide = _AugmentedDynamics(score64, proc, (2, 2), "exact", None, var, None)
    expected = wide.rows_times(taus)  # float64 throughout
    dyn = _AugmentedDynamics(score64, proc, (2, 2), "exact", None, var, None)
    seen = []
    real = dyn._evaluate
    dyn._evaluate = lambda state, *args: seen.append(args[:6]) or real(state, *args)
    state32 = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.3, 0.0]], dtype=torch.float32)
    dyn.rows_call(dyn.rows_times(taus)[0], state32, None)  # the first call: float32
    out = dyn.rows_call(dyn.rows_times(taus)[1], state32.double(), None)  # promoted: float64
    assert all(v.dtype == torch.float32 for v in seen[0][:4])
    for got, want in zip(seen[1], expected[1][:6]):
        assert got.dtype == torch.float64 and torch.equal(got, want)
    assert out.dtype == torch.float64
    xg = torch.tensor([[0.5, -1.0]], dtype=torch.float32, requires_grad=True)
    div = dyn._divergence(score64(xg, torch.full((1,), 0.3, dtype=torch.float64)), xg, None)
    assert div.dtype == torch.float64
