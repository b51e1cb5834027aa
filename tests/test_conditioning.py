"""Conditioning: measurement operators, the exact posterior / class-conditional test bed, score transforms
(classifier guidance, classifier-free guidance, DPS, PiGDM, replacement) and the conditional samplers (imputation,
RePaint), each checked against closed forms and, where the method is exact, with the conformance accuracy check
on the exact posterior (one stochastic and one deterministic sampler)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import projection_problem

from score_toolkit.analytic import ClassConditionalMixture, GaussianMixture, anisotropic_mixture, gaussian, ring_mixture
from score_toolkit.conditioning import (
    DPS,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    Downsample,
    GaussianBlur,
    Greyscale,
    LabelledScoreAdapter,
    Mask,
    MatrixOperator,
    PiGDM,
    Replacement,
    make_operator,
)
from score_toolkit.processes import VESDE, VPSDE
from score_toolkit.registry import get_sampler
from score_toolkit.testing import check_accuracy, conformance_mixture

D64 = torch.float64


def _operators():
    g = torch.Generator().manual_seed(0)
    yield "mask-vector", Mask(torch.tensor([1, 0, 1, 1, 0, 0])), (6,)
    yield "mask-image", Mask(torch.rand(1, 4, 4, generator=g) > 0.5), (3, 4, 4)
    yield "downsample-image", Downsample(2), (2, 4, 6)
    yield "downsample-signal", Downsample(3), (2, 6)
    yield "downsample-vector", Downsample(2), (8,)
    yield "greyscale", Greyscale(), (3, 2, 3)
    yield "greyscale-weights", Greyscale((0.299, 0.587, 0.114)), (3, 4)
    yield "blur-image", GaussianBlur(1.0), (2, 5, 6)
    yield "blur-vector", GaussianBlur(0.8), (7,)
    yield "matrix-wide", MatrixOperator(torch.randn(3, 8, generator=g, dtype=D64)), (2, 2, 2)
    yield "matrix-tall", MatrixOperator(torch.randn(5, 3, generator=g, dtype=D64)), (3,)


OPS = list(_operators())


@pytest.mark.parametrize("name,op,shape", OPS, ids=[o[0] for o in OPS])
def test_operator_against_its_dense_matrix(name, op, shape):
    """A, A^T, A^+, (a A A^T + b I)^-1 and the singular values agree with the dense matrix."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *shape, generator=g, dtype=D64)
    mat = op.matrix(shape)
    ax = op(x)
    assert ax.shape == (4, *op.measurement_shape(shape))
    torch.testing.assert_close(op.measurements(ax, shape), x.reshape(4, -1) @ mat.T)
    # adjoint: <A x, v> = <x, A^T v> for measurements v (zero-filled for masks)
    v = op(torch.randn(4, *shape, generator=g, dtype=D64)) + (0 if isinstance(op, Mask) else 0.3 * torch.randn(ax.shape, generator=g, dtype=D64))
    torch.testing.assert_close((ax * v).flatten(1).sum(1), (x * op.adjoint(v, shape)).flatten(1).sum(1))
    vm = op.measurements(v, shape)
    torch.testing.assert_close(op.adjoint(v, shape).reshape(4, -1), vm @ mat)
    torch.testing.assert_close(op.pinv(v, shape).reshape(4, -1), vm @ torch.linalg.pinv(mat).T, atol=1e-8, rtol=1e-6)
    for a, b in ((0.7, 0.2), (torch.tensor([0.1, 1.0, 2.0, 0.5], dtype=D64), torch.tensor([0.3, 0.01, 1.0, 2.0], dtype=D64))):
        got = op.measurements(op.gram_solve(v, a, b, shape), shape)
        for i in range(4):
            ai, bi = (float(a[i]), float(b[i])) if isinstance(a, torch.Tensor) else (a, b)
            m = ai * mat @ mat.T + bi * torch.eye(mat.shape[0], dtype=D64)
            torch.testing.assert_close(got[i], torch.linalg.solve(m, vm[i]), atol=1e-8, rtol=1e-6)
    sv = torch.linalg.svdvals(mat)
    torch.testing.assert_close(op.singular_values(shape)[: len(sv)], sv, atol=1e-8, rtol=1e-6)


