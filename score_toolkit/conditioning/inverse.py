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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._utils import append_dims, as_time, check_tensor
from ..processes import Process
from .operators import LinearOperator

__all__ = ["DPS", "PiGDM", "Replacement", "InverseProblemScore"]


class InverseProblemScore:
    """Common part: the prior score, the process, the operator, the observation and its noise level."""

    method = "inverse"

    def __init__(self, score_fn: Callable, process: Process, operator: LinearOperator, observation: torch.Tensor,
                 noise_std: float = 0.0):
        if not callable(score_fn):
            raise TypeError(f"expected a callable score_fn(x, t), found {type(score_fn).__name__}")
        if not isinstance(process, Process):
            raise TypeError(f"expected a score_toolkit Process, found {type(process).__name__}")
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"expected a LinearOperator (score_toolkit.conditioning.operators), found {type(operator).__name__}")
        check_tensor(observation, "observation", min_rank=1)
        noise_std = float(noise_std)
        if not noise_std >= 0:
            raise ValueError(f"expected noise_std >= 0, found {noise_std!r}")
        self.score_fn, self.process, self.operator = score_fn, process, operator
        self.observation, self.noise_std = observation, noise_std

    def _y(self, x: torch.Tensor) -> torch.Tensor:
        y = self.operator.check_observation(self.observation, tuple(x.shape[1:]), x.shape[0])
        return y.to(device=x.device, dtype=x.dtype)

    def _denoised(self, x, t):
        """(x with grad, x0^ = D(x, t), alpha, sigma) with the graph of x0^ on x."""
        alpha, sigma = self.process.marginal(t)
        xg = x.detach().requires_grad_(True)
        s = self.score_fn(xg, t)
        x0 = (xg + append_dims(sigma**2, x.ndim) * s) / append_dims(alpha, x.ndim)
        return xg, s, x0, alpha, sigma

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        check_tensor(x, "x", min_rank=2)
        t = as_time(t, x.shape[0], like=x)
        self.operator.check_input(x)
        y = self._y(x)
        return self._score(x, t, y)

    def __repr__(self):
        return f"{type(self).__name__}(operator={self.operator!r}, noise_std={self.noise_std:g})"


def _check_scale(scale):
    if callable(scale):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        raise ValueError(f"expected scale to be a number >= 0 or a function of t, found {scale!r}")
    return float(scale)


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

    def _score(self, x, t, y):
        with torch.enable_grad():
            xg, s, x0, _, _ = self._denoised(x, t)
            r = (y - self.operator.forward(x0)).reshape(x.shape[0], -1)
            sq = r.pow(2).sum(1)
            if self.weighting == "gaussian":
                obj = sq.sum() / (2 * self.noise_std**2)
            else:
                obj = sq.clamp_min(1e-30).sqrt().sum()
            (grad,) = torch.autograd.grad(obj, xg)
        return s.detach() - _scale_at(self.scale, t, grad) * grad


class PiGDM(InverseProblemScore):
    """Pseudoinverse-guided diffusion (Song et al. 2023, eq. 7) with ``r_t^2 = v sigma~^2 / (v + sigma~^2)``,
    ``v = data_variance`` (see the module docstring)."""

    method = "pigdm"

    def __init__(self, score_fn, process, operator, observation, noise_std: float = 0.0, *, scale: float = 1.0,
                 data_variance: float = 1.0):
        super().__init__(score_fn, process, operator, observation, noise_std)
        if not float(data_variance) > 0:
            raise ValueError(f"expected data_variance > 0, found {data_variance!r}")
        self.scale, self.data_variance = _check_scale(scale), float(data_variance)

    def _score(self, x, t, y):
        with torch.enable_grad():
            xg, s, x0, alpha, sigma = self._denoised(x, t)
            nsr2 = (sigma / alpha) ** 2
            r2 = self.data_variance * nsr2 / (self.data_variance + nsr2)
            shape = tuple(x.shape[1:])
            resid = y - self.operator.forward(x0)
            v = self.operator.adjoint(self.operator.gram_solve(resid.detach(), r2, self.noise_std**2, shape), shape)
            (grad,) = torch.autograd.grad(x0, xg, grad_outputs=v)
        return s.detach() + _scale_at(self.scale, t, grad) * grad


class Replacement(InverseProblemScore):
    """Replacement / imputation in score form (Song et al. 2021, App. I.2; see the module docstring). Cost: one score
    evaluation, no gradient."""

    method = "replacement"

    def _score(self, x, t, y):
        alpha, sigma = self.process.marginal(t)
        shape = tuple(x.shape[1:])
        op = self.operator
        s = self.score_fn(x, t)
        s_free = s - op.pinv(op.forward(s), shape)
        resid = op.forward(x) - append_dims(alpha, y.ndim) * y
        obs = op.adjoint(op.gram_solve(resid, sigma**2, alpha**2 * self.noise_std**2, shape), shape)
        return s_free - obs
