"""Forward noising processes (Song et al. 2021, "Score-based generative modeling through SDEs").

Every process is a linear SDE ``dx = f(t) x dt + g(t) dw`` on ``t in [t_min, 1]`` whose marginal is
``x_t = alpha(t) x_0 + sigma(t) z``. Samplers only use the methods of :class:`Process`; they never
test a process's class. Time runs from 1 (the prior) down to ``t_min``.

Identities used throughout (FORMULAS.md): ``f = d ln(alpha)/dt`` and ``d(sigma^2)/dt = 2 f sigma^2 + g^2``.

Why one module of this length: it is one interface and its four implementations (VE, VP, sub-VP, the discrete
DDPM table) with the conversions from configs. The subclasses are short; most of the length is the shared
derived quantities of :class:`Process` (log-SNR and its inverse, time grids, priors), which every
implementation must agree on and which are read side by side with FORMULAS.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ._config import init_keys, strict_from_config
from ._utils import GeneratorLike, check_positive, randn

__all__ = [
    "Process",
    "VESDE",
    "VPSDE",
    "SubVPSDE",
    "DiscreteVP",
    "process_from_config",
    "process_from_scheduler_config",
    "TIME_GRIDS",
]

TIME_GRIDS = ("uniform", "log_sigma", "karras")
#: how far outside [0, t_max] a time may lie (rounding of grid ends) before the public methods refuse it
_T_TOL = 1e-6


def _as_t(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


def _steps(n, name: str = "num_train_timesteps") -> int:
    """A number of training steps N >= 2 (an integral float such as 1000.0 is that int): the network's index input is
    ``t (N - 1)``, so N = 1 feeds it 0 at every time."""
    n = n.item() if isinstance(n, torch.Tensor) and n.ndim == 0 else n
    number = not isinstance(n, (bool, torch.Tensor)) and (isinstance(n, (int, float)) or hasattr(n, "__index__"))
    if not number or not (math.isfinite(n) and n == int(n) and n >= 2):
        raise ValueError(f"expected {name} to be an int >= 2 (the network's time index is t * (N - 1)), found {n!r}")
    return int(n)


def _numbers(**values) -> None:
    """Real numbers (the config stores them as given: a string "0.01" or a tensor would be saved as such)."""
    for name, v in values.items():
        if isinstance(v, (bool, str)) or not isinstance(v, numbers.Real):
            raise TypeError(f"expected {name} to be a real number, found {type(v).__name__} {v!r}")


class Process(ConfigMixin):
    """Base class of the forward processes. Subclasses implement :meth:`log_alpha`, :meth:`sigma`,
    :meth:`drift_coef`, :meth:`diffusion_squared` and :meth:`_t_from_log_snr`."""

    config_name = "process_config.json"
    t_max: float = 1.0
    #: std of the Gaussian prior N(0, prior_std^2 I) at t = 1.
    prior_std: float = 1.0

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # strict like a network config: a typo (beta_mx) is an error, and a value present in the config is used
        # even when ``_use_default_values`` lists it (see score_toolkit._config)
        config_dict, kwargs = strict_from_config(config_dict, kwargs, init_keys(cls), cls.__name__,
                                                 kind="process config")
        return super().extract_init_dict(config_dict, **kwargs)

    # ----------------------------------------------------------------- subclass interface
    @property
    def t_min(self) -> float:
        return float(self.config.t_min)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.num_train_timesteps)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def drift_coef(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """f(t) in the drift f(t) x of the forward SDE."""
        raise NotImplementedError

    def diffusion_squared(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """g(t)^2."""
        raise NotImplementedError

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- derived quantities
    def _time(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` as a float tensor, checked to lie in the process's time range [0, t_max] (``t_min`` is where
        samplers stop; ``to_zero`` and ``denoise`` evaluate at 0). One min/max reduction: the public methods
        below check, the subclass interface (:meth:`log_alpha`, :meth:`sigma`, ...) does not. Times on an
        accelerator are not checked: reading the reduction would synchronise the device at every network call of
        a score adapter."""
        t = _as_t(t, like)
        if t.numel() and t.device.type == "cpu":
            lo, hi = torch.aminmax(t.detach())
            lo, hi = float(lo), float(hi)
            if not (-_T_TOL <= lo and hi <= self.t_max + _T_TOL):  # also False for NaN
                raise ValueError(f"{type(self).__name__}: expected t in [0, {self.t_max:g}], found values in "
                                 f"[{lo:g}, {hi:g}]")
        return t

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(self._time(t)))

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) of ``x_t = alpha x_0 + sigma z``; ``t`` in [0, t_max], else a ``ValueError``."""
        t = self._time(t)
        return torch.exp(self.log_alpha(t)), self.sigma(t)

    def diffusion(self, t) -> torch.Tensor:
        """g(t)."""
        return self.diffusion_squared(self._time(t)).clamp_min(0).sqrt()

    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(t) x`` (shape of ``x``) and diffusion ``g(t)`` of the forward SDE at the state ``x``.

        ``t`` is a float, a 0-dim tensor or a (B,) tensor. ``g`` is per sample and already broadcast
        against ``x``: shape (B, 1, ..., 1) of rank ``x.ndim`` for any ``t``, so that
        ``f - 0.5 * g**2 * score`` is the probability-flow drift without further reshaping.
        """
        from ._utils import append_dims

        t = self._time(t, x)
        batch = x.shape[0] if x.ndim else 0
        if x.ndim == 0 or t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"sde: expected x of shape (B, ...) and t a scalar or of shape (B,), "
                             f"found x {tuple(x.shape)} and t {tuple(t.shape)}")
        t = t.expand(batch)
        g = self.diffusion_squared(t).clamp_min(0).sqrt()
        return append_dims(self.drift_coef(t), x.ndim) * x, append_dims(g, x.ndim)

    def log_snr(self, t) -> torch.Tensor:
        """lambda(t) = ln(alpha / sigma), decreasing in t."""
        t = self._time(t)
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def noise_to_signal(self, t) -> torch.Tensor:
        """sigma(t) / alpha(t): the "sigma" of EDM / k-diffusion (equal to sigma(t) for VE)."""
        return torch.exp(-self.log_snr(t))

    def t_from_log_snr(self, lam) -> torch.Tensor:
        """Inverse of :meth:`log_snr`."""
        return self._t_from_log_snr(_as_t(lam))

    def t_from_noise_to_signal(self, s) -> torch.Tensor:
        """Inverse of :meth:`noise_to_signal`."""
        return self.t_from_log_snr(-torch.log(_as_t(s)))

    def perturb(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x_0 + sigma(t) noise, with ``t`` a scalar or of shape (B,) and ``noise`` shaped like ``x_0``
        (anything that would broadcast into another shape is a ``ValueError``)."""
        from ._utils import append_dims, check_tensor

        x0, t = check_tensor(x0, "x0"), _as_t(t, x0)
        if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape or t.ndim > 1 or (
                t.ndim == 1 and t.shape[0] not in (1, x0.shape[0])):
            found = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"perturb: expected noise of x0's shape {tuple(x0.shape)} and t a scalar or of shape "
                             f"({x0.shape[0]},), found noise {found} and t {tuple(t.shape)}")
        a, s = self.marginal(t)
        return append_dims(a, x0.ndim) * x0 + append_dims(s, x0.ndim) * noise

    # ----------------------------------------------------------------- prior
    def prior_sample(self, shape, *, generator: GeneratorLike = None, device=None, dtype=None) -> torch.Tensor:
        return self.prior_std * randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample log-density of the prior N(0, prior_std^2 I) (shape (B,))."""
        d = x[0].numel()
        s2 = self.prior_std**2
        return -0.5 * x.flatten(1).pow(2).sum(1) / s2 - 0.5 * d * math.log(2 * math.pi * s2)

    # ----------------------------------------------------------------- time
    def check_t(self, t: torch.Tensor, *, name: str = "t", tol: float = 1e-6) -> None:
        """Raise a ValueError if some ``t`` lies outside [t_min, 1]."""
        lo, hi = torch.aminmax(t)  # one reduction for both ends
        lo, hi = float(lo), float(hi)
        if not (lo >= self.t_min - tol and hi <= self.t_max + tol) or lo != lo or hi != hi:
            raise ValueError(
                f"expected {name} in [{self.t_min:g}, {self.t_max:g}] for {type(self).__name__}, "
                f"found values in [{lo:g}, {hi:g}]"
            )

    def clamp_t(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(self.t_min, self.t_max)

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        """The discrete label ``t * (N - 1)`` that score_sde feeds to discrete-time networks."""
        return t * (self.num_train_timesteps - 1)

    def time_grid(
        self,
        num_steps: int,
        kind: str = "uniform",
        *,
        rho: float = 7.0,
        t_min: float | None = None,
        t_max: float | None = None,
        device=None,
        dtype=torch.float64,
    ) -> torch.Tensor:
        """Decreasing times ``t_0 = t_max > ... > t_n = t_min`` (``num_steps + 1`` points).

        ``kind``: ``"uniform"`` in t; ``"log_sigma"`` uniform in ln(sigma/alpha) (= ln sigma for VE);
        ``"karras"``: the rho schedule of Karras et al. 2022 (eq. 5) on sigma/alpha.
        """
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"expected num_steps to be a positive int, found {num_steps!r}")
        if kind not in TIME_GRIDS:
            raise ValueError(f"expected kind in {TIME_GRIDS}, found {kind!r}")
        lo = self.t_min if t_min is None else float(t_min)
        hi = self.t_max if t_max is None else float(t_max)
        if not (self.t_min - 1e-12 <= lo < hi <= self.t_max + 1e-12):
            raise ValueError(
                f"expected t_min < t_max inside [{self.t_min:g}, {self.t_max:g}], found t_min={lo:g}, t_max={hi:g}"
            )
        i = torch.arange(num_steps + 1, dtype=torch.float64)
        ends = torch.tensor([hi, lo], dtype=torch.float64)
        if kind == "uniform":
            ts = hi + (lo - hi) * i / num_steps
        else:
            s_hi, s_lo = self.noise_to_signal(ends).tolist()
            if kind == "log_sigma":
                log_s = math.log(s_hi) + (math.log(s_lo) - math.log(s_hi)) * i / num_steps
                ts = self.t_from_noise_to_signal(torch.exp(log_s))
            else:
                check_positive(rho, "rho")
                r = 1.0 / rho
                s = (s_hi**r + i / num_steps * (s_lo**r - s_hi**r)) ** rho
                ts = self.t_from_noise_to_signal(s)
        ts[0], ts[-1] = hi, lo  # exact ends despite round-off
        return ts.to(device=device, dtype=dtype)

    # ----------------------------------------------------------------- diffusers
    def to_scheduler_config(self, prediction_type: str = "epsilon") -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._public_config().items() if k != "alphas_cumprod")
        return f"{type(self).__name__}({args})"

    def _public_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._public_config() == other._public_config()

    def __hash__(self):
        return id(self)