def test_operator_shape_errors():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"mask.*per-sample shape \(3, 4, 4\).*found \(4, 5\)"):
        Mask(torch.ones(4, 5))(x)
    with pytest.raises(ValueError, match="zeros and ones"):
        Mask(torch.full((4, 4), 0.5))
    with pytest.raises(ValueError, match=r"observation of shape \(3, 4, 4\).*found \(3, 4\)"):
        Mask(torch.ones(4, 4)).adjoint(torch.zeros(3, 4), (3, 4, 4))
    with pytest.raises(ValueError, match="multiples of the factor 3"):
        Downsample(3)(x)
    with pytest.raises(ValueError, match="expected samples with 3 channels"):
        Greyscale()(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"expected samples with 5 entries.*\(2, 5\).*48 entries"):
        MatrixOperator(torch.ones(2, 5))(x)
    with pytest.raises(ValueError, match="did you mean 'downsample'"):
        make_operator("downsampel", factor=2)
    with pytest.raises(ValueError, match="factor >= 1"):
        Downsample(0)


# ---------------------------------------------------------------------- the exact test bed
def test_exact_posterior_against_bayes_on_a_grid():
    """2-D: the posterior density equals prior x likelihood / evidence, evaluated by brute force on a grid."""
    mix = conformance_mixture()
    a = torch.tensor([[0.6, -0.8]], dtype=D64)
    y, sy = torch.tensor([0.7], dtype=D64), 0.4
    post = mix.condition(a, y, sy)
    u = torch.linspace(-6, 6, 241, dtype=D64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    loglik = -0.5 * ((grid @ a.T - y) / sy).pow(2).sum(1) - math.log(sy * math.sqrt(2 * math.pi))
    unnorm = mix.log_prob(grid) + loglik
    cell = float(u[1] - u[0]) ** 2
    log_z = torch.logsumexp(unnorm, 0) + math.log(cell)
    torch.testing.assert_close(log_z, mix.observation_log_prob(a, y, sy), atol=1e-6, rtol=0)
    keep = unnorm > unnorm.max() - 20
    torch.testing.assert_close(post.log_prob(grid[keep]), unnorm[keep] - log_z, atol=1e-6, rtol=0)


def test_exact_posterior_information_form_and_monte_carlo():
    """16-D full-covariance mixture: components equal the information form (S^-1 + A^T A / s^2)^-1, and the
    posterior mean agrees with self-normalised importance sampling of prior draws."""
    mix = anisotropic_mixture(16, 6)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 16, generator=g, dtype=D64) / 4
    x_true = mix.sample(1, generator=g)[0]
    sy = 0.5
    y = a @ x_true + sy * torch.randn(3, generator=g, dtype=D64)
    post = mix.condition(a, y, sy)
    for k in range(mix.num_components):
        s_inv = torch.linalg.inv(mix.covariances[k])
        cov = torch.linalg.inv(s_inv + a.T @ a / sy**2)
        torch.testing.assert_close(post.covariances[k], cov, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(post.means[k], cov @ (s_inv @ mix.means[k] + a.T @ y / sy**2), atol=1e-10, rtol=1e-8)
    xs = mix.sample(400_000, generator=g)
    logw = -0.5 * ((xs @ a.T - y) / sy).pow(2).sum(1)
    w = torch.softmax(logw, 0)
    ess = 1 / float((w**2).sum())
    mc_mean = (w[:, None] * xs).sum(0)
    exact_mean = (post.weights[:, None] * post.means).sum(0)
    assert ess > 1000
    tol = 5 * float(post.sample(20000, generator=g).std(0).max()) / math.sqrt(ess)
    assert float((mc_mean - exact_mean).abs().max()) < tol


def test_exact_perturbed_posterior_score_is_the_gradient_of_its_log_density():
    post = anisotropic_mixture(16, 4).condition(torch.eye(16, dtype=D64)[:2], torch.tensor([0.5, -1.0], dtype=D64), 0.05)
    x = torch.randn(5, 16, dtype=D64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for proc in (VPSDE(), VESDE()):
        t = torch.tensor([0.01, 0.1, 0.3, 0.6, 1.0], dtype=D64)
        (grad,) = torch.autograd.grad(post.log_prob(x, t, proc).sum(), x)
        torch.testing.assert_close(post.score(x.detach(), t, proc), grad)


def test_condition_bad_input():
    mix = ring_mixture()
    with pytest.raises(ValueError, match=r"\(m, 2\) observation matrix"):
        mix.condition(torch.ones(1, 3), torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="observation with 1 entries"):
        mix.condition(torch.ones(1, 2), torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="noise_std > 0"):
        mix.condition(torch.ones(1, 2), torch.ones(1), 0.0)


def _classes():
    return ClassConditionalMixture(conformance_mixture(), [0, 1, 1])


def test_noise_conditional_classifier_is_bayes_rule():
    cc, proc = _classes(), VPSDE()
    x = torch.randn(7, 2, dtype=D64, generator=torch.Generator().manual_seed(0)) * 2
    t = torch.linspace(0.01, 1, 7, dtype=D64)
    logp = cc.classifier(proc)(x, t)
    brute = torch.stack([cc.class_weights[c].log() + cc.class_mixture(c).log_prob(x, t, proc) for c in range(2)], 1)
    torch.testing.assert_close(logp, torch.log_softmax(brute, 1))


def test_classifier_guidance_scale_one_is_the_exact_conditional_score():
    cc = _classes()
    for proc in (VPSDE(), VESDE()):
        x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(1)) * 3
        t = torch.linspace(0.01, 0.9, 6, dtype=D64)
        for c in range(2):
            guided = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), c, scale=1.0)
            torch.testing.assert_close(guided(x, t), cc.class_mixture(c).score(x, t, proc))


