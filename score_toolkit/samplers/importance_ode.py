"""Importance-corrected probability flow: an exact conditional sampler whose transport is deterministic.

An approximate conditional score transform ``s~`` (DPS, PiGDM, replacement) defines a probability-flow ODE
``dx/dt = f(t) x - g(t)^2 s~(x, t) / 2`` whose flow map takes the prior ``p_1`` to some law ``q`` at ``t_min`` that is
not the posterior: no deterministic map of the prior through a biased flow has the right law. Its density is known
along the way, though (the instantaneous change of variables, as in :mod:`score_toolkit.likelihood`):

    log q(x_{t_min}) = log p_1(x_1) + int_{t_min}^{1} div_x F~(x_t, t) dt,   F~ = f x - g^2 s~ / 2,

so every point it delivers can be weighted to the target ``pi(x) ~ p_{t_min}(x) p(y | x)``, with ``log p_{t_min}`` the
prior model's own log-density (:func:`~score_toolkit.likelihood.log_likelihood` of the unconditional score, or
``-energy`` where the score has one, its constant estimated from the defensive points below) and ``p(y | x)`` the transform's limit likelihood
``log N(y; A x / alpha, sigma_y^2 I + (sigma / alpha)^2 A A^T)`` at ``t_min`` (exact as ``t_min -> 0``;
:meth:`~score_toolkit.conditioning.InverseProblemScore.limit_log_likelihood`, the final weight of ``tds`` too).

Every output sample draws ``K = num_particles`` prior points. A share ``lambda = m / K`` of them (``m =
round(defensive K)``) follows the prior's own flow (whose law is ``p_{t_min}``), the rest the conditional flow,
each integrating its log-density (one augmented solve, :mod:`._flow_density` on
:mod:`score_toolkit.likelihood.dynamics`). Each point gets the deterministic-mixture weight (defensive importance
sampling, Hesterberg 1995; Owen & Zhou 2000)

    w = p_{t_min}(x) p(y | x) / ((1 - lambda) q(x) + lambda p_{t_min}(x))  <=  p(y | x) / lambda,

so the missing density of each point comes from a second solve: the prior's log-density at the conditional flow's
points and the conditional flow's ``log q`` at the prior flow's points (:func:`~score_toolkit.likelihood.log_likelihood`
of the transform, solved back from the data to the prior). One point per group is drawn with the normalised weights
(sampling-importance-resampling, :func:`~score_toolkit.samplers.tds.draw_index`). The only randomness is the prior
draw and the resampling choice; the transport itself is deterministic. The returned draw's law tends to ``pi`` as
``K -> infinity`` (its error is ``O(1 / K)`` times the weights' relative variance), up to the solver's error in ``x``
and in the log-densities. The mixture bounds the weights: without it (``defensive=0``), a transform whose flow is
narrower than the posterior (DPS) gives weights with heavy tails, and the bias then falls very slowly with ``K``
(measured in docs/conditioning.md).

Cost per output sample: ``K`` transport solves with the divergence (exact: ``d`` vector-Jacobian products per
evaluation; through DPS and PiGDM each is a double backward through the score network, their correction being a
gradient itself) and ``K`` second densities (``K - m`` prior densities, a solve each or one energy evaluation each
with ``prior_density="energy"``, and ``m`` conditional densities, a solve each). ``SamplerOutput.info`` reports it:
``evaluations_per_sample`` (score and energy evaluations of points, per output sample), ``vjps_per_sample``
(vector-Jacobian products of the divergences per output sample), the batched calls of each stage, and the effective
sample size of the final weights. Memory: ``batch_size`` bounds the points of one solve (the graph of one divergence
evaluation); the states and log-densities of all ``B K`` points are held until the resampling. Attention layers run on
PyTorch's math kernel here, the fused ones having no second derivative (which DPS's and PiGDM's divergences take).

Why one module of this length: it is one sampler, whose option checks, chunked staged solves and cost accounting
share its state (the transport itself is in :mod:`._flow_density`, the solvers in :mod:`score_toolkit.likelihood`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._utils import per_sample_generators, rand
from ..likelihood.divergence import _probes
from ..likelihood.ode import log_likelihood
from ..likelihood.options import _resolve_time_variable
from ..likelihood.result import SolverError
from ..processes import TIME_GRIDS
from ._flow_density import DEFAULT_MAX_NUM_STEPS, DEFAULT_TOLERANCE, METHODS, flow_with_density
from .base import NonFiniteError, Sampler, SamplerProperties, SamplingContext, check_choice, check_float, check_int
from .langevin import energy_or_none
from .tds import draw_index, normalised_weights

__all__ = ["ImportanceODESampler", "flow_with_density", "METHODS"]

#: where the prior's log-density at t_min comes from
PRIOR_DENSITIES = ("ode", "energy")


class _Counted:
    """A score (or energy) function that counts its calls and the rows it evaluated."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.rows += x.shape[0]
        out = self.fn(x, t)
        if isinstance(out, torch.Tensor) and not bool(torch.isfinite(out.detach()).all()):
            raise NonFiniteError(f"the score function returned NaN or infinite values at t = {float(t.min()):.6g} "
                                 f"(solver step of batched evaluation {self.calls})")
        return out