class VESDE(Process):
    """Variance-exploding SDE: ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``f = 0``,
    ``g(t) = sigma(t) sqrt(2 ln(sigma_max / sigma_min))``, alpha = 1, prior N(0, sigma_max^2 I).
    As in score_sde, sigma(t) is used as the marginal std (sigma_min at t = 0 is not subtracted)."""

    @register_to_config
    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, num_train_timesteps: int = 1000):
        _numbers(sigma_min=sigma_min, sigma_max=sigma_max, t_min=t_min)
        smin = check_positive(sigma_min, "sigma_min")
        smax = check_positive(sigma_max, "sigma_max")
        _steps(num_train_timesteps)
        if not smax > smin:
            raise ValueError(f"expected sigma_max > sigma_min, found sigma_min={smin:g}, sigma_max={smax:g}")
        if not 0.0 <= float(t_min) < 1.0:
            raise ValueError(f"expected 0 <= t_min < 1, found t_min={t_min!r}")
        self._log_smin = math.log(smin)
        self._log_ratio = math.log(smax / smin)
        self.prior_std = smax

    def log_alpha(self, t):
        return torch.zeros_like(_as_t(t))

    def sigma(self, t):
        return torch.exp(self._log_smin + self._log_ratio * _as_t(t))

    def drift_coef(self, t):
        return torch.zeros_like(_as_t(t))

    def diffusion_squared(self, t):
        return 2 * self._log_ratio * self.sigma(t) ** 2

    def _t_from_log_snr(self, lam):
        return (-lam - self._log_smin) / self._log_ratio

    def to_scheduler_config(self, prediction_type: str = "score") -> dict[str, Any]:
        """``ScoreSdeVeScheduler`` config (its UNet receives sigma and outputs the score)."""
        if prediction_type != "score":
            raise ValueError(f"ScoreSdeVeScheduler models predict the score; found prediction_type={prediction_type!r}")
        c = self.config
        return {
            "_class_name": "ScoreSdeVeScheduler",
            "num_train_timesteps": int(c.num_train_timesteps),
            "sigma_min": float(c.sigma_min),
            "sigma_max": float(c.sigma_max),
            "sampling_eps": float(c.t_min) if c.t_min > 0 else 1e-5,
            "snr": 0.15,
            "correct_steps": 1,
        }


