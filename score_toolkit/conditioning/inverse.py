"""Linear inverse problems ``y = A x_0 + sigma_y n`` as score transforms: each maps the prior's score
``score_fn(x, t)`` to an approximation of the posterior's perturbed score ``grad log p_t(x | y)`` with the same
signature, written as ``s(x, t) + g(x, t)`` with ``g ~= grad_x log p_t(y | x)``.

With ``x_t = alpha x_0 + sigma z`` and Tweedie's denoiser ``x0^ = D(x_t, t) = (x_t + sigma^2 s) / alpha``:

* :class:`DPS` (Chung et al. 2023): ``p_t(y | x_t) ~= p(y | x_0 = x0^) = N(y; A x0^, sigma_y^2 I)``, so
  ``g = -scale * grad_{x_t} ||y - A x0^||^2 / (2 sigma_y^2)`` (``weighting="gaussian"``, eq. 16), or the authors'
  step rule ``g = -scale * grad_{x_t} ||y - A x0^||`` (``weighting="normalized"``: ``zeta_i = zeta' / ||y - A x0^||``
  in Algorithm 1, whose strength then depends on the sampler's step size).
* :class:`PiGDM` (Song, Vahdat, Mardani & Kautz 2023, eq. 7): ``p_t(y | x_t) ~= N(y; A x0^, r_t^2 A A^T + sigma_y^2 I)``
  with ``r_t^2 = v sigma~^2 / (v + sigma~^2)``, ``sigma~ = sigma / alpha`` and data variance ``v`` (1 in the paper), so
  ``g = (d x0^ / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0^)``. Exact for a Gaussian prior
  ``N(mu, v I)`` (then ``x0^`` is affine in ``x_t`` and ``p(x_0 | x_t)`` has covariance ``r_t^2 I``).
* :class:`Replacement` (Song et al. 2021, App. I.2, in score form): the part of ``x_t`` in the row space of ``A``
  gets the score of ``A x_t | y ~ N(alpha y, sigma^2 A A^T + alpha^2 sigma_y^2 I)`` (exact when the prior is flat
  along the observed directions), the rest the prior's score at the current ``x_t``:
  ``(I - A^+ A) s(x_t, t) - A^T (sigma^2 A A^T + alpha^2 sigma_y^2 I)^{-1} (A x_t - alpha y)``. The sampler form that
  overwrites the observed part of x between steps is the registered ``imputation`` sampler; RePaint is ``repaint``.

``scale`` of DPS and PiGDM is a number or a function of the time (``scale(t)`` with t of shape (B,), returning a number
or (B,) values): a time-dependent weight, e.g. to turn a method's published per-step update into a score term for a
given sampler's step sizes (benchmarks/bench_inpainting_digits.py does this for the ancestral sampler).

DPS and PiGDM cost one score evaluation and one backward pass through the score network (a vector-Jacobian
product) per call; Replacement costs one score evaluation and no gradient.

Each method also states the likelihood it approximates, ``log p~_t(y | x_t)`` (up to a constant in ``x``), whose
gradient is its correction ``g``: the ``log_likelihood`` field of :meth:`InverseProblemScore.twist`, which returns the
prior score, the transformed score and that log-likelihood from one evaluation. DPS:
``-scale ||y - A x0^||^2 / (2 sigma_y^2)`` (``-scale ||y - A x0^||`` with ``weighting="normalized"``); PiGDM:
``-scale (y - A x0^)^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0^) / 2``; Replacement: the flat-prior likelihood
:meth:`InverseProblemScore.limit_log_likelihood` (its correction on the observed directions is that likelihood's
gradient, but it also drops the prior's score there, so its score is not the prior's plus ``g``). The twisted
diffusion sampler (``tds``, :mod:`score_toolkit.samplers.tds`) uses them as the twisting functions of its
importance weights, which makes every one of these methods asymptotically exact in the number of particles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._utils import append_dims, as_time, check_finite, check_tensor
from ..processes import Process
from .operators import LinearOperator

__all__ = ["DPS", "PiGDM", "Replacement", "InverseProblemScore", "Twist"]


class Twist(NamedTuple):
    """What :meth:`InverseProblemScore.twist` returns for a batch ``x`` (B, ...) at times ``t`` (B,)."""

    #: the prior's score ``s(x, t)`` (B, ...)
    prior_score: torch.Tensor
    #: the method's conditional score (what calling the transform returns) (B, ...)
    score: torch.Tensor
    #: the method's ``log p~_t(y | x_t)`` per sample (B,), up to a constant in x
    log_likelihood: torch.Tensor


class InverseProblemScore:
    """Common part: the prior score, the process, the operator, the observation and its noise level.

    Subclasses implement ``_twist(x, t, y) -> Twist``; calling the transform returns its ``score``."""

    method = "inverse"

    def __init__(self, score_fn: Callable, process: Process, operator: LinearOperator, observation: torch.Tensor,
                 noise_std: float = 0.0):
        if not callable(score_fn):
            raise TypeError(f"expected a callable score_fn(x, t), found {type(score_fn).__name__}")
        if not isinstance(process, Process):
            raise TypeError(f"expected a score_toolkit Process, found {type(process).__name__}")
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"expected a LinearOperator (score_toolkit.conditioning.operators), found {type(operator).__name__}")
        check_finite(check_tensor(observation, "observation", min_rank=1), "observation", type(self).__name__)
        noise_std = float(noise_std)
        if not 0 <= noise_std < math.inf:
            raise ValueError(f"expected a finite noise_std >= 0, found {noise_std!r}")
        self.score_fn, self.process, self.operator = score_fn, process, operator
        self.observation, self.noise_std = observation, noise_std

    def _y(self, x: torch.Tensor) -> torch.Tensor:
        y = self.operator.check_observation(self.observation, tuple(x.shape[1:]), x.shape[0])
        return y.to(device=x.device, dtype=x.dtype)

    def _denoised(self, x, t):
        """(x with grad, prior score, x0^ = D(x, t), alpha, sigma, differentiable) with the graph of x0^ on x.

        ``differentiable``: ``x`` arrived with a graph (it requires grad and grad mode is on), as when a caller
        takes the divergence of this score (:mod:`score_toolkit.samplers.importance_ode`): then the score keeps its
        graph on ``x`` (the correction's gradient is taken with ``create_graph=True``, a double backward through
        the score network); otherwise ``x`` is detached and the returned score carries no graph."""
        alpha, sigma = self.process.marginal(t)
        differentiable = x.requires_grad and torch.is_grad_enabled()
        xg = x if differentiable else x.detach().requires_grad_(True)
        s = self.score_fn(xg, t)
        x0 = (xg + append_dims(sigma**2, x.ndim) * s) / append_dims(alpha, x.ndim)
        return xg, s, x0, alpha, sigma, differentiable

    def _checked(self, x, t):
        check_tensor(x, "x", min_rank=2)
        t = as_time(t, x.shape[0], like=x)
        self.operator.check_input(x)
        return t, self._y(x)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t, y = self._checked(x, t)
        return self._score(x, t, y)

    def _score(self, x, t, y):
        return self._twist(x, t, y).score

    def twist(self, x: torch.Tensor, t) -> Twist:
        """The prior score, this method's score and its ``log p~_t(y | x_t)`` (B,) at ``(x, t)``, from one score
        evaluation (and, for DPS and PiGDM, one vector-Jacobian product): what a twisted sequential Monte Carlo
        sampler needs per step (``tds``)."""
        t, y = self._checked(x, t)
        return self._twist(x, t, y)

    def limit_log_likelihood(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log N(y; A x / alpha, sigma_y^2 I + (sigma / alpha)^2 A A^T)`` per sample (B,), up to a constant in x:
        the likelihood of ``y`` given ``x_t`` when ``x_0 | x_t`` is taken as ``N(x / alpha, (sigma / alpha)^2 I)``.
        It tends to the exact ``log p(y | x_t)`` as t -> 0 (error O(sigma^2)); the final weight of ``tds`` at
        ``t_min``. No score evaluation. Needs ``noise_std > 0`` or ``sigma > 0``."""
        t, y = self._checked(x, t)
        r, solved, _, _ = self._flat_parts(x, t, y)
        return -0.5 * (r * solved).reshape(x.shape[0], -1).sum(1)

    def _flat_parts(self, x, t, y):
        """``(r, G^{-1} r, alpha, shape)`` with ``r = y - A x / alpha``, ``G = sigma_y^2 I + (sigma/alpha)^2 A A^T``."""
        alpha, sigma = self.process.marginal(t)
        shape = tuple(x.shape[1:])
        a = append_dims(alpha, x.ndim)
        r = y - self.operator.forward(x / a)
        solved = self.operator.gram_solve(r, (sigma / alpha) ** 2, torch.full_like(alpha, self.noise_std**2), shape)
        return r, solved, a, shape

    def __repr__(self):
        return f"{type(self).__name__}(operator={self.operator!r}, noise_std={self.noise_std:g})"


