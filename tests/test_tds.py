"""The twisted diffusion sampler (``tds``, score_toolkit/samplers/tds.py) and the likelihood terms of the inverse-problem
transforms it uses as twists: gradients against finite differences, the sampler against closed-form posteriors and
the exact-score floor, per-sample generators with a real twist, any rank, its diagnostics and its errors. The
conformance accuracy check on the exact posterior with tds: tests/test_conformance.py."""

from __future__ import annotations

import math

import pytest
import torch

from score_toolkit.analytic import GaussianMixture
from score_toolkit.conditioning import (
    DPS,
    ClassifierGuidance,
    Mask,
    MatrixOperator,
    ObservationLikelihood,
    PiGDM,
    Replacement,
    Twist,
)
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.samplers.base import NonFiniteError
from score_toolkit.samplers.tds import systematic_resample
from score_toolkit.testing import conformance_mixture

D64 = torch.float64


def _problem2d():
    mix = conformance_mixture()
    a = torch.tensor([[0.6, -0.8]], dtype=D64)
    return mix, a, torch.tensor([0.7], dtype=D64), 0.5


def _transforms(mix, proc, op, y, sy):
    return {"dps": DPS(mix.score_fn(proc), proc, op, y, sy), "pigdm": PiGDM(mix.score_fn(proc), proc, op, y, sy),
            "dps_normalized": DPS(mix.score_fn(proc), proc, op, y, sy, weighting="normalized", scale=0.5),
            "pigdm_scaled": PiGDM(mix.score_fn(proc), proc, op, y, sy, scale=lambda t: 1 + t),
            "replacement": Replacement(mix.score_fn(proc), proc, op, y, sy),
            "likelihood": ObservationLikelihood(mix.score_fn(proc), proc, op, y, sy)}


# ---------------------------------------------------------------------- the twist of each transform
@pytest.mark.parametrize("name", ["dps", "pigdm", "dps_normalized", "pigdm_scaled", "replacement", "likelihood"])
@pytest.mark.parametrize("proc", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_twist_is_consistent_with_the_score(name, proc):
    """``twist`` returns the prior score, the transform's own score, and a log-likelihood whose gradient (central
    differences) is the transform's correction; for replacement, whose score also drops the prior's observed part,
    the gradient is the correction on the observed direction."""
    mix, a, y, sy = _problem2d()
    fn = _transforms(mix, proc, MatrixOperator(a), y, sy)[name]
    x = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.2, 0.4, 0.7, 0.95], dtype=D64)
    tw = fn.twist(x, t)
    assert isinstance(tw, Twist) and tw.log_likelihood.shape == (5,)
    torch.testing.assert_close(tw.prior_score, mix.score(x, t, proc))
    torch.testing.assert_close(tw.score, fn(x, t), rtol=1e-10, atol=1e-10)
    h = 1e-5
    grad = torch.stack([(fn.twist(x + h * e, t).log_likelihood - fn.twist(x - h * e, t).log_likelihood) / (2 * h)
                        for e in torch.eye(2, dtype=D64)], 1)
    correction = tw.score - tw.prior_score
    if name == "replacement":
        p = a.T @ a / (a @ a.T)  # projection on the observed direction
        torch.testing.assert_close(grad @ p, correction @ p + tw.prior_score @ p, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(grad, correction, rtol=1e-6, atol=1e-6)


def test_limit_likelihood_is_the_exact_likelihood_as_t_goes_to_zero():
    """For a Gaussian prior N(m, v I), ``p(y | x_t)`` is Gaussian in closed form; the limit likelihood's differences
    between points match it up to O(sigma^2) (sigma^2 ~ beta_min t near t = 0 under VP), and not at large t."""
    v, m = 0.7, torch.tensor([0.3, -0.2], dtype=D64)
    prior = GaussianMixture(m[None], [[v, v]], [1.0])
    proc, a, y, sy = VPSDE(), torch.tensor([[1.0, 0.5]], dtype=D64), torch.tensor([0.4], dtype=D64), 0.3
    fn = DPS(prior.score_fn(proc), proc, MatrixOperator(a), y, sy)
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(1))

    def exact(x, t):  # x_0 | x_t ~ N(mu, c I): y | x_t ~ N(a mu, c a a^T + sy^2)
        al, si = (float(u) for u in proc.marginal(torch.tensor(t, dtype=D64)))
        c = 1 / (1 / v + al**2 / si**2)
        mu = c * (m / v + al * x / si**2)
        var = c * float(a @ a.T) + sy**2
        return -0.5 * ((y - mu @ a.T)[:, 0] ** 2) / var

    def error(t):
        got = fn.limit_log_likelihood(x, torch.full((6,), t, dtype=D64))
        return float(((got - got[0]) - (exact(x, t) - exact(x, t)[0])).abs().max())

    small, ten_times, large = error(1e-3), error(1e-2), error(0.5)
    assert small < 0.01 and large > 0.1
    assert 5 < ten_times / small < 20  # O(sigma^2), and sigma^2 is about proportional to t near 0 under VP