class _VPFamily(Process):
    """Shared pieces of processes with ``ln alpha(t) = -a t^2 - b t``."""

    def _ab(self):
        c = self.config
        return (float(c.beta_max) - float(c.beta_min)) / 4.0, float(c.beta_min) / 2.0

    def _check_betas(self, beta_min, beta_max, t_min, num_train_timesteps):
        _steps(num_train_timesteps)
        _numbers(beta_min=beta_min, beta_max=beta_max, t_min=t_min)
        bmin = check_positive(beta_min, "beta_min")
        bmax = check_positive(beta_max, "beta_max")
        if bmax < bmin:
            raise ValueError(f"expected beta_max >= beta_min, found beta_min={bmin:g}, beta_max={bmax:g}")
        if not 0.0 < float(t_min) < 1.0:
            raise ValueError(f"expected 0 < t_min < 1, found t_min={t_min!r}")

    def beta(self, t):
        c = self.config
        return float(c.beta_min) + _as_t(t) * (float(c.beta_max) - float(c.beta_min))

    def log_alpha(self, t):
        a, b = self._ab()
        t = _as_t(t)
        return -a * t * t - b * t

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def _t_from_log_alpha(self, log_alpha):
        # solve a t^2 + b t = c with c = -ln alpha >= 0 (stable root form)
        a, b = self._ab()
        c = -log_alpha
        return 2 * c / (b + torch.sqrt(b * b + 4 * a * c))