def test_classifier_free_guidance_equals_classifier_guidance_in_one_batched_call():
    cc, proc = _classes(), VPSDE()
    calls = []
    fn = cc.score_fn(proc)

    def counted(x, t, labels):
        calls.append(x.shape[0])
        return fn(x, t, labels)

    counted.null_label, counted.num_classes = fn.null_label, fn.num_classes
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(2)) * 3
    t = torch.linspace(0.01, 0.9, 6, dtype=D64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    for gamma in (0.0, 1.0, 3.0):
        calls.clear()
        cfg = ClassifierFreeGuidance(counted, labels, guidance_scale=gamma)(x, t)
        assert calls == ([6] if gamma == 1.0 else [12])
        cg = torch.stack([ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), int(c), scale=gamma)(x[i:i + 1], t[i:i + 1])[0]
                          for i, c in enumerate(labels)])
        torch.testing.assert_close(cfg, cg)


def test_class_label_errors():
    cc, proc = _classes(), VPSDE()
    with pytest.raises(ValueError, match=r"class label\(s\) \[2\] outside the model's classes 0..1"):
        ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 2)
    with pytest.raises(ValueError, match=r"outside the model's classes"):
        ClassifierFreeGuidance(cc.score_fn(proc), [0, 5])
    with pytest.raises(ValueError, match="one class label per sample"):
        ClassifierFreeGuidance(cc.score_fn(proc), [0, 1, 0])(torch.zeros(2, 2, dtype=D64), 0.5)


def test_guidance_on_a_network_without_labels_is_an_error():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    with pytest.raises(ValueError, match="built without class labels"):
        LabelledScoreAdapter(unet, VPSDE())
    labelled = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                           down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
                           num_class_embeds=4)
    adapter = LabelledScoreAdapter(labelled, VPSDE())
    assert (adapter.num_classes, adapter.null_label) == (3, 3)
    x = torch.randn(2, 1, 8, 8)
    out = ClassifierFreeGuidance(adapter, [0, 2], guidance_scale=2.0)(x, torch.full((2,), 0.5))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match=r"\[3\] outside the model's classes 0..2"):
        ClassifierFreeGuidance(adapter, [3])


