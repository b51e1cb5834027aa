"""Denoising score matching: at one noise level (:class:`DSM`), over a geometric ladder of levels
(:class:`NCSN`), and in continuous time on a process (:class:`ContinuousDSM`, and :class:`EpsilonLoss` for
epsilon-prediction networks). Formulas in :mod:`score_toolkit.objectives`.
"""

from __future__ import annotations

import math

import torch

from .._utils import append_dims, check_positive, rand, randn
from ..processes import Process
from ..scores import ScoreAdapter, epsilon_from_score
from .base import (
    Objective,
    _check_process,
    _check_same_process,
    _check_time_value,
    _score,
    _sq_norm,
)

__all__ = ["DSM", "NCSN", "ContinuousDSM", "EpsilonLoss", "WEIGHTINGS"]


WEIGHTINGS = ("uniform", "likelihood")


class DSM(Objective):
    """Denoising score matching at one noise level (Vincent 2011, eq. 11):
    ``1/2 E_x E_z ||s(x + sigma z, t) + z / sigma||^2``.

    Minimiser: the score of ``p_sigma = p * N(0, sigma^2 I)``; ESM on ``p_sigma`` equals DSM minus a
    constant independent of the model.

    Args:
        sigma: the noise level (> 0).
        t: the time handed to ``score_fn``; ``None`` (default) hands it ``sigma`` itself, which suits
            networks conditioned on the noise level. To train a :class:`ScoreAdapter` of a VE process on
            its own time axis, pass ``t = float(process.t_from_noise_to_signal(sigma))``.
    """

    name = "dsm"

    def __init__(self, sigma: float, t: float | None = None, *, reduction: str = "mean"):
        super().__init__(reduction=reduction)
        self.sigma = check_positive(sigma, "sigma")
        self.t = None if t is None else _check_time_value(t)

    def _options(self):
        return {"sigma": self.sigma, "t": self.t}

    def _per_sample(self, score_fn, x, generator):
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = self._time(x, self.sigma if self.t is None else self.t)
        s = _score(score_fn, x + self.sigma * z, t)
        return 0.5 * _sq_norm(s + z / self.sigma)


