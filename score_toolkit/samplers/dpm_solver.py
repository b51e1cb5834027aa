"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast solver for guided sampling of diffusion probabilistic
models"): exponential integrators of the probability-flow ODE in data-prediction form, for any process.

With ``lambda = ln(alpha / sigma)`` (the log-SNR) and the denoiser ``D = (x + sigma^2 s) / alpha`` (Tweedie,
computed from the canonical score, so every process and prediction type works), the PF-ODE solution is
(DPM-Solver++ eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda D(x_lambda, lambda) dlambda.

The solvers replace ``D`` on a step ``h = lambda_t - lambda_s`` by the polynomial in lambda interpolating
previous (multistep) or intermediate (single-step) denoiser values, and integrate it exactly:
``int_0^h e^{-(h - tau)} tau^m dtau = I_m(h)``, ``I_0 = 1 - e^{-h}``, ``I_m = h^m - m I_{m-1}``. Order 1 is
DDIM, ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s``; order 2 with the previous value is
DPM-Solver++(2M) with ``solver_type="taylor"`` of Lu et al.'s code (diffusers' ``solver_type="heun"``);
order 3 with the two previous values is DPM-Solver++(3M). Note: Lu et al.'s reference code, diffusers and
k-diffusion (``sample_dpmpp_3m_sde``) weight the second difference of 3M by ``phi_3`` where the exact
integral of the quadratic interpolant needs ``2 phi_3`` (checked on an exactly quadratic denoiser); the
weights here are the exact ones, and the tests measure third order.