# ---------------------------------------------------------------------- inverse-problem transforms: closed forms
def _gaussian_problem(dim=3, v=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = gaussian(torch.randn(dim, generator=g, dtype=D64), torch.full((dim,), v, dtype=D64))
    a = torch.randn(2, dim, generator=g, dtype=D64)
    y = torch.randn(2, generator=g, dtype=D64)
    return prior, a, y, v


@pytest.mark.parametrize("proc", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_pigdm_is_exact_for_an_isotropic_gaussian_prior(proc):
    prior, a, y, v = _gaussian_problem()
    sy = 0.3
    post = prior.condition(a, y, sy)
    x = torch.randn(5, 3, dtype=D64, generator=torch.Generator().manual_seed(1)) * 2
    t = torch.tensor([0.002, 0.05, 0.2, 0.5, 0.9], dtype=D64)
    fn = PiGDM(prior.score_fn(proc), proc, MatrixOperator(a), y, sy, data_variance=v)
    torch.testing.assert_close(fn(x, t), post.score(x, t, proc), atol=1e-9, rtol=1e-7)
    wrong = PiGDM(prior.score_fn(proc), proc, MatrixOperator(a), y, sy, data_variance=4 * v)
    assert float((wrong(x, t) - post.score(x, t, proc)).abs().max()) > 1e-3


def test_dps_is_the_gaussian_likelihood_at_tweedies_denoiser():
    """For a Gaussian prior D(x_t) = c1 x_t + c0 is affine, so DPS's term is -c1 A^T (A D - y) / sy^2, and with the
    normalized weighting -scale c1 A^T (A D - y) / ||A D - y|| (the gradient of the unsquared norm)."""
    prior, a, y, v = _gaussian_problem()
    proc, sy = VPSDE(), 0.2
    x = torch.randn(4, 3, dtype=D64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.05, 0.2, 0.5, 0.9], dtype=D64)
    alpha, sigma = proc.marginal(t)
    c1 = (alpha * v / (alpha**2 * v + sigma**2))[:, None]  # dD/dx_t for the prior N(mu, v I)
    den = prior.denoiser(x, t, proc)
    r = den @ a.T - y
    expected = prior.score(x, t, proc) - c1 * (r @ a) / sy**2
    torch.testing.assert_close(DPS(prior.score_fn(proc), proc, MatrixOperator(a), y, sy)(x, t), expected)
    normalized = DPS(prior.score_fn(proc), proc, MatrixOperator(a), y, weighting="normalized", scale=0.5)(x, t)
    torch.testing.assert_close(normalized, prior.score(x, t, proc) - 0.5 * c1 * (r @ a) / r.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="noise_std > 0"):
        DPS(prior.score_fn(proc), proc, MatrixOperator(a), y, 0.0)


def test_replacement_is_exact_for_independent_coordinates_and_noise_free_observations():
    """Prior with independent coordinates, the first observed without noise: the posterior is N((y, mu_2), diag(0, v2))
    (a tiny variance stands for 0); replacement's score equals its exact perturbed score."""
    proc = VPSDE()
    prior = gaussian(torch.tensor([0.5, -1.0], dtype=D64), torch.tensor([0.8, 0.3], dtype=D64))
    post = gaussian(torch.tensor([1.3, -1.0], dtype=D64), torch.tensor([1e-14, 0.3], dtype=D64))
    op, y = Mask(torch.tensor([1, 0])), torch.tensor([1.3, 0.0], dtype=D64)
    x = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.01, 0.1, 0.3, 0.6, 1.0], dtype=D64)
    torch.testing.assert_close(Replacement(prior.score_fn(proc), proc, op, y)(x, t), post.score(x, t, proc))