# ---------------------------------------------------------------------- the sampler against closed forms
def test_exact_twist_reaches_the_floor_on_a_gaussian():
    """A 1-D Gaussian prior N(0, 1) under VP: PiGDM with data_variance = 1 is the exact p_t(y | x_t), so tds with it
    matches the exact posterior score sampled with ``ancestral`` on the same grid (the floor) within Monte Carlo
    error, with almost no resampling; the transform alone is itself exact here, so both agree with N(0.8, 0.2)."""
    proc = VPSDE()
    prior = GaussianMixture([[0.0]], [[1.0]], [1.0])
    a, y, sy = torch.tensor([[1.0]], dtype=D64), torch.tensor([1.0], dtype=D64), 0.5
    post = prior.condition(a, y, sy)
    n = 4000
    floor = get_sampler("ancestral", num_steps=200).sample(post.score_fn(proc), proc, shape=(n, 1), dtype=D64,
                                                           generator=torch.Generator().manual_seed(3)).samples
    out = get_sampler("tds", num_steps=200, num_particles=4).sample(
        PiGDM(prior.score_fn(proc), proc, MatrixOperator(a), y, sy), proc, shape=(n, 1), dtype=D64,
        generator=torch.Generator().manual_seed(4))
    se = math.sqrt(0.2 * 2 / n)
    assert abs(float(out.samples.mean()) - float(floor.mean())) < 4 * se
    assert abs(float(out.samples.var()) - float(floor.var())) < 4 * 0.2 * math.sqrt(2 / n) * math.sqrt(2)
    assert abs(float(out.samples.mean()) - 0.8) < 0.05
    assert out.info["resampling_count"] < 0.1 and out.info["final_ess"] > 3.5


def test_tds_corrects_a_biased_transform():
    """DPS on the 1-D Gaussian is overconfident at large t (it ignores the spread of x_0 | x_t): alone it misses the
    posterior mean 0.8 by far more than sampling error; tds with DPS as proposal and twist moves towards it as the
    particles grow (slowly: its twist is a poor approximation of p_t(y | x_t))."""
    proc = VPSDE()
    prior = GaussianMixture([[0.0]], [[1.0]], [1.0])
    a, y, sy = torch.tensor([[1.0]], dtype=D64), torch.tensor([1.0], dtype=D64), 0.5
    fn = DPS(prior.score_fn(proc), proc, MatrixOperator(a), y, sy)
    n = 1500

    def mean(sampler):
        out = sampler.sample(fn, proc, shape=(n, 1), dtype=D64, generator=torch.Generator().manual_seed(5))
        return float(out.samples.mean())

    alone = mean(get_sampler("ancestral", num_steps=100))
    few = mean(get_sampler("tds", num_steps=100, num_particles=4))
    many = mean(get_sampler("tds", num_steps=100, num_particles=256))
    se = math.sqrt(0.2 / n)
    assert alone - 0.8 > 10 * se
    assert alone > few > many
    assert abs(many - 0.8) < 0.35 * abs(alone - 0.8)