The stochastic variants (:mod:`.dpm_solver_sde`) integrate the SDE family with the same marginals
(Lu et al. 2022, Sec. 5 / appendix; the ``eta`` of k-diffusion's ``sample_dpmpp_2m_sde``)

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s + alpha_t int (1 + eta) e^{-(1+eta)(h - tau)} D dtau
          + sigma_t sqrt(1 - e^{-2 eta h}) z,

which is the ODE for ``eta = 0`` and the reverse SDE (DDPM's posterior) for ``eta = 1``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import SamplerProperties, SamplingContext
from .fixed_grid import GridSampler, _floats, _lincomb

__all__ = [
    "DPMSolverPP2M",
    "DPMSolverPP3M",
    "DPMSolverPP2S",
    "DPMSolverPP3S",
    "exponential_integrals",
    "lagrange_weights",
    "multistep_orders",
]


# ---------------------------------------------------------------------------------------------- math helpers
def exponential_integrals(h: torch.Tensor, m_max: int, eta: float = 0.0) -> torch.Tensor:
    """``J_m = int_0^h (1 + eta) e^{-(1 + eta)(h - tau)} tau^m dtau`` for ``m = 0..m_max`` (shape ``(*h.shape, m_max + 1)``).

    With ``H = (1 + eta) h``: ``J_m = I_m(H) / (1 + eta)^m``, ``I_0(H) = 1 - e^{-H}``, ``I_m = H^m - m I_{m-1}``
    (integration by parts; the cancellation for small ``H`` costs ~``(m + 1) eps / H`` relative, harmless in float64)."""
    c = 1.0 + float(eta)
    big_h = c * h
    out = [-torch.expm1(-big_h)]
    for m in range(1, m_max + 1):
        out.append(big_h**m - m * out[-1])
    return torch.stack([v / c**m for m, v in enumerate(out)], dim=-1)


def lagrange_weights(nodes: torch.Tensor, h: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
    """Weights ``w_j`` with ``sum_j w_j p(tau_j) = int_0^h (1 + eta) e^{-(1 + eta)(h - tau)} p(tau) dtau`` for every
    polynomial ``p`` of degree < k, given k distinct ``nodes`` tau_j (shape ``(..., k)``) and ``h`` (shape ``(...)``)."""
    k = nodes.shape[-1]
    moments = exponential_integrals(h, k - 1, eta)  # (..., k)
    if k == 1:
        return moments
    powers = torch.arange(k, dtype=nodes.dtype, device=nodes.device)
    vander = nodes.unsqueeze(-1) ** powers  # V[..., j, m] = tau_j^m
    return torch.linalg.solve(vander.transpose(-1, -2), moments.unsqueeze(-1)).squeeze(-1)


def multistep_orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Order used at each step: ``min(order, i + 1)`` (warm-up from the first step), and with
    ``lower_order_final`` also ``<= num_steps - i`` (the last steps fall back to lower orders, as in
    diffusers' ``lower_order_final``)."""
    out = []
    for i in range(num_steps):
        k = min(order, i + 1)
        if lower_order_final:
            k = min(k, num_steps - i)
        out.append(k)
    return out


def _marginals(process, ts: torch.Tensor):
    alpha, sigma = process.marginal(ts)
    lam = torch.log(alpha) - torch.log(sigma)
    return alpha, sigma, lam


def multistep_coefficients(process, ts: torch.Tensor, orders: list[int], eta: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-step coefficients of the (stochastic) multistep update on the grid ``ts`` (float64, differentiable):

        x_{i+1} = a_i x_i + sum_j w_{ij} D_{i-j} + n_i z_i,   D_i = (x_i + sigma_i^2 s_i) / alpha_i,

    with ``w_{ij} = alpha_{i+1} * lagrange_weights(lambda_{i-j} - lambda_i)`` for ``j < orders[i]``."""
    alpha, sigma, lam = _marginals(process, ts)
    n = ts.numel() - 1
    h = lam[1:] - lam[:-1]
    k_max = max(orders)
    w = torch.zeros(n, k_max, dtype=ts.dtype, device=ts.device)
    order_t = torch.tensor(orders)
    for k in sorted(set(orders)):
        idx = torch.nonzero(order_t == k).flatten()
        nodes = torch.stack([lam[idx - j] - lam[idx] for j in range(k)], dim=-1)
        w[idx, :k] = lagrange_weights(nodes, h[idx], eta) * alpha[idx + 1].unsqueeze(-1)
    a = sigma[1:] / sigma[:-1] * torch.exp(-eta * h)
    noise = sigma[1:] * torch.sqrt(-torch.expm1(-2.0 * eta * h)) if eta > 0 else torch.zeros_like(h)
    return {"a": a, "w": w, "noise": noise, "sigma2": sigma**2, "inv_alpha": 1.0 / alpha}


def _denoise(x, s, sigma2, inv_alpha):
    """Tweedie's denoiser D = (x + sigma^2 s) / alpha."""
    if isinstance(sigma2, float):
        d = torch.add(x, s, alpha=sigma2)
        return d if inv_alpha == 1.0 else d.mul_(inv_alpha)  # alpha = 1 (VE): skip an exact no-op pass
    return (x + sigma2 * s) * inv_alpha


class _DPMSolverBase(GridSampler):
    """Shared validation."""

    #: values of ``lower_order_final`` besides a bool that a sampler accepts (UniPC: ``"auto"``)
    lower_order_final_values: ClassVar[tuple[str, ...]] = ()

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        lof = cfg.get("lower_order_final", False)
        if not isinstance(lof, bool) and not (isinstance(lof, str) and lof in self.lower_order_final_values):
            expected = " or ".join(("a bool", *map(repr, self.lower_order_final_values)))
            raise TypeError(f"sampler {self.name!r}: expected option lower_order_final to be {expected}, found {lof!r}")


class _Multistep(_DPMSolverBase):
    order: ClassVar[int] = 2
    eta: ClassVar[float] = 0.0  # the ODE; the SDE variants override (and make it an option)

    def _eta(self) -> float:
        return float(self.config.get("eta", self.eta))

    def _orders(self, n: int) -> list[int]:
        return multistep_orders(n, self.order, self.config["lower_order_final"])

    def _integrate(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        n = ts.numel() - 1
        orders = self._orders(n)
        eta = self._eta()
        if not ts.requires_grad:
            tl = ts.tolist()
            co = self._per_process(ctx.process, "coefficients", (tl, orders, eta), lambda: {
                k: v.tolist() for k, v in multistep_coefficients(ctx.process, ts, orders, eta).items()})
            return self._integrate_floats(ctx, x, tl, orders, co)
        co = multistep_coefficients(ctx.process, ts, orders, eta)
        a, w, noise, sigma2, inv_alpha = _floats(co["a"], co["w"], co["noise"], co["sigma2"], co["inv_alpha"])
        t_score = ts if ts.requires_grad else ts.tolist()
        t_rec = ts.tolist() if not ts.requires_grad else ts.detach().tolist()
        history: list[torch.Tensor] = []
        for i in range(n):
            s = ctx.score(x, t_score[i])
            history.insert(0, _denoise(x, s, sigma2[i], inv_alpha[i]))
            del history[self.order :]
            pairs = [(a[i], x)] + [(w[i][j], history[j]) for j in range(orders[i])]
            if eta > 0:
                pairs.append((noise[i], ctx.randn_like(x)))
            x = _lincomb(pairs)
            ctx.record(x, t_rec[i + 1], step=i + 1)
        return x

    def _integrate_floats(self, ctx: SamplingContext, x: torch.Tensor, ts: list[float], orders: list[int],
                          co: dict[str, list]) -> torch.Tensor:
        """The sampling loop (no grad through the grid): float coefficients, fused multiply-adds, no tensor made
        per step but the denoiser value and the new state. Bit for bit the differentiable loop's result, and
        the same history of denoiser values as :class:`~score_toolkit.diffusers_schedulers.ScoreDPMSolverScheduler`."""
        n = len(ts) - 1
        a, w, noise, sigma2, inv_alpha = co["a"], co["w"], co["noise"], co["sigma2"], co["inv_alpha"]
        stochastic = self._eta() > 0
        keep = self.order
        history: list[torch.Tensor] = []  # D_i, D_{i-1}, ...
        for i in range(n):
            history.insert(0, _denoise(x, ctx.score(x, ts[i]), sigma2[i], inv_alpha[i]))
            del history[keep:]
            wi = w[i]
            x = torch.mul(x, a[i])
            for j in range(orders[i]):
                x.add_(history[j], alpha=wi[j])
            if stochastic:
                x.add_(ctx.randn_like(x), alpha=noise[i])
            ctx.record(x, ts[i + 1], step=i + 1)
        return x


class DPMSolverPP2M(_Multistep):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep exponential integrator of the
    PF-ODE in data-prediction form, one score evaluation per step.

    Step ``i`` (``h = lambda_{i+1} - lambda_i``, ``r = h_{i-1} / h``) integrates the line through the last two
    denoiser values exactly:
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi_1 D_i + alpha_{i+1} phi_2 (D_i - D_{i-1}) / r`` with
    ``phi_1 = e^{-h} - 1``, ``phi_2 = phi_1 / h + 1``; the first step is first order (DDIM).

    Options:
        num_steps (20): steps of the grid (NFE = num_steps + 1 with ``to_zero``).
        grid ("fitted"), rho (7.0): see :mod:`score_toolkit.samplers.grids` (the data-free fitted grid, built-in
            kinds, saved grids, explicit times).
        lower_order_final (True): the last step is first order.
        to_zero (True): end with the PF-ODE step to noise level 0 (one more evaluation; see
            :func:`~score_toolkit.samplers.grids.step_to_zero`); off by itself when ``denoise=True`` is passed.

    Defaults (grid, ``to_zero``) chosen by measurement: docs/fast_samplers.md, "Defaults".
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.
    """

    name: ClassVar[str] = "dpmpp_2m"
    description: ClassVar[str] = "DPM-Solver++(2M): second-order multistep exponential integrator of the PF-ODE (Lu et al. 2022)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=2.0)
    options: ClassVar[dict[str, Any]] = {"num_steps": 20, "grid": "fitted", "rho": 7.0, "lower_order_final": True, "to_zero": True}
    order = 2


class DPMSolverPP3M(_Multistep):
    """DPM-Solver++(3M) (Lu et al. 2022; multistep third order as in their code and in UniPC/DPM-Solver-v3,
    Zheng et al. 2023), one score evaluation per step.

    Integrates the quadratic through the last three denoiser values exactly in lambda:
    ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha phi_1 D_i + alpha phi_2 D1 - 2 alpha phi_3 D2`` with
    ``D1, D2`` the divided differences of Lu et al.'s code and ``phi_3 = phi_2 / h - 1/2`` (the factor 2 is
    the exact integral; their code has 1). Steps 1 and 2 warm up with orders 1 and 2.

    Options:
        num_steps (20): steps of the grid (NFE = num_steps + 1 with ``to_zero``).
        grid ("fitted"), rho (7.0): see :class:`DPMSolverPP2M`; ``"fitted"`` is here the data-free density fitted
            for third-order samplers (``fitted_log_snr(process, n, order=3)``).
        lower_order_final (False): the last two steps use orders 1 and 2 (diffusers' default below 15 steps;
            measured worse here on the analytic test problems, and it lowers the asymptotic order).
        to_zero (True): end with the PF-ODE step to noise level 0 (one more evaluation; see
            :func:`~score_toolkit.samplers.grids.step_to_zero`); off by itself when ``denoise=True`` is passed.

    Defaults (grid, ``to_zero``) chosen by measurement: docs/fast_samplers.md, "Defaults".
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.

    Order: the first step (no history yet) is first order; its local error ``O(h^2 |dD/dlambda|)`` at the prior's
    noise level, where the denoiser barely moves (``dD/dlambda ~ Cov / sigma~_max^2``), caps the asymptotic order at 2
    with a tiny constant. Over practical step counts the measured order on Gaussian data is 3 to 4 (tests).
    """

    name: ClassVar[str] = "dpmpp_3m"
    description: ClassVar[str] = "DPM-Solver++(3M): third-order multistep exponential integrator of the PF-ODE (Lu et al. 2022)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=3.0)
    options: ClassVar[dict[str, Any]] = {"num_steps": 20, "grid": "fitted", "rho": 7.0, "lower_order_final": False,
                                         "to_zero": True}
    order = 3
    fitted_order = 3


# ---------------------------------------------------------------------------------------------- single-step
def singlestep_coefficients(process, ts: torch.Tensor, fractions: tuple[float, ...], eta: float = 0.0) -> dict[str, Any]:
    """Coefficients of an s-stage single-step exponential Runge-Kutta scheme (DPM-Solver++(2S)/(3S); for
    ``eta > 0`` its stochastic counterpart) on the grid ``ts``.

    Stage ``q`` (at ``lambda_i + c_q h``, ``c_0 = 0``, ``c_q = fractions[q-1]``) and the final value are

        u_q = a_q x + sum_{j<q} w_{qj} D_j + noise,    x_{i+1} = a x + sum_j w_j D_j + noise,

    where the weights integrate the Lagrange interpolant through the stage values ``(c_j h, D_j)``
    exactly (the ``taylor`` variant of Lu et al.'s code). Noise: the exact Ornstein-Uhlenbeck increments of
    one Brownian path, ``n_q`` (stage) and the final ``m_{q}``, built from one standard normal per
    sub-interval (so stages and the final value see consistent noise)."""
    alpha, sigma, lam = _marginals(process, ts)
    h = lam[1:] - lam[:-1]
    c = [0.0, *fractions]
    stage_t, stage_alpha, stage_sigma = [], [], []
    for cq in fractions:
        lam_q = lam[:-1] + cq * h
        t_q = process.t_from_log_snr(lam_q)
        a_q, s_q = process.marginal(t_q)
        # use the exact lambda of the (rounded) stage time: the weights below must match where D is evaluated
        stage_t.append(t_q)
        stage_alpha.append(a_q)
        stage_sigma.append(s_q)
    lam_stage = [lam[:-1]] + [torch.log(a) - torch.log(s) for a, s in zip(stage_alpha, stage_sigma)]
    out: dict[str, Any] = {"stage_t": stage_t, "sigma2": [sigma[:-1] ** 2] + [s**2 for s in stage_sigma],
                           "inv_alpha": [1.0 / alpha[:-1]] + [1.0 / a for a in stage_alpha]}
    # targets: the stages q = 1..s-1 and the step end
    targets = [(lam_stage[q], stage_alpha[q - 1], stage_sigma[q - 1]) for q in range(1, len(c))]
    targets.append((lam[1:], alpha[1:], sigma[1:]))
    a_list, w_list, hh = [], [], []
    for q, (lam_q, a_q, s_q) in enumerate(targets, start=1):
        hq = lam_q - lam[:-1]
        nodes = torch.stack([lam_stage[j] - lam[:-1] for j in range(q)], dim=-1)
        w_list.append(lagrange_weights(nodes, hq, eta) * a_q.unsqueeze(-1))
        a_list.append(s_q / sigma[:-1] * torch.exp(-eta * hq))
        hh.append(hq)
    out["a"], out["w"] = a_list, w_list
    # noise of one Brownian path: sub-interval q spans [lam_stage[q-1], lam_stage[q]] (last: to lambda_{i+1})
    if eta > 0:
        ends = lam_stage + [lam[1:]]
        sub = [ends[q + 1] - ends[q] for q in range(len(ends) - 1)]  # the s sub-interval lengths
        # std of the OU integral over sub-interval q, seen at its own end (in units of sigma at that end)
        std = [torch.sqrt(-torch.expm1(-2.0 * eta * d)) for d in sub]
        noise = []
        for q, (_, _, s_q) in enumerate(targets):
            # target q sits at the end of sub-interval q; contributions decay by e^{-eta * (distance)}
            terms = []
            for p in range(q + 1):
                decay = torch.exp(-eta * (ends[q + 1] - ends[p + 1]))
                terms.append(s_q * decay * std[p])
            noise.append(terms)
        out["noise"] = noise
    return out


class _Singlestep(_DPMSolverBase):
    fractions: ClassVar[tuple[float, ...]] = (0.5,)
    eta: ClassVar[float] = 0.0

    def _eta(self) -> float:
        return float(self.config.get("eta", self.eta))

    def _integrate(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        n = ts.numel() - 1
        eta = self._eta()
        grad = ts.requires_grad
        if grad:
            co = singlestep_coefficients(ctx.process, ts, self.fractions, eta)
        else:  # as Python floats, computed once per process and grid and kept for the next run (as _Multistep does)
            co = self._per_process(ctx.process, "coefficients", (ts.tolist(), self.fractions, eta),
                                   lambda: _nested_floats(singlestep_coefficients(ctx.process, ts, self.fractions, eta)))
        sigma2, inv_alpha, a, w, stage_t = co["sigma2"], co["inv_alpha"], co["a"], co["w"], co["stage_t"]
        noise = co["noise"] if eta > 0 else None
        t_score = ts if grad else ts.tolist()
        t_rec = ts.detach().tolist()
        num_targets = len(self.fractions) + 1
        for i in range(n):
            ds = [_denoise(x, ctx.score(x, t_score[i]), sigma2[0][i], inv_alpha[0][i])]
            zs = []
            for q in range(num_targets):
                pairs = [(a[q][i], x)] + [(w[q][i][j], ds[j]) for j in range(q + 1)]
                if noise is not None:
                    zs.append(ctx.randn_like(x))
                    pairs += [(noise[q][p][i], zs[p]) for p in range(q + 1)]
                u = _lincomb(pairs)
                if q < num_targets - 1:
                    ds.append(_denoise(u, ctx.score(u, stage_t[q][i]), sigma2[q + 1][i], inv_alpha[q + 1][i]))
            x = u
            ctx.record(x, t_rec[i + 1], step=i + 1)
        return x


def _nested_floats(value):
    """The tensors in nested dicts and lists as Python floats (lists of them)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _nested_floats(v) for k, v in value.items()}
    return [_nested_floats(v) for v in value]


class DPMSolverPP2S(_Singlestep):
    """DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1): second-order single-step exponential integrator, two
    score evaluations per step (the second at the log-SNR midpoint ``lambda_i + h / 2``).

    ``u = (sigma_s/sigma_i) x - alpha_s (e^{-h/2} - 1) D_i``; ``x_{i+1} = (sigma_{i+1}/sigma_i) x - alpha phi_1 D_i
    + 2 alpha phi_2 (D(u) - D_i)`` (exact integral of the line through both values).

    Options:
        num_steps (10): steps (NFE = 2 num_steps).
        grid ("log_sigma"), rho (7.0): see :mod:`score_toolkit.samplers.grids`.
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.
    """

    name: ClassVar[str] = "dpmpp_2s"
    description: ClassVar[str] = "DPM-Solver++(2S): second-order single-step exponential integrator of the PF-ODE (Lu et al. 2022)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=2.0)
    options: ClassVar[dict[str, Any]] = {"num_steps": 10, "grid": "log_sigma", "rho": 7.0, "to_zero": False}
    nfe_per_step = 2
    fractions = (0.5,)


class DPMSolverPP3S(_Singlestep):
    """DPM-Solver++(3S): third-order single-step exponential integrator (Lu et al. 2022, DPM-Solver-3 with
    ``r1 = 1/3, r2 = 2/3`` in data-prediction form), three score evaluations per step.

    Stage 2 integrates the line through ``(0, D_i), (h/3, D_1)``; the final value the quadratic through
    all three values (the ``taylor`` variant of Lu et al.'s code).

    Options:
        num_steps (7): steps (NFE = 3 num_steps).
        grid ("log_sigma"), rho (7.0): see :mod:`score_toolkit.samplers.grids`.
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.
    """

    name: ClassVar[str] = "dpmpp_3s"
    description: ClassVar[str] = "DPM-Solver++(3S): third-order single-step exponential integrator of the PF-ODE (Lu et al. 2022)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=3.0)
    options: ClassVar[dict[str, Any]] = {"num_steps": 7, "grid": "log_sigma", "rho": 7.0, "to_zero": False}
    nfe_per_step = 3
    fractions = (1.0 / 3.0, 2.0 / 3.0)
