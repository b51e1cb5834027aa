"""The twisted diffusion sampler (Wu, Trippe, Naesseth, Blei & Cunningham 2023, "Practical and asymptotically exact
conditional sampling in diffusion models", Algorithm 1): sequential Monte Carlo that turns an approximate
conditional score transform (DPS, PiGDM, replacement) into a sampler that is exact as the number of particles grows.

Every output sample is one independent SMC run of ``K = num_particles`` particles (its *group*). On the grid
``1 = t_0 > ... > t_N = t_min`` each particle moves with the ancestral step (:mod:`.ancestral`) of the transform's
score ``s~`` (the proposal ``q``), while the unconditional model's step uses the prior score ``s``:

    p(x_s | x_t)    = N(m_p, v),  m_p = (x_t + sigma_{t|s}^2 s(x_t, t)) / alpha_{t|s}
    q(x_s | x_t, y) = N(m_q, v),  m_q = (x_t + sigma_{t|s}^2 s~(x_t, t)) / alpha_{t|s},  v = sigma_{t|s}^2 sigma_s^2 / sigma_t^2

and carries the importance weight (the twist ``p~_t(y | x_t)`` is the transform's own likelihood approximation,
:meth:`~score_toolkit.conditioning.InverseProblemScore.twist`)

    w_{t_0} = p~_{t_0}(y | x_{t_0}),
    w_s     = w_t * p~_s(y | x_s) p(x_s | x_t) / (p~_t(y | x_t) q(x_s | x_t, y)),

with ``p~_{t_min}`` replaced at the last step by the limit likelihood ``log N(y; A x / alpha, sigma_y^2 I +
(sigma / alpha)^2 A A^T)`` (exact as ``t_min -> 0``, :meth:`~score_toolkit.conditioning.InverseProblemScore.limit_log_likelihood`).
Whenever a group's effective sample size ``(sum w)^2 / sum w^2`` falls below ``ess_threshold * K`` its particles are
resampled (systematic resampling) and their weights reset. At the end one particle per group is drawn with the final
weights. The weighted particles target ``p_model(x_{t_min}) p(y | x_{t_min})`` for every proposal and every twist, so
the transform's bias disappears as ``K -> infinity`` (the discretisation bias of the unconditional ancestral sampler
at ``num_steps`` remains: the floor is the exact conditional score sampled with ``ancestral`` at the same grid).

Cost per step: one evaluation of the transform's twist on all ``B K`` particles (one score evaluation and, for DPS
and PiGDM, one vector-Jacobian product through the score network): ``num_steps`` batched calls, ``K`` times the
work of the transform with ``ancestral``.
"""

from __future__ import annotations

import torch

from .._utils import check_tensor, rand, randn
from ..processes import TIME_GRIDS
from .ancestral import forward_transitions
from .base import NonFiniteError, Sampler, SamplerProperties, SamplingContext, check_choice, check_int, time_dtype

__all__ = ["TwistedDiffusionSampler", "systematic_resample", "normalised_weights", "draw_index"]


def systematic_resample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices (G, K) of systematic resampling of each row of normalised ``weights`` (G, K), with one uniform
    ``u`` (G,) per row: particle ``j`` is the one whose cumulative weight first exceeds ``(u + j) / K``."""
    k = weights.shape[1]
    return _inverse_cdf(weights, (u[:, None] + torch.arange(k, dtype=weights.dtype, device=weights.device)) / k)


def draw_index(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of normalised ``weights`` (G, K) drawn with those probabilities, from uniforms ``u`` (G,)."""
    return _inverse_cdf(weights, u[:, None])[:, 0]


