"""Reference problems of the grid optimiser (:func:`score_toolkit.samplers.grids.optimize_grid`): the mixture fit
(:func:`fit_mixture`), the exact mixture score specialised to a batch that shares one time (what a fixed-grid
sampler asks for), and the per-sample "off the data" measure that makes the objective see blown-up samples."""

from __future__ import annotations

import math

import torch

from ..processes import Process

__all__ = ["fit_mixture", "MixtureScore", "OffData"]


def fit_mixture(
    data: torch.Tensor,
    num_components: int = 8,
    *,
    covariance: str = "full",
    iterations: int = 100,
    seed: int = 0,
    reg: float = 1e-6,
    tol: float = 1e-7,
):
    """Fit a :class:`~score_toolkit.analytic.GaussianMixture` to ``data`` (N, ...) by EM (k-means++ start,
    float64). ``covariance``: ``"full"`` or ``"diag"``; ``reg`` (times the mean data variance) is added to every
    covariance's diagonal. EM stops after ``iterations`` rounds or once the mean log-likelihood per point improves
    by less than ``tol`` nats. Used as the reference problem of :func:`~score_toolkit.samplers.grids.optimize_grid`."""
    from ..analytic import GaussianMixture

    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise TypeError(f"expected data as a float tensor (N, ...), found {type(data).__name__}")
    if covariance not in ("full", "diag"):
        raise ValueError(f"expected covariance 'full' or 'diag', found {covariance!r}")
    x = data.detach().reshape(data.shape[0], -1).to("cpu", torch.float64)
    n, d = x.shape
    k = int(num_components)
    if not 1 <= k <= n:
        raise ValueError(f"expected 1 <= num_components <= number of data points ({n}), found {num_components!r}")
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):  # k-means++
        d2 = torch.cdist(x, torch.stack(centers)).min(1).values ** 2
        centers.append(x[torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n) / n, 1, generator=g)].squeeze(0))
    means = torch.stack(centers)
    ridge = reg * float(x.var(0).mean()) + 1e-12
    var0 = x.var(0) + ridge
    covs = torch.diag(var0).expand(k, d, d).clone()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    previous = -math.inf
    for _ in range(int(iterations)):
        # E-step (log-domain through Cholesky factors)
        chol = torch.linalg.cholesky(covs)
        diff = x[None] - means[:, None]  # (k, n, d)
        sol = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # (k, d, n)
        maha = (sol**2).sum(1)  # (k, n)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        logp = -0.5 * (maha + logdet[:, None] + d * math.log(2 * math.pi)) + torch.log(weights)[:, None]
        loglik = float(torch.logsumexp(logp, 0).mean())
        resp = torch.softmax(logp, 0)  # (k, n)
        # M-step
        nk = resp.sum(1) + 1e-12
        weights = nk / n
        means = (resp @ x) / nk[:, None]
        diff = x[None] - means[:, None]
        if covariance == "full":
            covs = torch.einsum("kn,knd,kne->kde", resp, diff, diff) / nk[:, None, None] + ridge * eye
        else:
            covs = torch.diag_embed((resp[..., None] * diff**2).sum(1) / nk[:, None] + ridge)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        if loglik - previous < tol:
            break
        previous = loglik
    return GaussianMixture(means, covs, weights.clamp_min(1e-12))


