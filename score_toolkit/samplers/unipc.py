"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of diffusion
models"): a multistep exponential integrator of the probability-flow ODE in data-prediction form whose corrector
(UniC) raises the order by one without another score evaluation, for any process.

Notation as in :mod:`.dpm_solver`: ``lambda = ln(alpha / sigma)``, the denoiser ``D = (x + sigma^2 s) / alpha``,
``h = lambda_{i+1} - lambda_i``, ``r_k = (lambda_{i-k} - lambda_i) / h``. The ``bh2`` variant (``B(h) = e^{-h} - 1``,
diffusers' default ``solver_type``): with ``phi_1 = e^{-h} - 1`` and the divided differences
``D1_k = (D_{i-k} - D_i) / r_k``,

    UniP-p:   x~_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} phi_1 D_i - alpha_{i+1} B(h) sum_k a_k D1_k,
    UniC-p:   x_{i+1}  = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} phi_1 D_i
                         - alpha_{i+1} B(h) (sum_k c_k D1_k + c_p (D(x~_{i+1}) - D_i)),

where ``(a_k)`` solve the order conditions ``sum_k a_k r_k^(j-1) = g_j`` for ``j < p`` and ``(c_k)`` the ``p``
conditions with the node ``r = 1`` added (``g_j = j! phi_{j+1}(-h) h^... / B(h)``: the ``b`` of diffusers'
``multistep_uni_{p,c}_bh_update``; ``a = 1/2`` for p = 2 and ``c = 1/2`` for p = 1, as there). The value
``D(x~_{i+1})`` the corrector uses is the evaluation the next predictor step needs anyway, so UniPC-p costs one
evaluation per step and has order p + 1; the next step starts from the corrected ``x_{i+1}``. The last step is not
corrected (no evaluation follows it) unless the final step to noise level zero (``to_zero``) supplies one: then
its evaluation at ``x~_n`` also corrects ``x_n`` before the step to zero, at no extra cost, and the step to zero is
``(x_n / alpha + D(x~_n)) / 2``. The form ``x_n / alpha + (D(x~_n) - x~_n / alpha) / 2`` (overriding
``_step_to_zero``) is closer on Gaussian data but measured worse on the ring mixture at 15-25 NFE, where the slightly
narrowing default offsets the ring's own error (docs/fast_samplers.md, "Defaults").