def test_inverse_transforms_bad_input():
    prior, a, y, _ = _gaussian_problem()
    proc = VPSDE()
    fn = PiGDM(prior.score_fn(proc), proc, MatrixOperator(a), torch.zeros(3, dtype=D64), 0.1)
    with pytest.raises(ValueError, match=r"observation of shape \(2,\) or \(4, 2\).*found \(3,\)"):
        fn(torch.zeros(4, 3, dtype=D64), 0.5)
    fn = Replacement(prior.score_fn(proc), proc, Mask(torch.ones(2)), torch.zeros(3, dtype=D64))
    with pytest.raises(ValueError, match=r"mask: expected a mask of the per-sample shape \(3,\).*found \(2,\)"):
        fn(torch.zeros(4, 3, dtype=D64), 0.5)
    with pytest.raises(TypeError, match="LinearOperator"):
        DPS(prior.score_fn(proc), proc, a, y, 0.1)


def test_transforms_work_on_images():
    """Any rank: a (B, 1, 2, 2) problem gives the same scores as its flattened (B, 4) version."""
    mix = GaussianMixture([[1.0, -0.5, 0.0, 1.5], [-1.0, 1.0, 0.5, -1.0]], [0.2, 0.3], [0.6, 0.4])
    proc = VPSDE()
    m = torch.tensor([[1, 0], [0, 1]])
    x = torch.randn(3, 1, 2, 2, dtype=D64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[[0.5, 0.0], [0.0, -0.4]]], dtype=D64)
    t = torch.tensor([0.1, 0.4, 0.8], dtype=D64)
    for cls, kw in ((DPS, {"noise_std": 0.2}), (PiGDM, {"noise_std": 0.2}), (Replacement, {})):
        img = cls(mix.score_fn(proc), proc, Mask(m[None]), y, **kw)(x, t)
        flat = cls(mix.score_fn(proc), proc, Mask(m.reshape(4)), y.reshape(4), **kw)(x.reshape(3, 4), t)
        torch.testing.assert_close(img.reshape(3, 4), flat)


# ---------------------------------------------------------------------- conformance accuracy on the exact posterior
SAMPLERS = [("ancestral", {"num_steps": 200}), ("pf_ode", {})]



