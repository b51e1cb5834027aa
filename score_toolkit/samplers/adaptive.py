"""Adaptive-step samplers with per-sample error control: every sample has its own time and step size.

* :class:`AdaptiveSDESampler` (``adaptive_sde``): Jolicoeur-Martineau et al. 2021, "Gotta go fast when
  generating data with score-based models", Algorithm 1: an Euler-Maruyama step and an improved-Euler
  (stochastic Heun) step of the reverse SDE share one noise draw; their difference, scaled by
  ``delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|))``, is the error estimate; an accepted step keeps the
  improved-Euler value (extrapolation), and ``h <- min(t - t_min, theta h E^{-r})``.
* :class:`AdaptiveODESampler` (``adaptive_ode``): an embedded explicit Runge-Kutta pair (Bogacki-Shampine
  3(2), or Dormand-Prince 5(4)) on the probability-flow ODE in the log-SNR ``lambda = ln(alpha / sigma)``
  with the scaled state ``x~ = x / alpha``: ``dx~ / dlambda = D - x~`` (``D``: Tweedie's denoiser; Karras et al.
  2022 eq. 4 in ``sigma~ = e^{-lambda}``), whose linear part has rate at most 1 (not stiff) and whose time
  variable stays inside the process's range.

Both run a whole batch in lockstep iterations, but each sample accepts, rejects and sizes its steps from
its own error (the norm is taken over that sample's features only), and the score is evaluated only on the
samples still running, each at its own time. So a sample's result does not depend on its batch (with a list
of generators for the noise). Unlike a batch-shared solver (torchdiffeq, k-diffusion's adaptive DPM-Solver),
an easy sample does not pay for a hard one, and a hard one is not under-resolved because of easy ones.

``nfe`` counts batched score calls (``max_nfe`` caps them: :class:`~score_toolkit.samplers.base.NFEBudgetError`
beyond it); the per-sample evaluation counts are in ``SamplerOutput.info`` (``nfe_per_sample_mean`` and
``nfe_per_sample_max``, ``accepted_steps_mean``, ``rejected_steps_mean``, ``iterations``).

Why one module of this length: the two samplers share one piece of machinery, the per-sample step control
(lockstep iterations over the running samples, per-sample accept/reject, the NFE budget, the statistics),
which is most of the module; and their entry points in pyproject.toml name this module.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._utils import append_dims, randn
from .base import (
    NonFiniteError,
    Sampler,
    SamplerProperties,
    SamplingContext,
    check_choice,
    check_float,
    check_int,
    check_max_nfe,
    time_dtype,
)
from .grids import check_to_zero, step_to_zero

__all__ = ["AdaptiveSDESampler", "AdaptiveODESampler", "TABLEAUS"]


def _noise_rows(ctx: SamplingContext, like: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Standard normals for the rows ``idx`` of the batch: from their own generators when ``ctx.generator`` is a
    list (so a sample's noise never depends on which other samples are still running)."""
    gen = ctx.generator
    if isinstance(gen, (list, tuple)):
        gen = [gen[i] for i in idx.tolist()]
    return randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt()


_EPS64 = torch.finfo(torch.float64).eps