def test_systematic_resampling_counts():
    """Systematic resampling keeps floor(K w_i) or ceil(K w_i) copies of particle i."""
    w = torch.tensor([[0.05, 0.5, 0.3, 0.15], [1.0, 0.0, 0.0, 0.0]], dtype=D64)
    for u in (0.0, 0.3, 0.999):
        idx = systematic_resample(w, torch.full((2,), u, dtype=D64))
        counts = torch.stack([torch.bincount(r, minlength=4) for r in idx]).double()
        assert bool(((counts - 4 * w).abs() < 1).all())
        assert idx[1].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------- contract with a real twist
def test_per_sample_generators_and_any_rank_with_a_twist():
    """With one generator per sample a sample does not depend on its batch (each is its own particle system), and a
    (B, 1, 2, 2) problem gives the samples of its flattened (B, 4) version."""
    from score_toolkit._utils import per_sample_generators

    mix = GaussianMixture([[1.0, -0.5, 0.0, 1.5], [-1.0, 1.0, 0.5, -1.0]], [0.3, 0.4], [0.6, 0.4])
    proc = VPSDE()
    m = torch.tensor([[1, 0], [0, 1]])
    y = torch.tensor([[0.5, 0.0], [0.0, -0.4]], dtype=D64)
    sampler = get_sampler("tds", num_steps=20, num_particles=5, ess_threshold=0.9)
    img = DPS(mix.score_fn(proc), proc, Mask(m[None]), y[None], 0.2)
    flat = DPS(mix.score_fn(proc), proc, Mask(m.reshape(4)), y.reshape(4), 0.2)
    five = sampler.sample(flat, proc, shape=(5, 4), dtype=D64, generator=per_sample_generators(3, range(5)))
    three = sampler.sample(flat, proc, shape=(3, 4), dtype=D64, generator=per_sample_generators(3, range(3)))
    torch.testing.assert_close(five.samples[:3], three.samples, rtol=1e-9, atol=1e-9)
    assert five.info["resampling_count"] > 0  # the groups did resample
    image = sampler.sample(img, proc, shape=(5, 1, 2, 2), dtype=D64, generator=per_sample_generators(3, range(5)))
    torch.testing.assert_close(image.samples.reshape(5, 4), five.samples, rtol=1e-9, atol=1e-9)
    f32 = sampler.sample(flat, proc, shape=(5, 4), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    assert f32.samples.dtype == torch.float32 and bool(torch.isfinite(f32.samples).all())


def test_diagnostics_and_nfe():
    mix, a, y, sy = _problem2d()
    proc = VPSDE()
    fn = PiGDM(mix.score_fn(proc), proc, MatrixOperator(a), y, sy)
    calls = []
    out = get_sampler("tds", num_steps=30, num_particles=6).sample(fn, proc, shape=(40, 2), dtype=D64, callback=calls.append,
                                                                   generator=torch.Generator().manual_seed(0))
    assert out.nfe == 30 == get_sampler("tds", num_steps=30).nfe and calls[-1]["nfe"] == 30
    assert out.info["evaluations_per_sample"] == 6 * 30
    assert len(out.info["ess"]) == 30 and all(1 <= e <= 6 + 1e-9 for e in out.info["ess"])
    assert 1 <= out.info["min_final_ess"] <= out.info["final_ess"] <= 6 + 1e-9
    never = get_sampler("tds", num_steps=30, num_particles=6, ess_threshold=0.0).sample(
        fn, proc, shape=(40, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    always = get_sampler("tds", num_steps=30, num_particles=6, ess_threshold=1.0).sample(
        fn, proc, shape=(40, 2), dtype=D64, generator=torch.Generator().manual_seed(0))
    assert never.info["resampling_count"] == 0
    assert always.info["resampling_count"] == pytest.approx(30, abs=1)


def test_a_non_finite_particle_that_is_never_the_heaviest_is_not_dropped():
    """Unweighted (twist='none'): a NaN in a particle that would not be the heaviest under equal weights is still an
    error, not a particle silently outweighed."""
    proc = VPSDE()
    mix = conformance_mixture()

    def score(x, t):
        s = mix.score_fn(proc)(x, t)
        s[1::2] = float("nan")  # every second particle; the heaviest of each group (the first: equal weights) is fine
        return s

    with pytest.raises(NonFiniteError, match="NaN"):
        get_sampler("tds", num_steps=5, num_particles=2, twist="none").sample(
            score, proc, shape=(3, 2), dtype=D64, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- bad input
def test_bad_options():
    for k in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_particles to be an int >= 2"):
            get_sampler("tds", num_particles=k)
    for thr in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match=r"ess_threshold to be a number in \[0, 1\]"):
            get_sampler("tds", ess_threshold=thr)
    with pytest.raises(ValueError, match="twist"):
        get_sampler("tds", twist="dps")


def test_a_score_without_a_likelihood_term_is_refused():
    """A plain score function, or a transform without a likelihood (classifier guidance), is refused before any
    evaluation, with the reason and the alternatives."""
    from score_toolkit.analytic import ClassConditionalMixture

    mix, proc = conformance_mixture(), VPSDE()
    cc = ClassConditionalMixture(mix, [0, 1, 1])
    for fn in (mix.score_fn(proc), ClassifierGuidance(mix.score_fn(proc), cc.classifier(proc), 1, scale=2.0)):
        with pytest.raises(ValueError, match="likelihood term.*twist='none'"):
            get_sampler("tds", num_steps=5).sample(fn, proc, shape=(3, 2), dtype=D64)


def test_bad_twist_outputs_and_non_finite_weights():
    mix, a, y, sy = _problem2d()
    proc = VPSDE()
    good = DPS(mix.score_fn(proc), proc, MatrixOperator(a), y, sy)

    class Wrong:
        def __init__(self, how):
            self.how = how

        def __call__(self, x, t):
            return good(x, t)

        def limit_log_likelihood(self, x, t):
            return good.limit_log_likelihood(x, t)

        def twist(self, x, t):
            p, s, ll = good.twist(x, t)
            if self.how == "shape":
                return p, s[:, :1], ll
            if self.how == "ll_shape":
                return p, s, ll[:, None]
            return p, s, torch.full_like(ll, math.nan)

    sampler = get_sampler("tds", num_steps=5, num_particles=2)
    with pytest.raises(ValueError, match="score of shape"):
        sampler.sample(Wrong("shape"), proc, shape=(3, 2), dtype=D64)
    with pytest.raises(ValueError, match="log likelihood of shape"):
        sampler.sample(Wrong("ll_shape"), proc, shape=(3, 2), dtype=D64)
    with pytest.raises(NonFiniteError, match="particle weights of 3 of 3 samples"):
        sampler.sample(Wrong("nan"), proc, shape=(3, 2), dtype=D64)
    with pytest.raises(ValueError, match="expected samples with 2 entries"):  # a state the operator does not fit
        sampler.sample(good, proc, shape=(3, 3), dtype=D64)


def test_benchmark_script_writes_its_tables(tmp_path):
    """benchmarks/bench_tds.py on tiny settings: one row per planned run, a markdown table, and the merge mode."""
    import json

    from helpers import load_benchmark

    bench = load_benchmark("bench_tds")
    assert bench.main(["--cases", "conformance", "--sigma-y", "0.5", "--n", "60", "--particles", "2", "--nfe", "4,6",
                       "--k-nfe", "2", "--floor-seeds", "2", "--tag", "t", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    # exact at 2 NFE values, then per method: alone, K = 2 at the largest NFE, the NFE sweep at K = 2
    assert len(rows) == 2 + 3 * 3
    assert all("error" not in r and math.isfinite(r["wsw_ratio"]) for r in rows)
    assert {r["sampler"] for r in rows} == {"ancestral", "tds"}
    assert bench.main(["--merge", "t", "--tag", "merged", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "merged.md").read_text()
    assert "## conformance, sigma_y = 0.5 (N = 60, Pearson limit 18.4)" in text and text.count("| tds |") == 6