class VPSDE(_VPFamily):
    """Variance-preserving SDE (DDPM in continuous time): ``beta(t) = beta_min + t (beta_max - beta_min)``,
    ``f = -beta/2``, ``g = sqrt(beta)``, ``sigma^2 = 1 - alpha^2``, prior N(0, I)."""

    @register_to_config
    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, num_train_timesteps: int = 1000):
        self._check_betas(beta_min, beta_max, t_min, num_train_timesteps)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def diffusion_squared(self, t):
        return self.beta(t)

    def _t_from_log_snr(self, lam):
        return self._t_from_log_alpha(0.5 * torch.nn.functional.logsigmoid(2 * lam))

    def to_scheduler_config(self, prediction_type: str = "epsilon") -> dict[str, Any]:
        """``DDPMScheduler`` config with linear betas ``beta_min / N .. beta_max / N``: the standard
        discretisation (alpha_bar matches this process to 8e-4 for N = 1000). Read back with
        ``process_from_scheduler_config(cfg, continuous=True)`` to get this VPSDE exactly."""
        c = self.config
        n = int(c.num_train_timesteps)
        return _ddpm_config(n, "linear", float(c.beta_min) / n, float(c.beta_max) / n, None, prediction_type)


class SubVPSDE(_VPFamily):
    """sub-VP SDE: drift as VP, ``g^2 = beta(t) (1 - alpha(t)^4)``, ``sigma(t) = 1 - alpha(t)^2``
    (not a square root), prior N(0, I)."""

    @register_to_config
    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, num_train_timesteps: int = 1000):
        self._check_betas(beta_min, beta_max, t_min, num_train_timesteps)

    def sigma(self, t):
        return -torch.expm1(2 * self.log_alpha(t))

    def diffusion_squared(self, t):
        return self.beta(t) * (-torch.expm1(4 * self.log_alpha(t)))

    def _t_from_log_snr(self, lam):
        # alpha / (1 - alpha^2) = e^lam  =>  alpha = 2 e^lam / (1 + sqrt(1 + 4 e^{2 lam}))
        e = torch.exp(lam)
        alpha = 2 * e / (1 + torch.sqrt(1 + 4 * e * e))
        return self._t_from_log_alpha(torch.log(alpha))

    def to_scheduler_config(self, prediction_type: str = "epsilon") -> dict[str, Any]:
        raise ValueError("diffusers has no scheduler for the sub-VP SDE; save it with save_config() instead")