class NCSN(Objective):
    """Multi-level denoising score matching of NCSN (Song & Ermon 2019, eqs. 5-6):
    ``1/L sum_i lambda(sigma_i) 1/2 E ||s(x + sigma_i z, t_i) + z / sigma_i||^2`` with
    ``lambda(sigma) = sigma^2`` on the geometric ladder ``sigma_1 = sigma_max > ... > sigma_L = sigma_min``
    (property :attr:`sigmas`). Each sample draws one level uniformly, an unbiased estimate of the average.
    Per sample the loss is ``1/2 ||sigma s + z||^2``. Minimiser: the score of ``p_{sigma_i}`` at every level.

    Args:
        sigma_min, sigma_max: ends of the ladder (``0 < sigma_min < sigma_max``).
        num_levels: L >= 2 (10 in NCSN).
        process: ``None`` (default): the network is called with ``t = sigma_i``. A variance-exploding
            process (alpha(t) = 1, e.g. :class:`~score_toolkit.processes.VESDE`): the network is called
            with the time ``t_i`` at which the process's ``sigma(t_i) = sigma_i``, so the same network
            (e.g. a ``ScoreAdapter`` with ``time_input="sigma"``) trains on the SDE's time axis; then
            ``sigma_min`` and ``sigma_max`` default to ``sigma(t_min)`` and ``sigma(1)``, and the ladder
            must lie inside that range (property :attr:`times`).
    """

    name = "ncsn"

    def __init__(
        self,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        num_levels: int = 10,
        *,
        process: Process | None = None,
        reduction: str = "mean",
    ):
        super().__init__(reduction=reduction)
        if process is not None:
            _check_process(process)
            lo_hi = process.sigma(torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).tolist()
            sigma_min = lo_hi[0] if sigma_min is None else sigma_min
            sigma_max = lo_hi[1] if sigma_max is None else sigma_max
        if sigma_min is None or sigma_max is None:
            raise ValueError("expected sigma_min and sigma_max (they default to the process's range only with process=)")
        smin, smax = check_positive(sigma_min, "sigma_min"), check_positive(sigma_max, "sigma_max")
        if not smax > smin:
            raise ValueError(f"expected sigma_max > sigma_min, found sigma_min={smin:g}, sigma_max={smax:g}")
        if isinstance(num_levels, bool) or not isinstance(num_levels, int):
            raise TypeError(f"expected num_levels to be an int, found {type(num_levels).__name__}")
        if num_levels < 2:
            raise ValueError(f"expected num_levels >= 2 (use DSM for one level), found {num_levels}")
        self.sigma_min, self.sigma_max, self.num_levels, self.process = smin, smax, num_levels, process
        self._sigmas = torch.exp(torch.linspace(math.log(smax), math.log(smin), num_levels, dtype=torch.float64))
        self._times = self._sigmas.clone() if process is None else self._ladder_times(process)

    def _ladder_times(self, process: Process) -> torch.Tensor:
        t = process.t_from_noise_to_signal(self._sigmas)
        tol = 1e-9
        if not (float(t.min()) >= process.t_min - tol and float(t.max()) <= process.t_max + tol):
            lo_hi = process.sigma(torch.tensor([process.t_min, process.t_max], dtype=torch.float64)).tolist()
            raise ValueError(
                f"expected the ladder [{self.sigma_min:g}, {self.sigma_max:g}] inside the process's sigma range "
                f"[{lo_hi[0]:g}, {lo_hi[1]:g}] (t in [{process.t_min:g}, {process.t_max:g}])"
            )
        t = process.clamp_t(t)
        log_alpha = process.log_alpha(t)
        if float(log_alpha.abs().max()) > 1e-9 or not torch.allclose(process.sigma(t), self._sigmas, rtol=1e-6):
            raise ValueError(
                f"NCSN perturbs x + sigma z (alpha = 1): expected a variance-exploding process, found {process!r} "
                f"with alpha in [{float(log_alpha.exp().min()):g}, {float(log_alpha.exp().max()):g}] on the ladder"
            )
        return t

    @property
    def sigmas(self) -> torch.Tensor:
        """The ladder sigma_1 > ... > sigma_L (float64, (L,))."""
        return self._sigmas.clone()

    @property
    def times(self) -> torch.Tensor:
        """What the network is called with at each level: the sigmas, or the process times t_i."""
        return self._times.clone()

    def _options(self):
        return {
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "num_levels": self.num_levels,
            "process": self.process,
        }

    def _per_sample(self, score_fn, x, generator):
        if self.process is not None:
            _check_same_process(score_fn, self.process)
        b = x.shape[0]
        u = rand((b,), generator=generator, device=x.device, dtype=torch.float32)
        level = (u * self.num_levels).long().clamp(max=self.num_levels - 1)
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # float64 -> x.dtype before moving: some devices have no float64
        sigma = self._sigmas.to(dtype=x.dtype).to(x.device)[level]
        t = self._times.to(dtype=x.dtype).to(x.device)[level]
        s = _score(score_fn, x + append_dims(sigma, x.ndim) * z, t)
        # sigma^2 * 1/2 ||s + z / sigma||^2, written without dividing by sigma
        return 0.5 * _sq_norm(append_dims(sigma, x.ndim) * s + z)


class _ProcessObjective(Objective):
    """Shared pieces of the objectives on a process: t ~ U[t_min, 1], then x_t = alpha x + sigma z."""

    def __init__(self, process: Process, t_min: float | None, *, reduction: str):
        super().__init__(reduction=reduction)
        self.process = _check_process(process)
        if t_min is None:
            t_min = process.t_min
        t_min = _check_time_value(t_min, "t_min")
        if not process.t_min <= t_min < process.t_max:
            raise ValueError(f"expected {process.t_min:g} <= t_min < {process.t_max:g} for {process!r}, found {t_min:g}")
        self.t_min = t_min

    def _noisy(self, x, generator):
        t = self.t_min + (self.process.t_max - self.t_min) * rand(
            (x.shape[0],), generator=generator, device=x.device, dtype=x.dtype
        )
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        alpha, sigma = self.process.marginal(t)
        return t, z, append_dims(alpha, x.ndim) * x + append_dims(sigma, x.ndim) * z, sigma


