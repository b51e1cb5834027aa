"""The integration variable of the likelihood ODE (``time_variable`` of :func:`~score_toolkit.likelihood.log_likelihood`):
t itself, ln(sigma / alpha) with the scaled state, or the clock of the standard VP process with the
variance-preserving state, and the coefficients of the ODE in it.
"""

from __future__ import annotations

import torch

from ..processes import VPSDE, Process

#: (beta_min, beta_max) of the VP process whose time is the ``"vp_t"`` clock (score_sde's VP schedule)
VP_CLOCK = (0.1, 20.0)


def _vp_clock(lam: torch.Tensor) -> torch.Tensor:
    """The time of VP(b0, b1) at noise-to-signal ratio ``lam``: the root of ``(b1 - b0) tau^2 / 2 + b0 tau =
    ln(1 + lam^2)``, written without cancellation."""
    b0, b1 = VP_CLOCK
    log1p_lam2 = torch.log1p(lam.to(torch.float64) ** 2)
    return 2 * log1p_lam2 / (b0 + torch.sqrt(b0 * b0 + 2 * (b1 - b0) * log1p_lam2))


def _is_the_clock(process: Process) -> bool:
    cfg = process.config
    return type(process) is VPSDE and (float(cfg.beta_min), float(cfg.beta_max)) == VP_CLOCK


class _TimeVariable:
    """The integration variable tau and the map to the ODE in it (see :func:`log_likelihood`, ``time_variable``).

    With ``x = c(tau) y`` (y the solver's state), ``dy/dtau = A y + B s(x, t)`` and
    ``d(int div)/dtau = A d + B c div_x s``:

    * ``"t"``: tau = t, c = 1, A = f(t), B = -g(t)^2 / 2 (Song et al. 2021, eq. 13);
    * ``"log_sigma"``: tau = ln(sigma / alpha), y = x / alpha, c = alpha, A = 0, B = -(sigma / alpha)^2 alpha
      (the probability-flow ODE of the scaled state, Karras et al. 2022, eq. 4, in the log of its noise level;
      ``g^2 dt / 2 = alpha^2 s~ ds~`` with ``s~ = sigma / alpha``). Its right-hand side is smooth whenever the score
      is, even when f and g are not (e.g. :class:`~score_toolkit.processes.DiscreteVP`'s piecewise-constant
      coefficients, which make an adaptive solver stop at each of its N knots in t).
    * ``"vp_t"``: tau = the time of the standard VP(0.1, 20) process (:data:`VP_CLOCK`) at the same noise-to-signal
      ratio ``lam = sigma / alpha`` (``ln(1 + lam^2) = b0 tau + (b1 - b0) tau^2 / 2``), with the variance-preserving
      state ``y = x / sqrt(alpha^2 + sigma^2)``: c = sqrt(alpha^2 + sigma^2), A = -beta(tau) / 2,
      B = -c beta(tau) / 2 (``beta = b0 + (b1 - b0) tau``). Every process with the same noise-to-signal ratio
      gives the same ODE in (tau, y), so each one is integrated as VP(0.1, 20) is in t: for VP(0.1, 20) it is
      exactly ``"t"``. Its right-hand side depends on t only through lam, so it is smooth for a DDPM table too.
      In y the data's drift vanishes at large noise (y is then nearly standard normal), and in tau the noise level
      grows like lam^2, then lam, then sqrt(ln lam), which spends few steps at both ends (docs/likelihood.md).
    """

    def __init__(self, kind: str, process: Process, t_lo: float, t_hi: float):
        self.kind, self.process = kind, process
        self.t_lo, self.t_hi = t_lo, t_hi
        ends = torch.tensor([t_lo, t_hi], dtype=torch.float64)
        if kind == "t":
            self.lo, self.hi = t_lo, t_hi
            self.log_c_lo = self.log_c_hi = 0.0
        elif kind == "vp_t":
            # the clock's own process: its time is the clock and its state x, so the ODE is the one in t (cheaper
            # coefficients, the same numbers)
            self._own_clock = _is_the_clock(process)
            tau = _vp_clock(process.noise_to_signal(ends))
            self.lo, self.hi = float(tau[0]), float(tau[1])
            c2 = process.alpha(ends) ** 2 + process.sigma(ends) ** 2
            self.log_c_lo, self.log_c_hi = (float(v) for v in 0.5 * torch.log(c2.to(torch.float64)))
        else:
            log_s = torch.log(process.noise_to_signal(ends))
            self.lo, self.hi = float(log_s[0]), float(log_s[1])
            la = process.log_alpha(ends)
            self.log_c_lo, self.log_c_hi = float(la[0]), float(la[1])
        if not self.lo < self.hi:
            raise ValueError(f"log_likelihood: the process's noise level must grow from t_min to 1, found "
                             f"{kind} from {self.lo:g} to {self.hi:g}")

    def to_tau(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "t":
            return t
        if self.kind == "vp_t":
            return _vp_clock(self.process.noise_to_signal(t))
        return torch.log(self.process.noise_to_signal(t))

    def coefficients(self, tau: float) -> tuple[float, float, float, float]:
        """(t, c, A, B) at tau (clamped into the interval: adaptive solvers probe outside it)."""
        t, c, a, b = self.coefficients_rows(torch.tensor([float(tau)], dtype=torch.float64))
        return float(t[0]), float(c[0]), float(a[0]), float(b[0])

    def coefficients_rows(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, c, A, B), each of tau's shape, at the float64 values ``tau`` (clamped into the interval)."""
        tau = tau.to(torch.float64).clamp(self.lo, self.hi)
        if self.kind == "t" or (self.kind == "vp_t" and self._own_clock):
            f = self.process.drift_coef(tau)
            g2 = self.process.diffusion_squared(tau).clamp_min(0)
            return tau, torch.ones_like(tau), f.to(tau.dtype), -0.5 * g2.to(tau.dtype)
        if self.kind == "vp_t":
            b0, b1 = VP_CLOCK
            log1p_lam2 = b0 * tau + (b1 - b0) * tau * tau / 2  # ln(1 + lam^2)
            t = self.process.t_from_log_snr(-0.5 * torch.log(torch.expm1(log1p_lam2))).to(tau.dtype)  # ln(1 / lam)
            t = t.clamp(self.t_lo, self.t_hi)
            c = torch.exp(self.process.log_alpha(t).to(tau.dtype) + log1p_lam2 / 2)
            half_beta = (b0 + (b1 - b0) * tau) / 2
            return t, c, -half_beta, -c * half_beta
        st = torch.exp(tau)
        t = self.process.t_from_noise_to_signal(st).to(tau.dtype).clamp(self.t_lo, self.t_hi)
        alpha = self.process.alpha(t).to(tau.dtype)
        return t, alpha, torch.zeros_like(tau), -st * st * alpha
