"""The analytic test bed: Gaussian mixtures with exact perturbed densities, scores and denoisers.

Data ``sum_k w_k N(mu_k, C_k)`` noised by any process stays a mixture (FORMULAS.md):
``p_t = sum_k w_k N(alpha mu_k, alpha^2 C_k + sigma^2 I)``. With ``C_k = U_k diag(lam_k) U_k^T`` computed
once, every per-sample covariance is ``U_k diag(alpha^2 lam_k + sigma^2) U_k^T``, so log-densities,
scores and denoisers at any batch of times are exact and cheap. Everything is computed in the
mixture's dtype (float64 by default) and returned in the input's dtype.

Why one module of this length: it is one family of closed forms (a Gaussian mixture noised by a process: its
density, score, denoiser and class posteriors) read side by side with FORMULAS.md; the conditional mixture
and the score adapters are a few lines over :class:`GaussianMixture` each.
"""

from __future__ import annotations

import math
import operator

import torch

from ._utils import GeneratorLike, as_time, check_tensor, rand, randn
from .processes import Process

__all__ = [
    "GaussianMixture",
    "AnalyticScore",
    "ClassConditionalMixture",
    "MixtureClassifier",
    "gaussian",
    "ring_mixture",
    "anisotropic_mixture",
]


class GaussianMixture:
    """A Gaussian mixture in ``d`` dimensions.

    Args:
        means: (K, d) component means.
        covs: per-component covariances: ``None`` (identity), a float (isotropic variance), a (K,) tensor
            of isotropic variances, a (K, d) tensor of diagonal variances, or a (K, d, d) tensor of full
            covariance matrices (symmetric positive definite).
        weights: (K,) positive weights (normalised here); ``None`` for equal weights.
    """

    def __init__(self, means, covs=None, weights=None, *, dtype=torch.float64):
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim == 1:
            means = means[None]
        if means.ndim != 2:
            raise ValueError(f"expected means of shape (K, d), found {tuple(means.shape)}")
        k, d = means.shape
        if k == 0 or d == 0:
            raise ValueError(f"expected means of shape (K, d) with K >= 1 components in d >= 1 dims, found "
                             f"{tuple(means.shape)}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("expected finite means, found NaN or infinite values")
        if covs is None:
            covs = torch.ones(k, d, dtype=dtype)
        covs = torch.as_tensor(covs, dtype=dtype)
        if covs.ndim == 0:
            covs = covs.expand(k, d).clone()
        elif covs.ndim == 1 and covs.shape[0] == k:
            covs = covs[:, None].expand(k, d).clone()
        if covs.shape == (k, d):
            if not torch.all(covs > 0):
                raise ValueError("expected positive diagonal variances in covs")
            lam, vecs = covs, torch.eye(d, dtype=dtype).expand(k, d, d).clone()
            self._diagonal = True
        elif covs.shape == (k, d, d):
            if not torch.allclose(covs, covs.transpose(1, 2), atol=1e-10):
                raise ValueError("expected symmetric covariance matrices in covs")
            lam, vecs = torch.linalg.eigh(covs)
            if not torch.all(lam > 0):
                raise ValueError(f"expected positive definite covariances, found eigenvalue {float(lam.min()):g}")
            self._diagonal = False
        else:
            raise ValueError(
                f"expected covs of shape (), ({k},), ({k}, {d}) or ({k}, {d}, {d}) for {k} components in {d} dims, "
                f"found {tuple(covs.shape)}"
            )
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=dtype)
        weights = torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (k,) or not torch.all(weights > 0):
            raise ValueError(f"expected {k} positive weights, found {weights.tolist()}")
        self.means = means
        self.eigvals = lam
        self.eigvecs = vecs
        self.weights = weights / weights.sum()
        self.dtype = dtype

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def covariances(self) -> torch.Tensor:
        """(K, d, d) covariance matrices."""
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    def __repr__(self) -> str:
        return f"GaussianMixture(components={self.num_components}, dim={self.dim})"

    def sample(self, n: int, *, generator: GeneratorLike = None, return_labels: bool = False):
        """Exact samples (n, d) (and their component labels)."""
        try:
            count = -1 if isinstance(n, bool) else operator.index(n)
        except TypeError:
            count = -1
        if count < 0:
            raise ValueError(f"expected n to be an int >= 0 (number of samples), found {n!r}")
        n = count
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"expected one generator per sample ({n}), found {len(generator)}")
            u = rand((n, 1), generator=generator, dtype=self.dtype)[:, 0]
        else:
            u = rand((n,), generator=generator, dtype=self.dtype)
        labels = torch.searchsorted(torch.cumsum(self.weights, 0), u.contiguous()).clamp(max=self.num_components - 1)
        z = randn((n, self.dim), generator=generator, dtype=self.dtype)
        x = self.means[labels] + torch.einsum("nde,ne->nd", self.eigvecs[labels], z * self.eigvals[labels].sqrt())
        return (x, labels) if return_labels else x

    # ------------------------------------------------------------------ exact quantities
    def _coeffs(self, x, t, process):
        b = x.shape[0]
        if t is None:
            if process is not None:
                raise ValueError("pass t together with process (or neither, for the clean density)")
            one = torch.ones(b, dtype=self.dtype, device=x.device)
            return one, torch.zeros_like(one)
        if process is None:
            raise ValueError("expected a process together with t")
        t = as_time(t, b, like=x).to(self.dtype)
        return process.marginal(t)

    def _terms(self, x, t, process):
        check_tensor(x, "x", min_rank=2)
        if x[0].numel() != self.dim:
            raise ValueError(f"expected samples with {self.dim} features, found shape {tuple(x.shape)}")
        xf = x.reshape(x.shape[0], -1).to(self.dtype)
        alpha, sigma = self._coeffs(x, t, process)
        means, lam, vecs = (v.to(xf.device) for v in (self.means, self.eigvals, self.eigvecs))
        diff = xf[:, None, :] - alpha[:, None, None] * means[None]  # (B, K, d)
        y = diff if self._diagonal else torch.einsum("kde,bkd->bke", vecs, diff)
        var = alpha[:, None, None] ** 2 * lam[None] + sigma[:, None, None] ** 2  # (B, K, d)
        log_comp = -0.5 * (y * y / var).sum(-1) - 0.5 * torch.log(var).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        log_joint = log_comp + torch.log(self.weights.to(xf.device))[None]
        return xf, alpha, sigma, y, var, vecs, log_joint

    def log_prob(self, x: torch.Tensor, t=None, process: Process | None = None) -> torch.Tensor:
        """Exact log-density (B,) of the data (``t=None``) or of the marginal p_t of ``process``."""
        log_joint = self._terms(x, t, process)[-1]
        return torch.logsumexp(log_joint, dim=1).to(x.dtype)

    def posterior(self, x: torch.Tensor, t=None, process: Process | None = None) -> torch.Tensor:
        """Component responsibilities p(k | x_t) (B, K)."""
        return torch.softmax(self._terms(x, t, process)[-1], dim=1).to(x.dtype)

    def score(self, x: torch.Tensor, t=None, process: Process | None = None) -> torch.Tensor:
        """Exact score grad_x log p_t(x), shaped like ``x``."""
        _, _, _, y, var, vecs, log_joint = self._terms(x, t, process)
        r = torch.softmax(log_joint, dim=1)[..., None]
        w = r * y / var  # (B, K, d), in the eigen-basis
        s = -(w.sum(1) if self._diagonal else torch.einsum("kde,bke->bd", vecs, w))
        return s.to(x.dtype).reshape(x.shape)

    def denoiser(self, x: torch.Tensor, t, process: Process) -> torch.Tensor:
        """Exact E[x_0 | x_t = x] = (x + sigma^2 s) / alpha (Tweedie)."""
        t = as_time(t, x.shape[0], like=x)
        alpha, sigma = process.marginal(t.to(self.dtype))
        s = self.score(x, t, process).reshape(x.shape[0], -1).to(self.dtype)
        x0 = (x.reshape(x.shape[0], -1).to(self.dtype) + sigma[:, None] ** 2 * s) / alpha[:, None]
        return x0.to(x.dtype).reshape(x.shape)

    def perturbed(self, alpha: float, sigma: float) -> GaussianMixture:
        """The mixture law of ``alpha x + sigma z`` (one scalar time)."""
        cov = self.covariances * alpha**2 + sigma**2 * torch.eye(self.dim, dtype=self.dtype)
        return GaussianMixture(alpha * self.means, cov, self.weights, dtype=self.dtype)

    def components(self, index) -> GaussianMixture:
        """The mixture of the components ``index`` (a list of ints or a bool mask), weights renormalised."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("expected at least one component")
        return GaussianMixture(self.means[idx], self.covariances[idx], self.weights[idx], dtype=self.dtype)

    def condition(self, matrix, observation, noise_std: float) -> GaussianMixture:
        """The exact posterior of ``x`` given ``y = A x + noise_std n`` (n ~ N(0, I)): again a Gaussian mixture, with
        full covariances (FORMULAS.md, "Conditioning"). For component ``k`` with ``G_k = A S_k A^T + noise_std^2 I``:

            S_k' = S_k - S_k A^T G_k^{-1} A S_k,   mu_k' = mu_k + S_k A^T G_k^{-1} (y - A mu_k),
            w_k' ~ w_k N(y; A mu_k, G_k)

        (the same as ``S_k' = (S_k^-1 + A^T A / noise_std^2)^-1``, ``mu_k' = S_k' (S_k^-1 mu_k + A^T y / noise_std^2)``,
        written so that it needs no inverse of S_k). ``matrix``: (m, d); ``observation``: (m,) (one observation);
        ``noise_std > 0`` (a noise-free observation makes the posterior degenerate)."""
        a = torch.as_tensor(matrix, dtype=self.dtype)
        if a.ndim == 1:
            a = a[None]
        y = torch.as_tensor(observation, dtype=self.dtype).reshape(-1)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValueError(f"expected an (m, {self.dim}) observation matrix, found shape {tuple(a.shape)}")
        if y.shape[0] != a.shape[0]:
            raise ValueError(f"expected an observation with {a.shape[0]} entries (the rows of the matrix), found {tuple(y.shape)}")
        noise_std = float(noise_std)
        if not noise_std > 0:
            raise ValueError(f"expected noise_std > 0 (a noise-free observation gives a degenerate posterior), found {noise_std!r}")
        cov = self.covariances
        sat = cov @ a.T  # (K, d, m)
        gram = a @ sat + noise_std**2 * torch.eye(a.shape[0], dtype=self.dtype)  # (K, m, m)
        chol = torch.linalg.cholesky(gram)
        resid = y[None] - self.means @ a.T  # (K, m)
        sol = torch.cholesky_solve(resid[..., None], chol)[..., 0]  # G^-1 (y - A mu)
        means = self.means + torch.einsum("kdm,km->kd", sat, sol)
        covs = cov - sat @ torch.cholesky_solve(sat.transpose(1, 2), chol)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        loglik = -0.5 * (resid * sol).sum(1) - 0.5 * logdet - 0.5 * a.shape[0] * math.log(2 * math.pi)
        logw = torch.log(self.weights) + loglik
        return GaussianMixture(means, covs, torch.softmax(logw, 0), dtype=self.dtype)

    def observation_log_prob(self, matrix, observation, noise_std: float) -> torch.Tensor:
        """The exact evidence ``log p(y)`` of ``y = A x + noise_std n`` under the mixture (a 0-d tensor)."""
        a = torch.as_tensor(matrix, dtype=self.dtype)
        a = a[None] if a.ndim == 1 else a
        y = torch.as_tensor(observation, dtype=self.dtype).reshape(1, -1)
        cov = a @ self.covariances @ a.T + float(noise_std) ** 2 * torch.eye(a.shape[0], dtype=self.dtype)
        return GaussianMixture(self.means @ a.T, cov, self.weights, dtype=self.dtype).log_prob(y)[0]

    def score_fn(self, process: Process | None = None) -> AnalyticScore:
        """The exact canonical ``score_fn(x, t)`` under ``process`` (any tensor rank with d features);
        without a process, the score of the clean data (t is ignored). The returned object also has
        ``energy(x, t)`` (= -log p_t, for Metropolis-adjusted samplers) and ``denoiser(x, t)``."""
        return AnalyticScore(self, process)

    def as_network(self, process: Process, prediction_type: str, time_input: str = "t") -> torch.nn.Module:
        """A module that outputs exactly what a perfect network of ``prediction_type`` would (the
        energy -log p_t for ``energy``), taking the time input ``time_input`` (``t`` or ``sigma``)."""
        return _AnalyticNetwork(self, process, prediction_type, time_input)


class AnalyticScore:
    """Exact score function of a :class:`GaussianMixture` under a process (see ``GaussianMixture.score_fn``)."""

    def __init__(self, mixture: GaussianMixture, process: Process | None):
        self.mixture, self.process = mixture, process

    def __call__(self, x: torch.Tensor, t=None) -> torch.Tensor:
        if self.process is None:
            return self.mixture.score(x)
        return self.mixture.score(x, t, self.process)

    def energy(self, x: torch.Tensor, t=None) -> torch.Tensor:
        """-log p_t(x) (B,)."""
        if self.process is None:
            return -self.mixture.log_prob(x)
        return -self.mixture.log_prob(x, t, self.process)

    def denoiser(self, x: torch.Tensor, t) -> torch.Tensor:
        if self.process is None:
            raise ValueError("the denoiser needs a process")
        return self.mixture.denoiser(x, t, self.process)

    def __repr__(self) -> str:
        return f"AnalyticScore({self.mixture!r}, {self.process!r})"


class ClassConditionalMixture:
    """A Gaussian mixture whose components are grouped into classes: ``p(x | c)`` is the mixture of the components of
    class ``c`` (weights renormalised), ``p(c)`` their total weight, ``p(x) = sum_c p(c) p(x | c)``.

    Args:
        mixture: the unconditional :class:`GaussianMixture`.
        classes: (K,) class of each component (ints ``0..C-1``, every class used); default: one class per component.

    The label ``num_classes`` (= ``null_label``) stands for "no label" in :meth:`score_fn` (the unconditional score,
    as the null label of classifier-free guidance).
    """

    def __init__(self, mixture: GaussianMixture, classes=None):
        k = mixture.num_components
        classes = torch.arange(k) if classes is None else torch.as_tensor(classes)
        if classes.shape != (k,) or classes.dtype.is_floating_point:
            raise ValueError(f"expected {k} integer component classes, found {classes.tolist()}")
        num = int(classes.max()) + 1
        if int(classes.min()) < 0 or set(classes.tolist()) != set(range(num)):
            raise ValueError(f"expected component classes covering 0..C-1, found {classes.tolist()}")
        self.mixture, self.classes, self.num_classes = mixture, classes.long(), num
        self.null_label = num
        self.class_weights = torch.zeros(num, dtype=mixture.dtype).index_add_(0, self.classes, mixture.weights)

    def class_mixture(self, label: int) -> GaussianMixture:
        """The exact class-conditional mixture p(x | c = label)."""
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"class label {label} outside 0..{self.num_classes - 1}")
        return self.mixture.components(self.classes == int(label))

    def class_log_prob(self, x: torch.Tensor, t=None, process: Process | None = None) -> torch.Tensor:
        """``log p_t(c | x)`` for every class (B, C): the noise-conditional classifier (sum of component posteriors)."""
        log_joint = self.mixture._terms(x, t, process)[-1]  # (B, K): log w_k N_k,t(x)
        out = torch.full((x.shape[0], self.num_classes), -math.inf, dtype=log_joint.dtype, device=log_joint.device)
        for c in range(self.num_classes):
            out[:, c] = torch.logsumexp(log_joint[:, self.classes.to(log_joint.device) == c], dim=1)
        return torch.log_softmax(out, dim=1).to(x.dtype)

    def classifier(self, process: Process) -> MixtureClassifier:
        """The exact noise-conditional classifier ``(x, t) -> log p_t(c | x)`` (B, C) under ``process``."""
        return MixtureClassifier(self, process)

    def score_fn(self, process: Process):
        """``f(x, t, labels)``: the exact score of ``p_t(x | c)`` per sample (the unconditional score where the label is
        ``null_label``), for :class:`score_toolkit.conditioning.ClassifierFreeGuidance`."""
        return _ClassConditionalScore(self, process)

    def tempered_log_weights(self, x: torch.Tensor, label: int, scale: float) -> torch.Tensor:
        """``scale * log p(c | x)`` (B,): importance log-weights that turn exact draws of ``p(x)`` into draws of the
        tempered target ``p(x) p(c | x)^scale / Z`` (what classifier guidance of that scale aims at as t -> 0)."""
        return float(scale) * self.class_log_prob(x)[:, int(label)]

    def __repr__(self):
        return f"ClassConditionalMixture({self.mixture!r}, classes={self.num_classes})"


class MixtureClassifier:
    """Exact noise-conditional classifier of a :class:`ClassConditionalMixture`: ``(x, t) -> log p_t(c | x)`` (B, C)."""

    def __init__(self, conditional: ClassConditionalMixture, process: Process):
        self.conditional, self.process = conditional, process
        self.num_classes = conditional.num_classes

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.conditional.class_log_prob(x.reshape(x.shape[0], -1), t, self.process)


class _ClassConditionalScore:
    def __init__(self, conditional: ClassConditionalMixture, process: Process):
        self.conditional, self.process = conditional, process
        self.num_classes, self.null_label = conditional.num_classes, conditional.null_label
        self._scores = [conditional.class_mixture(c).score_fn(process) for c in range(conditional.num_classes)]
        self._scores.append(conditional.mixture.score_fn(process))

    def __call__(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels).reshape(-1).to(x.device)
        t = as_time(t, x.shape[0], like=x)
        out = torch.empty_like(x)
        for c in labels.unique().tolist():
            if not 0 <= c <= self.null_label:
                raise ValueError(f"class label {c} outside 0..{self.num_classes - 1} (null label {self.null_label})")
            sel = labels == c
            out[sel] = self._scores[c](x[sel], t[sel])
        return out

    def energy(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        """``-log p_t(x | c)`` per sample (B,) (``-log p_t(x)`` where the label is ``null_label``)."""
        labels = torch.as_tensor(labels).reshape(-1).to(x.device)
        if bool(((labels < 0) | (labels > self.null_label)).any()):
            raise ValueError(f"class labels outside 0..{self.num_classes - 1} (null label {self.null_label})")
        t = as_time(t, x.shape[0], like=x)
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for c in labels.unique().tolist():
            out = out + (labels == c).to(x.dtype) * self._scores[c].energy(x, t)
        return out


class _AnalyticNetwork(torch.nn.Module):
    def __init__(self, mixture, process, prediction_type, time_input):
        super().__init__()
        from .scores import _check_prediction_type

        _check_prediction_type(prediction_type)
        if time_input not in ("t", "sigma"):
            raise ValueError(f"expected time_input 't' or 'sigma', found {time_input!r}")
        self.mixture, self.process, self.prediction_type, self.time_input = mixture, process, prediction_type, time_input

    def forward(self, x, time):
        from .scores import score_to_prediction

        t = time if self.time_input == "t" else _t_from_sigma(self.process, time)
        if self.prediction_type == "energy":
            return -self.mixture.log_prob(x, t, self.process)
        alpha, sigma = self.process.marginal(t)
        s = self.mixture.score(x, t, self.process)
        return score_to_prediction(s, x, alpha, sigma, self.prediction_type)


def _t_from_sigma(process: Process, sigma: torch.Tensor, iters: int = 80) -> torch.Tensor:
    """Invert sigma(t) (monotone) by bisection on [0, 1]."""
    lo = torch.zeros_like(sigma)
    hi = torch.ones_like(sigma)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = process.sigma(mid) < sigma
        lo = torch.where(up, mid, lo)
        hi = torch.where(up, hi, mid)
    return 0.5 * (lo + hi)


def gaussian(mean, cov=None, *, dtype=torch.float64) -> GaussianMixture:
    """A single Gaussian N(mean, cov) (cov: None, float, (d,) diagonal or (d, d))."""
    mean = torch.as_tensor(mean, dtype=dtype).reshape(1, -1)
    if cov is not None:
        cov = torch.as_tensor(cov, dtype=dtype)
        if cov.ndim in (1, 2):
            cov = cov[None]
    return GaussianMixture(mean, cov, None, dtype=dtype)


def ring_mixture(num_modes: int = 8, radius: float = 4.0, std: float = 0.2, *, dtype=torch.float64) -> GaussianMixture:
    """The 2-D ring of ``num_modes`` equal-weight isotropic Gaussians (radius 4, std 0.2 by default)."""
    if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 1:
        raise ValueError(f"ring_mixture: expected num_modes to be a positive int, found {num_modes!r}")
    if not (math.isfinite(radius) and math.isfinite(std) and std > 0):
        raise ValueError(f"ring_mixture: expected a finite radius and a finite std > 0, found radius={radius!r}, "
                         f"std={std!r}")
    ang = torch.arange(num_modes, dtype=dtype) * (2 * math.pi / num_modes)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture(means, torch.full((num_modes,), std**2, dtype=dtype), None, dtype=dtype)


def anisotropic_mixture(dim: int = 16, num_components: int = 10, *, seed: int = 0, dtype=torch.float64) -> GaussianMixture:
    """A ``dim``-dimensional mixture of ``num_components`` anisotropic full-covariance Gaussians with
    unequal weights (deterministic given ``seed``): means spread over a ball of radius ~3, covariance
    eigenvalues log-uniform in [0.01, 0.25], weights proportional to 1..K."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, dim, generator=g, dtype=dtype)
    means = 3.0 * means / means.norm(dim=1, keepdim=True) * torch.rand(num_components, 1, generator=g, dtype=dtype).add(0.5).clamp(max=1)
    q, _ = torch.linalg.qr(torch.randn(num_components, dim, dim, generator=g, dtype=dtype))
    ev = torch.exp(torch.empty(num_components, dim, dtype=dtype).uniform_(math.log(0.01), math.log(0.25), generator=g))
    covs = q @ torch.diag_embed(ev) @ q.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    weights = torch.arange(1, num_components + 1, dtype=dtype)
    return GaussianMixture(means, covs, weights, dtype=dtype)