def _inverse_cdf(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """For each row of normalised ``weights`` (G, K), the index whose cumulative weight first exceeds each of the
    row's ``points`` (G, P) in [0, 1)."""
    cum = weights.cumsum(1)
    cum[:, -1] = 1.0  # rounding: the last cumulative weight must cover every point
    return torch.searchsorted(cum, points.contiguous()).clamp_(max=weights.shape[1] - 1)


class TwistedDiffusionSampler(Sampler):
    """Twisted diffusion sampler: SMC with a conditional score transform as proposal and twist.

    Options:
        num_steps (200): steps of the grid ``process.time_grid(num_steps, grid)`` (= NFE, batched over particles).
        grid ("uniform"): time grid kind.
        num_particles (16): particles per output sample (``K >= 2``).
        ess_threshold (0.5): resample a group when its effective sample size is below ``ess_threshold * K``
            (0: never, plain sequential importance sampling; 1: whenever the weights are not all equal).
        twist ("transform"): take the proposal and the twist from the score function, which must have a
            ``twist(x, t)`` method returning (prior score, conditional score, log p~_t(y | x_t)) and a
            ``limit_log_likelihood(x, t)`` method (:class:`~score_toolkit.conditioning.DPS`,
            :class:`~score_toolkit.conditioning.PiGDM`, :class:`~score_toolkit.conditioning.Replacement`,
            :class:`~score_toolkit.conditioning.ObservationLikelihood`); ``"none"``: a plain score function and
            nothing observed (all weights equal: ``K`` ancestral chains, one returned).

    ``x_init`` (or the prior draw from ``shape``) gives particle 0 of every group; the other ``K - 1`` start from
    the process's prior. With one generator per sample, a group draws all its noise from its sample's generator,
    so a sample does not depend on its batch. The trajectory follows, at every step, each group's heaviest particle
    (the last entry is the returned draw). ``SamplerOutput.info`` holds ``ess`` (per step, the mean over groups of the
    effective sample size before resampling, in particles), ``final_ess`` (the mean ESS of the final weights),
    ``min_final_ess``, ``resampling_count`` (mean resampling events per group), ``num_particles`` and
    ``evaluations_per_sample`` (``num_particles`` times the batched evaluations). With
    ``denoise=True`` the returned draw gets Tweedie's step with the transform's score (one more batched evaluation,
    on B samples).
    """

    name = "tds"
    description = "twisted diffusion sampler (Wu et al. 2023): SMC with a conditional transform as proposal and twist"
    properties = SamplerProperties(stochastic=True, order=1.0)
    options = {"num_steps": 200, "grid": "uniform", "num_particles": 16, "ess_threshold": 0.5, "twist": "transform"}
    # the generic suite runs the SMC machinery with nothing observed; the conditional accuracy (exact posteriors,
    # DPS / PiGDM / replacement twists) is tested in tests/test_tds.py and tests/test_conformance.py
    conformance = {"sampler_options": {"num_steps": 20, "num_particles": 3, "twist": "none"},
                   "accuracy_options": {"num_steps": 200, "num_particles": 2}}

    def _validate_options(self, cfg):
        super()._validate_options(cfg)
        check_int(cfg, "num_steps", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        k = cfg["num_particles"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"sampler {self.name!r}: expected option num_particles to be an int >= 2 (one particle "
                             f"is the transform's own sampler without correction: use 'ancestral'), found {k!r}")
        thr = cfg["ess_threshold"]
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
            raise ValueError(f"sampler {self.name!r}: expected option ess_threshold to be a number in [0, 1], found {thr!r}")
        check_choice(cfg, "twist", self.name, ("transform", "none"))

    @property
    def nfe(self) -> int:
        """Batched score evaluations of one run: ``num_steps`` (+1 with ``denoise``); each evaluates all particles, so
        the evaluations per output sample are ``num_particles * nfe`` (``info["evaluations_per_sample"]``)."""
        return self.config["num_steps"] + self._final_steps_nfe()

    def _twisted(self, ctx: SamplingContext):
        """The evaluation ``(x, t) -> (prior score, proposal score, log twist)``, counted and checked."""
        fn = ctx.score_fn
        if self.config["twist"] == "none":
            def plain(x, t):
                s = ctx.score(x, t)
                return s, s, torch.zeros(x.shape[0], dtype=time_dtype(x), device=x.device)
            return plain, None
        missing = [m for m in ("twist", "limit_log_likelihood") if not callable(getattr(fn, m, None))]
        if missing:
            raise ValueError(
                f"sampler {self.name!r}: expected a conditional score transform with a likelihood term (methods twist(x, t) "
                f"and limit_log_likelihood(x, t): DPS, PiGDM, Replacement or ObservationLikelihood from "
                f"score_toolkit.conditioning), found {fn!r} without {' and '.join(missing)}; for unconditional sampling "
                f"pass twist='none'")

        def times(x, t):
            return ctx.process.clamp_t(torch.full((x.shape[0],), float(t), dtype=time_dtype(x), device=x.device))

        def twisted(x, t):
            out = fn.twist(x, times(x, t))
            ctx.nfe += 1
            parts = tuple(out)
            if len(parts) != 3:
                raise ValueError(f"sampler {self.name!r}: expected twist(x, t) to return (prior score, score, log "
                                 f"likelihood), found {len(parts)} values")
            prior, score, ll = parts
            for what, v in (("prior score", prior), ("score", score)):
                if not isinstance(v, torch.Tensor) or v.shape != x.shape:
                    raise ValueError(f"sampler {self.name!r}: expected twist(x, t)'s {what} of shape {tuple(x.shape)}, "
                                     f"found {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            if not isinstance(ll, torch.Tensor) or ll.shape != (x.shape[0],):
                raise ValueError(f"sampler {self.name!r}: expected twist(x, t)'s log likelihood of shape ({x.shape[0]},), "
                                 f"found {tuple(ll.shape) if isinstance(ll, torch.Tensor) else type(ll).__name__}")
            return prior.to(x.dtype), score.to(x.dtype), ll.to(time_dtype(x))

        def limit(x, t):
            ll = fn.limit_log_likelihood(x, times(x, t))
            check_tensor(ll, "limit_log_likelihood(x, t)")
            if ll.shape != (x.shape[0],):
                raise ValueError(f"sampler {self.name!r}: expected limit_log_likelihood(x, t) of shape ({x.shape[0]},), "
                                 f"found {tuple(ll.shape)}")
            return ll.to(time_dtype(x))

        return twisted, limit

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        cfg, process = self.config, ctx.process
        evaluate, limit = self._twisted(ctx)
        b, k, shape = x.shape[0], cfg["num_particles"], tuple(x.shape[1:])
        n = b * k
        wdtype = time_dtype(x)

        def noise(*tail):  # (B, *tail) from the sample's generator(s)
            return randn((b, *tail), generator=ctx.generator, device=x.device, dtype=x.dtype)

        def uniform():
            return rand((b,), generator=ctx.generator, device=x.device, dtype=wdtype)

        others = process.prior_sample((b, k - 1, *shape), generator=ctx.generator, device=x.device, dtype=x.dtype)
        xp = torch.cat([x[:, None], others], 1).reshape(n, *shape)
        ts = process.time_grid(cfg["num_steps"], cfg["grid"]).tolist()
        coefs = forward_transitions(process, ts)
        threshold = float(cfg["ess_threshold"]) * k
        flat = (torch.arange(b, device=x.device) * k)[:, None]
        ess_history, final_ess = [], None
        resamples = torch.zeros(b, dtype=torch.long, device=x.device)

        prior, score, ll = evaluate(xp, ts[0])
        logw = ll.clone()
        for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            logw_g = logw.reshape(b, k)
            weights = self._normalised(logw_g, t_cur, i)
            ess = 1.0 / weights.pow(2).sum(1)
            ess_history.append(float(ess.mean()))
            u = uniform()  # drawn at every step, so a group's random stream does not depend on the other groups
            low = ess < threshold
            if bool(low.any()):
                idx = torch.where(low[:, None], systematic_resample(weights, u),
                                  torch.arange(k, device=x.device).expand(b, k))
                take = (flat + idx).reshape(-1)
                xp, prior, score, ll = xp[take], prior[take], score[take], ll[take]
                logw = torch.where(low[:, None], torch.zeros_like(logw_g), logw_g).reshape(-1)
                resamples += low.long()
            # propose with the transform's step; weight by the prior's step over it
            _, s_t, _, s_s, a_ts, var_ts = coefs[i]
            std = (var_ts * s_s**2 / s_t**2) ** 0.5
            z = noise(k, *shape).reshape(n, *shape)
            shift = (var_ts / a_ts) * (score - prior)  # m_q - m_p
            xp = (xp + var_ts * score) / a_ts + std * z
            log_ratio = -((z * shift).reshape(n, -1).sum(1) / std + shift.pow(2).reshape(n, -1).sum(1) / (2 * std**2))
            last = i + 2 == len(ts)
            if not last:
                prior, score, ll_next = evaluate(xp, t_next)
            else:
                ll_next = limit(xp, t_next) if limit is not None else torch.zeros_like(ll)
            logw = logw + ll_next - ll + log_ratio.to(wdtype)
            ll = ll_next
            if not last:
                heaviest = logw.reshape(b, k).argmax(1)
                ctx.record(xp[flat[:, 0] + heaviest], t_next, step=i + 1)
        weights = self._normalised(logw.reshape(b, k), ts[-1], len(ts) - 1)
        final_ess = 1.0 / weights.pow(2).sum(1)
        pick = draw_index(weights, uniform())  # one particle per group, drawn with its final weights
        out = xp[flat[:, 0] + pick]
        ctx.record(out, ts[-1], step=len(ts) - 1)
        if not bool(torch.isfinite(xp).all()):  # the heaviest particle alone is checked at each step
            raise NonFiniteError(f"sampler {self.name!r}: a particle became NaN or infinite by t = {ts[-1]:.6g}; check "
                                 "the score function and its twist, or use more steps")
        ctx.info.update({"num_particles": k, "ess": ess_history, "final_ess": float(final_ess.mean()),
                         "min_final_ess": float(final_ess.min()),
                         "resampling_count": resamples.sum().item() / b,  # no float64 on the device (MPS has none)
                         "evaluations_per_sample": k * ctx.nfe})
        return out

    def _normalised(self, logw: torch.Tensor, t: float, step: int) -> torch.Tensor:
        return normalised_weights(logw, self.name, f"at step {step} (t = {t:.6g}); check the score function and its "
                                  "twist, or use more particles or steps")


def normalised_weights(logw: torch.Tensor, sampler: str, where: str) -> torch.Tensor:
    """Each group's log-weights (G, K) as normalised weights; a :class:`NonFiniteError` naming ``sampler`` and
    ``where`` when a group has no finite weight or a NaN."""
    top = logw.max(1, keepdim=True).values
    bad = ~torch.isfinite(top[:, 0]) | torch.isnan(logw).any(1)
    if bool(bad.any()):
        raise NonFiniteError(f"sampler {sampler!r}: the particle weights of {int(bad.sum())} of {logw.shape[0]} "
                             f"samples became NaN or all zero {where}")
    w = (logw - top).exp()
    return w / w.sum(1, keepdim=True)