class DiscreteVP(Process):
    """Discrete VP process of a DDPM ``alphas_cumprod`` table (N entries), in continuous time.

    Step ``i`` (0-based) sits at ``t_i = (i + 1) / N`` with ``alpha(t_i)^2 = alpha_bar_i``; ``ln alpha``
    is interpolated linearly in t (with ``ln alpha(0) = 0``), so ``f`` is piecewise constant and
    ``g^2 = -2 f`` (the VP identity). ``t_min = 1 / N`` (the first table entry).

    Build it from a diffusers beta schedule (``beta_schedule`` in ``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``; the table is computed by diffusers' own ``DDPMScheduler``, so it is exact) or
    from any table with ``DiscreteVP.from_alphas_cumprod``."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        alphas_cumprod: list[float] | None = None,
    ):
        num_train_timesteps = _steps(num_train_timesteps)
        if alphas_cumprod is not None:
            table = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
            if table.ndim != 1 or table.numel() < 2:
                raise ValueError(f"expected alphas_cumprod to be a 1-D table of >= 2 entries, found shape {tuple(table.shape)}")
            if int(num_train_timesteps) != table.numel():
                raise ValueError(
                    f"expected num_train_timesteps == len(alphas_cumprod), found {num_train_timesteps} and {table.numel()}"
                )
        else:
            from diffusers import DDPMScheduler

            if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
                raise ValueError(
                    f"expected beta_schedule in ('linear', 'scaled_linear', 'squaredcos_cap_v2'), found {beta_schedule!r}"
                )
            sched = DDPMScheduler(
                num_train_timesteps=int(num_train_timesteps),
                beta_start=float(beta_start),
                beta_end=float(beta_end),
                beta_schedule=beta_schedule,
            )
            table = sched.alphas_cumprod.to(torch.float64)
        body = table[:-1]
        if not (torch.all(body > 0) and torch.all(table < 1) and table[-1] >= 0 and torch.all(table[1:] <= table[:-1])
                and (table[-1] > 0 or table.numel() > 2)):
            raise ValueError(
                "expected alphas_cumprod strictly inside (0, 1) (the last entry may be 0: zero terminal SNR) and "
                "non-increasing"
            )
        n = table.numel()
        #: whether alpha(1) = 0 (a zero-terminal-SNR table, diffusers' rescale_betas_zero_snr=True)
        self.zero_terminal_snr = bool(table[-1] == 0)
        self._knots_t = torch.arange(n + 1, dtype=torch.float64) / n
        self._knots_la = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(table)])
        self._cache: dict = {}

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> DiscreteVP:
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        return cls(num_train_timesteps=table.numel(), beta_schedule="custom", alphas_cumprod=table.tolist())

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.exp(2 * self._knots_la[1:])

    def _knots(self, t: torch.Tensor):
        key = (t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = (self._knots_t.to(t.device, t.dtype), self._knots_la.to(t.device, t.dtype))
        return self._cache[key]

    def _segment(self, t):
        kt, kla = self._knots(t)
        n = kt.numel() - 1
        i = torch.clamp(torch.searchsorted(kt, t.contiguous(), right=True) - 1, 0, n - 1)
        slope = (kla[i + 1] - kla[i]) * n
        return i, kt, kla, slope

    def log_alpha(self, t):
        t = _as_t(t)
        i, kt, kla, slope = self._segment(t)
        if not self.zero_terminal_snr:
            return kla[i] + slope * (t - kt[i])
        # alpha(1) = 0: on the last segment alpha falls linearly to 0 (ln alpha = ln alpha_{N-1} + ln(1 - u))
        n = kt.numel() - 1
        last = i == n - 1
        u = ((t - kt[n - 1]) * n).clamp(0, 1)
        inner = kla[i] + torch.where(last, torch.zeros_like(slope), slope) * (t - kt[i])
        return torch.where(last, kla[n - 1] + torch.log1p(-u), inner)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def drift_coef(self, t):
        t = _as_t(t)
        i, kt, _, slope = self._segment(t)
        if not self.zero_terminal_snr:
            return slope
        n = kt.numel() - 1
        u = ((t - kt[n - 1]) * n).clamp(0, 1)
        return torch.where(i == n - 1, -n / (1 - u), slope)

    def diffusion_squared(self, t):
        return -2 * self.drift_coef(t)

    def timestep_index(self, t):
        """The table index of time t: ``i = t N - 1`` (continuous between entries)."""
        return t * self.num_train_timesteps - 1

    def _t_from_log_snr(self, lam):
        la = 0.5 * torch.nn.functional.logsigmoid(2 * lam)
        kt, kla = self._knots(la)
        n = kt.numel() - 1
        # kla is decreasing: search on its negation
        neg = -kla
        i = torch.clamp(torch.searchsorted(neg, (-la).contiguous()) - 1, 0, n - 1)
        slope = (kla[i + 1] - kla[i]) * n
        t = kt[i] + (la - kla[i]) / slope
        if self.zero_terminal_snr:  # the last segment: alpha = alpha_{N-1} (1 - u)
            last = la < kla[n - 1]
            u = -torch.expm1(la - kla[n - 1])
            t = torch.where(last, kt[n - 1] + u / n, t)
        return t

    def to_scheduler_config(self, prediction_type: str = "epsilon") -> dict[str, Any]:
        c = self.config
        if c.alphas_cumprod is None:
            return _ddpm_config(int(c.num_train_timesteps), c.beta_schedule, float(c.beta_start), float(c.beta_end), None, prediction_type)
        table = torch.as_tensor(c.alphas_cumprod, dtype=torch.float64)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), table[:-1]])
        betas = (1 - table / prev).tolist()
        return _ddpm_config(int(c.num_train_timesteps), "linear", 1e-4, 0.02, betas, prediction_type)


def _ddpm_config(n, schedule, start, end, trained_betas, prediction_type) -> dict[str, Any]:
    if prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(
            f"DDPMScheduler supports prediction_type epsilon, sample or v_prediction; found {prediction_type!r}"
        )
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": n,
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": schedule,
        "trained_betas": trained_betas,
        "prediction_type": prediction_type,
        # diffusers' default clip_sample=True clamps x0 to [-1, 1]: wrong for non-image data
        "clip_sample": False,
        "variance_type": "fixed_small",
    }


_PROCESS_CLASSES = {cls.__name__: cls for cls in (VESDE, VPSDE, SubVPSDE, DiscreteVP)}


def _config_dict(config) -> dict[str, Any]:
    if hasattr(config, "config") and isinstance(config.config, Mapping):
        cfg = dict(config.config)
        cfg.setdefault("_class_name", type(config).__name__)
        return cfg
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"expected a config mapping or an object with .config, found {type(config).__name__}")


def process_from_config(config) -> Process:
    """Rebuild a process saved with ``process.save_config`` (or its ``.config``)."""
    cfg = _config_dict(config)
    name = cfg.get("_class_name")
    if name not in _PROCESS_CLASSES:
        raise ValueError(f"expected _class_name in {sorted(_PROCESS_CLASSES)}, found {name!r}")
    return _PROCESS_CLASSES[name].from_config(cfg)


def process_from_scheduler_config(config, *, continuous: bool = False) -> Process:
    """The process encoded by a diffusers scheduler config (a dict, a FrozenDict or a scheduler).

    * ``ScoreSdeVeScheduler`` -> :class:`VESDE` (sigma_min, sigma_max, sampling_eps as t_min).
    * DDPM-style configs (``DDPMScheduler``, ``DDIMScheduler`` and every scheduler with
      ``beta_schedule``) -> :class:`DiscreteVP` with exactly diffusers' ``alphas_cumprod``; with
      ``continuous=True`` a linear schedule maps to ``VPSDE(beta_start * N, beta_end * N)``.
    * A process config of ours (``_class_name`` VESDE, VPSDE, SubVPSDE, DiscreteVP) -> that process.
    """
    cfg = _config_dict(config)
    name = cfg.get("_class_name")
    if name in _PROCESS_CLASSES:
        return process_from_config(cfg)
    if name == "ScoreSdeVeScheduler" or ("sigma_max" in cfg and "sigma_min" in cfg and "beta_schedule" not in cfg):
        eps = float(cfg.get("sampling_eps", 1e-5))
        return VESDE(
            sigma_min=float(cfg.get("sigma_min", 0.01)),
            sigma_max=float(cfg.get("sigma_max", 1348.0)),
            t_min=eps,
            num_train_timesteps=_steps(cfg.get("num_train_timesteps", 2000), "scheduler config field num_train_timesteps"),
        )
    if "beta_schedule" in cfg or "beta_start" in cfg or "trained_betas" in cfg:
        if cfg.get("rescale_betas_zero_snr", False):
            # diffusers' zero-terminal-SNR table (Lin et al. 2024): the same betas rescaled so that alpha(1) = 0
            from diffusers import DDPMScheduler

            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
            table = DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg}, rescale_betas_zero_snr=True).alphas_cumprod
            return DiscreteVP.from_alphas_cumprod(table.to(torch.float64))
        n = _steps(cfg.get("num_train_timesteps", 1000), "scheduler config field num_train_timesteps")
        schedule = cfg.get("beta_schedule", "linear")
        start = float(cfg.get("beta_start", 1e-4))
        end = float(cfg.get("beta_end", 0.02))
        trained = cfg.get("trained_betas")
        if trained is not None:
            betas = torch.as_tensor(trained, dtype=torch.float64)
            return DiscreteVP.from_alphas_cumprod(torch.cumprod(1 - betas, 0))
        if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"scheduler config field beta_schedule: expected linear, scaled_linear or squaredcos_cap_v2, "
                f"found {schedule!r}"
            )
        if continuous:
            if schedule != "linear":
                raise ValueError(f"continuous=True needs beta_schedule='linear', found {schedule!r}")
            return VPSDE(beta_min=start * n, beta_max=end * n, num_train_timesteps=n)
        return DiscreteVP(num_train_timesteps=n, beta_schedule=schedule, beta_start=start, beta_end=end)
    raise ValueError(
        f"cannot map scheduler config {name or '(no _class_name)'} to a process: expected a DDPM-style config "
        f"(beta_schedule, beta_start, beta_end), a ScoreSdeVeScheduler config (sigma_min, sigma_max), or a "
        f"score_toolkit process config; found keys {sorted(k for k in cfg if not k.startswith('_'))}"
    )
