#!/usr/bin/env python
"""Sampler benchmark: error vs NFE next to the noise floor, and speed against hand-written loops.

Part 1, accuracy. Every registered sampler (or ``--samplers``) runs on the analytic test bed with the exact
score (a 2-D ring of 8 Gaussians; a 16-D anisotropic mixture of 10 components with unequal weights) under
``VESDE(0.01, 50)`` and ``VPSDE(0.1, 20)``, at a few NFE budgets each. Each run is scored against an exact
reference set of the same size N with the metrics of :mod:`score_toolkit.metrics`, and every metric is put
next to its noise floor: the same metric between two independent exact sample sets of size N, averaged
over ``--floor-seeds`` pairs. A run "meets the criterion" when its within-mode sliced W2 and its
mean-NLL gap are both within 1.5x of their floors; the summary gives, per sampler and case, the smallest
NFE that meets it.

Part 2, speed. Side by side in one process, repetitions interleaved (the order alternates), each sampler
is timed against a hand-written loop of the same algorithm at the same NFE (``HAND_LOOPS``: a few lines
each), on a cheap exact score (the ring, where overhead is visible) and on an expensive one (a small MLP on
16-D). The sampler and its hand loop start from the same state with identically seeded generators, so
their outputs must agree to round-off (reported as ``max |diff|``). ``pf_ode`` is compared with calling
``torchdiffeq.odeint`` directly; torchsde's default ``sdeint`` (its own Brownian interval) is the slow
reference for ``euler_maruyama``. Peak memory: the growth of the resident-set high-water mark
(``getrusage(RUSAGE_SELF).ru_maxrss``) over one run in a fresh subprocess per measurement (after a small
warm-up run, so lazy imports are not counted); on CUDA it would be ``torch.cuda.max_memory_allocated``.

Usage (see benchmarks/README.md)::

    python benchmarks/bench_samplers.py                 # full run, N = 10000, all registered samplers
    python benchmarks/bench_samplers.py --quick --n 500 # one NFE per sampler variant, a smoke run
    python benchmarks/bench_samplers.py --samplers euler_maruyama,pf_ode --parts speed

Adding a sampler: nothing to do for accuracy (the generic sweep reads its declared properties); for
speed add its hand loop to ``HAND_LOOPS`` (and its options at a given NFE to ``SPEED_OPTIONS`` if it has
no ``num_steps``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Passive OpenMP waiting: on a shared, oversubscribed machine spinning worker threads slowed 2-thread runs
# down up to 5x; it applies to the samplers and the hand loops alike. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import git_commit  # noqa: E402

from score_toolkit import metrics as M  # noqa: E402
from score_toolkit._io import write_text_atomic
from score_toolkit.analytic import anisotropic_mixture, ring_mixture  # noqa: E402
from score_toolkit.processes import TIME_GRIDS, VESDE, VPSDE, Process  # noqa: E402
from score_toolkit.registry import get_sampler, get_sampler_class, list_samplers  # noqa: E402

HERE = Path(__file__).resolve().parent
CRITERION = 1.5  # within 1.5x of the noise floor in within-mode SW2 and in mean NLL
FAST_TARGETS = {"ring": 15, "aniso16": 40}  # NFE the fast samplers must reach the criterion at
SW_SEED = 7  # projections of the plain sliced W2 (the within-mode one seeds its own, per component)
REF_SEED = 999_999  # the exact reference set the samplers are scored against
FLOOR_SEED = 100_000  # floor pair k uses seeds FLOOR_SEED + 2k and FLOOR_SEED + 2k + 1

CASES: dict[str, tuple[str, Callable]] = {
    "ring": ("2-D ring of 8 Gaussians (std 0.2, radius 4)", ring_mixture),
    "aniso16": ("16-D anisotropic mixture, 10 components, unequal weights", anisotropic_mixture),
}
PROCESSES: dict[str, Callable[[], Process]] = {
    "VE": lambda: VESDE(0.01, 50.0),
    "VP": lambda: VPSDE(0.1, 20.0),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _fmt_opts(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"


# ====================================================================== part 1: accuracy
# NFE ladders, per case: the 16-D score costs ~5x the ring's, so its ladders stop earlier (the whole full run
# is meant to take ~25 minutes on 2 cores).
STEPS = {"ring": (10, 20, 50, 100, 250, 500, 1000), "aniso16": (10, 20, 50, 100, 250, 500)}
FAST_STEPS = {"ring": (3, 5, 8, 10, 12, 15, 20, 30, 50, 100), "aniso16": (3, 5, 8, 10, 12, 15, 20, 30, 50)}
ODE_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
SDE_TOLS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3)
FAST_SAMPLERS = ("dpmpp", "dpm_solver", "heun", "edm", "unipc", "lms", "deis")  # name fragments


@dataclass
class Variant:
    """One curve of the error-vs-NFE plot: a fixed set of options (``label``) and the runs along it,
    cheapest first (``--quick`` keeps the first run only)."""

    label: str
    runs: list[dict[str, Any]]


def _is_fast(name: str, cls) -> bool:
    order = cls.properties.order
    return (order is not None and order >= 2) or any(f in name for f in FAST_SAMPLERS)


def generic_sweep(name: str, cls, case: str) -> list[Variant]:
    """From the sampler's declared properties: tolerances for adaptive samplers (``rtol``/``atol``),
    ``num_steps`` for fixed-grid ones (a finer ladder at small NFE for high-order samplers, and for those whose
    default grid is not EDM's, a second curve on the Karras rho = 7 grid)."""
    props, opts = cls.properties, cls.options
    if props.adaptive:
        keys = [k for k in ("rtol", "atol") if k in opts]
        if keys:
            tols = SDE_TOLS if props.stochastic else ODE_TOLS
            return [Variant("defaults", [{k: tol for k in keys} for tol in tols])]
        return [Variant("defaults", [{}])]
    if "num_steps" in opts:
        fast = _is_fast(name, cls)
        steps = (FAST_STEPS if fast else STEPS)[case]
        out = [Variant("defaults", [{"num_steps": n} for n in steps])]
        if fast and opts.get("grid", "karras") != "karras" and "karras" in TIME_GRIDS:
            out.append(Variant("grid=karras", [{"num_steps": n, "grid": "karras"} for n in steps]))
        return out
    return [Variant("defaults", [{}])]


def _pc_sweep(name: str, cls, case: str) -> list[Variant]:
    steps = STEPS[case][:-1]  # 2 NFE per step
    out = [Variant("defaults", [{"num_steps": n} for n in steps])]
    opts = cls.options
    if "snr_scaling" in opts:
        # "grid" equals "constant" up to reference_steps; a small reference_steps shows whether the bias
        # vanishes within this NFE range.
        extra = {"snr_scaling": "grid", "reference_steps": 50} if "reference_steps" in opts else {"snr_scaling": "grid"}
        out.append(Variant(_fmt_opts(extra), [{**extra, "num_steps": n} for n in steps if n >= 100]))
    if opts.get("snr_rule", "sample") != "sample":  # the paper's per-sample norm rule, if not the default
        out.append(Variant("snr_rule=sample", [{"snr_rule": "sample", "num_steps": n} for n in steps[::2]]))
    return out


def _annealed_sweep(name: str, cls, case: str) -> list[Variant]:
    return [Variant("num_levels=10 (defaults)", [{"steps_per_level": n // 10} for n in STEPS[case]])]


def _langevin_sweep(name: str, cls, case: str) -> list[Variant]:
    # Plain ULA at t_min from the prior: step 1e-3 is the default; 1e-2 is below 4 x the smallest data
    # variance of both cases (0.04 for the 16-D mixture) but biased (eps / (4 v) = 25 % there).
    steps = tuple(n for n in STEPS[case] if n not in (20, 500))
    return [Variant(f"step_size={eps}", [{"step_size": eps, "num_steps": n} for n in steps]) for eps in (1e-3, 1e-2)]


def _pf_ode_sweep(name: str, cls, case: str) -> list[Variant]:
    out = generic_sweep(name, cls, case)
    opts = cls.options
    if "method" in opts and "num_steps" in opts:  # a fixed-grid method too, if the sampler offers one
        out.append(Variant("method=rk4", [{"method": "rk4", "num_steps": n} for n in (3, 5, 10, 25)]))
    return out


def _adaptive_sde_sweep(name: str, cls, case: str) -> list[Variant]:
    if "eps_rel" not in cls.options:  # Jolicoeur-Martineau et al.'s names; otherwise the generic rtol / atol
        return generic_sweep(name, cls, case)
    return [Variant("eps_abs default", [{"eps_rel": e} for e in (0.2, 0.1, 0.05, 0.02, 0.01)])]


# ---------------------------------------------------------------- optimised grids
# The grid optimiser never sees the evaluation mixture: it fits a mixture by EM to a held-out batch of exact
# samples (seed HELD_OUT_SEED, not a reference, floor or sampling seed) and draws its own prior samples (seed
# OPTIMISER_SEED, not the sampling seed: with the same seed its 1024 prior draws would be the first rows of the
# evaluated run's). The number of components is the true number of modes of each case.
HELD_OUT_SEED = 271_828
HELD_OUT_N = 5000
OPTIMISER_SEED = 314_159
GRID_COMPONENTS = {"ring": 8, "aniso16": 10}
OPT_STEPS = {"ring": (5, 8, 10, 12, 13, 14, 19, 29), "aniso16": (12, 16, 20, 25, 30, 34, 39, 49)}


@dataclass(frozen=True)
class OptimisedGrid:
    """A ``grid=`` option resolved at run time by :func:`score_toolkit.samplers.grids.optimize_grid` for the
    sampler, its ``num_steps``, the process and the case (shown as ``grid=optimised`` in the tables)."""

    def __str__(self) -> str:
        return "optimised"

    __repr__ = __str__


_GRID_CACHE: dict[tuple, list[float]] = {}


def resolve_optimised_grid(name: str, num_steps: int, process_name: str, process: Process, case: str,
                           mixture, log=print) -> list[float]:
    from score_toolkit.samplers.grids import optimize_grid

    key = (name, num_steps, process_name, case)
    if key not in _GRID_CACHE:
        t0 = time.perf_counter()
        held_out = mixture.sample(HELD_OUT_N, generator=_gen(HELD_OUT_SEED))
        res = optimize_grid(get_sampler_class(name)(num_steps=num_steps), process, data=held_out,
                            num_components=GRID_COMPONENTS[case], seed=OPTIMISER_SEED)
        _GRID_CACHE[key] = res.times.tolist()
        log(f"[grid] {case}/{process_name} {name} {num_steps} steps: optimised in {time.perf_counter() - t0:.1f} s")
    return _GRID_CACHE[key]


def _optimised_grid_sweep(name: str, cls, case: str) -> list[Variant]:
    """The generic curves, plus one on grids optimised per NFE budget, ending with ``to_zero``."""
    out = generic_sweep(name, cls, case)
    if "to_zero" in cls.options:
        out.append(Variant("optimised grid, to_zero=True",
                           [{"num_steps": n, "grid": OptimisedGrid(), "to_zero": True} for n in OPT_STEPS[case]]))
    return out


SWEEPS: dict[str, Callable[[str, Any, str], list[Variant]]] = {
    "dpmpp_2m": _optimised_grid_sweep,
    "dpmpp_3m": _optimised_grid_sweep,
    "adaptive_sde": _adaptive_sde_sweep,
    "predictor_corrector": _pc_sweep,
    "annealed_langevin": _annealed_sweep,
    "langevin": _langevin_sweep,
    "pf_ode": _pf_ode_sweep,
}


def sweep_for(name: str, cls, case: str, quick: bool, denoise: bool = False, only: str | None = None) -> list[Variant]:
    variants = SWEEPS.get(name, generic_sweep)(name, cls, case)
    if quick:
        variants = [Variant(v.label, v.runs[:1]) for v in variants]
    if denoise:  # end on the clean data: a final Tweedie step at the sampler's final time (+1 NFE)
        variants = [v if any(o.get("to_zero") for o in v.runs) else  # to_zero already ends on the clean data
                    Variant("denoise=True" if v.label == "defaults" else f"{v.label}, denoise=True",
                            [{**o, "denoise": True} for o in v.runs]) for v in variants]
    if only:  # on the labels shown in the tables
        variants = [v for v in variants if (v.label == only[1:] if only.startswith("=") else only in v.label)]
    return variants


FLOOR_KEYS = ("wsw", "nll", "mwe", "sw")


def noise_floors(mixture, n: int, seeds: int) -> dict[str, dict[str, float]]:
    """Each metric between two independent exact sets of size ``n`` (``|mean_nll(A) - mean_nll(B)|`` for the
    NLL; the mode-weight error of each exact set against the true weights), mean and std over ``seeds``
    pairs (a single pair is itself a lucky or unlucky draw)."""
    vals: dict[str, list[float]] = {k: [] for k in FLOOR_KEYS}
    for k in range(seeds):
        a = mixture.sample(n, generator=_gen(FLOOR_SEED + 2 * k))
        b = mixture.sample(n, generator=_gen(FLOOR_SEED + 2 * k + 1))
        vals["wsw"].append(M.within_mode_sliced_wasserstein(a, mixture, reference=b))
        vals["nll"].append(abs(M.mean_nll(a, mixture) - M.mean_nll(b, mixture)))
        vals["mwe"] += [M.mode_weight_error(a, mixture), M.mode_weight_error(b, mixture)]
        vals["sw"].append(M.sliced_wasserstein(a, b, generator=_gen(SW_SEED)))
    return {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "count": len(v)} for k, v in vals.items()}


def score_samples(samples: torch.Tensor, mixture, reference: torch.Tensor, ref_nll: float) -> dict[str, float]:
    return {
        "wsw": M.within_mode_sliced_wasserstein(samples, mixture, reference=reference),
        "nll_gap": M.mean_nll(samples, mixture) - ref_nll,
        "mwe": M.mode_weight_error(samples, mixture),
        "sw": M.sliced_wasserstein(samples, reference, generator=_gen(SW_SEED)),
    }


ACC_FIELDS = [
    "sampler", "variant", "process", "case", "options", "nfe",
    "wsw", "wsw_floor", "wsw_ratio", "nll_gap", "nll_floor", "nll_ratio",
    "mwe", "mwe_floor", "mwe_ratio", "sw", "sw_floor", "sw_ratio", "wall_s", "meets", "error",
]


def run_accuracy(args, samplers: list[str], log) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    floors_by_case: dict[str, dict] = {}
    dtype = getattr(torch, args.dtype)
    for case in args.cases:
        _, make = CASES[case]
        mixture = make()
        t0 = time.perf_counter()
        floors = noise_floors(mixture, args.n, args.floor_seeds)
        floors_by_case[case] = floors
        log(f"[floors] {case}: " + ", ".join(f"{k}={v['mean']:.4g}+-{v['std']:.2g}" for k, v in floors.items())
            + f" ({time.perf_counter() - t0:.1f} s)")
        reference = mixture.sample(args.n, generator=_gen(REF_SEED))
        ref_nll = M.mean_nll(reference, mixture)
        fl = {k: floors[k]["mean"] for k in FLOOR_KEYS}
        for proc_name in args.processes:
            process = PROCESSES[proc_name]()
            score_fn = mixture.score_fn(process)
            for name in samplers:
                try:
                    cls = get_sampler_class(name)
                except Exception as exc:  # a broken plugin is reported, not fatal
                    rows.append(_error_row(name, "-", proc_name, case, {}, f"load failed: {exc}"))
                    log(f"[skip] {name}: {exc}")
                    continue
                for variant in sweep_for(name, cls, case, args.quick, args.denoise, args.only_variant):
                    for opts in variant.runs:
                        row = _accuracy_run(name, variant.label, opts, proc_name, process, case, mixture, score_fn,
                                            reference, ref_nll, fl, args, dtype, log)
                        rows.append(row)
                        log(_row_line(row))
                        if args.out_dir is not None:
                            write_csv(args.out_dir / f"{args.tag}_accuracy.partial.csv", rows, ACC_FIELDS)
    return rows, floors_by_case


def _error_row(name, variant, proc, case, opts, error) -> dict:
    row = {k: "" for k in ACC_FIELDS}
    row.update(sampler=name, variant=variant, process=proc, case=case, options=_fmt_opts(opts), meets=False, error=error)
    return row


def _accuracy_run(name, variant, opts, proc_name, process, case, mixture, score_fn, reference, ref_nll, fl, args, dtype,
                  log=print):
    try:
        resolved = {k: resolve_optimised_grid(name, opts["num_steps"], proc_name, process, case, mixture, log)
                    if isinstance(v, OptimisedGrid) else v for k, v in opts.items()}
    except Exception as exc:
        return _error_row(name, variant, proc_name, case, opts, f"grid optimisation failed: {type(exc).__name__}: {exc}")
    try:
        sampler = get_sampler(name, **resolved)
    except (TypeError, ValueError) as exc:
        return _error_row(name, variant, proc_name, case, opts, f"options rejected: {exc}")
    try:
        sampler._check_process(process)
    except ValueError as exc:
        return _error_row(name, variant, proc_name, case, opts, f"process rejected: {exc}")
    try:
        t0 = time.perf_counter()
        out = sampler.sample(score_fn, process, shape=(args.n, mixture.dim), generator=_gen(args.seed), dtype=dtype)
        wall = time.perf_counter() - t0
        m = score_samples(out.samples, mixture, reference, ref_nll)
    except Exception as exc:  # NaN states, solver failures: recorded in the table
        return _error_row(name, variant, proc_name, case, opts, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    ratios = {
        "wsw_ratio": m["wsw"] / fl["wsw"],
        "nll_ratio": abs(m["nll_gap"]) / fl["nll"],
        "mwe_ratio": m["mwe"] / fl["mwe"],
        "sw_ratio": m["sw"] / fl["sw"],
    }
    return {
        "sampler": name, "variant": variant, "process": proc_name, "case": case, "options": _fmt_opts(opts),
        "nfe": int(out.nfe), "wsw": m["wsw"], "wsw_floor": fl["wsw"], "nll_gap": m["nll_gap"], "nll_floor": fl["nll"],
        "mwe": m["mwe"], "mwe_floor": fl["mwe"], "sw": m["sw"], "sw_floor": fl["sw"], "wall_s": wall,
        **ratios, "meets": ratios["wsw_ratio"] <= CRITERION and ratios["nll_ratio"] <= CRITERION, "error": "",
    }


def _row_line(r: dict) -> str:
    if r["error"]:
        return f"[acc] {r['case']}/{r['process']} {r['sampler']} ({r['options']}): ERROR {r['error']}"
    return (f"[acc] {r['case']}/{r['process']} {r['sampler']} ({r['options']}): nfe={r['nfe']} "
            f"wsw={r['wsw']:.4g} ({r['wsw_ratio']:.2f}x) nll_gap={r['nll_gap']:+.4g} ({r['nll_ratio']:.2f}x) "
            f"mwe={r['mwe']:.3g} ({r['mwe_ratio']:.2f}x) sw={r['sw']:.4g} ({r['sw_ratio']:.2f}x) "
            f"{r['wall_s']:.2f} s{'  MEETS' if r['meets'] else ''}")


def criterion_summary(rows: list[dict]) -> list[dict]:
    """Per (sampler, variant, case, process): the smallest NFE meeting the criterion, the smallest NFE from
    which every larger NFE tried also meets it, and the largest NFE tried."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["error"]:
            continue
        groups.setdefault((r["sampler"], r["variant"], r["case"], r["process"]), []).append(r)
    out = []
    for (s, v, c, p), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        first = next((r["nfe"] for r in rs if r["meets"]), None)
        stable = None
        for i in range(len(rs) - 1, -1, -1):
            if not rs[i]["meets"]:
                break
            stable = rs[i]["nfe"]
        out.append({"sampler": s, "variant": v, "case": c, "process": p, "first_nfe": first, "stable_nfe": stable,
                    "max_nfe": rs[-1]["nfe"]})
    return out


# ====================================================================== part 2: speed
# A hand loop takes (score_fn, process, x, generator, cfg) with cfg the sampler's resolved options, and
# returns (samples, nfe). Each mirrors its sampler's algorithm in a few lines, with everything that does
# not depend on x precomputed as Python floats, as one would write it by hand.
HandLoop = Callable[[Callable, Process, torch.Tensor, torch.Generator, dict], tuple[torch.Tensor, int]]


def _need(cfg: dict, **expected) -> None:
    for k, v in expected.items():
        if cfg.get(k) != v:
            raise ValueError(f"the hand loop implements {k}={v!r} only, found {cfg.get(k)!r}")


def _randn(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)


def _tvec(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def hand_euler_maruyama(score_fn, process, x, g, cfg):
    """Reverse SDE, Euler-Maruyama: x <- x - [f x - g^2 s] dt + g sqrt(dt) z."""
    _need(cfg, method="euler", denoise=False)
    n = cfg["num_steps"]
    ts = process.time_grid(n, cfg["grid"])
    f, g2 = process.drift_coef(ts[:-1]).tolist(), process.diffusion_squared(ts[:-1]).clamp_min(0).tolist()
    t = ts.tolist()
    for i in range(n):
        dt = t[i] - t[i + 1]
        x = x + (g2[i] * score_fn(x, _tvec(x, t[i])) - f[i] * x) * dt + math.sqrt(g2[i] * dt) * _randn(x, g)
    return x, n


def _transitions(process, ts):
    alpha, sigma = process.marginal(ts)
    a, s = alpha.tolist(), sigma.tolist()
    a_ts = [a[i] / a[i + 1] for i in range(len(a) - 1)]
    var_ts = [s[i] ** 2 - a_ts[i] ** 2 * s[i + 1] ** 2 for i in range(len(a) - 1)]
    return s, a_ts, var_ts


def hand_ancestral(score_fn, process, x, g, cfg):
    """DDPM / SMLD ancestral: x <- (x + sigma_{t|s}^2 s) / alpha_{t|s} + sqrt(var) z."""
    _need(cfg, denoise=False)
    n = cfg["num_steps"]
    ts = process.time_grid(n, cfg["grid"])
    s, a_ts, var_ts = _transitions(process, ts)
    posterior = cfg["variance"] == "posterior"
    t = ts.tolist()
    for i in range(n):
        std = math.sqrt(var_ts[i] * s[i + 1] ** 2 / s[i] ** 2 if posterior else var_ts[i])
        x = (x + var_ts[i] * score_fn(x, _tvec(x, t[i]))) / a_ts[i] + std * _randn(x, g)
    return x, n


def hand_predictor_corrector(score_fn, process, x, g, cfg):
    """Reverse-diffusion predictor + one Langevin corrector step; corrector step eps = 2 a (r sigma)^2
    (snr_rule "sigma") or 2 a (r ||z|| / ||s||)^2 with per-sample ("sample") or batch-mean ("batch") norms."""
    _need(cfg, predictor="reverse_diffusion", corrector="langevin", corrector_steps=1, denoise=False)
    n, snr, rule = cfg["num_steps"], cfg["snr"], cfg.get("snr_rule", "sample")
    if cfg["snr_scaling"] == "grid":
        snr *= math.sqrt(min(1.0, cfg["reference_steps"] / n))
    ts = process.time_grid(n, cfg["grid"])
    s_t, a_ts, var_ts = _transitions(process, ts)
    t = ts.tolist()
    tiny = torch.finfo(x.dtype).tiny
    for i in range(n):
        x = (2.0 - a_ts[i]) * x + var_ts[i] * score_fn(x, _tvec(x, t[i])) + math.sqrt(var_ts[i]) * _randn(x, g)
        s = score_fn(x, _tvec(x, t[i + 1]))
        z = _randn(x, g)
        if rule == "sigma":
            eps = 2.0 * a_ts[i] ** 2 * (snr * s_t[i + 1]) ** 2
            x = x + eps * s + math.sqrt(2.0 * eps) * z
            continue
        zn, sn = z.flatten(1).norm(dim=1), s.flatten(1).norm(dim=1)
        if rule == "batch":
            zn, sn = zn.mean().expand_as(zn), sn.mean().expand_as(sn)
        eps = (2.0 * a_ts[i] ** 2 * (snr * zn / sn.clamp_min(tiny)) ** 2).reshape(-1, *([1] * (x.ndim - 1)))
        x = x + eps * s + (2.0 * eps).sqrt() * z
    return x, 2 * n


def hand_langevin(score_fn, process, x, g, cfg):
    """ULA at t_min: x <- x + (eps/2) s + sqrt(eps) z."""
    _need(cfg, metropolis=False, t=None, denoise=False)
    eps, n = cfg["step_size"], cfg["num_steps"]
    tt = _tvec(x, process.t_min)
    for _ in range(n):
        x = x + (eps / 2) * score_fn(x, tt) + math.sqrt(eps) * _randn(x, g)
    return x, n


def hand_annealed_langevin(score_fn, process, x, g, cfg):
    """NCSN Algorithm 1: step_i = eps sigma_i^2 / sigma_L^2 (noise-to-signal of the last level)."""
    _need(cfg, denoise=False)
    ts = process.time_grid(cfg["num_levels"] - 1, cfg["grid"])
    alpha, sigma = process.marginal(ts)
    last = float(sigma[-1] / alpha[-1])
    eps, steps = cfg["step_size"], cfg["steps_per_level"]
    for t_i, s_i in zip(ts.tolist(), sigma.tolist()):
        step = eps * s_i**2 / last**2
        tt = _tvec(x, t_i)
        for _ in range(steps):
            x = x + (step / 2) * score_fn(x, tt) + math.sqrt(step) * _randn(x, g)
    return x, cfg["num_levels"] * steps


def hand_odeint(score_fn, process, x, g, cfg, *, plain=False):
    """torchdiffeq.odeint called directly on dx/dt = f(t) x - g(t)^2 s(x, t) / 2 from t = 1 to t_min, with the
    sampler's settings: tolerances, per-sample max-RMS error norm, no step past t_min. ``plain=True``: odeint's
    defaults instead (RMS over the whole batch), for reference."""
    import torchdiffeq

    _need(cfg, denoise=False)
    nfe = 0
    t_min, t_max = process.t_min, process.t_max

    def func(t, y):
        nonlocal nfe
        nfe += 1
        tt = t.reshape(1).to(torch.float64).clamp(t_min, t_max)
        f, g2 = float(process.drift_coef(tt)), float(process.diffusion_squared(tt))
        return f * y - 0.5 * g2 * score_fn(y, _tvec(y, float(tt)))

    span = torch.tensor([t_max, t_min], dtype=torch.float64, device=x.device)
    method = cfg["method"]
    if method not in ("dopri5", "dopri8", "bosh3", "adaptive_heun"):
        grid = process.time_grid(cfg["num_steps"], cfg["grid"], device=x.device)
        y = torchdiffeq.odeint(func, x, span, method=method, options={"grid_constructor": lambda f, y0, t: grid.to(t)})
        return y[-1], nfe
    rtol = 1e-5 if cfg["rtol"] is None else cfg["rtol"]
    atol = 1e-5 if cfg["atol"] is None else cfg["atol"]
    options = {}
    if not plain:
        options = {"step_t": span[1:].clone()}
        if cfg.get("per_sample_norm") in (None, True):
            options["norm"] = lambda e: e.reshape(e.shape[0], -1).pow(2).mean(1).sqrt().max()
    y = torchdiffeq.odeint(func, x, span, rtol=rtol, atol=atol, method=method, options=options)
    return y[-1], nfe


def _grid(process, cfg):
    if cfg.get("grid") not in TIME_GRIDS:
        raise ValueError(f"the hand loop implements the built-in grid kinds {TIME_GRIDS} only, found {cfg.get('grid')!r}")
    return process.time_grid(cfg["num_steps"], cfg["grid"], rho=cfg.get("rho", 7.0))


def _exp_ints(h: float, eta: float = 0.0) -> tuple[float, float, float]:
    """J_m = int_0^h (1 + eta) e^{-(1 + eta)(h - tau)} tau^m dtau for m = 0, 1, 2 (I_m(H) / (1 + eta)^m, H = (1 + eta) h)."""
    c = 1.0 + eta
    big = c * h
    i0 = -math.expm1(-big)
    i1 = big - i0
    return i0, i1 / c, (big * big - 2 * i1) / c**2


def hand_dpmpp_multistep(score_fn, process, x, g, cfg, order):
    """DPM-Solver++(2M)/(3M), and their SDE versions (eta > 0): x' = (sigma'/sigma) e^{-eta h} x + alpha' int (1 + eta)
    e^{-(1 + eta)(h - tau)} p(tau) dtau + sigma' sqrt(1 - e^{-2 eta h}) z, p the Newton polynomial through the last
    `order` denoiser values (nodes at lambda_{i-j} - lambda_i)."""
    _need(cfg, denoise=False)
    if cfg.get("to_zero", False):
        raise ValueError("the hand loop implements to_zero=False only")
    eta = float(cfg.get("eta", 0.0))
    ts = _grid(process, cfg)
    n = cfg["num_steps"]
    alpha, sigma = process.marginal(ts)
    a, s = alpha.tolist(), sigma.tolist()
    lam = (torch.log(alpha) - torch.log(sigma)).tolist()
    t = ts.tolist()
    ds: list[torch.Tensor] = []
    for i in range(n):
        k = min(order, i + 1, n - i if cfg["lower_order_final"] else order)
        ds.insert(0, (x + s[i] ** 2 * score_fn(x, _tvec(x, t[i]))) / a[i])
        del ds[order:]
        h = lam[i + 1] - lam[i]
        j0, j1, j2 = _exp_ints(h, eta)
        x_new = (s[i + 1] / s[i] * math.exp(-eta * h)) * x + (a[i + 1] * j0) * ds[0]
        if k >= 2:
            h1 = lam[i] - lam[i - 1]
            d01 = (ds[0] - ds[1]) / h1
            x_new = x_new + (a[i + 1] * j1) * d01
        if k >= 3:
            h2 = lam[i - 1] - lam[i - 2]
            d012 = (d01 - (ds[1] - ds[2]) / h2) / (h1 + h2)
            x_new = x_new + (a[i + 1] * (j2 + h1 * j1)) * d012
        if eta > 0:
            x_new = x_new + s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * _randn(x, g)
        x = x_new
    return x, n


def hand_dpmpp_singlestep(score_fn, process, x, g, cfg, fractions):
    """DPM-Solver++(2S)/(3S): stages at lambda_i + c h; each stage and the step end integrate the Newton
    polynomial through the denoiser values so far exactly."""
    _need(cfg, denoise=False)
    ts = _grid(process, cfg)
    n = cfg["num_steps"]
    alpha, sigma = process.marginal(ts)
    lam_t = torch.log(alpha) - torch.log(sigma)
    a, s, lam, t = alpha.tolist(), sigma.tolist(), lam_t.tolist(), ts.tolist()
    stages = []  # per fraction: (t, alpha, sigma, lambda) lists
    for c in fractions:
        tq = process.t_from_log_snr(lam_t[:-1] + c * (lam_t[1:] - lam_t[:-1]))
        aq, sq = process.marginal(tq)
        stages.append((tq.tolist(), aq.tolist(), sq.tolist(), (torch.log(aq) - torch.log(sq)).tolist()))
    for i in range(n):
        nodes = [0.0]
        ds = [(x + s[i] ** 2 * score_fn(x, _tvec(x, t[i]))) / a[i]]
        targets = [(tq[i], aq[i], sq[i], lq[i] - lam[i]) for tq, aq, sq, lq in stages] + [(None, a[i + 1], s[i + 1], lam[i + 1] - lam[i])]
        for tq, aq, sq, hq in targets:
            i0, i1, i2 = _exp_ints(hq)
            u = (sq / s[i]) * x + (aq * i0) * ds[0]
            if len(ds) >= 2:
                d01 = (ds[1] - ds[0]) / nodes[1]
                u = u + (aq * i1) * d01
            if len(ds) >= 3:
                d012 = ((ds[2] - ds[1]) / (nodes[2] - nodes[1]) - d01) / nodes[2]
                u = u + (aq * (i2 - nodes[1] * i1)) * d012
            if tq is not None:
                nodes.append(hq)
                ds.append((u + sq**2 * score_fn(u, _tvec(u, tq))) / aq)
        x = u
    return x, n * (len(fractions) + 1)


def hand_dpmpp_sde(score_fn, process, x, g, cfg):
    """DPM-Solver++ SDE (two stages, r = 1/2): the stage at lambda_i + h/2 and the step end are two points of one
    Ornstein-Uhlenbeck path, from two normals per step (z1 before the stage, z2 after); the step end integrates the
    line through (0, D_i), (h/2, D(u)) exactly."""
    _need(cfg, denoise=False)
    if cfg.get("to_zero", False):
        raise ValueError("the hand loop implements to_zero=False only")
    eta = float(cfg["eta"])
    ts = _grid(process, cfg)
    n = cfg["num_steps"]
    alpha, sigma = process.marginal(ts)
    lam_t = torch.log(alpha) - torch.log(sigma)
    a, s, lam, t = alpha.tolist(), sigma.tolist(), lam_t.tolist(), ts.tolist()
    tq_t = process.t_from_log_snr(lam_t[:-1] + 0.5 * (lam_t[1:] - lam_t[:-1]))
    aq_t, sq_t = process.marginal(tq_t)
    tq, aq, sq = tq_t.tolist(), aq_t.tolist(), sq_t.tolist()
    for i in range(n):
        h = lam[i + 1] - lam[i]
        d0 = (x + s[i] ** 2 * score_fn(x, _tvec(x, t[i]))) / a[i]
        u = (sq[i] / s[i] * math.exp(-eta * h / 2)) * x + (aq[i] * -math.expm1(-(1 + eta) * h / 2)) * d0
        if eta > 0:
            root = math.sqrt(-math.expm1(-eta * h))  # sqrt(1 - e^{-eta h})
            z1 = _randn(x, g)
            u = u + (sq[i] * root) * z1
        d1 = (u + sq[i] ** 2 * score_fn(u, _tvec(u, tq[i]))) / aq[i]
        j0, j1, _ = _exp_ints(h, eta)
        x_new = (s[i + 1] / s[i] * math.exp(-eta * h)) * x + (a[i + 1] * j0) * d0 + (a[i + 1] * j1 * 2 / h) * (d1 - d0)
        if eta > 0:
            z2 = _randn(x, g)
            x_new = x_new + (s[i + 1] * math.exp(-eta * h / 2) * root) * z1 + (s[i + 1] * root) * z2
        x = x_new
    return x, 2 * n


def hand_edm_heun(score_fn, process, x, g, cfg):
    """Karras et al. 2022, Algorithm 1 in y = x / alpha on the rho grid: Euler predictor, trapezoidal corrector."""
    _need(cfg, denoise=False)
    if cfg.get("S_churn", 0.0) != 0.0:
        raise ValueError("the hand loop implements S_churn = 0 (Algorithm 1) only")
    ts = _grid(process, {"grid": "karras", **cfg})
    sig, al, t = process.noise_to_signal(ts).tolist(), process.alpha(ts).tolist(), ts.tolist()
    y = x / al[0]
    for i in range(len(t) - 1):
        d = -sig[i] * al[i] * score_fn(al[i] * y, _tvec(y, t[i]))
        y_euler = y + (sig[i + 1] - sig[i]) * d
        d2 = -sig[i + 1] * al[i + 1] * score_fn(al[i + 1] * y_euler, _tvec(y, t[i + 1]))
        y = y + (sig[i + 1] - sig[i]) * (0.5 * d + 0.5 * d2)
    return al[-1] * y, 2 * (len(t) - 1)


HAND_LOOPS: dict[str, HandLoop] = {
    "dpmpp_2m": lambda *a: hand_dpmpp_multistep(*a, order=2),
    "dpmpp_3m": lambda *a: hand_dpmpp_multistep(*a, order=3),
    "dpmpp_2m_sde": lambda *a: hand_dpmpp_multistep(*a, order=2),
    "dpmpp_3m_sde": lambda *a: hand_dpmpp_multistep(*a, order=3),
    "dpmpp_sde": hand_dpmpp_sde,
    "dpmpp_2s": lambda *a: hand_dpmpp_singlestep(*a, fractions=(0.5,)),
    "dpmpp_3s": lambda *a: hand_dpmpp_singlestep(*a, fractions=(1.0 / 3.0, 2.0 / 3.0)),
    "edm_heun": hand_edm_heun,
    "heun": hand_edm_heun,
    "euler_maruyama": hand_euler_maruyama,
    "ancestral": hand_ancestral,
    "predictor_corrector": hand_predictor_corrector,
    "langevin": hand_langevin,
    "annealed_langevin": hand_annealed_langevin,
    "pf_ode": hand_odeint,
}

# Options that make a sampler spend about `nfe` score evaluations (default: {"num_steps": nfe}).
SPEED_OPTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    "predictor_corrector": lambda nfe: {"num_steps": max(1, nfe // 2)},
    "langevin": lambda nfe: {"num_steps": nfe, "step_size": 1e-3},
    "annealed_langevin": lambda nfe: {"num_levels": 10, "steps_per_level": max(1, nfe // 10)},
    "pf_ode": lambda nfe: {"rtol": 1e-3, "atol": 1e-3},
}
TARGETS = {"euler_maruyama": 1.3}  # every other comparison: 1.1


def torchsde_default(score_fn, process, x, g, cfg):
    """torchsde's own sdeint with its default Brownian interval (numpy-seeded; ``g`` is unused), Euler, the
    same number of steps: the slow baseline. dt is padded by 1e-9 so the last step is not a sliver."""
    import torchsde

    n = cfg["num_steps"]
    t_min, t_max = process.t_min, process.t_max
    shape = x.shape

    class _SDE:
        noise_type, sde_type = "diagonal", "ito"

        def _coefs(self, u):
            tt = (-u).reshape(1).to(torch.float64)
            return float(process.drift_coef(tt)), float(process.diffusion_squared(tt).clamp_min(0))

        def f(self, u, y):
            f, g2 = self._coefs(u)
            return g2 * score_fn(y.view(shape), _tvec(y, float(-u))).reshape(y.shape) - f * y

        def g(self, u, y):
            return torch.full_like(y, math.sqrt(self._coefs(u)[1]))

    us = torch.tensor([-t_max, -t_min], dtype=x.dtype, device=x.device)
    dt = (t_max - t_min) / n * (1 + 1e-9)
    y = torchsde.sdeint(_SDE(), x.reshape(shape[0], -1), us, method="euler", dt=dt)[-1]
    return y.reshape(shape), n + 1  # +1: torchsde's contract check evaluates f once more


def _mlp_score(dim: int):
    """An 'expensive' score: exact N(0, I)-data score under VP (-x) plus a small random MLP (ScoreMLP's
    defaults: 3 residual blocks of width 128), so every sampler stays stable."""
    from score_toolkit.models import ScoreMLP

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = ScoreMLP(dim, time_embedding="linear").eval()

    def score(x, t):
        return 0.1 * net(x.float(), t.float()).to(x.dtype) - x

    return score


@dataclass
class SpeedCase:
    key: str
    label: str
    dim: int
    nfe: int
    make_score: Callable[[Process], Callable]
    make_process: Callable[[], Process] = field(default=PROCESSES["VP"])


def speed_cases(args) -> dict[str, SpeedCase]:
    return {
        "ring": SpeedCase("ring", "cheap score: exact ring score, 2-D, VP", 2, args.speed_nfe,
                          lambda p: ring_mixture().score_fn(p)),
        "mlp16": SpeedCase("mlp16", "expensive score: MLP (3 x 128) on 16-D, VP", 16, args.speed_nfe_mlp,
                           lambda p: _mlp_score(16)),
    }


def speed_options(name: str, cls, nfe: int) -> dict[str, Any]:
    if name in SPEED_OPTIONS:
        return SPEED_OPTIONS[name](nfe)
    opts: dict[str, Any] = {"num_steps": nfe} if "num_steps" in cls.options else {}
    # the hand loops run on built-in grid kinds without the final step; speed does not depend on the grid
    if cls.options.get("grid") == "fitted":
        opts["grid"] = "log_sigma"
    if cls.options.get("to_zero") is True:
        opts["to_zero"] = False
    return opts


def build_contender(kind: str, name: str, options: dict, case: SpeedCase):
    """A zero-argument-ready callable ``run(x0, seed) -> (samples, nfe)`` for a sampler, its hand loop or
    torchsde's default ``sdeint``, plus the process and score it uses."""
    process = case.make_process()
    score_fn = case.make_score(process)
    sampler = get_sampler(name, **options)
    cfg = dict(sampler.config)
    if kind == "sampler":
        def run(x0, seed):
            out = sampler.sample(score_fn, process, x_init=x0, generator=_gen(seed))
            return out.samples, out.nfe
    elif kind == "hand":
        hand = HAND_LOOPS[name]

        def run(x0, seed):
            with torch.no_grad():
                return hand(score_fn, process, x0.clone(), _gen(seed), cfg)
    elif kind == "odeint_plain":
        def run(x0, seed):
            with torch.no_grad():
                return hand_odeint(score_fn, process, x0.clone(), _gen(seed), cfg, plain=True)
    elif kind == "torchsde_default":
        def run(x0, seed):
            with torch.no_grad():
                return torchsde_default(score_fn, process, x0.clone(), _gen(seed), cfg)
    else:
        raise ValueError(f"unknown contender kind {kind!r}")
    return run, process


def _x0(case: SpeedCase, n: int, dtype) -> torch.Tensor:
    return case.make_process().prior_sample((n, case.dim), generator=_gen(4321), dtype=dtype)


SPEED_FIELDS = ["case", "sampler", "contender", "options", "nfe", "median_s", "ratio_paired", "ratio_of_medians",
                "median_cpu_s", "ratio_cpu", "target", "meets", "max_abs_diff", "peak_mem_mb", "reps", "note"]


def run_speed(args, samplers: list[str], log) -> list[dict]:
    rows: list[dict] = []
    dtype = getattr(torch, args.speed_dtype)
    for key in args.speed_cases:
        case = speed_cases(args)[key]
        x0 = _x0(case, args.speed_n, dtype)
        for name in samplers:
            try:
                cls = get_sampler_class(name)
            except Exception as exc:
                rows.append(_speed_note(key, name, f"load failed: {exc}"))
                continue
            if name not in HAND_LOOPS:
                why = ("no hand loop written yet (add one to HAND_LOOPS)" if cls.properties.fixed_grid
                       else "adaptive / not on a fixed grid: no hand loop")
                rows.append(_speed_note(key, name, why))
                log(f"[speed] {key} {name}: {why}")
                continue
            opts = speed_options(name, cls, case.nfe)
            contenders = [("sampler", name), ("hand", name)]
            if name == "euler_maruyama" and not args.quick:
                contenders.append(("torchsde_default", name))
            if name == "pf_ode" and get_sampler(name, **opts).properties.adaptive:
                contenders.append(("odeint_plain", name))
            try:
                rows += _time_group(args, case, name, opts, contenders, x0, log)
            except Exception as exc:
                traceback.print_exc()
                rows.append(_speed_note(key, name, f"{type(exc).__name__}: {exc}"))
            if args.out_dir is not None:
                write_csv(args.out_dir / f"{args.tag}_speed.partial.csv", rows, SPEED_FIELDS)
    return rows


def _speed_note(case, name, note) -> dict:
    row = {k: "" for k in SPEED_FIELDS}
    row.update(case=case, sampler=name, contender="-", note=note)
    return row


def _contender_label(kind: str, name: str) -> str:
    return {"sampler": f"sampler {name}", "hand": "hand loop" if name != "pf_ode" else "torchdiffeq.odeint direct",
            "torchsde_default": "torchsde sdeint, default BrownianInterval",
            "odeint_plain": "odeint direct, default batch RMS norm"}[kind]


def _time_group(args, case: SpeedCase, name: str, opts: dict, contenders, x0, log) -> list[dict]:
    runs = {kind: build_contender(kind, name, opts, case)[0] for kind, _ in contenders}
    seed = args.seed
    # Warm-up, and the agreement check: same start, same seed -> same samples (the hand loop mirrors it).
    outs, nfes = {}, {}
    for kind in runs:
        if kind == "torchsde_default":
            continue
        with torch.no_grad():
            outs[kind], nfes[kind] = runs[kind](x0.clone(), seed)
    times: dict[str, list[float]] = {kind: [] for kind in runs}
    cpu: dict[str, list[float]] = {kind: [] for kind in runs}
    for r in range(args.speed_reps):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for kind in order:
            if kind == "torchsde_default" and r >= 1:  # the slow reference (12-20x): one timed run
                continue
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            _, nfe = runs[kind](x0.clone(), seed)
            times[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
            nfes.setdefault(kind, nfe)
    probe = args.memory and case.key in args.memory_cases
    mems = {kind: (memory_probe(args, case, kind, name, opts) if probe else None) for kind in runs}
    hand_times = times["hand"]
    rows = []
    for kind in runs:
        ts = times[kind]
        paired = [a / b for a, b in zip(ts, hand_times)]
        cpu_ratio = statistics.median(a / b for a, b in zip(cpu[kind], cpu["hand"])) if kind != "hand" else 1.0
        target = TARGETS.get(name, 1.1) if kind == "sampler" else None
        ratio = statistics.median(paired) if kind != "hand" else 1.0
        diff = float((outs[kind].double() - outs["hand"].double()).abs().max()) if kind in outs else None
        row = {
            "case": case.key, "sampler": name, "contender": _contender_label(kind, name), "options": _fmt_opts(opts),
            "nfe": int(nfes[kind]), "median_s": statistics.median(ts), "ratio_paired": ratio,
            "ratio_of_medians": statistics.median(ts) / statistics.median(hand_times),
            "median_cpu_s": statistics.median(cpu[kind]), "ratio_cpu": cpu_ratio,
            "target": target if target is not None else "", "meets": (ratio <= target) if target else "",
            "max_abs_diff": diff if diff is not None else "", "peak_mem_mb": mems[kind] if mems[kind] is not None else "",
            "reps": len(ts), "note": {"torchsde_default": "different noise (numpy-seeded)",
                                      "odeint_plain": "other error norm: other steps"}.get(kind, ""),
        }
        if kind == "sampler" and nfes["sampler"] != nfes["hand"]:
            row["note"] = f"NFE differs from the hand loop ({nfes['hand']})"
        rows.append(row)
        log(f"[speed] {case.key} {name} {row['contender']}: nfe={row['nfe']} median={row['median_s']:.3f} s "
            f"ratio={ratio:.3f} (of medians {row['ratio_of_medians']:.3f}, cpu {cpu_ratio:.3f}) diff={row['max_abs_diff']} "
            f"mem={row['peak_mem_mb']} MB")
    return rows


def memory_probe(args, case: SpeedCase, kind: str, name: str, opts: dict) -> float | None:
    """Peak-RSS growth (MB) of one run in a fresh subprocess."""
    spec = {"case": case.key, "kind": kind, "name": name, "options": opts, "n": args.speed_n, "dtype": args.speed_dtype,
            "threads": args.threads, "seed": args.seed, "speed_nfe": args.speed_nfe, "speed_nfe_mlp": args.speed_nfe_mlp}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_delta_mb"]
    except Exception as exc:
        print(f"memory probe failed for {kind} {name}: {exc}", file=sys.stderr)
        return None


def _probe_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    os.environ["SCORE_TOOLKIT_NUM_THREADS"] = str(spec["threads"])  # the thread policy (docs/cli.md)
    torch.set_num_threads(spec["threads"])
    ns = argparse.Namespace(speed_nfe=spec["speed_nfe"], speed_nfe_mlp=spec["speed_nfe_mlp"])
    case = speed_cases(ns)[spec["case"]]
    dtype = getattr(torch, spec["dtype"])
    run, _ = build_contender(spec["kind"], spec["name"], spec["options"], case)
    with torch.no_grad():
        run(_x0(case, 16, dtype), spec["seed"])  # warm-up: lazy imports, caches
    x0 = _x0(case, spec["n"], dtype)
    gc.collect()
    hwm_reset = _reset_peak_rss()
    before = _status_kb("VmRSS") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        run(x0, spec["seed"])
    after = _status_kb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_delta_mb": round(max(after - before, 0) / 1024.0, 2), "method": "VmHWM" if hwm_reset else "ru_maxrss"}))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that
    the peak after a run is that run's peak, not the import's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ====================================================================== output
def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in fields})


def _csv_value(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def _g(v, spec=".3g"):
    if v == "" or v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def write_markdown(path: Path, args, meta: dict, acc_rows, floors, summary, speed_rows, plots) -> None:
    L: list[str] = []
    L.append("# Sampler benchmark")
    L.append("")
    L.append(f"Generated by `python benchmarks/bench_samplers.py {' '.join(meta['argv'])}` "
             f"(see `benchmarks/README.md`).")
    L.append("")
    L.append("| setting | value |")
    L.append("| --- | --- |")
    for k in ("date", "commit", "python", "torch", "threads", "omp_wait_policy", "n", "dtype", "samplers",
              "loadavg_start", "loadavg_end", "duration_min", "cpu_min", "merged_from", "note"):
        if k in ("merged_from", "note") and not meta.get(k):
            continue
        L.append(f"| {k} | {meta.get(k, '')} |")
    L.append("")
    if acc_rows:
        L += _markdown_accuracy(args, acc_rows, floors, summary, plots)
    if speed_rows:
        L += _markdown_speed(args, speed_rows)
    write_text_atomic(path, "\n".join(L) + "\n")


def _markdown_accuracy(args, rows, floors, summary, plots) -> list[str]:
    L = ["## Accuracy: error vs NFE next to the noise floor", ""]
    L.append(
        f"Exact scores, N = {args.n} samples per run, one `torch.Generator` (seed {args.seed}) per run. Metrics "
        "(`score_toolkit.metrics`) against an independent exact reference set of N samples: within-mode sliced W2 "
        "(`W-SW2`), mean-NLL gap (mean true NLL of the samples minus that of the reference set, in nats; positive = "
        "over-dispersed), mode-weight error (total variation between the assigned-mode frequencies and the true "
        "weights, `MWE`), sliced W2 (`SW2`). Each `/floor` column is the ratio to the noise floor: the same metric "
        f"between two independent exact sets of N samples, averaged over {args.floor_seeds} pairs (for the NLL: "
        "`|mean_nll(A) - mean_nll(B)|`; for the MWE: the MWE of an exact set). An exact sampler scores about 1x on "
        f"each. `ok` = within {CRITERION}x of the floor in both W-SW2 and mean NLL (the fast samplers' criterion). "
        "`wall s` is the sampling time only (shared machine: indicative).")
    L.append("")
    L.append("### Noise floors (mean +- std over the pairs)")
    L.append("")
    L.append("| case | W-SW2 | mean-NLL gap | MWE | SW2 |")
    L.append("| --- | --- | --- | --- | --- |")
    for case, fl in floors.items():
        cells = [f"{fl[k]['mean']:.4g} +- {fl[k]['std']:.2g}" for k in FLOOR_KEYS]
        L.append(f"| {case}: {CASES[case][0]} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"### Smallest NFE within {CRITERION}x of the floor in both W-SW2 and mean NLL")
    L.append("")
    L.append("Each cell: the smallest NFE tried that meets the criterion, and in brackets the NFE from which "
             "every larger NFE tried meets it too when that differs; `-` = not met up to the largest NFE tried "
             f"(given). The targets for the fast samplers: <= {FAST_TARGETS['ring']} NFE on the ring, "
             f"<= {FAST_TARGETS['aniso16']} on the 16-D mixture.")
    L.append("")
    combos = [(c, p) for c in args.cases for p in args.processes]
    L.append("| sampler | variant | " + " | ".join(f"{c} {p}" for c, p in combos) + " |")
    L.append("| --- | --- | " + " | ".join("---" for _ in combos) + " |")
    keyed = {(s["sampler"], s["variant"], s["case"], s["process"]): s for s in summary}
    for sv in dict.fromkeys((s["sampler"], s["variant"]) for s in summary):
        cells = []
        for c, p in combos:
            s = keyed.get((*sv, c, p))
            if s is None:
                cells.append("n/a")
            elif s["first_nfe"] is None:
                cells.append(f"- (<= {s['max_nfe']})")
            elif s["stable_nfe"] not in (None, s["first_nfe"]):
                cells.append(f"{s['first_nfe']} ({s['stable_nfe'] if s['stable_nfe'] is not None else '-'})")
            else:
                cells.append(f"{s['first_nfe']}")
        L.append(f"| {sv[0]} | {sv[1]} | " + " | ".join(cells) + " |")
    L.append("")
    for case in args.cases:
        L.append(f"### {case}: {CASES[case][0]}")
        L.append("")
        if case in plots:
            L.append(f"![error vs NFE, {case}]({plots[case]})")
            L.append("")
        for proc in args.processes:
            rs = [r for r in rows if r["case"] == case and r["process"] == proc]
            if not rs:
                continue
            L.append(f"#### {case}, {proc}")
            L.append("")
            L.append("| sampler | options | NFE | W-SW2 | /floor | NLL gap | floor | /floor | MWE | floor | /floor "
                     "| SW2 | floor | /floor | wall s | ok |")
            L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                     "| ---: | --- |")
            for r in rs:
                if r["error"]:
                    L.append(f"| {r['sampler']} | {r['options']} | | error: {r['error'][:120]} | | | | | | | | | | | | |")
                    continue
                L.append(
                    f"| {r['sampler']} | {r['options']} | {r['nfe']} | {_g(r['wsw'], '.4f')} | {_g(r['wsw_ratio'], '.2f')} "
                    f"| {_g(r['nll_gap'], '+.4f')} | {_g(r['nll_floor'], '.4f')} | {_g(r['nll_ratio'], '.2f')} "
                    f"| {_g(r['mwe'], '.4f')} | {_g(r['mwe_floor'], '.4f')} | {_g(r['mwe_ratio'], '.2f')} "
                    f"| {_g(r['sw'], '.4f')} | {_g(r['sw_floor'], '.4f')} | {_g(r['sw_ratio'], '.2f')} "
                    f"| {_g(r['wall_s'], '.2f')} | {'yes' if r['meets'] else ''} |")
            L.append("")
    return L


def _markdown_speed(args, rows) -> list[str]:
    L = ["## Speed: samplers against hand-written loops (same NFE, same run)", ""]
    L.append(
        f"N = {args.speed_n}, {args.speed_dtype}, {args.threads} threads, {args.speed_reps} interleaved repetitions "
        "(the order alternates between repetitions). `ratio` = median over repetitions of (contender time / hand-loop "
        "time of the same repetition); `of medians` = ratio of the median times. The sampler and its hand loop start "
        "from the same state with identically seeded generators: `max |diff|` is the largest difference of their "
        "samples (round-off only if the hand loop mirrors the algorithm). Targets: `euler_maruyama` <= 1.3x of a "
        "hand Euler-Maruyama loop, `pf_ode` <= 1.1x of `torchdiffeq.odeint` called directly, every other fixed-grid "
        "sampler <= 1.1x of its hand loop (`ok` judges the wall-clock `ratio`). `CPU s` / `CPU ratio`: the same with "
        "the process's CPU time (both threads), steadier than wall time on a loaded machine. Peak memory: the peak "
        "resident set of one run above the resident set before it, in a fresh subprocess after a warm-up run "
        "(Linux: peak mark reset through /proc/self/clear_refs, then VmHWM - VmRSS; elsewhere the growth of "
        "ru_maxrss, a lower bound), MB.")
    L.append("")
    cases = speed_cases(args)
    for key in args.speed_cases:
        rs = [r for r in rows if r["case"] == key]
        if not rs:
            continue
        L.append(f"### {key}: {cases[key].label}")
        L.append("")
        L.append("| sampler | contender | options | NFE | median s | ratio | of medians | CPU s | CPU ratio | target "
                 "| ok | max abs diff | peak MB | note |")
        L.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
        for r in rs:
            if r["contender"] == "-":
                L.append(f"| {r['sampler']} | - | | | | | | | | | | | | {r['note']} |")
                continue
            ok = "" if r["meets"] == "" else ("yes" if r["meets"] else "**no**")
            L.append(
                f"| {r['sampler']} | {r['contender']} | {r['options']} | {r['nfe']} | {_g(r['median_s'], '.3f')} "
                f"| {_g(r['ratio_paired'], '.3f')} | {_g(r['ratio_of_medians'], '.3f')} | {_g(r.get('median_cpu_s', ''), '.3f')} "
                f"| {_g(r.get('ratio_cpu', ''), '.3f')} | {r['target']} | {ok} "
                f"| {_g(r['max_abs_diff'], '.2g')} | {_g(r['peak_mem_mb'], '.1f')} | {r['note']} |")
        L.append("")
    return L


def plot_accuracy(args, rows: list[dict], out_dir: Path, tag: str, log) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[plot] matplotlib is not installed (pip install 'score-toolkit[plot]'): skipping the plots")
        return {}
    plots = {}
    metrics = [("wsw_ratio", "within-mode SW2 / floor"), ("nll_ratio", "|mean-NLL gap| / floor")]
    for case in args.cases:
        fig, axes = plt.subplots(len(metrics), len(args.processes), figsize=(6.5 * len(args.processes), 10.5),
                                 squeeze=False, sharex=True)
        curves = dict.fromkeys((r["sampler"], r["variant"]) for r in rows if r["case"] == case and not r["error"])
        cmap = plt.get_cmap("tab20")  # 10 colours (even indices), then line style and marker change
        for j, proc in enumerate(args.processes):
            for i, (key, ylabel) in enumerate(metrics):
                ax = axes[i][j]
                for k, (s, v) in enumerate(curves):
                    rs = sorted((r for r in rows if r["case"] == case and r["process"] == proc and not r["error"]
                                 and r["sampler"] == s and r["variant"] == v), key=lambda r: r["nfe"])
                    if not rs:
                        continue
                    label = s if v in ("defaults",) else f"{s} ({v})"
                    ax.plot([r["nfe"] for r in rs], [max(r[key], 1e-3) for r in rs], marker="os^D"[k // 10 % 4], ms=3,
                            ls=("-", "--", ":")[k // 10 % 3], color=cmap(k % 10 * 2), label=label)
                ax.axhline(CRITERION, color="k", ls="--", lw=1)
                ax.axhline(1.0, color="gray", ls=":", lw=1)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{case}, {proc}")
                ax.set_ylabel(ylabel)
                if i == len(metrics) - 1:
                    ax.set_xlabel("NFE")
                ax.grid(True, which="both", alpha=0.2)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
        fig.suptitle(f"{CASES[case][0]}: error / noise floor vs NFE (N = {args.n}; dashed: {CRITERION}x)")
        fig.tight_layout(rect=(0, 0.2, 1, 0.97))
        name = f"{tag}_{case}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        plots[case] = name
        log(f"[plot] wrote {out_dir / name}")
    return plots


def _typed(row: dict) -> dict:
    """A CSV row back to the types the writers expect (numbers, bools)."""
    out = {}
    for k, v in row.items():
        if v in ("True", "False"):
            out[k] = v == "True"
        elif k in ("nfe", "reps") and v != "":
            out[k] = int(v)
        else:
            try:
                out[k] = float(v) if k not in ("sampler", "variant", "process", "case", "options", "error", "contender",
                                                "note", "metric") and v != "" else v
            except ValueError:
                out[k] = v
    return out


def _check_same_floors(rows: list[dict], floors: dict) -> None:
    for r in rows:
        if r["error"] or r["case"] not in floors:
            continue
        if not math.isclose(float(r["wsw_floor"]), floors[r["case"]]["wsw"]["mean"], rel_tol=1e-4):
            raise SystemExit(f"--append: the previous rows of {r['sampler']} were made with other floors (another --n "
                             "or --floor-seeds?); re-run every sampler instead")


def _read_rows(path: Path) -> list[dict]:
    """The rows of a previous run's CSV file (none if it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [_typed(r) for r in csv.DictReader(fh)]


def _read_floors(path: Path) -> dict:
    floors: dict[str, dict] = {}
    for r in _read_rows(path):
        floors.setdefault(r["case"], {})[r["metric"]] = {"mean": r["mean"], "std": r["std"], "count": int(r["count"])}
    return floors


# ====================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="samples per accuracy run (default 10000)")
    p.add_argument("--samplers", default=None, help="comma-separated names (default: every registered sampler)")
    p.add_argument("--quick", action="store_true",
                   help="one NFE per sampler variant, 2 floor pairs, 1 speed repetition, no memory probes")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    p.add_argument("--tag", default="samplers", help="prefix of the output files (default 'samplers')")
    p.add_argument("--parts", default="accuracy,speed", help="accuracy, speed or both (default)")
    p.add_argument("--cases", default=",".join(CASES), help=f"accuracy cases (default {','.join(CASES)})")
    p.add_argument("--processes", default=",".join(PROCESSES), help="VE, VP or both (default)")
    p.add_argument("--floor-seeds", type=int, default=None, help="exact pairs averaged for the floors (default 10, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"), help="accuracy runs (default float64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--speed-cases", default="ring,mlp16")
    p.add_argument("--speed-n", type=int, default=None, help="batch of the speed runs (default: --n)")
    p.add_argument("--speed-nfe", type=int, default=None, help="NFE of the cheap-score speed runs (default 200, quick 10)")
    p.add_argument("--speed-nfe-mlp", type=int, default=None, help="NFE of the MLP speed runs (default 50, quick 10)")
    p.add_argument("--speed-reps", type=int, default=None, help="interleaved repetitions (default 5, quick 1)")
    p.add_argument("--speed-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--memory", dest="memory", action="store_true", default=None, help="peak-memory probes (default unless --quick)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-cases", default="ring", help="speed cases with memory probes (default ring)")
    p.add_argument("--denoise", action="store_true",
                   help="accuracy runs end with the final Tweedie step (denoise=True, +1 NFE): the samples then target "
                        "the clean data rather than p(t_min), which the metrics compare them with")
    p.add_argument("--only-variant", default=None, metavar="TEXT", help="run only the sweep variants whose label contains TEXT (=TEXT: is TEXT)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of the other samplers from the previous results in --out (same --n and --tag) "
                        "and rewrite the tables with them: re-run only new or changed samplers")
    p.add_argument("--merge-from", default=None, metavar="DIR",
                   help="run nothing: replace the rows of the samplers found in DIR's tables (another run's --out, "
                        "same --tag) in those of --out, and rewrite --out's tables and plots")
    p.add_argument("--note", default="", help="a line added to the settings table of the markdown report")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe is not None:
        return args
    if args.n < 2:
        p.error(f"--n must be >= 2, found {args.n}")
    args.parts = _split(args.parts, ("accuracy", "speed"), "--parts", p)
    args.cases = _split(args.cases, tuple(CASES), "--cases", p)
    args.processes = _split(args.processes, tuple(PROCESSES), "--processes", p)
    args.speed_cases = _split(args.speed_cases, ("ring", "mlp16"), "--speed-cases", p)
    args.memory_cases = _split(args.memory_cases, ("ring", "mlp16"), "--memory-cases", p)
    args.floor_seeds = args.floor_seeds or (2 if args.quick else 10)
    args.speed_n = args.speed_n or args.n
    args.speed_nfe = args.speed_nfe or (10 if args.quick else 200)
    args.speed_nfe_mlp = args.speed_nfe_mlp or (10 if args.quick else 50)
    args.speed_reps = args.speed_reps or (1 if args.quick else 5)
    if args.memory is None:
        args.memory = not args.quick
    args.out_dir = Path(args.out)
    return args


def _split(value: str, allowed: tuple, flag: str, parser) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        parser.error(f"{flag}: expected a comma-separated subset of {allowed}, found {value!r}")
    return items


def _meta(argv) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
            "python": platform.python_version(), "torch": torch.__version__, "argv": list(argv),
            "loadavg_start": _loadavg(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.memory_probe is not None:
        _probe_main(args.memory_probe)
        return 0
    os.environ["SCORE_TOOLKIT_NUM_THREADS"] = str(args.threads)  # the thread policy (docs/cli.md)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta = _meta(argv)

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - t_start:8.1f}s {msg}", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        available = list_samplers()
    if args.samplers:
        samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
        unknown = [s for s in samplers if s not in available]
        if unknown:
            print(f"unknown sampler(s) {unknown}; registered: {available}", file=sys.stderr)
            return 2
    else:
        samplers = available
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log(f"samplers: {samplers}; parts: {args.parts}; N = {args.n}; threads = {args.threads}")
    acc_rows, floors, summary, plots, speed_rows = [], {}, [], {}, []
    # --append / --merge-from: read the previous rows first (the runs below rewrite the CSV files as they go)
    keep_old = args.append or bool(args.merge_from)
    old_acc = _read_rows(args.out_dir / f"{args.tag}_accuracy.csv") if keep_old else []
    old_speed = _read_rows(args.out_dir / f"{args.tag}_speed.csv") if keep_old else []
    old_floors = _read_floors(args.out_dir / f"{args.tag}_floors.csv") if keep_old else {}
    new_acc: list[dict] | None = None
    new_speed: list[dict] | None = None
    if args.merge_from:  # no runs: the rows of another run's folder replace those of its samplers
        src = Path(args.merge_from)
        new_acc = _read_rows(src / f"{args.tag}_accuracy.csv") if (src / f"{args.tag}_accuracy.csv").exists() else None
        new_speed = _read_rows(src / f"{args.tag}_speed.csv") if (src / f"{args.tag}_speed.csv").exists() else None
        if new_acc is None and new_speed is None:
            print(f"--merge-from: no {args.tag}_accuracy.csv or {args.tag}_speed.csv in {src}", file=sys.stderr)
            return 2
        floors = {**old_floors, **_read_floors(src / f"{args.tag}_floors.csv")}
        samplers = sorted({r["sampler"] for r in (new_acc or []) + (new_speed or [])})
        log(f"merging the rows of {samplers} from {src}")
    else:
        if "accuracy" in args.parts:
            new_acc, floors = run_accuracy(args, samplers, log)
        if "speed" in args.parts:
            new_speed = run_speed(args, samplers, log)
        floors = {**old_floors, **floors}
    kept: set[str] = set()
    if new_acc is not None or old_acc:
        replaced = {(r["sampler"], r["variant"], r["case"], r["process"]) for r in new_acc or []}
        kept_acc = [r for r in old_acc if (r["sampler"], r["variant"], r["case"], r["process"]) not in replaced]
        if kept_acc and floors:
            _check_same_floors(kept_acc, floors)
        acc_rows = kept_acc + (new_acc or [])
        kept.update(r["sampler"] for r in kept_acc)
        summary = criterion_summary(acc_rows)
        write_csv(args.out_dir / f"{args.tag}_accuracy.csv", acc_rows, ACC_FIELDS)
        write_csv(args.out_dir / f"{args.tag}_criterion.csv", summary,
                  ["sampler", "variant", "case", "process", "first_nfe", "stable_nfe", "max_nfe"])
        write_csv(args.out_dir / f"{args.tag}_floors.csv",
                  [{"case": c, "metric": k, **v} for c, fl in floors.items() for k, v in fl.items()],
                  ["case", "metric", "mean", "std", "count"])
        if not args.no_plot:
            plots = plot_accuracy(args, acc_rows, args.out_dir, args.tag, log)
    if new_speed is not None or old_speed:
        replaced = {(r["sampler"], r["case"]) for r in new_speed or []}
        kept_speed = [r for r in old_speed if (r["sampler"], r["case"]) not in replaced]
        speed_rows = kept_speed + (new_speed or [])
        kept.update(r["sampler"] for r in kept_speed)
        write_csv(args.out_dir / f"{args.tag}_speed.csv", speed_rows, SPEED_FIELDS)
    all_samplers = sorted(set(samplers) | kept)
    meta.update(threads=args.threads, n=args.n, dtype=f"{args.dtype} (accuracy), {args.speed_dtype} (speed)",
                samplers=", ".join(all_samplers) + (f" (rows of {', '.join(sorted(kept))} kept from the previous run)"
                                                    if kept else ""),
                loadavg_end=_loadavg(), cpu_min=f"{time.process_time() / 60:.1f}", note=args.note,
                merged_from=f"{args.merge_from} (rows of {', '.join(samplers)})" if args.merge_from else "",
                duration_min=f"{(time.perf_counter() - t_start) / 60:.1f}")
    write_markdown(args.out_dir / f"{args.tag}.md", args, meta, acc_rows, floors, summary, speed_rows, plots)
    for part in ("accuracy", "speed"):  # progress files, written row by row while running
        (args.out_dir / f"{args.tag}_{part}.partial.csv").unlink(missing_ok=True)
    log(f"wrote {args.out_dir / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
