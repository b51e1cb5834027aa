"""Exact log-likelihoods through the probability-flow ODE, and bits/dim with uniform dequantization.

The probability-flow ODE of a process (Song et al. 2021, "Score-based generative modeling through SDEs",
eq. 13) is ``dx/dt = F(x, t) = f(t) x - g(t)^2 s(x, t) / 2``. Along its solution the instantaneous change of
variables (Chen et al. 2018, "Neural ordinary differential equations", Theorem 1; Song et al. 2021, eq. 39)
gives ``d log p_t(x_t) / dt = -div_x F(x_t, t)``, so, integrating forward from the data at ``t_min`` to the
prior at ``t = 1``:

    log p_{t_min}(x) = log p_1(x_1) + int_{t_min}^{1} div_x F(x_t, t) dt,
    div_x F = f(t) d - g(t)^2 / 2 * div_x s(x, t).

:func:`log_likelihood` integrates the augmented state ``(x, int div F)`` with torchdiffeq (adaptive dopri5 by
default, or a fixed grid), by default in ``tau = ln(sigma / alpha)`` with the scaled state ``x / alpha``
(``time_variable="log_sigma"``: the same ODE, smooth in tau for every process; ``"t"`` integrates in t itself,
see :class:`_TimeVariable`). The divergence of the score is computed

* ``"exact"``: as the trace of the Jacobian, ``d`` vector-Jacobian products (one backward pass per basis vector on
  the CPU; vectorised with ``is_grads_batched`` on accelerators when the network supports it);
* ``"hutchinson"``: with Hutchinson's estimator ``div s = E_v[v^T (ds/dx) v]`` (``E[v v^T] = I``), ``K``
  Rademacher or Gaussian probes per sample, drawn once and held fixed through the solve (FFJORD, Grathwohl
  et al. 2019; score_sde_pytorch uses one probe).

Standard error of the Hutchinson estimate. Only the score's divergence is estimated (``f d`` is exact). The
trajectory ``x_t`` does not depend on the probes, so each probe ``v_k`` gives its own integral
``I_k = int [f d - g^2 / 2 * v_k^T J(x_t, t) v_k] dt`` (``J = ds/dx``; each ``I_k`` is a component of the
augmented state). ``E[I_k] = int [f d - g^2 / 2 * tr J] dt`` (linearity of the integral, the probes being fixed
in time), and ``I_1..I_K`` are i.i.d. given ``x``. The estimate is their mean ``I = mean_k I_k`` and its standard
error ``sd(I_1..I_K) / sqrt(K)`` (sample standard deviation, ``K - 1`` degrees of freedom; it needs ``K >= 2``,
and is NaN for ``K = 1``). It is the standard error of the log-likelihood itself; the solver's own error
(rtol/atol) is not included. This is why the probes are per-probe components of the state rather than one
summed estimate: the spread of the K integrals is what gives the error bar.

What is computed is ``log p_{t_min}`` of the model's marginal at ``t_min`` (score_sde's ``eps``), with the
process's Gaussian prior standing in for ``p_1`` (pass ``prior_log_prob`` to use another one).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._utils import GeneratorLike, check_tensor, per_sample_generators, rand, randn
from .processes import TIME_GRIDS, Process
from .samplers.base import NonFiniteError

__all__ = [
    "LikelihoodResult",
    "BitsPerDimResult",
    "SolverError",
    "log_likelihood",
    "bits_per_dim",
    "dequantize",
    "to_levels",
    "dequantized_bits_per_dim",
    "DIVERGENCES",
    "PROBES",
    "TIME_VARIABLES",
    "METHODS",
]

DIVERGENCES = ("exact", "hutchinson")
TIME_VARIABLES = ("log_sigma", "t")
PROBES = ("rademacher", "gaussian")
#: torchdiffeq methods: name -> adaptive?
METHODS: dict[str, bool] = {
    "dopri5": True,
    "dopri8": True,
    "bosh3": True,
    "adaptive_heun": True,
    "euler": False,
    "midpoint": False,
    "heun2": False,
    "heun3": False,
    "rk4": False,
}
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_NUM_STEPS = 10_000
DEFAULT_NUM_PROBES = 4
DEFAULT_BATCH_SIZE = 256
# above this many vector-Jacobian products per call, the exact divergence loops over chunks of the basis
_MAX_BATCHED_VJP_ELEMENTS = 2**24


class SolverError(RuntimeError):
    """The ODE solver could not finish: step budget exhausted or step size underflow."""


@dataclass
class LikelihoodResult:
    """What :func:`log_likelihood` returns (all per-sample tensors of shape (B,), in the input's order).

    Attributes:
        log_prob: ``log p_{t_min}(x)`` in nats, in model space.
        std_err: standard error of ``log_prob`` from the Hutchinson probes (0 for the exact divergence).
        prior_log_prob: ``log p_1(x_1)`` of the state reached at ``t = 1``.
        delta_log_prob: ``int_{t_min}^1 div F dt`` (``log_prob = prior_log_prob + delta_log_prob``).
        nfe: number of ODE right-hand-side evaluations, i.e. batched score evaluations, over every solve
            (each also costs ``d`` (exact) or ``K`` (Hutchinson) vector-Jacobian products).
        nfe_per_sample: NFE of the solve each sample was part of.
        num_dims: ``d``, the number of features per sample.
        divergence, num_probes, probe: how the divergence was computed.
        t_min: where the integration started.
        wall_time_s: wall time of the call.
        latent: the state at ``t = 1`` (with ``return_latent=True``), shaped like ``x``.
        info: solver settings.
    """

    log_prob: torch.Tensor
    std_err: torch.Tensor
    prior_log_prob: torch.Tensor
    delta_log_prob: torch.Tensor
    nfe: int
    nfe_per_sample: torch.Tensor
    num_dims: int
    divergence: str
    num_probes: int
    probe: str | None
    t_min: float
    wall_time_s: float
    latent: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nll(self) -> torch.Tensor:
        """Negative log-likelihood in nats (B,)."""
        return -self.log_prob

    def bits_per_dim(self, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0) -> torch.Tensor:
        """Bits/dim of this result when ``x`` was dequantised as in :func:`dequantize` (see :func:`bits_per_dim`)."""
        return bits_per_dim(self.nll, self.num_dims, bits=bits, levels=levels, scale=scale)

    def summary(self) -> dict[str, Any]:
        """Means over samples, as plain numbers. The standard error of the mean combines the spread over samples
        and the Hutchinson error of each sample (unknown, reported as None, with a single probe; the spread over
        samples already contains the probe noise then)."""
        n = self.log_prob.numel()
        nll = self.nll.double()
        spread = float(nll.std()) if n > 1 else 0.0
        hutch = float(self.std_err.double().pow(2).sum().sqrt()) / n
        hutch_known = math.isfinite(hutch)  # one probe gives no error bar
        return {
            "num_samples": n,
            "num_dims": self.num_dims,
            "mean_nll_nats": float(nll.mean()),
            "std_err_mean_nll": math.sqrt(spread**2 / n + (hutch**2 if hutch_known else 0.0)),
            "hutchinson_std_err_mean_nll": hutch if hutch_known else None,
            "nfe": self.nfe,
            "wall_time_s": self.wall_time_s,
            "divergence": self.divergence,
            "num_probes": self.num_probes,
            "probe": self.probe,
            "t_min": self.t_min,
            **{k: v for k, v in self.info.items() if k not in ("num_processes",)},
            "num_processes": self.info.get("num_processes", 1),
        }


# ============================================================================================ the ODE
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
    """

    def __init__(self, kind: str, process: Process, t_lo: float, t_hi: float):
        self.kind, self.process = kind, process
        self.t_lo, self.t_hi = t_lo, t_hi
        ends = torch.tensor([t_lo, t_hi], dtype=torch.float64)
        if kind == "t":
            self.lo, self.hi = t_lo, t_hi
            self.log_c_lo = self.log_c_hi = 0.0
        else:
            log_s = torch.log(process.noise_to_signal(ends))
            self.lo, self.hi = float(log_s[0]), float(log_s[1])
            la = process.log_alpha(ends)
            self.log_c_lo, self.log_c_hi = float(la[0]), float(la[1])
        if not self.lo < self.hi:
            raise ValueError(f"log_likelihood: the process's noise level must grow from t_min to 1, found "
                             f"{kind} from {self.lo:g} to {self.hi:g}")

    def to_tau(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.kind == "t" else torch.log(self.process.noise_to_signal(t))

    def coefficients(self, tau: float) -> tuple[float, float, float, float]:
        """(t, c, A, B) at tau (clamped into the interval: adaptive solvers probe outside it)."""
        tau = min(max(tau, self.lo), self.hi)
        if self.kind == "t":
            tt = torch.tensor([tau], dtype=torch.float64)
            f = float(self.process.drift_coef(tt))
            g2 = float(self.process.diffusion_squared(tt).clamp_min(0))
            return tau, 1.0, f, -0.5 * g2
        st = math.exp(tau)
        t = float(self.process.t_from_noise_to_signal(torch.tensor([st], dtype=torch.float64)))
        t = min(max(t, self.t_lo), self.t_hi)
        alpha = float(self.process.alpha(torch.tensor([t], dtype=torch.float64)))
        return t, alpha, 0.0, -st * st * alpha


class _AugmentedDynamics:
    """Right-hand side of the augmented ODE on a flat state (B, D + C): C = 1 (exact) or K (per probe)."""

    def __init__(self, score_fn, process: Process, shape, divergence: str, probes, variable: _TimeVariable,
                 max_num_steps: int | None):
        self.score_fn = score_fn
        self.process = process
        self.shape = tuple(shape)
        self.batch = self.shape[0]
        self.dim = math.prod(self.shape[1:])
        self.divergence = divergence
        self.probes = probes  # (K, B, ...) or None
        self.variable = variable
        self.max_num_steps = max_num_steps
        self.nfe = 0
        self.steps = 0
        self.t = variable.t_lo
        self._basis = None
        self._vjp_state: dict = {}

    def _divergence(self, s: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
        if not s.requires_grad:
            raise TypeError(
                "expected score_fn to be differentiable with respect to x (the divergence needs autograd), found "
                "an output without a graph: do not evaluate the score under torch.no_grad() or detach it"
            )
        if self.divergence == "hutchinson":
            vjp = _batched_vjp(s, xg, self.probes, self._vjp_state)  # (K, B, ...)
            return (vjp * self.probes).flatten(2).sum(2).transpose(0, 1)  # (B, K)
        d = self.dim
        if self._basis is None or self._basis.dtype != s.dtype or self._basis.device != s.device:
            self._basis = torch.eye(d, dtype=s.dtype, device=s.device)
        total = torch.zeros(self.batch, dtype=s.dtype, device=s.device)
        chunk = max(1, min(d, _MAX_BATCHED_VJP_ELEMENTS // max(1, self.batch * d)))
        for lo in range(0, d, chunk):
            e = self._basis[lo : lo + chunk]  # (c, D)
            grads = e[:, None, :].expand(e.shape[0], self.batch, d).reshape(e.shape[0], *self.shape)
            rows = _batched_vjp(s, xg, grads, self._vjp_state).flatten(2)  # (c, B, D): rows of the Jacobian
            idx = torch.arange(lo, lo + e.shape[0], device=s.device)
            total = total + rows[torch.arange(e.shape[0], device=s.device), :, idx].sum(0)
        return total[:, None]

    def __call__(self, tau: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        t, c, a, b = self.variable.coefficients(float(tau))
        y = state[:, : self.dim].reshape(self.shape)
        t_vec = torch.full((self.batch,), t, dtype=y.dtype, device=y.device)
        with torch.enable_grad():
            xg = (c * y).detach().requires_grad_(True)
            s = self.score_fn(xg, t_vec)
            _check_score_output(s, xg)
            div_s = self._divergence(s, xg)
        self.nfe += 1
        dy = a * y + b * s.detach()
        ddiv = a * self.dim + (b * c) * div_s.detach()
        out = torch.cat([dy.reshape(self.batch, self.dim), ddiv.to(dy.dtype)], 1)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(1).sum())
            raise NonFiniteError(
                f"log_likelihood: the score or its divergence became NaN or infinite at t = {t:.6g} (step "
                f"{self.steps}, evaluation {self.nfe}) in {bad} of {self.batch} samples; check the score function "
                f"and that the data lie where the model is defined"
            )
        return out

    def callback_step(self, tau0, y0, dt) -> None:
        self.steps += 1
        self.t = self.variable.coefficients(float(tau0))[0]
        if self.max_num_steps is not None and self.steps > self.max_num_steps:
            raise SolverError(_too_many_steps(self.max_num_steps, self.t, self.variable.t_hi))


def _batched_vjp(s: torch.Tensor, xg: torch.Tensor, grads: torch.Tensor, state: dict) -> torch.Tensor:
    """Vector-Jacobian products ``grads[k]^T ds/dx`` for a stack of ``grads`` (k, *s.shape): one pass per vector on
    the CPU (measured faster there than vmap: 11 vs 20 ms per evaluation for the exact divergence of a 16-D mixture,
    batch 256), one vectorised backward pass on accelerators (fewer kernel launches) unless vmap does not support
    the network (then one pass per vector, remembered in ``state``)."""
    if grads.shape[0] > 1 and s.device.type != "cpu" and state.get("vmap", True):
        try:
            (out,) = torch.autograd.grad(s, xg, grads, retain_graph=True, is_grads_batched=True)
            return out
        except RuntimeError as err:
            # vmap over the backward pass is not implemented for every operator (e.g. diffusers' UNet)
            if "vmap" not in str(err).lower() and "batch" not in str(err).lower():
                raise
            state["vmap"] = False
    rows = []
    for k in range(grads.shape[0]):
        (g,) = torch.autograd.grad(s, xg, grads[k], retain_graph=True)
        rows.append(g)
    return torch.stack(rows)


def _check_score_output(s, x: torch.Tensor) -> None:
    if not isinstance(s, torch.Tensor) or s.shape != x.shape:
        found = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        hint = ""
        if isinstance(s, torch.Tensor) and (s.shape == x.shape[:1] or s.shape == (x.shape[0], 1)):
            hint = (" (one number per sample looks like an energy: wrap the network as "
                    "ScoreAdapter(model, process, prediction_type='energy'))")
        raise ValueError(f"log_likelihood: expected score_fn to return a score of shape {tuple(x.shape)} (like x), "
                         f"found {found}{hint}")


def _too_many_steps(max_num_steps: int, t: float, t_end: float) -> str:
    return (f"log_likelihood: the ODE solver exceeded max_num_steps={max_num_steps} at t = {t:.6g} before reaching "
            f"t = {t_end:g}; raise max_num_steps, loosen rtol/atol, or use a fixed-grid method (num_steps)")


def _per_sample_norm(dim: int):
    def norm(y: torch.Tensor) -> torch.Tensor:
        # every sample must meet the tolerance by itself, in x and in the log-density components alike
        xr = y[:, :dim].pow(2).mean(1).sqrt()
        lr = y[:, dim:].pow(2).mean(1).sqrt()
        return torch.maximum(xr, lr).max()

    return norm


def _batch_norm(dim: int):
    def norm(y: torch.Tensor) -> torch.Tensor:
        return torch.maximum(y[:, :dim].pow(2).mean().sqrt(), y[:, dim:].pow(2).mean().sqrt())

    return norm


def _probes(kind: str, num: int, shape, generators, dtype, device) -> torch.Tensor:
    """(K, B, ...) probes, sample b's drawn from ``generators[b]`` only (or one shared generator)."""
    b = shape[0]
    full = (b, num, *shape[1:])
    if kind == "gaussian":
        v = randn(full, generator=generators, device=device, dtype=dtype)
    else:
        v = torch.where(rand(full, generator=generators, device=device, dtype=dtype) < 0.5, -1.0, 1.0).to(dtype)
    return v.transpose(0, 1).contiguous()


def _solve_chunk(score_fn, process, x, *, divergence, probes, method, rtol, atol, grid, max_num_steps,
                 per_sample_norm, variable: _TimeVariable, prior_log_prob):
    import torchdiffeq

    t_hi = variable.t_hi
    func = _AugmentedDynamics(score_fn, process, x.shape, divergence, probes, variable,
                              max_num_steps if METHODS[method] else None)
    comps = 1 if probes is None else probes.shape[0]
    y_start = x.reshape(x.shape[0], -1) * math.exp(-variable.log_c_lo)
    y0 = torch.cat([y_start, torch.zeros(x.shape[0], comps, dtype=x.dtype, device=x.device)], 1)
    if METHODS[method]:
        span = torch.tensor([variable.lo, variable.hi], dtype=torch.float64, device=x.device)
        norm = _per_sample_norm(func.dim) if per_sample_norm else _batch_norm(func.dim)
        options = {"max_num_steps": max_num_steps, "step_t": span[1:].clone(), "norm": norm}
        try:
            y1 = torchdiffeq.odeint(func, y0, span, rtol=rtol, atol=atol, method=method, options=options)[-1]
        except AssertionError as err:  # torchdiffeq checks with assert (absent under python -O)
            msg = str(err)
            if msg.startswith("max_num_steps exceeded"):
                raise SolverError(_too_many_steps(max_num_steps, func.t, t_hi)) from err
            if msg.startswith("underflow in dt"):
                raise SolverError(
                    f"log_likelihood: the adaptive step size underflowed at t = {func.t:.6g} after {func.steps} steps; "
                    f"the ODE is too stiff for rtol/atol, or the score is not smooth"
                ) from err
            if msg.startswith("non-finite values in state"):
                raise NonFiniteError(f"log_likelihood: the state became NaN or infinite at t = {func.t:.6g}") from err
            raise
    else:
        ts = grid.to(x.device)
        y1 = torchdiffeq.odeint(func, y0, ts[[0, -1]], method=method,
                                options={"grid_constructor": lambda f, y, t: ts.to(t)})[-1]
    x1 = (y1[:, : func.dim] * math.exp(variable.log_c_hi)).reshape(x.shape)
    # the divergence of A y integrates to d (ln c(tau_hi) - ln c(tau_lo)) when it is not in A (log_sigma)
    per_probe = y1[:, func.dim :] + (0.0 if variable.kind == "t" else func.dim * (variable.log_c_hi - variable.log_c_lo))
    delta = per_probe.mean(1)
    if comps > 1:
        std_err = per_probe.std(1) / math.sqrt(comps)
    elif divergence == "exact":
        std_err = torch.zeros_like(delta)
    else:
        std_err = torch.full_like(delta, math.nan)
    prior = prior_log_prob(x1)
    if not isinstance(prior, torch.Tensor) or prior.shape != (x.shape[0],):
        found = tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__
        raise ValueError(f"log_likelihood: expected prior_log_prob to return shape ({x.shape[0]},), found {found}")
    prior = prior.to(delta.dtype)
    if not bool(torch.isfinite(prior).all()):
        raise NonFiniteError("log_likelihood: the prior log-density of the state at t = 1 is NaN or infinite")
    return {
        "log_prob": prior + delta,
        "std_err": std_err,
        "prior": prior,
        "delta": delta,
        "latent": x1,
        "nfe": func.nfe,
    }


# ============================================================================================ public
def _expected_sample_shape(score_fn) -> tuple[int, ...] | int | None:
    """What the wrapped network expects per sample: a shape (C, H, W), a feature count, or None if unknown."""
    from .scores import ScoreAdapter

    if not isinstance(score_fn, ScoreAdapter):
        mixture = getattr(score_fn, "mixture", None)
        return int(mixture.dim) if mixture is not None and hasattr(mixture, "dim") else None
    cfg = getattr(score_fn.model, "config", None)
    if cfg is None:
        return None
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    if get("dim") is not None:
        return int(get("dim"))
    if get("sample_size") is not None and get("in_channels") is not None:
        size = get("sample_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(get("in_channels")), int(h), int(w))
    return None


def _check_data(x, score_fn, sample_shape, data_range) -> torch.Tensor:
    check_tensor(x, "x", min_rank=2)
    if x.shape[0] == 0:
        raise ValueError("log_likelihood: expected at least one sample, found an empty batch")
    expected = tuple(sample_shape) if sample_shape is not None else _expected_sample_shape(score_fn)
    if isinstance(expected, int):
        if x[0].numel() != expected:
            raise ValueError(f"log_likelihood: expected samples with {expected} features (the model's), found "
                             f"shape {tuple(x.shape)}")
    elif expected is not None and tuple(x.shape[1:]) != expected:
        raise ValueError(f"log_likelihood: expected data of shape (B, {', '.join(map(str, expected))}) (the model's "
                         f"sample shape), found {tuple(x.shape)}")
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"log_likelihood: expected finite data, found NaN or infinity in {int((~finite).sum())} "
                         f"of {x.shape[0]} samples")
    if data_range is not None:
        lo, hi = (float(v) for v in data_range)
        if not lo < hi:
            raise ValueError(f"log_likelihood: expected data_range (lo, hi) with lo < hi, found {data_range!r}")
        mn, mx = float(x.min()), float(x.max())
        if mn < lo or mx > hi:
            raise ValueError(f"log_likelihood: expected data in the model's range [{lo:g}, {hi:g}], found values in "
                             f"[{mn:g}, {mx:g}]")
    return x


def _check_score_fn(score_fn) -> None:
    from .scores import ScoreAdapter

    if isinstance(score_fn, torch.nn.Module) and not isinstance(score_fn, ScoreAdapter):
        raise TypeError(
            f"log_likelihood: expected a score function score_fn(x, t), found the network {type(score_fn).__name__}, "
            f"whose prediction type is unknown: wrap it as ScoreAdapter(model, process, prediction_type=..., "
            f"time_input=...) (score, epsilon, v_prediction, sample and energy networks all work)"
        )
    if not callable(score_fn):
        raise TypeError(f"log_likelihood: expected score_fn to be callable, found {type(score_fn).__name__}")


def _resolve_options(divergence, num_probes, probe, method, rtol, atol, num_steps, grid, max_num_steps):
    if divergence not in DIVERGENCES:
        raise ValueError(f"log_likelihood: expected divergence in {DIVERGENCES}, found {divergence!r}")
    if divergence == "exact":
        given = [k for k, v in (("num_probes", num_probes), ("probe", probe)) if v is not None]
        if given:
            raise ValueError(f"log_likelihood: {', '.join(given)} only apply to divergence='hutchinson'")
        num_probes, probe = 0, None
    else:
        num_probes = DEFAULT_NUM_PROBES if num_probes is None else num_probes
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"log_likelihood: expected num_probes to be an int >= 1, found {num_probes!r}")
        probe = "rademacher" if probe is None else probe
        if probe not in PROBES:
            raise ValueError(f"log_likelihood: expected probe in {PROBES}, found {probe!r}")
    if method not in METHODS:
        raise ValueError(f"log_likelihood: expected method in {tuple(METHODS)}, found {method!r}")
    if METHODS[method]:
        if num_steps is not None:
            raise ValueError(f"log_likelihood: num_steps applies to fixed-grid methods "
                             f"{tuple(m for m, a in METHODS.items() if not a)}, found method={method!r}")
        rtol = DEFAULT_RTOL if rtol is None else rtol
        atol = DEFAULT_ATOL if atol is None else atol
        for name, v in (("rtol", rtol), ("atol", atol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ValueError(f"log_likelihood: expected {name} > 0 (finite), found {v!r}")
        max_num_steps = DEFAULT_MAX_NUM_STEPS if max_num_steps is None else max_num_steps
        if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
            raise ValueError(f"log_likelihood: expected max_num_steps to be an int >= 1, found {max_num_steps!r}")
    else:
        given = [k for k, v in (("rtol", rtol), ("atol", atol), ("max_num_steps", max_num_steps)) if v is not None]
        if given:
            raise ValueError(f"log_likelihood: {', '.join(given)} only apply to adaptive methods "
                             f"{tuple(m for m, a in METHODS.items() if a)}, found method={method!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"log_likelihood: fixed-grid method {method!r} needs num_steps, an int >= 1; "
                             f"found {num_steps!r}")
        if grid not in TIME_GRIDS:
            raise ValueError(f"log_likelihood: expected grid in {TIME_GRIDS}, found {grid!r}")
    return num_probes, probe, rtol, atol, max_num_steps


def log_likelihood(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: Process,
    x: torch.Tensor,
    *,
    divergence: str = "exact",
    num_probes: int | None = None,
    probe: str | None = None,
    method: str = "dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    num_steps: int | None = None,
    grid: str = "uniform",
    max_num_steps: int | None = None,
    per_sample_norm: bool = True,
    time_variable: str = "log_sigma",
    t_min: float | None = None,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    generator: GeneratorLike = None,
    sample_shape: Sequence[int] | None = None,
    data_range: tuple[float, float] | None = None,
    accelerator=None,
    return_latent: bool = False,
) -> LikelihoodResult:
    """``log p(x)`` of a score model through the probability-flow ODE (see the module docstring).

    Args:
        score_fn: the canonical ``score_fn(x, t)``: a :class:`~score_toolkit.scores.ScoreAdapter` (any process and
            prediction type, energy included) or an analytic score; it must be differentiable in ``x``. A bare
            network is refused (its prediction type is unknown).
        process: the forward process the score belongs to.
        x: data (B, ...) in model space, any rank.
        divergence: ``"exact"`` (``d`` vector-Jacobian products per evaluation: small ``d``) or ``"hutchinson"``.
        num_probes: Hutchinson probes per sample (default 4; ``>= 2`` for a standard error, NaN with 1).
        probe: ``"rademacher"`` (default) or ``"gaussian"``.
        method: torchdiffeq method: adaptive ``dopri5`` (default), ``dopri8``, ``bosh3``, ``adaptive_heun``, or
            fixed-grid ``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4`` (then ``num_steps`` is required).
        rtol, atol: adaptive tolerances (default 1e-5 each).
        num_steps, grid: fixed-grid methods: steps and kind of the grid (:meth:`Process.time_grid`).
        max_num_steps: adaptive step budget per solve (default 10000); exceeding it raises :class:`SolverError`
            (also under ``python -O``, where torchdiffeq's own ``assert`` vanishes).
        per_sample_norm: error norm = max over samples of each sample's RMS (of x and of its log-density
            components), so every sample meets the tolerance by itself; ``False``: RMS over the whole batch
            (score_sde's choice; a hard sample among easy ones may then end far less accurate).
        time_variable: the variable the solver integrates in: ``"log_sigma"`` (default), ``tau = ln(sigma / alpha)``
            with the scaled state ``x / alpha`` (smooth in tau whenever the score is smooth, for every process,
            including a discrete DDPM table whose coefficients jump at each of its N steps), or ``"t"``, the
            process's own time (``dx/dt = f x - g^2 s / 2``). Both give the same ODE solution; they differ in where
            the solver puts its steps. For VE processes they coincide up to a linear change of variable.
        t_min: start of the integration (default ``process.t_min``).
        prior_log_prob: ``log p_1`` (default ``process.prior_log_prob``, the Gaussian prior).
        batch_size: samples per solve (default 256). Samples are solved in chunks of consecutive global
            indices, so results do not depend on the number of processes.
        seed: probes of sample ``i`` come from a generator seeded by ``(seed, i)`` (default seed 0): the same
            whatever the batch size or process count.
        generator: instead of ``seed``: one ``torch.Generator`` (shared by all samples) or one per sample.
            Not allowed with ``accelerator``.
        sample_shape: the model's sample shape, to check ``x`` against (default: read from the wrapped network's
            config when it has one: ``dim`` of the MLPs, ``(in_channels, sample_size, sample_size)`` of a UNet).
        data_range: ``(lo, hi)``: refuse data outside it (e.g. ``(-1, 1)`` for images scaled to [-1, 1]).
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``); every process passes the same full ``x``
            and solves its own chunks (chunk ``c`` on process ``c mod world``),
            without any collective inside the solve (so processes needing different numbers of steps cannot
            deadlock), then results are gathered; every process returns the full result. If a process fails,
            every process raises (the failures are exchanged first, so none waits forever).
        return_latent: also return the state at ``t = 1``.

    Raises:
        ValueError / TypeError on bad input (shape, range, non-finite data, options), :class:`SolverError` when
        the solver exhausts its step budget, :class:`~score_toolkit.samplers.base.NonFiniteError` when the
        score or its divergence becomes NaN or infinite.
    """
    start = time.perf_counter()
    _check_score_fn(score_fn)
    if not isinstance(process, Process):
        raise TypeError(f"log_likelihood: expected a score_toolkit Process, found {type(process).__name__}")
    x = _check_data(x, score_fn, sample_shape, data_range)
    num_probes, probe, rtol, atol, max_num_steps = _resolve_options(
        divergence, num_probes, probe, method, rtol, atol, num_steps, grid, max_num_steps)
    if not isinstance(per_sample_norm, bool):
        raise TypeError(f"log_likelihood: expected per_sample_norm to be a bool, found {per_sample_norm!r}")
    t_lo = process.t_min if t_min is None else float(t_min)
    if not process.t_min - 1e-12 <= t_lo < process.t_max:
        raise ValueError(f"log_likelihood: expected t_min in [{process.t_min:g}, {process.t_max:g}), found {t_min!r}")
    t_hi = process.t_max
    prior = process.prior_log_prob if prior_log_prob is None else prior_log_prob
    if not callable(prior):
        raise TypeError(f"log_likelihood: expected prior_log_prob to be callable, found {type(prior).__name__}")
    n = x.shape[0]
    bs = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"log_likelihood: expected batch_size to be an int >= 1, found {batch_size!r}")
    if generator is not None and seed is not None:
        raise ValueError("log_likelihood: pass seed or generator, not both")
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ValueError(f"log_likelihood: expected one generator per sample ({n}), found {len(generator)}")
    if generator is not None and accelerator is not None:
        raise ValueError("log_likelihood: with an accelerator pass seed (per-sample probes by global index), "
                         "not generator")
    seed = 0 if seed is None and generator is None else seed
    if time_variable not in TIME_VARIABLES:
        raise ValueError(f"log_likelihood: expected time_variable in {TIME_VARIABLES}, found {time_variable!r}")
    variable = _TimeVariable(time_variable, process, t_lo, t_hi)
    grid_tau = None
    if not METHODS[method]:
        grid_t = process.time_grid(num_steps, grid, t_min=t_lo, t_max=t_hi, dtype=torch.float64).flip(0)
        grid_tau = variable.to_tau(grid_t)
        grid_tau[0], grid_tau[-1] = variable.lo, variable.hi

    rank, world = 0, 1
    if accelerator is not None:
        rank, world = int(accelerator.process_index), int(accelerator.num_processes)
    chunks = [(lo, min(lo + bs, n)) for lo in range(0, n, bs)]
    mine = chunks[rank::world]
    dims = math.prod(x.shape[1:])
    outputs: list[tuple[int, int, dict]] = []
    error: BaseException | None = None
    try:
        for lo, hi in mine:
            xc = x[lo:hi]
            probes = None
            if divergence == "hutchinson":
                if generator is None:
                    gens = per_sample_generators(seed, range(lo, hi), device=xc.device)
                elif isinstance(generator, (list, tuple)):
                    gens = list(generator[lo:hi])
                else:
                    gens = generator
                probes = _probes(probe, num_probes, xc.shape, gens, xc.dtype, xc.device)
            out = _solve_chunk(score_fn, process, xc, divergence=divergence, probes=probes, method=method, rtol=rtol,
                               atol=atol, grid=grid_tau, max_num_steps=max_num_steps, per_sample_norm=per_sample_norm,
                               variable=variable, prior_log_prob=prior)
            outputs.append((lo, hi, out))
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes have been told
        if world == 1:
            raise
        error = err

    if world > 1:
        outputs = _exchange(accelerator, outputs, error, chunks, mine, n, x, rank, world, return_latent)
    fields = ("log_prob", "std_err", "prior", "delta")
    res = {k: torch.empty(n, dtype=x.dtype, device=x.device) for k in fields}
    nfe_per = torch.zeros(n, dtype=torch.long)
    latent = torch.empty_like(x) if return_latent else None
    total_nfe = 0
    for lo, hi, out in outputs:
        for k in fields:
            res[k][lo:hi] = out[k]
        nfe_per[lo:hi] = int(out["nfe"])
        total_nfe += int(out["nfe"])
        if latent is not None:
            latent[lo:hi] = out["latent"]
    info = {"method": method, "time_variable": time_variable, "batch_size": bs, "per_sample_norm": per_sample_norm,
            "num_processes": world}
    if METHODS[method]:
        info.update(rtol=rtol, atol=atol, max_num_steps=max_num_steps)
    else:
        info.update(num_steps=num_steps, grid=grid)
    return LikelihoodResult(
        log_prob=res["log_prob"], std_err=res["std_err"], prior_log_prob=res["prior"], delta_log_prob=res["delta"],
        nfe=total_nfe, nfe_per_sample=nfe_per, num_dims=dims, divergence=divergence, num_probes=num_probes,
        probe=probe, t_min=t_lo, wall_time_s=time.perf_counter() - start, latent=latent, info=info,
    )


def _exchange(accelerator, outputs, error, chunks, mine, n, x, rank, world, return_latent):
    """Tell every process whether any failed (one small collective), then gather the per-sample results."""
    from accelerate.utils import gather, gather_object

    failed = torch.tensor([1 if error is not None else 0], device=accelerator.device)
    flags = gather(failed).cpu()
    if bool(flags.any()):
        messages = gather_object([f"process {rank}: {type(error).__name__}: {error}" if error is not None else None])
        text = "; ".join(m for m in messages if m)
        if error is not None:
            if _rebuildable(error):
                raise type(error)(f"{error} [log_likelihood on {world} processes: {text}]") from error
            raise error
        raise RuntimeError(f"log_likelihood: another process failed, so this one stops too: {text}")
    # every process knows how many samples each holds, so all can pad to the same length without asking
    counts = [sum(hi - lo for lo, hi in chunks[r::world]) for r in range(world)]
    m = max(counts)
    d = math.prod(x.shape[1:])
    cols = 6 + (d if return_latent else 0)  # index, log_prob, std_err, prior, delta, nfe[, latent]
    local = torch.full((m, cols), -1.0, dtype=torch.float64, device=accelerator.device)
    row = 0
    for lo, hi, out in outputs:
        k = hi - lo
        local[row : row + k, 0] = torch.arange(lo, hi, dtype=torch.float64)
        for j, key in enumerate(("log_prob", "std_err", "prior", "delta"), start=1):
            local[row : row + k, j] = out[key].to(torch.float64)
        local[row : row + k, 5] = float(out["nfe"])
        if return_latent:
            local[row : row + k, 6:] = out["latent"].reshape(k, -1).to(torch.float64)
        row += k
    table = gather(local).cpu()
    table = table[table[:, 0] >= 0]
    order = torch.argsort(table[:, 0])
    table = table[order]
    if table.shape[0] != n or not torch.equal(table[:, 0].long(), torch.arange(n)):
        raise RuntimeError(f"log_likelihood: gathered {table.shape[0]} results for {n} samples")
    merged = []
    for lo, hi in chunks:
        part = table[lo:hi]
        out = {key: part[:, j].to(x.dtype).to(x.device) for j, key in
               enumerate(("log_prob", "std_err", "prior", "delta"), start=1)}
        out["nfe"] = int(part[0, 5])
        out["latent"] = part[:, 6:].to(x.dtype).to(x.device).reshape(hi - lo, *x.shape[1:]) if return_latent else None
        merged.append((lo, hi, out))
    return merged


def _rebuildable(error: BaseException) -> bool:
    try:
        type(error)("probe")
        return True
    except Exception:  # noqa: BLE001
        return False


# ============================================================================================ bits/dim
def _levels(bits, levels) -> int:
    if (bits is None) == (levels is None):
        raise ValueError(f"expected exactly one of bits or levels, found bits={bits!r}, levels={levels!r}")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
            raise ValueError(f"expected bits to be an int in [1, 32], found {bits!r}")
        return 2**bits
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"expected levels to be an int >= 2, found {levels!r}")
    return levels


def bits_per_dim(nll, num_dims: int, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0):
    """Bits per dimension of the discrete data from the model-space NLL (nats) of its uniform dequantization.

    Data stored with ``L = 2^B`` levels (``bits=B``, or any ``levels=L``, e.g. 17 for scikit-learn's digits),
    integers ``k in {0..L-1}^d``, are dequantised to ``y = (k + u) / L`` with ``u ~ U[0, 1)^d`` and mapped to the
    model's space by ``x = a y + b`` (``scale = a``, e.g. 2 with ``b = -1`` for data in [-1, 1]; see
    :func:`dequantize`). Then

        bpd = NLL_x / (d ln 2) - log2|a| + log2 L            (= ... + B for B-bit data).

    Derivation. Let ``v = k + u = L y``; its density is ``p_v(v) = p_x(a v / L + b) |a / L|^d``. The discrete
    model ``P(k) = int_{[0,1)^d} p_v(k + u) du`` satisfies, by Jensen's inequality,

        log P(k) >= E_u log p_v(k + u) = E_u log p_x(x) + d ln|a| - d ln L,

    so ``-log2 P(k) / d <= E_u[NLL_x] / (d ln 2) - log2|a| + log2 L``: the formula, averaged over ``u``, is an
    upper bound on the code length of ``k`` in bits per dimension, with equality when ``p_v`` is constant on each
    cell (a model that is itself a dequantised density). ``a = 2, B = 8`` gives score_sde's offset ``+7``;
    ``a = 1`` gives ``+8``; its fixed ``+7`` is wrong for other bit depths or scalings.

    Args:
        nll: NLL in nats (a tensor or a number), per sample.
        num_dims: ``d``.
    """
    lv = _levels(bits, levels)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < abs(scale) < math.inf):
        raise ValueError(f"expected a finite, non-zero scale, found {scale!r}")
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"expected num_dims to be an int >= 1, found {num_dims!r}")
    return nll / (num_dims * math.log(2)) - math.log2(abs(scale)) + math.log2(lv)


def _check_levels_data(k: torch.Tensor, lv: int) -> torch.Tensor:
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"expected the quantised data k to be a tensor of integers, found {type(k).__name__}")
    if k.ndim < 2:
        raise ValueError(f"expected quantised data of shape (B, ...), found {tuple(k.shape)}")
    if k.is_floating_point():
        if not bool(torch.isfinite(k).all()) or not bool((k == k.round()).all()):
            raise ValueError("expected the quantised data k to hold integers (levels), found non-integer values")
    elif k.dtype == torch.bool or k.is_complex():
        raise TypeError(f"expected integer levels, found dtype {k.dtype}")
    mn, mx = int(k.min()), int(k.max())
    if mn < 0 or mx > lv - 1:
        raise ValueError(f"expected levels k in [0, {lv - 1}] for {lv}-level data, found values in [{mn}, {mx}]")
    return k


def dequantize(k: torch.Tensor, *, bits: int | None = None, levels: int | None = None, scale: float = 2.0,
               offset: float = -1.0, seed: int = 0, generator: GeneratorLike = None, dtype=torch.float32,
               indices: Sequence[int] | None = None) -> torch.Tensor:
    """Uniform dequantization into model space: ``x = scale * (k + u) / L + offset`` with ``u ~ U[0, 1)``.

    ``k``: integers in ``[0, L - 1]`` (any rank (B, ...)). Noise of sample ``i`` comes from a generator seeded
    by ``(seed, indices[i])`` (``indices`` default ``0..B-1``), or from ``generator``."""
    lv = _levels(bits, levels)
    k = _check_levels_data(k, lv)
    if generator is None:
        idx = range(k.shape[0]) if indices is None else indices
        generator = per_sample_generators(seed, idx, device=k.device)
    u = rand(k.shape, generator=generator, device=k.device, dtype=dtype)
    return scale * (k.to(dtype) + u) / lv + offset


def to_levels(x: torch.Tensor, *, bits: int | None = None, levels: int | None = None, lo: float = -1.0,
              hi: float = 1.0, tol: float = 1e-3) -> torch.Tensor:
    """The integer levels of data stored on an ``L``-level grid from ``lo`` to ``hi``
    (``x = lo + k (hi - lo) / (L - 1)``, as e.g. ``images / 255 * 2 - 1``): ``k = round((x - lo) / (hi - lo) (L - 1))``.
    Raises a ValueError when the data are not on that grid (within ``tol`` of a level)."""
    lv = _levels(bits, levels)
    check_tensor(x, "x", min_rank=2)
    pos = (x.double() - lo) / (hi - lo) * (lv - 1)
    k = pos.round()
    off = float((pos - k).abs().max())
    if off > tol:
        raise ValueError(f"expected data on the {lv}-level grid from {lo:g} to {hi:g}, found values {off:.3g} "
                         f"levels away from it")
    mn, mx = int(k.min()), int(k.max())
    if mn < 0 or mx > lv - 1:
        raise ValueError(f"expected data in [{lo:g}, {hi:g}] ({lv} levels), found values in "
                         f"[{float(x.min()):g}, {float(x.max()):g}]")
    return k.long()


@dataclass
class BitsPerDimResult:
    """What :func:`dequantized_bits_per_dim` returns.

    Attributes:
        bpd: per-sample bits/dim (B,), averaged over the dequantization draws.
        std_err: per-sample standard error (B,): over the draws when ``num_dequant >= 2`` (it then includes the
            dequantization noise and the Hutchinson error), else the Hutchinson error alone.
        nll: per-sample model-space NLL (nats), averaged over the draws.
        nfe: total ODE function evaluations; wall_time_s: wall time.
        levels, scale, offset, num_dequant: the dequantization.
        likelihoods: the :class:`LikelihoodResult` of every draw.
    """

    bpd: torch.Tensor
    std_err: torch.Tensor
    nll: torch.Tensor
    nfe: int
    wall_time_s: float
    levels: int
    scale: float
    offset: float
    num_dequant: int
    likelihoods: list[LikelihoodResult]

    def summary(self) -> dict[str, Any]:
        n = self.bpd.numel()
        spread = float(self.bpd.double().std()) if n > 1 else 0.0
        within = float(self.std_err.double().nan_to_num(0.0).pow(2).sum().sqrt()) / n
        return {"num_samples": n, "mean_bpd": float(self.bpd.double().mean()),
                "std_err_mean_bpd": math.sqrt(spread**2 / n + within**2), "mean_nll_nats": float(self.nll.double().mean()),
                "levels": self.levels, "scale": self.scale, "offset": self.offset, "num_dequant": self.num_dequant,
                "nfe": self.nfe, "wall_time_s": self.wall_time_s}


def dequantized_bits_per_dim(score_fn, process: Process, k: torch.Tensor, *, bits: int | None = None,
                             levels: int | None = None, scale: float = 2.0, offset: float = -1.0, num_dequant: int = 1,
                             seed: int = 0, dtype=torch.float32, **likelihood_options) -> BitsPerDimResult:
    """Bits/dim of quantised data ``k`` (integers in ``[0, L - 1]``): dequantise ``num_dequant`` times
    (:func:`dequantize`), compute each :func:`log_likelihood` (``likelihood_options`` are passed on), convert with
    :func:`bits_per_dim` and average. Draw ``j`` of sample ``i`` uses the seed ``(seed + j, i)`` for both the
    dequantization noise and the probes."""
    start = time.perf_counter()
    lv = _levels(bits, levels)
    if isinstance(num_dequant, bool) or not isinstance(num_dequant, int) or num_dequant < 1:
        raise ValueError(f"expected num_dequant to be an int >= 1, found {num_dequant!r}")
    for key in ("seed", "generator", "data_range"):
        if key in likelihood_options:
            raise ValueError(f"dequantized_bits_per_dim sets {key} itself; do not pass it")
    lo, hi = sorted((offset, offset + scale))
    results, per_draw = [], []
    d = math.prod(k.shape[1:])
    for j in range(num_dequant):
        x = dequantize(k, levels=lv, scale=scale, offset=offset, seed=_mix_seed(seed, j), dtype=dtype)
        res = log_likelihood(score_fn, process, x, seed=_mix_seed(seed, j), data_range=(lo, hi), **likelihood_options)
        results.append(res)
        per_draw.append(bits_per_dim(res.nll.double(), d, levels=lv, scale=scale))
    stack = torch.stack(per_draw)  # (J, B)
    bpd = stack.mean(0)
    if num_dequant > 1:
        std_err = stack.std(0) / math.sqrt(num_dequant)
    else:
        std_err = results[0].std_err.double() / (d * math.log(2))
    nll = torch.stack([r.nll.double() for r in results]).mean(0)
    return BitsPerDimResult(bpd=bpd, std_err=std_err, nll=nll, nfe=sum(r.nfe for r in results),
                            wall_time_s=time.perf_counter() - start, levels=lv, scale=float(scale),
                            offset=float(offset), num_dequant=num_dequant, likelihoods=results)


def _mix_seed(seed: int, j: int) -> int:
    return int(seed) * 7919 + j