def _check_scale(scale):
    if callable(scale):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        raise ValueError(f"expected scale to be a number >= 0 or a function of t, found {scale!r}")
    return float(scale)


def _scale_per_sample(scale, t, like):
    """The scale as a number or as (B,) values."""
    value = _scale_at(scale, t, like)
    return value.reshape(-1) if isinstance(value, torch.Tensor) and value.ndim > 0 else value


def _scale_at(scale, t, like):
    """The scale as a number or as values (B, 1, ...) broadcast against ``like``."""
    if not callable(scale):
        return scale
    value = torch.as_tensor(scale(t), dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    if value.shape != (like.shape[0],):
        raise ValueError(f"expected scale(t) to return a number or one value per sample ({like.shape[0]}), found "
                         f"shape {tuple(value.shape)}")
    return append_dims(value, like.ndim)


def _twist_of(s, grad, ll, keep: bool) -> Twist:
    """The twist of a gradient-corrected method: detached unless the caller differentiates it (``keep``)."""
    if not keep:
        s, ll = s.detach(), ll.detach()
    return Twist(s, s + grad, ll)


class DPS(InverseProblemScore):
    """Diffusion posterior sampling (Chung et al. 2023): ``s + g`` with ``g`` from the likelihood at Tweedie's
    ``x0^`` (see the module docstring). ``weighting="gaussian"`` needs ``noise_std > 0``."""

    method = "dps"

    def __init__(self, score_fn, process, operator, observation, noise_std: float = 0.0, *, scale: float = 1.0,
                 weighting: str = "gaussian"):
        super().__init__(score_fn, process, operator, observation, noise_std)
        if weighting not in ("gaussian", "normalized"):
            raise ValueError(f"expected weighting 'gaussian' or 'normalized', found {weighting!r}")
        if weighting == "gaussian" and not self.noise_std > 0:
            raise ValueError("DPS with weighting='gaussian' needs noise_std > 0 (or use weighting='normalized')")
        self.scale, self.weighting = _check_scale(scale), weighting

    def _twist(self, x, t, y):
        with torch.enable_grad():
            xg, s, x0, _, _, keep = self._denoised(x, t)
            r = (y - self.operator.forward(x0)).reshape(x.shape[0], -1)
            sq = r.pow(2).sum(1)
            if self.weighting == "gaussian":
                ll = sq / (-2 * self.noise_std**2)
            else:
                ll = -sq.clamp_min(1e-30).sqrt()
            ll = _scale_per_sample(self.scale, t, ll) * ll
            (grad,) = torch.autograd.grad(ll.sum(), xg, create_graph=keep)
        return _twist_of(s, grad, ll, keep)


class PiGDM(InverseProblemScore):
    """Pseudoinverse-guided diffusion (Song et al. 2023, eq. 7) with ``r_t^2 = v sigma~^2 / (v + sigma~^2)``,
    ``v = data_variance`` (see the module docstring)."""

    method = "pigdm"

    def __init__(self, score_fn, process, operator, observation, noise_std: float = 0.0, *, scale: float = 1.0,
                 data_variance: float = 1.0):
        super().__init__(score_fn, process, operator, observation, noise_std)
        if not 0 < float(data_variance) < math.inf:
            raise ValueError(f"expected a finite data_variance > 0, found {data_variance!r}")
        self.scale, self.data_variance = _check_scale(scale), float(data_variance)

    def _twist(self, x, t, y):
        with torch.enable_grad():
            xg, s, x0, alpha, sigma, keep = self._denoised(x, t)
            nsr2 = (sigma / alpha) ** 2
            r2 = self.data_variance * nsr2 / (self.data_variance + nsr2)
            shape = tuple(x.shape[1:])
            resid = y - self.operator.forward(x0)
            scale = _scale_per_sample(self.scale, t, resid)
            if keep:  # the quadratic form itself: its gradient keeps its own graph on x
                ll = -0.5 * (resid * self.operator.gram_solve(resid, r2, self.noise_std**2, shape)).reshape(
                    x.shape[0], -1).sum(1) * scale
                (grad,) = torch.autograd.grad(ll.sum(), xg, create_graph=True)
            else:
                solved = self.operator.gram_solve(resid.detach(), r2, self.noise_std**2, shape)
                # -(resid^T C^{-1} resid) with C^{-1} resid held fixed has the gradient of the quadratic form / 2
                half = -(resid * solved).reshape(x.shape[0], -1).sum(1) * scale
                (grad,) = torch.autograd.grad(half.sum(), xg)
                ll = 0.5 * half
        return _twist_of(s, grad, ll, keep)


class Replacement(InverseProblemScore):
    """Replacement / imputation in score form (Song et al. 2021, App. I.2; see the module docstring). Cost: one score
    evaluation, no gradient."""

    method = "replacement"

    def _twist(self, x, t, y):
        alpha, sigma = self.process.marginal(t)
        shape = tuple(x.shape[1:])
        op = self.operator
        s = self.score_fn(x, t)
        s_free = s - op.pinv(op.forward(s), shape)
        resid = op.forward(x) - append_dims(alpha, y.ndim) * y
        solved = op.gram_solve(resid, sigma**2, alpha**2 * self.noise_std**2, shape)
        # log N(A x; alpha y, sigma^2 A A^T + alpha^2 sigma_y^2 I) = limit_log_likelihood up to a constant in x
        ll = -0.5 * (resid * solved).reshape(x.shape[0], -1).sum(1)
        return Twist(s, s_free - op.adjoint(solved, shape), ll)