class _BrownianMemory:
    """Per-sample Brownian increments with rejection sampling with memory (Rackauckas & Nie 2017, "Adaptive
    methods for stochastic differential equations via natural embeddings and rejection sampling with memory",
    RSwM1).

    A rejected step's increment is not thrown away: it is pushed back as a known future piece of the path, and a
    shorter retry takes its first part from the Brownian bridge (``W' ~ N((h'/h) W, h' (h - h') / h)``, the rest
    staying on the stack). The accepted increments then always form one Brownian path, whatever the acceptance
    rule looked at (redrawing the noise on rejection, as Jolicoeur-Martineau et al.'s code does, keeps the
    increments that passed the test: a biased law). Each sample has its own stack (a padded tensor) and draws
    from its own generator."""

    def __init__(self, ctx: SamplingContext, like: torch.Tensor):
        self.ctx = ctx
        b = like.shape[0]
        self.shape = like.shape[1:]
        self.dt = torch.zeros(b, 4, dtype=time_dtype(like), device=like.device)  # float32 on MPS (no float64)
        self.dw = torch.zeros(b, 4, *self.shape, dtype=like.dtype, device=like.device)
        self.depth = torch.zeros(b, dtype=torch.long, device=like.device)

    def _normals(self, idx: torch.Tensor) -> torch.Tensor:
        return _noise_rows(self.ctx, self.dw.new_empty((idx.numel(), *self.shape)), idx)

    def take(self, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The increments W(t + h) - W(t) of the samples ``idx`` over their next steps ``h`` (float64)."""
        nd = len(self.shape) + 1
        out = self.dw.new_zeros((idx.numel(), *self.shape))
        need = h.clone()
        # what is left of a step after subtracting its pieces is round-off below this (1e-13 relative in float64,
        # as many float32 epsilons in float32)
        tiny = (1e-13 * torch.finfo(need.dtype).eps / _EPS64) * need.abs().clamp_min(1e-300)
        while True:
            pos = torch.nonzero((need > tiny) & (self.depth[idx] > 0)).flatten()
            if pos.numel() == 0:
                break
            rows = idx[pos]
            top = self.depth[rows] - 1
            t_dt, t_dw = self.dt[rows, top], self.dw[rows, top]
            whole = t_dt <= need[pos] + tiny[pos]
            if bool(whole.any()):
                p, r = pos[whole], rows[whole]
                out[p] += t_dw[whole]
                need[p] -= t_dt[whole]
                self.depth[r] -= 1
            part = ~whole
            if bool(part.any()):
                p, r, k = pos[part], rows[part], top[part]
                dt_all, dw_all, want = t_dt[part], t_dw[part], need[p]
                frac = want / dt_all
                std = torch.sqrt(want * (dt_all - want) / dt_all)
                piece = (append_dims(frac.to(out.dtype), nd) * dw_all
                         + append_dims(std.to(out.dtype), nd) * self._normals(r))
                out[p] += piece
                need[p] = 0.0
                self.dt[r, k] = dt_all - want
                self.dw[r, k] = dw_all - piece
        fresh = torch.nonzero(need > tiny).flatten()
        if fresh.numel():
            out[fresh] += append_dims(need[fresh].sqrt().to(out.dtype), nd) * self._normals(idx[fresh])
        return out

    def give_back(self, idx: torch.Tensor, h: torch.Tensor, dw: torch.Tensor) -> None:
        """Push the increments of rejected steps back as the next known piece of each sample's path."""
        if idx.numel() == 0:
            return
        if int(self.depth[idx].max()) >= self.dt.shape[1]:
            grow = self.dt.shape[1]
            self.dt = torch.cat([self.dt, self.dt.new_zeros(self.dt.shape[0], grow)], 1)
            self.dw = torch.cat([self.dw, self.dw.new_zeros(self.dw.shape[0], grow, *self.shape)], 1)
        k = self.depth[idx]
        self.dt[idx, k] = h
        self.dw[idx, k] = dw
        self.depth[idx] += 1


class _AdaptiveBase(Sampler):
    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        check_to_zero(cfg, self.name)
        check_int(cfg, "max_iterations", self.name)
        check_max_nfe(cfg, self.name)

    def _num_progress_steps(self) -> int | None:
        return None

    def _finish(self, ctx: SamplingContext, x: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
        ctx.info = stats  # read by the host (see docs/fast_samplers.md)
        if self.config["to_zero"]:
            x = step_to_zero(ctx, x, ctx.process.t_min)
        return x

    def _check_finite(self, err: torch.Tensor, it: int) -> None:
        if not bool(torch.isfinite(err).all()):
            bad = int((~torch.isfinite(err)).sum())
            raise NonFiniteError(
                f"sampler {self.name!r}: the error estimate became NaN or infinite at step {it} in {bad} sample(s): "
                "the score returned non-finite values; check the score function"
            )

    def _too_many(self, it: int, active: int, t_min_left: float) -> None:
        if it >= self.config["max_iterations"]:
            raise RuntimeError(
                f"sampler {self.name!r}: {active} sample(s) still running after max_iterations="
                f"{self.config['max_iterations']} (smallest progress left {t_min_left:.3g}); loosen the tolerances "
                "or raise max_iterations"
            )


# ---------------------------------------------------------------------------------------------- SDE
class AdaptiveSDESampler(_AdaptiveBase):
    """Adaptive reverse-SDE solver of Jolicoeur-Martineau et al. 2021 (Algorithm 1), with per-sample steps
    and rejection sampling with memory.

    For each running sample at time ``t`` with step ``h`` and Brownian increment ``dW`` over the step (reverse
    drift ``F(x, t) = g(t)^2 s(x, t) - f(t) x``):

        x'  = x + h F(x, t) + g(t) dW                                     (Euler-Maruyama)
        x~  = x' + h F(x', t - h) + g(t - h) dW
        x'' = (x + x~) / 2                                                (improved Euler)
        delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|)),  E = ||(x' - x'') / delta||_2 / sqrt(n)
        accept if E <= 1: x <- x'', t <- t - h, x'_prev <- x';   h <- min(t - t_min, theta h E^{-r})

    Options:
        eps_rel (0.05), eps_abs (0.0078): relative and absolute tolerances (the paper's defaults, for data
            scaled to about [-1, 1]; tighten both for accurate densities, e.g. 0.01 and 0.001).
        h_init (0.01): first step in t. r (0.9): exponent of the step rule. theta (0.9): safety factor.
        noise_on_reject ("bridge"): what a retry after a rejection uses as noise: ``"bridge"`` keeps the
            rejected increment and refines it with Brownian bridges (rejection sampling with memory, Rackauckas
            & Nie 2017: the accepted increments form one Brownian path, so the law is not biased);
            ``"redraw"`` draws fresh noise, as the paper's code does: the acceptance test then selects the
            noise (``delta`` grows with ``|x'|``), which biases the law, more so as the tolerances tighten
            (measured in the tests; kept to reproduce the paper).
        max_iterations (100000): guard against a never-ending run.
        max_nfe (None): cap on the batched score calls of the run (final step included); exceeding it raises
            :class:`~score_toolkit.samplers.base.NFEBudgetError`.
        to_zero, denoise, progress: see :class:`~score_toolkit.samplers.grids.GridSampler`.

    Two score evaluations per attempted step. Declared weak order 2: the accepted improved-Euler step is
    Heun's scheme for additive noise (the tests measure its weak order with fixed steps on Gaussian data).
    """

    name: ClassVar[str] = "adaptive_sde"
    description: ClassVar[str] = "Adaptive reverse-SDE solver with per-sample error control (Jolicoeur-Martineau et al. 2021)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=True, order=2.0, adaptive=True,
                                                                fixed_grid=False, per_sample=True)
    options: ClassVar[dict[str, Any]] = {"eps_rel": 0.05, "eps_abs": 0.0078, "h_init": 0.01, "r": 0.9, "theta": 0.9,
                                         "noise_on_reject": "bridge", "max_iterations": 100_000, "max_nfe": None,
                                         "to_zero": False}

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        for key in ("eps_rel", "eps_abs", "h_init", "r", "theta"):
            check_float(cfg, key, self.name)
        if cfg["theta"] > 1:
            raise ValueError(f"sampler {self.name!r}: expected option theta in (0, 1], found {cfg['theta']!r}")
        check_choice(cfg, "noise_on_reject", self.name, ("bridge", "redraw"))

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        process = ctx.process
        b, nd = x.shape[0], x.ndim
        t_min = process.t_min
        tdt = time_dtype(x)  # per-sample times and steps on the state's device: float32 on MPS (no float64)
        t = torch.full((b,), process.t_max, dtype=tdt, device=x.device)
        h = torch.full((b,), min(cfg["h_init"], process.t_max - t_min), dtype=tdt, device=x.device)
        x_prev = x.clone()
        memory = _BrownianMemory(ctx, x) if cfg["noise_on_reject"] == "bridge" else None
        nfe = torch.zeros(b, dtype=torch.long)
        accepted = torch.zeros(b, dtype=torch.long)
        rejected = torch.zeros(b, dtype=torch.long)
        eps_rel, eps_abs, r, theta = cfg["eps_rel"], cfg["eps_abs"], cfg["r"], cfg["theta"]

        def drift_and_g(xx, tt):
            f = append_dims(process.drift_coef(tt).to(xx.dtype), nd)
            g2 = process.diffusion_squared(tt).clamp_min(0).to(xx.dtype)
            s = ctx.score(xx, tt)
            return append_dims(g2, nd) * s - f * xx, append_dims(g2.sqrt(), nd)

        it = 0
        while True:
            idx = torch.nonzero(t > t_min * (1 + 1e-12) + 1e-15).flatten()
            if idx.numel() == 0:
                break
            self._too_many(it, idx.numel(), float((t[idx] - t_min).max()))
            it += 1
            xa, ta, ha = x[idx], t[idx], h[idx]
            tb = (ta - ha).clamp_min(t_min)
            ha = ta - tb
            if memory is not None:
                dw = memory.take(idx, ha)
            else:
                dw = append_dims(ha.sqrt().to(x.dtype), nd) * _noise_rows(ctx, xa, idx)
            hx = append_dims(ha.to(x.dtype), nd)
            f1, g1 = drift_and_g(xa, ta)
            x1 = xa + hx * f1 + g1 * dw  # Euler-Maruyama
            f2, g2 = drift_and_g(x1, tb)
            x2 = 0.5 * (xa + x1 + hx * f2 + g2 * dw)  # improved Euler
            nfe[idx.cpu()] += 2
            delta = torch.maximum(torch.full_like(x1, eps_abs), eps_rel * torch.maximum(x1.abs(), x_prev[idx].abs()))
            err = _rms((x1 - x2) / delta).to(tdt)
            self._check_finite(err, it)
            ok = err <= 1.0
            acc, rej = idx[ok], idx[~ok]
            if acc.numel():
                x = x.index_copy(0, acc, x2[ok])
                x_prev = x_prev.index_copy(0, acc, x1[ok])
                t = t.index_copy(0, acc, tb[ok])
            if memory is not None:
                memory.give_back(rej, ha[~ok], dw[~ok])
            accepted[acc.cpu()] += 1
            rejected[rej.cpu()] += 1
            h_new = theta * ha * err.clamp_min(1e-10).pow(-r)
            h = h.index_copy(0, idx, torch.minimum(h_new, (t[idx] - t_min).clamp_min(0)))
            ctx.record(x, float(t.max()), step=it)
        return self._finish(ctx, x, _stats(nfe, accepted, rejected, it))


def _stats(nfe, accepted, rejected, iterations) -> dict[str, Any]:
    return {"nfe_per_sample_mean": float(nfe.double().mean()), "nfe_per_sample_max": int(nfe.max()),
            "accepted_steps_mean": float(accepted.double().mean()), "rejected_steps_mean": float(rejected.double().mean()),
            "iterations": iterations}


# ---------------------------------------------------------------------------------------------- ODE
class _Tableau:
    """An explicit FSAL Runge-Kutta pair: the last stage sits at ``c = 1`` on the propagated solution
    (``a[-1]`` are its weights ``b``), so an accepted step's last evaluation starts the next step."""

    def __init__(self, c, a, b_err, order):
        if c[-1] != 1.0 or len(a[-1]) != len(c) - 1:
            raise ValueError("expected an FSAL tableau")
        self.c, self.a, self.order = c, a, order
        b = [*a[-1], 0.0]
        self.e = [bi - ei for bi, ei in zip(b, b_err)]  # b - b_hat: the embedded error estimate


TABLEAUS: dict[str, _Tableau] = {
    # Bogacki & Shampine 1989: third order, embedded second order, FSAL (3 evaluations per step)
    "bs32": _Tableau(
        c=[0.0, 0.5, 0.75, 1.0],
        a=[[], [0.5], [0.0, 0.75], [2 / 9, 1 / 3, 4 / 9]],
        b_err=[7 / 24, 1 / 4, 1 / 3, 1 / 8],
        order=3,
    ),
    # Dormand & Prince 1980: fifth order, embedded fourth order, FSAL (6 evaluations per step)
    "dopri5": _Tableau(
        c=[0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
        a=[[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
           [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
           [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
           [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
        b_err=[5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40],
        order=5,
    ),
}


class AdaptiveODESampler(_AdaptiveBase):
    """Adaptive probability-flow ODE solver with per-sample error control: an embedded Runge-Kutta pair on
    ``dx~ / dlambda = D(x~, lambda) - x~`` (``x~ = x / alpha``, ``lambda = ln(alpha / sigma)`` from
    ``lambda(1)`` up to ``lambda(t_min)``).

    Each sample keeps its own ``lambda`` and step ``h`` (in lambda units). With the error estimate ``err``
    of the embedded pair, ``E = ||err / (atol + rtol max(|x~|, |x~_new|))||_2 / sqrt(n)`` per sample; a step is
    accepted when ``E <= 1`` and the next step is ``h * min(5, max(0.2, 0.9 E^{-1/order}))`` (Hairer, Norsett &
    Wanner, "Solving ODEs I", II.4), with the higher-order solution propagated (local extrapolation) and the
    last stage reused (FSAL).

    Options:
        method ("bs32"): ``"bs32"`` (Bogacki-Shampine 3(2), 3 evaluations per step) or ``"dopri5"``
            (Dormand-Prince 5(4), 6 per step).
        rtol (1e-3), atol (1e-4): tolerances on the scaled state ``x~``.
        h_init (0.2): first step in lambda (the span is about 8 to 10 for the usual processes).
        max_iterations (100000): guard against a never-ending run.
        max_nfe (None): cap on the batched score calls of the run (final step included); exceeding it raises
            :class:`~score_toolkit.samplers.base.NFEBudgetError`.
        to_zero, denoise, progress: see :class:`~score_toolkit.samplers.grids.GridSampler`.

    Declared order: that of the propagated solution (3 for bs32, 5 for dopri5); the tests measure the error
    against the number of evaluations as the tolerance is tightened.
    """

    name: ClassVar[str] = "adaptive_ode"
    description: ClassVar[str] = "Adaptive PF-ODE solver in log-SNR with per-sample error control (embedded Runge-Kutta pair)"
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=False, order=3.0, adaptive=True,
                                                                fixed_grid=False, per_sample=True)
    options: ClassVar[dict[str, Any]] = {"method": "bs32", "rtol": 1e-3, "atol": 1e-4, "h_init": 0.2,
                                         "max_iterations": 100_000, "max_nfe": None, "to_zero": False}

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        from dataclasses import replace

        super()._validate_options(cfg)
        check_choice(cfg, "method", self.name, tuple(TABLEAUS))
        for key in ("rtol", "atol", "h_init"):
            check_float(cfg, key, self.name)
        order = float(TABLEAUS[cfg["method"]].order)
        if order != type(self).properties.order:
            self.properties = replace(type(self).properties, order=order)

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        tab = TABLEAUS[cfg["method"]]
        process = ctx.process
        b, nd = x.shape[0], x.ndim
        tdt = time_dtype(x)  # per-sample times and steps on the state's device: float32 on MPS (no float64)
        ends = process.log_snr(torch.tensor([process.t_max, process.t_min], dtype=torch.float64))
        lam_start, lam_end = float(ends[0]), float(ends[1])
        span = lam_end - lam_start
        alpha0 = float(process.marginal(torch.tensor(process.t_max, dtype=torch.float64))[0])
        lam = torch.full((b,), lam_start, dtype=tdt, device=x.device)
        h = torch.full((b,), min(cfg["h_init"], span), dtype=tdt, device=x.device)
        xt = x / alpha0
        k_first: torch.Tensor | None = None  # FSAL stage of every sample (valid where have_k)
        have_k = torch.zeros(b, dtype=torch.bool, device=x.device)
        nfe = torch.zeros(b, dtype=torch.long)
        accepted = torch.zeros(b, dtype=torch.long)
        rejected = torch.zeros(b, dtype=torch.long)
        rtol, atol = cfg["rtol"], cfg["atol"]
        expo = -1.0 / tab.order
        t_end_float = process.t_min

        def rhs(yy, ll):
            t = process.t_from_log_snr(ll).clamp(process.t_min, process.t_max)
            t = torch.where(ll >= lam_end, torch.full_like(t, process.t_min), t)
            alpha, sigma = process.marginal(t)
            a = append_dims(alpha.to(yy.dtype), nd)
            s = ctx.score(yy * a, t)
            # D - x~ = sigma^2 s / alpha
            return append_dims((sigma**2 / alpha).to(yy.dtype), nd) * s

        it = 0
        x_rec = x
        remaining = lambda: (lam_end - lam).clamp_min(0)  # noqa: E731
        while True:
            idx = torch.nonzero(remaining() > 1e-12 * max(1.0, abs(lam_end))).flatten()
            if idx.numel() == 0:
                break
            self._too_many(it, idx.numel(), float(remaining()[idx].max()))
            it += 1
            ya, la = xt[idx], lam[idx]
            ha = torch.minimum(h[idx], remaining()[idx])
            hx = append_dims(ha.to(x.dtype), nd)
            ks = []
            if k_first is not None and bool(have_k[idx].all()):  # always true after the first iteration
                ks.append(k_first[idx])
            else:
                ks.append(rhs(ya, la))
                nfe[idx.cpu()] += 1
            for j in range(1, len(tab.c)):
                yj = ya
                for m, a_jm in enumerate(tab.a[j]):
                    if a_jm != 0.0:
                        yj = yj + (a_jm * hx) * ks[m]
                if j == len(tab.c) - 1:
                    y_new = yj  # the FSAL stage is evaluated at the propagated solution
                ks.append(rhs(yj, la + tab.c[j] * ha))
                nfe[idx.cpu()] += 1
            err = hx * sum(ej * kj for ej, kj in zip(tab.e, ks) if ej != 0.0)
            scale = atol + rtol * torch.maximum(ya.abs(), y_new.abs())
            e = _rms(err / scale).to(tdt)
            self._check_finite(e, it)
            ok = e <= 1.0
            acc = idx[ok]
            # first stage of the next attempt: a rejected sample keeps its own (same point), an accepted one
            # takes the last stage, evaluated at its new point (FSAL)
            k_first = (torch.zeros_like(xt) if k_first is None else k_first).index_copy(0, idx, ks[0])
            if acc.numel():
                xt = xt.index_copy(0, acc, y_new[ok])
                lam = lam.index_copy(0, acc, la[ok] + ha[ok])
                k_first = k_first.index_copy(0, acc, ks[-1][ok])
            have_k[idx] = True
            accepted[acc.cpu()] += 1
            rejected[idx[~ok].cpu()] += 1
            fac = (0.9 * e.clamp_min(1e-10).pow(expo)).clamp(0.2, 5.0)
            fac = torch.where(ok, fac, fac.clamp(max=1.0))
            h = h.index_copy(0, idx, ha * fac)
            done_t = torch.where(lam >= lam_end, torch.full_like(lam, t_end_float), process.t_from_log_snr(lam))
            x_rec = xt * append_dims(process.marginal(done_t)[0].to(x.dtype), nd)
            ctx.record(x_rec, float(done_t.max()), step=it)
        return self._finish(ctx, x_rec, _stats(nfe, accepted, rejected, it))
