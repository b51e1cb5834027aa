"""The solution of the augmented probability-flow ODE: one solve per chunk of samples (the per-sample stepper of
:mod:`~score_toolkit.likelihood.stepper` or torchdiffeq) of the right-hand side of
:mod:`~score_toolkit.likelihood.dynamics` in the integration variable of
:mod:`~score_toolkit.likelihood.time_variable`, and :func:`log_likelihood` (see :mod:`score_toolkit.likelihood` for
the mathematics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from .._utils import GeneratorLike, per_sample_generators
from ..processes import Process
from ..samplers._odeint import raise_odeint_failure
from ..samplers.base import NonFiniteError
from ..threads import cpu_threads
from .divergence import _batch_norm, _per_sample_norm, _probes, _two_part_rms
from .dynamics import _AugmentedDynamics, _too_many_steps
from .exchange import _exchange
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_METHOD,
    METHODS,
    _check_data,
    _check_score_fn,
    _resolve_options,
    _resolve_time_variable,
)
from .result import LikelihoodResult, SolverError
from .time_variable import _TimeVariable

__all__ = ["log_likelihood"]


class _Reversed:
    """The augmented right-hand side in ``u = -tau``: the solvers step forward, from ``-tau0`` to ``-tau1``."""

    def __init__(self, dynamics: _AugmentedDynamics):
        self.dynamics = dynamics

    def __call__(self, u: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return -self.dynamics(-u, state)

    def rows_times(self, us: torch.Tensor) -> list[tuple]:
        return self.dynamics.rows_times(-us, sign=-1.0)

    def rows_call(self, times: tuple, state: torch.Tensor, rows) -> torch.Tensor:
        return self.dynamics.rows_call(times, state, rows)

    def callback_step(self, u0, y0, dt) -> None:
        self.dynamics.callback_step(-u0, y0, dt)


def _integrate(func: _AugmentedDynamics, y0: torch.Tensor, tau0: float, tau1: float, *, method: str, rtol: float,
               atol: float, max_num_steps: int, norm, grid: torch.Tensor | None, who: str) -> torch.Tensor:
    """The augmented state at ``tau1`` from ``y0`` at ``tau0`` on ``func``'s right-hand side: the per-sample
    Dormand-Prince stepper (``"dopri5_per_sample"``), a torchdiffeq adaptive method (error norm ``norm``), or a
    torchdiffeq fixed-grid method on ``grid`` (values of tau from ``tau0`` to ``tau1``). ``tau1 < tau0`` integrates the
    other way (in ``u = -tau``, from the prior to the data). Solver failures are worded for ``who``."""
    import torchdiffeq

    sign = 1.0 if tau1 >= tau0 else -1.0
    rhs = func if sign > 0 else _Reversed(func)
    lo, hi = sign * tau0, sign * tau1
    variable = func.variable
    t_end = variable.t_hi if sign > 0 else variable.t_lo
    if not METHODS[method]:
        us = (sign * grid).to(y0.device)
        return torchdiffeq.odeint(rhs, y0, us[[0, -1]], method=method,
                                  options={"grid_constructor": lambda f, y, t: us.to(t)})[-1]
    reached = [torch.tensor([lo])]  # the per-sample stepper's u of the rows still integrating (read on failure)
    try:
        if method == "dopri5_per_sample":
            from .stepper import solve_dopri5

            def on_attempt(attempt: int, u: torch.Tensor) -> None:
                func.steps = attempt - 1
                reached[0] = u

            y1, _ = solve_dopri5(rhs.rows_call, y0, lo, hi, rtol=rtol, atol=atol, ratio=_two_part_rms(func.dim),
                                 max_num_steps=max_num_steps, on_attempt=on_attempt, times=rhs.rows_times)
            return y1
        span = torch.tensor([lo, hi], dtype=torch.float64, device=y0.device)
        options = {"max_num_steps": max_num_steps, "step_t": span[1:].clone(), "norm": norm}
        return torchdiffeq.odeint(rhs, y0, span, rtol=rtol, atol=atol, method=method, options=options)[-1]
    except (SolverError, AssertionError) as err:  # the stepper words its failures as torchdiffeq does, which
        # checks with assert (absent under python -O); other errors (the step limit of callback_step) pass as raised
        if method == "dopri5_per_sample":
            func.t = variable.coefficients(sign * float(reached[0].min()))[0]
        raise_odeint_failure(err, who=who, t=func.t, steps=func.steps,
                             too_many=_too_many_steps(max_num_steps, func.t, t_end), error=SolverError)


def _solve_chunk(score_fn, process, x, *, divergence, probes, method, rtol, atol, grid, max_num_steps,
                 per_sample_norm, variable: _TimeVariable, prior_log_prob):
    func = _AugmentedDynamics(score_fn, process, x.shape, divergence, probes, variable,
                              max_num_steps if METHODS[method] else None)
    comps = 1 if probes is None else probes.shape[0]
    y_start = x.reshape(x.shape[0], -1) * math.exp(-variable.log_c_lo)
    y0 = torch.cat([y_start, torch.zeros(x.shape[0], comps, dtype=x.dtype, device=x.device)], 1)
    norm = _per_sample_norm(func.dim) if per_sample_norm else _batch_norm(func.dim)
    y1 = _integrate(func, y0, variable.lo, variable.hi, method=method, rtol=rtol, atol=atol,
                    max_num_steps=max_num_steps, norm=norm, grid=grid, who="log_likelihood")
    x1 = (y1[:, : func.dim] * math.exp(variable.log_c_hi)).reshape(x.shape)
    # with x = c y: div_x dx/dtau = d c'/c + div_y dy/dtau, so the log-density gains d (ln c(tau_hi) - ln c(tau_lo))
    # besides the integral of div_y dy/dtau = A d + B c div_x s (c = 1 in t)
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


@cpu_threads()
def log_likelihood(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: Process,
    x: torch.Tensor,
    *,
    divergence: str = "exact",
    num_probes: int | None = None,
    probe: str | None = None,
    method: str = DEFAULT_METHOD,
    rtol: float | None = None,
    atol: float | None = None,
    num_steps: int | None = None,
    grid: str | None = None,
    max_num_steps: int | None = None,
    per_sample_norm: bool = True,
    time_variable: str = "auto",
    t_min: float | None = None,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    generator: GeneratorLike = None,
    sample_shape: Sequence[int] | None = None,
    data_range: tuple[float, float] | None = None,
    accelerator=None,
    return_latent: bool = False,
    progress: bool = False,
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
        method: ``"dopri5_per_sample"`` (default): the Dormand-Prince 5(4) pair with a step size and an error
            control per sample (:mod:`score_toolkit.likelihood.stepper`; each sample meets ``rtol``/``atol`` in
            ``sqrt((rms_x^2 + rms_logp^2) / 2)``, its state's and its log-density's RMS weighing half each, and its
            result does not depend on the other samples of the batch); or a torchdiffeq method, one step sequence for the
            batch: adaptive ``dopri5``, ``dopri8``, ``bosh3``, ``adaptive_heun``, or fixed-grid ``euler``,
            ``midpoint``, ``heun2``, ``heun3``, ``rk4`` (then ``num_steps`` is required).
        rtol, atol: adaptive tolerances (default 1e-5 each).
        num_steps, grid: fixed-grid methods only: steps and kind of the grid (:meth:`Process.time_grid`; default
            ``"uniform"``); an error with an adaptive method.
        max_num_steps: adaptive step budget per solve (default 10000); exceeding it raises :class:`SolverError`
            (also under ``python -O``, where torchdiffeq's own ``assert`` vanishes).
        per_sample_norm: torchdiffeq's adaptive methods: error norm = max over samples of each sample's RMS (of x
            and of its log-density components), so every sample meets the tolerance by itself; ``False``: RMS over
            the whole batch (score_sde's choice; a hard sample among easy ones may then end far less accurate).
            The default method controls every sample by itself and refuses ``False``.
        time_variable: the variable the solver integrates in: ``"auto"`` (default) is ``"log_sigma"`` for a network
            (:class:`~score_toolkit.scores.ScoreAdapter`, whose score grows like 1 / sigma as t -> 0, which makes
            the ODE singular at ``t_min`` in t and in the VP clock) and ``"vp_t"`` for an analytic or plain score
            under every process; ``"vp_t"``: the time of VP(0.1, 20) at the process's noise-to-signal ratio, with
            the variance-preserving state ``x / sqrt(alpha^2 + sigma^2)`` (t itself for VP(0.1, 20)); ``"log_sigma"``:
            ``tau = ln(sigma / alpha)`` with the scaled state ``x / alpha`` (smooth in tau whenever the noise
            prediction is smooth, for every process, including a discrete DDPM table whose coefficients jump at
            each of its N steps), or ``"t"``, the process's own time (``dx/dt = f x - g^2 s / 2``). All give the
            same ODE solution; they differ in where the solver puts its steps (docs/likelihood.md).
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
        progress: a tqdm bar over the samples solved (this process's share; on the main process only).

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
    num_probes, probe, rtol, atol, grid, max_num_steps = _resolve_options(
        divergence, num_probes, probe, method, rtol, atol, num_steps, grid, max_num_steps)
    if not isinstance(per_sample_norm, bool):
        raise TypeError(f"log_likelihood: expected per_sample_norm to be a bool, found {per_sample_norm!r}")
    if method == "dopri5_per_sample" and not per_sample_norm:
        raise ValueError("log_likelihood: method='dopri5_per_sample' steps and controls the error of every sample by "
                         "itself; per_sample_norm=False (one error norm over the batch) needs a batch solver such as "
                         "method='dopri5'")
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
    time_variable = _resolve_time_variable(time_variable, process, score_fn)
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
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n if world == 1 else sum(hi - lo for lo, hi in mine), desc="likelihood", unit="sample",
                   dynamic_ncols=True)
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
            if bar is not None:
                bar.update(hi - lo)
                bar.set_postfix(nfe=int(out["nfe"]), refresh=False)
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes have been told
        if world == 1:
            raise
        error = err
    finally:
        if bar is not None:
            bar.close()

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
    std_err, probe_variance = res["std_err"], None
    if divergence == "hutchinson" and num_probes > 1:
        probe_variance = std_err.double().pow(2) * num_probes
        # all K probe estimates equal: the spread says nothing about the error, which is not 0 (never report 0)
        std_err = torch.where(std_err == 0, torch.full_like(std_err, math.nan), std_err)
    info = {"method": method, "time_variable": time_variable, "batch_size": bs, "per_sample_norm": per_sample_norm,
            "num_processes": world}
    if METHODS[method]:
        info.update(rtol=rtol, atol=atol, max_num_steps=max_num_steps)
    else:
        info.update(num_steps=num_steps, grid=grid)
    return LikelihoodResult(
        log_prob=res["log_prob"], std_err=std_err, prior_log_prob=res["prior"], delta_log_prob=res["delta"],
        nfe=total_nfe, nfe_per_sample=nfe_per, num_dims=dims, divergence=divergence, num_probes=num_probes,
        probe=probe, t_min=t_lo, wall_time_s=time.perf_counter() - start, latent=latent, info=info,
        probe_variance=probe_variance,
    )