class MixtureScore:
    """The exact score of a :class:`~score_toolkit.analytic.GaussianMixture` under ``process`` for a batch whose
    samples share one time (every call a fixed-grid sampler makes): the marginal's coefficients and the
    components' variances are computed once per call instead of once per sample, and the data are projected onto
    each component's eigen-basis by one matrix product. Differentiable in ``x`` and ``t``. Equal to
    ``mixture.score_fn(process)`` (tested); a batch of different times is passed on to it."""

    def __init__(self, mixture, process: Process):
        self.mixture, self.process = mixture, process
        self.diagonal = bool(mixture._diagonal)
        self.vecs = mixture.eigvecs
        self.eigvals = mixture.eigvals
        self.log_weights = torch.log(mixture.weights)
        # the means in each component's eigen-basis (K, d)
        self.means = mixture.means if self.diagonal else torch.einsum("kd,kde->ke", mixture.means, mixture.eigvecs)
        k, d = mixture.means.shape
        # the projections as two plain matrix products: x (B, d) @ (d, K d) and w (B, K d) @ (K d, d)
        self.project = mixture.eigvecs.permute(1, 0, 2).reshape(d, k * d).contiguous()
        self.unproject = mixture.eigvecs.permute(0, 2, 1).reshape(k * d, d).contiguous()
        self._general = mixture.score_fn(process)
        self._copies = {mixture.dtype: (self.means, self.eigvals, self.log_weights, self.project, self.unproject)}

    def _parameters(self, dtype: torch.dtype):
        """The means, variances, log-weights and projections in ``dtype`` (float32 states are scored in float32:
        what ``optimize_grid(fit_dtype=torch.float32)`` trains with; any other dtype in the mixture's)."""
        if dtype != torch.float32:
            dtype = self.mixture.dtype
        if dtype not in self._copies:
            self._copies[dtype] = tuple(v.to(dtype) for v in self._copies[self.mixture.dtype])
        return dtype, self._copies[dtype]

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=self.mixture.dtype)
        if t.ndim == 1 and t.numel() > 1 and not bool((t == t[0]).all()):
            return self._general(x, t)
        dtype, (means, eigvals, log_weights, project, unproject) = self._parameters(x.dtype)
        alpha, sigma = (v.to(dtype) for v in self.process.marginal(t.reshape(-1)[:1].to(self.mixture.dtype)))
        xf = x.reshape(x.shape[0], -1).to(dtype)
        b, (k, d) = xf.shape[0], means.shape
        xp = xf[:, None, :] if self.diagonal else (xf @ project).view(b, k, d)
        y = xp - alpha * means  # (B, K, d) in the eigen-bases
        inv_var = 1.0 / (alpha**2 * eigvals + sigma**2)  # (K, d)
        z = y * inv_var
        logits = -0.5 * (z * y).sum(-1) + 0.5 * torch.log(inv_var).sum(-1) + log_weights
        w = torch.softmax(logits, dim=1)[..., None] * z
        s = -(w.sum(1) if self.diagonal else w.reshape(b, k * d) @ unproject)
        return s.to(x.dtype).reshape(x.shape)


class OffData:
    """How far beyond the reference outputs each sample lands: the per-sample "off the data" score the optimiser's
    tail term and the validation report use.

    With a mixture (``mixture`` given) it is the sample's negative log-density under the clean mixture minus a
    threshold of the reference outputs' (``level`` quantile), in nats: a sample that ends in another mode than its
    reference (a mode flip near a boundary, no grid fixes that) lands where the data are and scores below zero, a
    sample that a bad grid throws off the data scores far above it. Without a mixture (a ``score_fn`` reference) it
    is the squared distance to the nearest reference output minus the ``level`` quantile of the reference outputs'
    own nearest-neighbour squared distances, in units of ``scale`` (one feature's spread within a mode)."""

    def __init__(self, reference: torch.Tensor, mixture=None, *, scale: float = 1.0, level: float = 0.99):
        self.mixture, self.scale = mixture, float(scale)
        self.reference = reference.detach().flatten(1)
        if mixture is not None:
            nll = self._nll(self.reference)
        else:
            d2 = torch.cdist(self.reference, self.reference).pow(2)
            d2.fill_diagonal_(math.inf)
            nll = d2.min(1).values / self.scale
        self.threshold = float(torch.quantile(nll, level)) if level < 1 else float(nll.max())

    def _nll(self, x: torch.Tensor) -> torch.Tensor:
        return -self.mixture.log_prob(x.flatten(1).to(self.mixture.dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) scores; differentiable in ``x``."""
        if self.mixture is not None:
            return self._nll(x) - self.threshold
        d2 = torch.cdist(x.flatten(1), self.reference.to(x.dtype)).pow(2)
        return d2.min(1).values / self.scale - self.threshold