@pytest.mark.parametrize("sampler,options", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_accuracy_exact_posterior_score(sampler, options):
    mix, a, y, sy, post = projection_problem()
    proc = VPSDE()
    check_accuracy(get_sampler(sampler, **options), post.score_fn(proc), proc, post)


@pytest.mark.parametrize("sampler,options", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_accuracy_classifier_guidance_and_cfg_at_scale_one(sampler, options):
    cc, proc = _classes(), VPSDE()
    target = cc.class_mixture(1)
    cg = ClassifierGuidance(cc.mixture.score_fn(proc), cc.classifier(proc), 1, scale=1.0)
    check_accuracy(get_sampler(sampler, **options), cg, proc, target)
    cfg = ClassifierFreeGuidance(cc.score_fn(proc), 1, guidance_scale=1.0)
    check_accuracy(get_sampler(sampler, **options), cfg, proc, target)


@pytest.mark.parametrize("sampler,options", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_accuracy_pigdm_on_a_gaussian_prior(sampler, options):
    prior, a, y, v = _gaussian_problem(dim=2, v=0.5, seed=4)
    a = a[:1]
    y = y[:1]
    proc = VPSDE()
    post = prior.condition(a, y, 0.3)
    check_accuracy(get_sampler(sampler, **options), PiGDM(prior.score_fn(proc), proc, MatrixOperator(a), y, 0.3,
                                                         data_variance=v), proc, post)


@pytest.mark.parametrize("sampler,options", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_accuracy_replacement_on_independent_coordinates(sampler, options):
    proc = VPSDE()
    prior = GaussianMixture([[0.5, -1.0], [0.5, 1.5]], [[0.8, 0.3], [0.8, 0.2]], [0.3, 0.7])
    post = GaussianMixture([[1.3, -1.0], [1.3, 1.5]], [[1e-12, 0.3], [1e-12, 0.2]], [0.3, 0.7])
    fn = Replacement(prior.score_fn(proc), proc, Mask(torch.tensor([1, 0])), torch.tensor([1.3, 0.0], dtype=D64))
    check_accuracy(get_sampler(sampler, **options), fn, proc, post)


@pytest.mark.parametrize("name,options", [("imputation", {"num_steps": 200}),
                                          ("repaint", {"num_steps": 100, "jump_length": 10, "jump_n_sample": 3})])
def test_accuracy_conditional_samplers_on_independent_coordinates(name, options):
    proc = VPSDE()
    prior = GaussianMixture([[0.5, -1.0], [0.5, 1.5]], [[0.8, 0.3], [0.8, 0.2]], [0.3, 0.7])
    post = GaussianMixture([[1.3, -1.0], [1.3, 1.5]], [[1e-12, 0.3], [1e-12, 0.2]], [0.3, 0.7])
    sampler = get_sampler(name, operator=Mask(torch.tensor([1, 0])), observation=torch.tensor([1.3, 0.0], dtype=D64),
                          **options)
    check_accuracy(sampler, prior.score_fn(proc), proc, post)


def test_approximate_methods_fail_where_they_are_biased():
    """The check is not blind: replacement on the overlapping mixture under a projection (sigma_y = 0.5) is far off."""
    mix, a, y, sy, post = projection_problem()
    proc = VPSDE()
    with pytest.raises(AssertionError):
        check_accuracy(get_sampler("ancestral", num_steps=200), Replacement(mix.score_fn(proc), proc, MatrixOperator(a), y, sy),
                       proc, post)


def test_conditional_sampler_options():
    with pytest.raises(ValueError, match="pass both operator and observation"):
        get_sampler("repaint", operator=Mask(torch.ones(2)))
    with pytest.raises(TypeError, match="LinearOperator"):
        get_sampler("imputation", operator="mask", observation=torch.zeros(2))
    s = get_sampler("imputation", num_steps=5, operator=Mask(torch.ones(3)), observation=torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask: expected a mask of the per-sample shape \(2,\)"):
        s.sample(ring_mixture().score_fn(VPSDE()), VPSDE(), shape=(4, 2))


# ---------------------------------------------------------------------- noise-conditional classifier training
def test_trained_noise_conditional_classifier_approaches_the_exact_one():
    """The cross-entropy objective's minimiser is the exact classifier: a small MLP trained on the 2-D
    class-conditional mixture gets within 0.03 nats of the exact classifier's loss (the Bayes optimum, which it
    cannot beat beyond Monte Carlo noise), and its guidance gradient points the same way."""
    from score_toolkit.conditioning import NoisyClassifierMLP, noise_conditional_classifier_loss

    torch.manual_seed(0)
    cc, proc = _classes(), VPSDE()
    labels_of = cc.classes
    clf = NoisyClassifierMLP(2, 2, proc, hidden_dim=64).double()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
        x, comp = cc.mixture.sample(256, generator=g, return_labels=True)
        loss = noise_conditional_classifier_loss(clf, x, labels_of[comp], proc, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, comp = cc.mixture.sample(20000, generator=torch.Generator().manual_seed(2), return_labels=True)
    with torch.no_grad():
        trained = noise_conditional_classifier_loss(clf, x, labels_of[comp], proc, generator=torch.Generator().manual_seed(3))
        exact = noise_conditional_classifier_loss(cc.classifier(proc), x, labels_of[comp], proc,
                                                  generator=torch.Generator().manual_seed(3))
    assert float(exact) <= float(trained) + 0.01
    assert float(trained) - float(exact) < 0.03, (float(trained), float(exact))
    with pytest.raises(ValueError, match="labels outside"):
        noise_conditional_classifier_loss(clf, x[:4], torch.tensor([0, 1, 2, 0]), proc)