Bit for bit the algorithm of diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``, ``solver_type="bh2"``)
given the same times (tests/test_fast_samplers.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import SamplerProperties, SamplingContext
from .dpm_solver import _denoise, _DPMSolverBase, _marginals, multistep_orders
from .fixed_grid import _lincomb

__all__ = ["UniPC", "unipc_coefficients"]

#: with ``lower_order_final="auto"`` (the default) the last steps fall back to lower orders from this many steps on
AUTO_LOWER_ORDER_FINAL = 29


def _order_conditions(rks: torch.Tensor, hh: torch.Tensor, b_h: torch.Tensor, p: int):
    """diffusers' ``R`` (rows ``rks ** (j - 1)``) and ``b`` (``j! phi_{j+1}(hh) / B(h)``) for j = 1..p."""
    h_phi_k = torch.expm1(hh) / hh - 1.0
    factorial = 1.0
    rows, b = [], []
    for j in range(1, p + 1):
        rows.append(rks ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return torch.stack(rows), torch.stack(b)


def unipc_coefficients(process, ts: torch.Tensor, orders: list[int], variant: str = "bh2") -> dict[str, list]:
    """Per-step coefficients of UniPC on the grid ``ts`` (float64 tensors, differentiable in ``ts``).

    Step ``i`` of order ``p = orders[i]``: the predictor ``x~_{i+1} = a_i x_i + sum_j P_ij D_{i-j}`` (j < p) and the
    corrector ``x_{i+1} = a_i x_i + C_i0 D(x~_{i+1}) + sum_j C_i,j+1 D_{i-j}`` (j < p). ``variant``: ``"bh2"``
    (``B(h) = e^{-h} - 1``) or ``"bh1"`` (``B(h) = -h``)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"expected variant 'bh1' or 'bh2', found {variant!r}")
    alpha, sigma, lam = _marginals(process, ts)
    a_list, pred, corr = [], [], []
    for i, p in enumerate(orders):
        h = lam[i + 1] - lam[i]
        hh = -h
        phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh) if variant == "bh2" else hh
        one = torch.ones((), dtype=ts.dtype, device=ts.device)
        rks = torch.stack([(lam[i - k] - lam[i]) / h for k in range(1, p)] + [one])
        big_r, b = _order_conditions(rks, hh, b_h, p)
        if p == 1:
            rho_p = rks[:0]
        elif p == 2:
            rho_p = 0.5 * one.reshape(1)
        else:
            rho_p = torch.linalg.solve(big_r[:-1, :-1], b[:-1])
        rho_c = 0.5 * one.reshape(1) if p == 1 else torch.linalg.solve(big_r, b)
        scale = -alpha[i + 1] * b_h
        # predictor: weights of (D_i, D_{i-1}, ..., D_{i-p+1})
        wp = [-alpha[i + 1] * phi_1] + [scale * rho_p[k] / rks[k] for k in range(p - 1)]
        wp[0] = wp[0] - sum(wp[1:], torch.zeros_like(h))
        # corrector: weights of (D(x~_{i+1}), D_i, D_{i-1}, ..., D_{i-p+1})
        wc = [scale * rho_c[-1], -alpha[i + 1] * phi_1] + [scale * rho_c[k] / rks[k] for k in range(p - 1)]
        wc[1] = wc[1] - sum(wc[2:], torch.zeros_like(h)) - wc[0]
        a_list.append(sigma[i + 1] / sigma[i])
        pred.append(wp)
        corr.append(wc)
    return {"a": a_list, "pred": pred, "corr": corr, "sigma2": sigma**2, "inv_alpha": 1.0 / alpha}


class UniPC(_DPMSolverBase):
    """UniPC (Zhao et al. 2023): multistep predictor (UniP) + corrector (UniC) in data-prediction form, ``bh2``
    variant, one score evaluation per step, order ``order + 1`` (declared: 3, the order-2 predictor's; the
    default order 3 measures 3.7 to 4.6 on Gaussian data).

    Options:
        num_steps (20): steps of the grid (NFE = num_steps + 1 with ``to_zero``).
        order (3): the predictor's order p (1, 2 or 3; the corrector's is p + 1); diffusers' ``solver_order``
            (whose default is 2; 3 measured better here, docs/fast_samplers.md).
        grid ("fitted"), rho (7.0): see :mod:`score_toolkit.samplers.grids`; ``"fitted"`` is the data-free density
            for fourth-order samplers (``fitted_log_snr(process, n, order=4)``).
        lower_order_final ("auto"): the last two steps fall back to orders 1 and 2 (diffusers' ``True``, its
            default); ``"auto"``: on from ``AUTO_LOWER_ORDER_FINAL`` (29) steps, off below (docs/fast_samplers.md,
            "Defaults": at 30 NFE and more the order-3 last steps make every narrow direction too narrow, a mean-NLL
            bias that grows with the dimension; at 15-25 NFE the ring's error needs the order-3 last steps).
        to_zero (True): end with the PF-ODE step to noise level 0 (one more evaluation, which also corrects the last
            step; see the module docstring); off by itself when ``denoise=True`` is passed.
        variant ("bh2"): ``B(h)`` of the update, ``"bh2"`` (``e^{-h} - 1``) or ``"bh1"`` (``-h``).
        denoise, progress: see :class:`~score_toolkit.samplers.base.Sampler`.

    Defaults chosen by measurement: docs/fast_samplers.md, "Defaults".
    """

    name: ClassVar[str] = "unipc"
    description: ClassVar[str] = "UniPC: multistep predictor-corrector exponential integrator of the PF-ODE (Zhao et al. 2023)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=3.0)
    options: ClassVar[dict[str, Any]] = {"num_steps": 20, "order": 3, "grid": "fitted", "rho": 7.0,
                                         "lower_order_final": "auto", "to_zero": True, "variant": "bh2"}
    fitted_order = 4
    lower_order_final_values = ("auto",)

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        if cfg["order"] not in (1, 2, 3) or isinstance(cfg["order"], bool):
            raise ValueError(f"sampler {self.name!r}: expected option order in (1, 2, 3), found {cfg['order']!r}")
        if cfg["variant"] not in ("bh1", "bh2"):
            raise ValueError(f"sampler {self.name!r}: expected option variant 'bh1' or 'bh2', found {cfg['variant']!r}")

    def _run_grid(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return self._integrate(ctx, x, ts, bool(self.config["to_zero"]))

    def _integrate(self, ctx: SamplingContext, x: torch.Tensor, ts: torch.Tensor, final: bool = False) -> torch.Tensor:
        """From the prior at ``ts[0]`` to ``ts[-1] = t_min`` (the last step uncorrected), or with ``final`` on to
        noise level zero (the evaluation at ``t_min`` corrects the last step, then the step to zero)."""
        n = ts.numel() - 1
        lof = self.config["lower_order_final"]
        orders = multistep_orders(n, int(self.config["order"]), n >= AUTO_LOWER_ORDER_FINAL if lof == "auto" else lof)
        if ts.requires_grad:
            co = unipc_coefficients(ctx.process, ts, orders, self.config["variant"])
        else:
            key = (ts.tolist(), orders, self.config["variant"])
            co = self._per_process(ctx.process, "coefficients", key, lambda: _as_floats(
                unipc_coefficients(ctx.process, ts, orders, self.config["variant"])))
        t_score = ts if ts.requires_grad else ts.tolist()
        t_rec = ts.detach().tolist()
        a, pred, corr, sigma2, inv_alpha = co["a"], co["pred"], co["corr"], co["sigma2"], co["inv_alpha"]
        keep = int(self.config["order"]) + 1
        history: list[torch.Tensor] = []  # D_i, D_{i-1}, ... (each at the predicted point)
        x_prev = x
        for i in range(n + (1 if final else 0)):
            history.insert(0, _denoise(x, ctx.score(x, t_score[i]), sigma2[i], inv_alpha[i]))
            del history[keep:]
            x_pred = x
            if i > 0:  # UniC: correct x_i with the evaluation just made there
                x = _lincomb([(a[i - 1], x_prev)] + [(c, history[j]) for j, c in enumerate(corr[i - 1])])
            if i == n:  # the final step to noise level zero, from the corrected point with the evaluation made
                x = self._step_to_zero(x, x_pred, history[0], inv_alpha[n])
                ctx.record(x, 0.0)
                return x
            x_prev = x
            x = _lincomb([(a[i], x)] + [(w, history[j]) for j, w in enumerate(pred[i])])
            ctx.record(x, t_rec[i + 1], step=i + 1)
        return x

    @staticmethod
    def _step_to_zero(x: torch.Tensor, x_pred: torch.Tensor, d: torch.Tensor, inv_alpha: float) -> torch.Tensor:
        """The step to noise level zero from the corrected ``x`` (``x_n``), given the predicted ``x_pred`` (``x~_n``)
        and ``d = D(x~_n)``: ``(x_n / alpha + D(x~_n)) / 2``, to_zero's step with the corrected point. It undoes half
        of the last correction; the alternative ``x_n / alpha + (D(x~_n) - x~_n / alpha) / 2`` is closer on Gaussian
        data but measured worse on the ring at 15-25 NFE (benchmarks/bench_defaults.py overrides this method to
        measure it; docs/fast_samplers.md, "Defaults")."""
        return _lincomb([(0.5 * inv_alpha, x), (0.5, d)])


def _as_floats(co: dict[str, Any]) -> dict[str, Any]:
    return {"a": [float(v) for v in co["a"]], "pred": [[float(v) for v in w] for w in co["pred"]],
            "corr": [[float(v) for v in w] for w in co["corr"]], "sigma2": co["sigma2"].tolist(),
            "inv_alpha": co["inv_alpha"].tolist()}