class ContinuousDSM(_ProcessObjective):
    """Continuous-time denoising score matching on a process (Song et al. 2021, eq. 7):
    ``E_{t ~ U[t_min, 1]} lambda(t) 1/2 E ||s(x_t, t) + z / sigma(t)||^2`` with
    ``x_t = alpha(t) x + sigma(t) z``.

    ``weighting="uniform"``: ``lambda = sigma(t)^2`` (uniform in the epsilon sense; the loss is half
    :class:`EpsilonLoss`). ``weighting="likelihood"``: ``lambda = g(t)^2`` (Song et al. 2021b,
    "Maximum likelihood training of score-based diffusion models", Theorem 1: ``(1 - t_min)`` times this
    loss is the bound's score-matching term up to a constant). Minimiser: the score of p_t at every t.

    Args:
        process: any :class:`~score_toolkit.processes.Process`; ``score_fn`` is called with its time t.
        weighting: ``"uniform"`` or ``"likelihood"``.
        t_min: lower end of the time interval (default ``process.t_min``).
    """

    name = "continuous_dsm"

    def __init__(self, process: Process, weighting: str = "uniform", t_min: float | None = None, *, reduction: str = "mean"):
        super().__init__(process, t_min, reduction=reduction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"expected weighting in {WEIGHTINGS}, found {weighting!r}")
        self.weighting = weighting

    def _options(self):
        return {"process": self.process, "weighting": self.weighting, "t_min": self.t_min}

    def _per_sample(self, score_fn, x, generator):
        _check_same_process(score_fn, self.process)
        t, z, xt, sigma = self._noisy(x, generator)
        s = _score(score_fn, xt, t)
        sig = append_dims(sigma, x.ndim)
        if self.weighting == "uniform":
            return 0.5 * _sq_norm(sig * s + z)
        return 0.5 * self.process.diffusion_squared(t) * _sq_norm(s + z / sig)


class EpsilonLoss(_ProcessObjective):
    """The epsilon loss of DDPM (Ho et al. 2020, eq. 14, "L_simple" in continuous time):
    ``E_{t ~ U[t_min, 1]} E ||eps_theta(x_t, t) - z||^2`` with ``eps_theta = -sigma(t) s(x_t, t)``
    (or the adapter's own ``epsilon`` view when ``score_fn`` is a :class:`ScoreAdapter`). No 1/2, as in
    FORMULAS.md; the per-sample loss sums over features (diffusers' ``mse_loss`` averages them).
    Minimiser: the score of p_t at every t (eps_theta = E[z | x_t]).

    Args:
        process: any :class:`~score_toolkit.processes.Process`.
        t_min: lower end of the time interval (default ``process.t_min``).
    """

    name = "epsilon"

    def __init__(self, process: Process, t_min: float | None = None, *, reduction: str = "mean"):
        super().__init__(process, t_min, reduction=reduction)

    def _options(self):
        return {"process": self.process, "t_min": self.t_min}

    def _per_sample(self, score_fn, x, generator):
        _check_same_process(score_fn, self.process)
        t, z, xt, _ = self._noisy(x, generator)
        if isinstance(score_fn, ScoreAdapter):
            eps = score_fn.epsilon(xt, t)
        else:
            eps = epsilon_from_score(lambda y, tt: _score(score_fn, y, tt), self.process)(xt, t)
        if eps.shape != x.shape:
            raise ValueError(f"expected an epsilon prediction of shape {tuple(x.shape)} (like x), found {tuple(eps.shape)}")
        return _sq_norm(eps - z)