class ImportanceODESampler(Sampler):
    """Importance-corrected probability flow (see the module docstring): ``K`` prior points per sample moved by the
    conditional PF-ODE (a share ``defensive`` by the prior's) with their log-density, weighted by the exact target
    over the mixture density, one resampled.

    Options:
        num_particles (16): prior points per output sample (``K >= 2``).
        method ("dopri5_per_sample"): the solver of both ODEs (the conditional transport and, with
            ``prior_density="ode"``, the prior's density): the likelihood's per-sample Dormand-Prince stepper, a
            torchdiffeq adaptive method (``dopri5``, ``dopri8``, ``bosh3``, ``adaptive_heun``; steps shared by the
            batch), or a fixed-grid method (``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``; ``num_steps``
            required).
        rtol, atol (adaptive methods; default 1e-5 each), max_num_steps (adaptive; default 10000).
        num_steps, grid ("uniform"): fixed-grid methods: steps and kind of the grid (:meth:`Process.time_grid`).
        divergence ("exact"): ``d`` vector-Jacobian products per evaluation, or ``"hutchinson"`` with
            ``num_probes`` (default 4) Rademacher probes per point and per solve, each held fixed through its solve:
            the transport's are drawn from the sample's generator first, the second density's
            (:func:`~score_toolkit.likelihood.log_likelihood`) after them from the same generator. A Hutchinson log-density is unbiased in the log, so its weight ``exp(-log q)`` is
            not: the estimate adds a bias that shrinks with ``num_probes``.
        time_variable ("auto"): the integration variable (:func:`~score_toolkit.likelihood.log_likelihood`).
        prior_density ("ode"): ``log p_{t_min}`` of the prior model by :func:`~score_toolkit.likelihood.log_likelihood`
            of its score, or ``"energy"``: ``-energy(x, t_min)`` of a prior score that has one (an analytic score, an
            energy network), one evaluation per point (counted in ``nfe``). The energy may be known only up to a
            constant: with the defensive share, the constant is estimated per group as the mean of ``log p + energy``
            over its defensive points (``log p`` their normalised log-density carried by the prior's flow); refused
            before any solve for a prior score without an energy.
        likelihood ("transform"): the score function is a conditional transform with a prior score ``score_fn``
            and ``limit_log_likelihood(x, t)`` (:class:`~score_toolkit.conditioning.DPS`,
            :class:`~score_toolkit.conditioning.PiGDM`, :class:`~score_toolkit.conditioning.Replacement`,
            :class:`~score_toolkit.conditioning.ObservationLikelihood`); ``"none"``: a plain score function and
            nothing observed (the target is the score's own law: weights ``p / q`` near 1, a check of the machinery);
            a conditional transform is refused there.
        defensive (0.5): the share of the ``K`` points moved by the prior's flow (``round(defensive K)``, at least 1
            and at most ``K - 1`` when > 0; 0: the conditional flow alone, unbounded weights); not used with
            ``likelihood="none"``.
        batch_size (None: all at once): the most points integrated in one solve, so one score call (and the graph of
            its divergence) holds at most that many. The output samples go through in chunks of whole samples
            (``batch_size // max(m, K - m)`` of them; each flow is one solve per chunk); when one sample's points of
            a flow exceed ``batch_size``, they are split into solves of ``batch_size``. Every random draw (prior points,
            probes, the streams of the second densities' probes, the resampling) is made in one order whatever the
            chunks, and the per-sample stepper and the fixed grids treat every point by itself, so the samples and
            the costs per sample are those of the unchunked run (up to float noise where a kernel rounds differently
            for another batch size); torchdiffeq's adaptive methods share their steps within a solve, so their
            results change with ``batch_size`` at the tolerance's level. ``nfe`` then counts the more numerous,
            smaller calls.

    ``x_init`` (or the prior draw from ``shape``) gives point 0 of every group; the other ``K - 1`` come from the
    process's prior, from the sample's generator when there is one per sample. ``nfe`` counts the batched calls of
    the score function (conditional transport, prior density or energy, and ``denoise``'s); ``info`` holds
    ``num_particles``, ``defensive_particles`` (m), ``final_ess`` (mean effective sample size of the groups' weights,
    in points), ``min_final_ess``, ``transport_nfe`` and ``density_nfe`` (batched calls of the transport solves and of
    the second densities), ``evaluations_per_sample`` (score and energy evaluations of points per output
    sample), ``vjps_per_sample``, ``batch_size`` (the effective points per solve), ``solves`` (the ODE solves with a
    divergence, both stages), and the effective solver settings (``rtol``, ``atol``, ``max_num_steps`` with their
    defaults in place of ``None``, ``num_probes``). The trajectory holds the initial state and the result.
    """

    name: ClassVar[str] = "importance_ode"
    description: ClassVar[str] = ("importance-corrected probability flow: K prior points per sample moved by the "
                                  "conditional PF-ODE with their log-density, reweighted to the exact target, one "
                                  "resampled")
    properties: ClassVar[SamplerProperties] = SamplerProperties(stochastic=True, order=None, adaptive=True,
                                                                fixed_grid=False, per_sample=True)
    options: ClassVar[dict[str, Any]] = {
        "num_particles": 16,
        "method": "dopri5_per_sample",
        "rtol": None,
        "atol": None,
        "max_num_steps": None,
        "num_steps": None,
        "grid": "uniform",
        "divergence": "exact",
        "num_probes": None,
        "time_variable": "auto",
        "prior_density": "ode",
        "likelihood": "transform",
        "defensive": 0.5,
        "batch_size": None,
    }
    # the generic suite runs the machinery with nothing observed (the target is the score's own law); the conditional
    # accuracy on exact posteriors is tested in tests/test_importance_ode.py and tests/test_conformance.py
    conformance = {"sampler_options": {"num_particles": 2, "likelihood": "none", "rtol": 1e-3, "atol": 1e-3},
                   "accuracy_options": {"rtol": 1e-5, "atol": 1e-5}}

    def _validate_options(self, cfg: dict[str, Any]) -> None:
        super()._validate_options(cfg)
        k = cfg["num_particles"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"sampler {self.name!r}: expected option num_particles to be an int >= 2 (one point is the "
                             f"transform's own probability flow without correction: use 'pf_ode'), found {k!r}")
        method = check_choice(cfg, "method", self.name, tuple(METHODS))
        adaptive = METHODS[method]
        if adaptive:
            given = [key for key in ("num_steps", "grid") if cfg[key] != type(self).options[key]]
            if given:
                raise ValueError(f"sampler {self.name!r}: option(s) {', '.join(given)} apply to the fixed-grid methods "
                                 f"{tuple(m for m, a in METHODS.items() if not a)}, found method={method!r}")
            for key in ("rtol", "atol"):
                if cfg[key] is not None:
                    check_float(cfg, key, self.name)
            if cfg["max_num_steps"] is not None:
                check_int(cfg, "max_num_steps", self.name)
        else:
            given = [key for key in ("rtol", "atol", "max_num_steps") if cfg[key] is not None]
            if given:
                raise ValueError(f"sampler {self.name!r}: option(s) {', '.join(given)} only apply to adaptive methods "
                                 f"{tuple(m for m, a in METHODS.items() if a)}, found method={method!r}")
            if cfg["num_steps"] is None:
                raise ValueError(f"sampler {self.name!r}: fixed-grid method {method!r} needs option num_steps, an int "
                                 f">= 1")
            check_int(cfg, "num_steps", self.name)
        check_choice(cfg, "grid", self.name, TIME_GRIDS)
        divergence = check_choice(cfg, "divergence", self.name, ("exact", "hutchinson"))
        if cfg["num_probes"] is not None:
            if divergence != "hutchinson":
                raise ValueError(f"sampler {self.name!r}: option num_probes applies to divergence='hutchinson'")
            check_int(cfg, "num_probes", self.name)
        check_choice(cfg, "time_variable", self.name, ("auto", "vp_t", "log_sigma", "t"))
        check_choice(cfg, "prior_density", self.name, PRIOR_DENSITIES)
        check_choice(cfg, "likelihood", self.name, ("transform", "none"))
        size = cfg["batch_size"]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"sampler {self.name!r}: expected option batch_size (points per solve) to be an int >= 1 "
                             f"or None (all points at once), found {size!r}")
        share = cfg["defensive"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ValueError(f"sampler {self.name!r}: expected option defensive to be a number in [0, 1), found {share!r}")
        props = replace(type(self).properties, adaptive=adaptive, fixed_grid=not adaptive,
                        # torchdiffeq's adaptive steps are shared by the batch; the stepper and fixed grids are per point
                        per_sample=method == "dopri5_per_sample" or not adaptive)
        if props != type(self).properties:
            self.properties = props

    def _num_progress_steps(self) -> int | None:
        return 1  # one recorded step whatever the method: the draw among the particles at t_min

    @property
    def nfe(self) -> int | None:
        """Batched score calls of one run with a fixed-grid method (conditional transport, prior density, ``denoise``);
        ``None`` for adaptive methods, and with ``batch_size`` (the number of solves then depends on the batch)."""
        cfg = self.config
        if METHODS[cfg["method"]] or cfg["batch_size"] is not None:
            return None
        from .pf_ode import METHODS as STAGES

        per_solve = cfg["num_steps"] * STAGES[cfg["method"]].nfe_per_step
        prior = per_solve if cfg["prior_density"] == "ode" else 1
        if cfg["likelihood"] == "transform" and self._defensive_count():
            # the defensive points: the prior's flow, their conditional density (and their energy)
            prior += 2 * per_solve + (cfg["prior_density"] == "energy")
        return per_solve + prior + self._final_steps_nfe()

    def _parts(self, ctx: SamplingContext, device: torch.device):
        """(the conditional score, the prior score, the log-likelihood of the observation at t_min or None, the prior
        score's energy or None), checked before any solve."""
        if device.type == "mps":
            # the log-densities, their solvers and the times are float64 (a sum of many small terms), which MPS lacks
            raise ValueError(f"sampler {self.name!r}: expected a CPU or CUDA device (its log-densities are float64, "
                             f"which MPS does not support), found {device}; sample on the CPU")
        fn = ctx.score_fn
        if self.config["likelihood"] == "none":
            if callable(getattr(fn, "limit_log_likelihood", None)):
                raise ValueError(f"sampler {self.name!r}: likelihood='none' expects a plain score function, found the "
                                 f"conditional transform {fn!r} (it has limit_log_likelihood): its weights would "
                                 "ignore the observation and return the transform's own biased flow; use "
                                 "likelihood='transform'")
            return fn, fn, None, self._energy(fn)
        prior = getattr(fn, "score_fn", None)
        missing = [m for m, ok in (("score_fn (the prior score)", callable(prior)),
                                   ("limit_log_likelihood(x, t)", callable(getattr(fn, "limit_log_likelihood", None))))
                   if not ok]
        if missing:
            raise ValueError(
                f"sampler {self.name!r}: expected a conditional score transform with its prior score and observation "
                f"likelihood (attributes score_fn and limit_log_likelihood(x, t): DPS, PiGDM, Replacement or "
                f"ObservationLikelihood from score_toolkit.conditioning), found {fn!r} without {' and '.join(missing)}; "
                "for unconditional sampling pass likelihood='none'")
        return fn, prior, fn.limit_log_likelihood, self._energy(prior)

    def _energy(self, prior):
        """The prior score's energy with ``prior_density="energy"`` (refused without one), else None."""
        if self.config["prior_density"] != "energy":
            return None
        energy = energy_or_none(prior)
        if energy is None:
            raise ValueError(f"sampler {self.name!r}: prior_density='energy' needs a prior score with an energy (an "
                             f"analytic score or a ScoreAdapter with prediction_type='energy'), found {prior!r} "
                             "without one; use prior_density='ode'")
        return energy

    def _solver_options(self) -> dict[str, Any]:
        cfg = self.config
        if METHODS[cfg["method"]]:
            return {"rtol": cfg["rtol"] if cfg["rtol"] is not None else DEFAULT_TOLERANCE,
                    "atol": cfg["atol"] if cfg["atol"] is not None else DEFAULT_TOLERANCE,
                    "max_num_steps": cfg["max_num_steps"] if cfg["max_num_steps"] is not None else DEFAULT_MAX_NUM_STEPS}
        return {"num_steps": cfg["num_steps"], "grid": cfg["grid"]}

    def _run(self, ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
        cfg, process = self.config, ctx.process
        conditional, prior, likelihood, energy = self._parts(ctx, x.device)
        b, k, shape = x.shape[0], cfg["num_particles"], tuple(x.shape[1:])
        n, d = b * k, math.prod(shape)
        # points 0..m-1 of every group follow the prior's flow (the defensive share), the others the conditional one
        m = self._defensive_count() if likelihood is not None else 0
        # every random draw happens here, before any solve, in one order whatever batch_size: the prior points, the
        # transport's probes, the streams of the second densities' probes (and, after the solves, the resampling)
        others = process.prior_sample((b, k - 1, *shape), generator=ctx.generator, device=x.device, dtype=x.dtype)
        x1 = torch.cat([x[:, None], others], 1)
        divergence = cfg["divergence"]
        num_probes = (cfg["num_probes"] or 4) if divergence == "hutchinson" else 0
        per_eval = d if divergence == "exact" else num_probes
        gens = ctx.generator
        probes = density_gens = None
        if divergence == "hutchinson":
            # a generator per point: the sample's own, once per point (its points draw in turn from its stream)
            point_gens = [g for g in gens for _ in range(k)] if isinstance(gens, (list, tuple)) else gens
            probes = _probes("rademacher", num_probes, (n, *shape), point_gens, x.dtype, x.device).reshape(
                num_probes, b, k, *shape)
            density_gens = self._density_generators(gens, k, x.device)
        time_variable = _resolve_time_variable(cfg["time_variable"], process, prior)
        transport = {"method": cfg["method"], "divergence": divergence, "time_variable": time_variable,
                     **self._solver_options()}
        # points per solve (one score call evaluates at most that many), and whole output samples per chunk
        per_group = max(m, k - m)
        size = cfg["batch_size"] if cfg["batch_size"] is not None else b * per_group
        chunk = max(1, size // per_group)
        density = {**transport, "batch_size": size}
        if divergence == "hutchinson":
            density["num_probes"] = num_probes
        counts = {"transport": [0, 0], "density": [0, 0], "vjp": 0, "solves": 0}  # [batched calls, points evaluated]

        def tally(stage, c, vjps=True):
            counts[stage][0] += c.calls
            counts[stage][1] += c.rows
            counts["vjp"] += c.rows * per_eval if vjps else 0

        def push(fn, lo, hi, sl):  # the flow of fn from the points sl of samples lo..hi-1: (x_{t_min}, log q) per point
            pts = x1[lo:hi, sl].reshape(-1, *shape)
            pr = None if probes is None else probes[:, lo:hi, sl].reshape(num_probes, -1, *shape)
            ys, deltas = [], []
            for a in range(0, pts.shape[0], size):  # a group larger than batch_size is split across solves
                c = _Counted(fn)
                y, delta = self._solve("the transport", flow_with_density, c, process, pts[a:a + size],
                                       probes=None if pr is None else pr[:, a:a + size], **transport)
                ys.append(y)
                deltas.append(delta)
                tally("transport", c)
                counts["solves"] += 1
            delta = torch.cat(deltas)
            return torch.cat(ys), process.prior_log_prob(pts).to(delta.dtype) + delta

        def log_density(fn, y, lo, hi, sl, which):  # log-density at y (the points sl of samples lo..hi-1) of fn's flow
            c = _Counted(fn)
            extra = {}
            if density_gens is not None:
                extra["generator"] = [density_gens(i, j) for i in range(lo, hi) for j in range(k)[sl]]
            res = self._solve(which, log_likelihood, c, process, y, **density, **extra)
            tally("density", c)
            counts["solves"] += -(-y.shape[0] // size)
            return res.log_prob

        def log_prior(y, lo, hi, sl):  # log p_{t_min} at y (the points sl), or -energy (up to a constant)
            if energy is not None:
                c = _Counted(energy)
                out = -c(y, torch.full((y.shape[0],), process.t_min, dtype=torch.float64, device=y.device))
                tally("density", c, vjps=False)
                return out
            return log_density(prior, y, lo, hi, sl, "the prior density")

        def group(lo, hi):  # samples lo..hi-1: their K points at t_min (c, K, ...) and log-weights (c, K)
            c = hi - lo
            cond = slice(m, k)
            y_c, log_q_c = push(conditional, lo, hi, cond)
            log_p_c = log_prior(y_c, lo, hi, cond)
            if m:
                dfn = slice(0, m)
                y_d, log_p_d = push(prior, lo, hi, dfn)  # the prior's flow carries the (normalised) density of its points
                if energy is not None:
                    # -energy is log p_{t_min} up to a constant, which does not cancel in the mixture (1 - lam) q + lam p:
                    # the group's defensive points, where both are known, give the constant (their mean difference)
                    neg_energy = log_prior(y_d, lo, hi, dfn).to(log_p_d.dtype).reshape(c, m)
                    offset = (log_p_d.reshape(c, m) - neg_energy).mean(1, keepdim=True)
                    log_p_d = (neg_energy + offset).reshape(-1)
                    log_p_c = (log_p_c.to(offset.dtype).reshape(c, k - m) + offset).reshape(-1)
                log_q_d = log_density(conditional, y_d, lo, hi, dfn, "the conditional density")
                y0 = torch.cat([y_d.reshape(c, m, *shape), y_c.reshape(c, k - m, *shape)], 1)
                log_p = torch.cat([log_p_d.reshape(c, m), log_p_c.to(log_p_d.dtype).reshape(c, k - m)], 1)
                log_q = torch.cat([log_q_d.reshape(c, m), log_q_c.to(log_q_d.dtype).reshape(c, k - m)], 1)
                lam = m / k  # the deterministic mixture (1 - lam) q + lam p: weights at most p(y | x) / lam
                log_q = torch.logaddexp(log_q + math.log1p(-lam), log_p + math.log(lam))
            else:
                y0, log_p, log_q = y_c.reshape(c, k, *shape), log_p_c.reshape(c, k), log_q_c.reshape(c, k)
            log_w = (log_p - log_q).to(torch.float64)
            if not bool(torch.isfinite(log_w).all()):
                raise NonFiniteError(f"sampler {self.name!r}: a log-density became NaN or infinite at the last step "
                                     f"(t = {process.t_min:.6g}); check the score function, or tighten the solver")
            if likelihood is not None:
                ll = likelihood(y0.reshape(c * k, *shape), torch.full((c * k,), process.t_min, dtype=torch.float64,
                                                                      device=x.device))
                if not isinstance(ll, torch.Tensor) or ll.shape != (c * k,):
                    raise ValueError(f"sampler {self.name!r}: expected limit_log_likelihood(x, t) of shape ({c * k},), "
                                     f"found {tuple(ll.shape) if isinstance(ll, torch.Tensor) else type(ll).__name__}")
                log_w = log_w + ll.to(torch.float64).reshape(c, k)
            return y0, log_w

        # attention on PyTorch's math kernel: the fused ones (flash, memory-efficient) have no second derivative, which
        # the divergence through DPS and PiGDM (a gradient themselves) takes
        with sdpa_kernel(SDPBackend.MATH):
            parts = [group(lo, min(lo + chunk, b)) for lo in range(0, b, chunk)]
        y0, log_w = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        weights = normalised_weights(log_w, self.name, f"at the last step (t = {process.t_min:.6g}); check the "
                                     "score function, or tighten the solver")
        ess = 1.0 / weights.pow(2).sum(1)
        u = rand((b,), generator=ctx.generator, device=x.device, dtype=torch.float64)
        pick = draw_index(weights, u)
        out = y0[torch.arange(b, device=x.device), pick].detach()
        ctx.nfe += counts["transport"][0] + counts["density"][0]
        ctx.record(out, process.t_min, step=1)
        ctx.info.update({
            "num_particles": k,
            "defensive_particles": m,
            "final_ess": float(ess.mean()),
            "min_final_ess": float(ess.min()),
            "transport_nfe": counts["transport"][0],
            "density_nfe": counts["density"][0],
            "evaluations_per_sample": (counts["transport"][1] + counts["density"][1]) / b,
            "vjps_per_sample": counts["vjp"] / b,
            # the effective points per solve and the solves with the divergence (transport and density ODEs)
            "batch_size": size,
            "solves": counts["solves"],
            # the effective solver settings (the defaults in place of None)
            **self._solver_options(),
            "num_probes": num_probes or None,
        })
        return out

    @staticmethod
    def _density_generators(gens, k: int, device: torch.device):
        """``(i, j) -> `` the generator of the second density's probes of point ``j`` of sample ``i``: the sample's own
        generator (a list, one per sample: its points draw in turn from its stream), or else one generator per point
        seeded from the point's index and one seed drawn now (from the shared generator, or torch's global one), so that
        the probes do not depend on how the points are split into solves."""
        if isinstance(gens, (list, tuple)):
            return lambda i, j: gens[i]
        seed = int(torch.randint(0, 2**62, (1,), generator=gens, device=gens.device if gens is not None else "cpu"))
        return lambda i, j: per_sample_generators(seed, [i * k + j], device=device)[0]

    def _defensive_count(self) -> int:
        k, share = self.config["num_particles"], float(self.config["defensive"])
        return 0 if share == 0 else min(k - 1, max(1, round(share * k)))

    def _solve(self, which: str, solve, score_fn, process, x, **kwargs):
        """``solve(score_fn, process, x, **kwargs)`` with its failures reworded as this sampler's."""
        try:
            return solve(score_fn, process, x, **kwargs)
        except (NonFiniteError, SolverError, ValueError, TypeError) as err:
            message = str(err).removeprefix("log_likelihood: ")
            raise type(err)(f"sampler {self.name!r}, {which}: {message}") from err
