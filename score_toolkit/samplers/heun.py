"""EDM's second-order Heun sampler with optional stochastic churn (Karras et al. 2022, "Elucidating the design
space of diffusion-based generative models", Algorithm 2), for any process.

EDM writes the probability-flow ODE in the scaled state ``x~ = x / alpha`` and the noise level
``sigma~ = sigma / alpha`` (their eq. 4 with ``s(t) = alpha``): ``dx~ / dsigma~ = (x~ - D) / sigma~``, where
``(x~ - D) / sigma~ = -sigma s(x, t)`` (Tweedie), so the slope is the predicted noise. Algorithm 2, step i:

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma~_i <= S_tmax else 0
    sigma^  = sigma~_i (1 + gamma_i);   x^ = x~_i + sqrt(sigma^^2 - sigma~_i^2) S_noise eps      (churn)
    d_i     = (x^ - D(x^; sigma^)) / sigma^;   x~_{i+1} = x^ + (sigma~_{i+1} - sigma^) d_i            (Euler)
    d'_i    = (x~_{i+1} - D(x~_{i+1}; sigma~_{i+1})) / sigma~_{i+1}
    x~_{i+1} = x^ + (sigma~_{i+1} - sigma^) (d_i + d'_i) / 2                                         (Heun)

The grid here ends at ``t_min`` (``sigma~ > 0``), so every step, the last included, is a Heun step
(NFE = 2 num_steps; EDM's last step to ``sigma = 0`` is Euler). ``sigma^`` is capped at ``sigma~(t = 1)``: the
score is not defined above the prior's noise level.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch

from .base import SamplerProperties, SamplingContext
from .fixed_grid import GridSampler, _lincomb

__all__ = ["EDMHeunSampler"]


class EDMHeunSampler(GridSampler):
    """EDM Heun (Karras et al. 2022, Algorithm 2): second-order Heun steps of the PF-ODE in
    ``sigma~ = sigma / alpha``, with optional stochastic churn; deterministic (Algorithm 1) when ``S_churn = 0``.

    Options:
        num_steps (18): steps (NFE = 2 num_steps).
        grid ("karras"), rho (7.0): see :mod:`score_toolkit.samplers.grids`.
        S_churn (0.0): total churn; ``gamma_i = min(S_churn / num_steps, sqrt(2) - 1)`` on the churn range.
        S_tmin (0.0), S_tmax (inf): the range of ``sigma~`` where churn is applied.
        S_noise (1.0): scale of the churn noise (slightly above 1 offsets the denoiser's loss of detail).
        to_zero, denoise, progress: see :class:`~score_toolkit.samplers.grids.GridSampler`.

    Declared order 2 (deterministic); with churn (``S_churn > 0``) the sampler is stochastic with weak
    order 2 on Gaussian data (the churn is an exact noising step; the tests measure it).
    """

    name: ClassVar[str] = "heun"
    description: ClassVar[str] = "EDM Heun sampler with optional stochastic churn (Karras et al. 2022, Algorithm 2)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=2.0)
    options: ClassVar[dict[str, Any]] = {"num_steps": 18, "grid": "karras", "rho": 7.0, "S_churn": 0.0, "S_tmin": 0.0,
                                         "S_tmax": math.inf, "S_noise": 1.0, "to_zero": False}
    nfe_per_step = 2

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        for key in ("S_churn", "S_tmin", "S_tmax", "S_noise"):
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise TypeError(f"sampler {self.name!r}: expected option {key} to be a number, found {v!r}")
            if v < 0 or (key != "S_tmax" and not math.isfinite(v)):
                raise ValueError(f"sampler {self.name!r}: expected option {key} >= 0 (finite), found {v!r}")
            cfg[key] = float(v)
        if cfg["S_tmax"] < cfg["S_tmin"]:
            raise ValueError(f"sampler {self.name!r}: expected S_tmin <= S_tmax, found {cfg['S_tmin']} > {cfg['S_tmax']}")
        if cfg["S_churn"] > 0:
            self.properties = replace(type(self).properties, stochastic=True)

    def _integrate(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        if not ts.requires_grad:
            tl = ts.tolist()
            co = self._per_process(ctx.process, "coefficients", (tl, self.config["S_churn"], self.config["S_tmin"],
                                                                self.config["S_tmax"], self.config["S_noise"]),
                                   lambda: self._coefficients(ctx.process, ts))
            return self._loop_floats(ctx, x, tl, *co)
        return self._integrate_grad(ctx, x, ts)

    def _coefficients(self, process, ts: torch.Tensor):
        """The loop's per-step coefficients as Python floats (the expressions of :meth:`_integrate_grad`)."""
        with torch.no_grad():
            churn, t_hat, a_hat, alpha, c_euler, c_half1, c_half2, noise_std = self._coefficient_tensors(process, ts)
        return (churn, t_hat.tolist(), a_hat.tolist(), alpha.tolist(), c_euler.tolist(), c_half1.tolist(),
                c_half2.tolist(), noise_std.tolist())

    def _coefficient_tensors(self, process, ts: torch.Tensor):
        cfg = self.config
        n = ts.numel() - 1
        alpha, sigma = process.marginal(ts)
        sig_t = sigma / alpha  # sigma~
        sig_list = sig_t.detach().tolist()
        gamma_max = min(cfg["S_churn"] / n, math.sqrt(2.0) - 1.0)
        gammas = [gamma_max if cfg["S_churn"] > 0 and cfg["S_tmin"] <= s <= cfg["S_tmax"] else 0.0 for s in sig_list[:-1]]
        churn = [g > 0 for g in gammas]
        # the churned level sigma^ (capped at the prior's level) and its time
        gam = torch.tensor(gammas, dtype=ts.dtype)
        sig_hat = torch.minimum(sig_t[:-1] * (1 + gam), sig_t[0].expand(n))
        t_hat = torch.where(torch.tensor(churn), process.t_from_noise_to_signal(sig_hat.detach()), ts[:-1]) if any(churn) else ts[:-1]
        if any(churn):
            sig_hat = torch.where(torch.tensor(churn), sig_hat, sig_t[:-1])
        a_hat, s_hat = process.marginal(t_hat)
        delta = sig_t[1:] - sig_hat
        # x~_{i+1} = x^ + delta (d + d') / 2 with d = -sigma^_t s(a^ x^), d' = -sigma_{i+1} s(alpha_{i+1} x~_e)
        c_euler = -delta * s_hat
        c_half1, c_half2 = 0.5 * c_euler, -0.5 * delta * sigma[1:]
        noise_std = torch.sqrt((sig_hat**2 - sig_t[:-1] ** 2).clamp_min(0)) * cfg["S_noise"]
        return churn, t_hat, a_hat, alpha, c_euler, c_half1, c_half2, noise_std

    def _integrate_grad(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """The loop differentiable in the grid (optimize_grid): tensor coefficients."""
        n = ts.numel() - 1
        churn, t_hat, a_hat_l, alpha_l, c_e, c_h1, c_h2, nstd = self._coefficient_tensors(ctx.process, ts)
        t_hat_l, t_next = t_hat, ts[1:]
        t_rec = ts.detach().tolist()
        one = torch.ones((), dtype=ts.dtype)
        xt = x / alpha_l[0]  # x~
        for i in range(n):
            if churn[i]:
                xt = _lincomb([(one, xt), (nstd[i], ctx.randn_like(xt))])
            x_eval = xt * a_hat_l[i] if churn[i] else x
            s1 = ctx.score(x_eval, t_hat_l[i])
            xe = _lincomb([(one, xt), (c_e[i], s1)])
            s2 = ctx.score(xe * alpha_l[i + 1], t_next[i])
            xt = _lincomb([(one, xt), (c_h1[i], s1), (c_h2[i], s2)])
            x = xt * alpha_l[i + 1]
            ctx.record(x, t_rec[i + 1], step=i + 1)
        return x

    @staticmethod
    def _loop_floats(ctx, x, ts, churn, t_hat, a_hat, alpha, c_e, c_h1, c_h2, nstd):
        """The sampling loop with float coefficients: fused multiply-adds, and no multiplication by
        ``alpha = 1`` (VE) or ``1`` (the former products with 1 were exact: the results are the same)."""
        a0 = alpha[0]
        xt = x if a0 == 1.0 else x / a0  # x~
        for i in range(len(ts) - 1):
            if churn[i]:
                xt = torch.add(xt, ctx.randn_like(xt), alpha=nstd[i])
                x_eval = xt if a_hat[i] == 1.0 else xt * a_hat[i]
            else:
                x_eval = x
            s1 = ctx.score(x_eval, t_hat[i])
            xe = torch.add(xt, s1, alpha=c_e[i])
            a1 = alpha[i + 1]
            s2 = ctx.score(xe if a1 == 1.0 else xe * a1, ts[i + 1])
            xt = torch.add(xt, s1, alpha=c_h1[i]).add_(s2, alpha=c_h2[i])
            x = xt if a1 == 1.0 else xt * a1
            ctx.record(x, ts[i + 1], step=i + 1)
        return x
