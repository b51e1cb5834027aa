#!/usr/bin/env python
"""The grid optimiser against the noise floor, grid transfer across processes, and fitting time.

Part ``ladder``: for dpmpp_2m and dpmpp_3m (``to_zero=True``) on the 2-D ring and the 16-D anisotropic mixture,
under ``VESDE(0.01, 50)`` and ``VPSDE(0.1, 20)``, one grid per budget is fitted by ``optimize_grid(data=held_out)``
(5,000 exact samples with their own seed, a mixture of the true number of modes fitted by EM, the optimiser's own
prior draws, ``tail_rounds=1``: one round of hard examples): the optimiser never sees the evaluation mixture. Each grid is judged on N samples with the exact score
(bench_samplers' metrics: within-mode sliced W2 and |mean-NLL gap|, each divided by its noise floor); a run meets the
criterion when both are <= 1.5. The optimiser's own held-out report (tail, flag, ratios) is recorded beside it.

Part ``transfer``: dpmpp_2m on the ring: grids fitted under VESDE(0.01, 50) carried to sigma_max 10 and 40 (the
saved-grid route: ``transfer_log_snr``), against grids fitted under each process. Every run starts from exact draws
of the process's marginal at t = 1 (under sigma_max 10 the prior N(0, 100) is not the ring's p_1, which no grid fixes).
The family grids (``--family-variants``, see FAMILY_VARIANTS): one grid fitted for sigma_max 50, 10 and 40 at once
(``optimize_grid(family=[sigma_max 10, 40])`` under sigma_max 50; ``head=2``: the anchored rule, ``transfer_head=2``),
carried over by its rule. The absolute rule (``absolute_log_snr``, clip / extend; the step count follows from the
process): "absolute family from 10" is fitted under sigma_max 10 for the family 40, 50 (``transfer="absolute"``),
"absolute family from 50" under 50 for 10, 40; ``--absolute-variants`` carries cached per-process fits by it with no new
fit (ABSOLUTE_VARIANTS); ``--transfer-processes`` adds members held out of every fit (VE20, VE55). The interpolated
rule (``_grid_family``): "interpolated family" fits two normalised grids for the extremes sigma_max 50 and 10 with the
members 20 and 40 (``transfer="interpolated"``), "interpolated family warm" starts them from the extremes' own fits. The fits are cached in ``<out>/<tag>_fits.jsonl`` (a rerun judges them again without
refitting). Judged by bench_defaults' protocol: ``--seeds`` draw seeds, each its own exact p_1 draws and exact
reference set; pass = the seed-means of both ratios <= 1.5; the signed mean-NLL gap of every seed beside it.
The ladder takes ``--loss nll`` and ``--tail-retries`` (optimize_grid's options).

Part ``calib``: the held-out report's far-off flag on two independent exact sets of the report's size (its rate
when sampling noise alone decides), against the large-set closed form.

Part ``time``: fitting time of this optimiser against the previous one (``--baseline-rev``, read from git), runs
interleaved in one process, the same arguments (``loss="nll"``, ``tail_rounds=1``), on the ring, the 16-D and the
64-D mixture; beside the times, both fits' held-out reports (the same held-out draws): the result, not only the time.

    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts ladder --cases ring --tag grids_ring
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --ladder 6,7,8,9,10,11,12,14,17 \
        --family-variants "family,family head=2" --tag grids_transfer --floor-seeds 20    # (+ "family head=3", merged)
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --seeds 8 --floor-seeds 20 \
        --ladder 6,7,8,9,10,11,12,14,17 --transfer-processes VE10,VE40,VE,VE20,VE55 \
        --family-variants "absolute family from 10" --judge-kinds "fitted for this process,absolute family from 10" \
        --tag grids_transfer4                                        # the absolute rule (quick looks: grids_transfer4_*)
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --seeds 8 --judge-seed-offset 100 \
        --floor-seeds 20 --ladder 6,7,8,9,10,11,12,14,17 --transfer-processes VE10,VE40,VE \
        --family-variants "absolute family from 10 warm" --judge-kinds "fitted for this process,absolute family from 10 warm" \
        --fits-tag grids_transfer4 --tag grids_transfer4_rep       # the same grids judged again on seeds 100-107
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --seeds 8 --floor-seeds 20 \
        --ladder 6,7,8,9,10,11,12,14,17 --transfer-processes VE10,VE20,VE40,VE,VE15,VE30 \
        --family-variants "absolute family from 10 warm +20" \
        --judge-kinds "fitted for this process,absolute family from 10 warm +20" \
        --fits-tag grids_transfer4c --tag grids_transfer4c      # sigma_max 20 a member too (fits cache: a copy of 4's)
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --seeds 2 --n 2000 --floor-seeds 20 \
        --ladder 6,7,8,9,10,11,13 --transfer-processes VE10,VE20,VE40,VE,VE15,VE30 \
        --family-variants "interpolated family warm,interpolated family" \
        --judge-kinds "fitted for this process,interpolated family warm,interpolated family" \
        --fits-tag grids_transfer5 --tag grids_transfer5_look   # the interpolated rule: every fit, a quick look
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --seeds 8 --floor-seeds 20 \
        --ladder 6,7,8,9,10,11,13 --transfer-processes VE10,VE20,VE40,VE,VE15,VE30 \
        --family-variants "interpolated family,interpolated family warm" \
        --judge-kinds "fitted for this process,interpolated family,interpolated family warm" \
        --fits-tag grids_transfer5 --tag grids_transfer5 --note "..."   # the same fits judged (the note: the criterion)
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts transfer --seeds 8 --judge-seed-offset 100 \
        --floor-seeds 20 --ladder 6,7,8,9,10,11,13 --transfer-processes VE10,VE40,VE,VE20,VE15 \
        --family-variants "interpolated family" --judge-kinds "fitted for this process,interpolated family" \
        --fits-tag grids_transfer5 --tag grids_transfer5_rep --note "..."   # judged again on seeds 100-107
    OMP_NUM_THREADS=1 python benchmarks/bench_grids.py --parts reference --cases ring,aniso16 --tag grids_reference
    python benchmarks/bench_grids.py --merge grids_ring,grids_aniso16,... --tag grids     # the result file
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_samplers as B  # noqa: E402

from score_toolkit import metrics as M  # noqa: E402
from score_toolkit._io import write_text_atomic  # noqa: E402
from score_toolkit.analytic import anisotropic_mixture  # noqa: E402
from score_toolkit.processes import VESDE, VPSDE  # noqa: E402
from score_toolkit.registry import get_sampler, get_sampler_class  # noqa: E402
from score_toolkit.samplers._grid_family import FamilyGrid  # noqa: E402
from score_toolkit.samplers._grid_reference import OffData  # noqa: E402
from score_toolkit.samplers.grid_store import absolute_log_snr  # noqa: E402
from score_toolkit.samplers.grids import FAR_OFF_MARGIN, GridTailWarning, optimize_grid, transfer_log_snr  # noqa: E402

LADDERS = {"ring": (6, 8, 10, 12, 14, 19, 24), "aniso16": (12, 16, 20, 25, 30, 39)}
PROCESSES = {"VE": lambda: VESDE(0.01, 50.0), "VP": lambda: VPSDE(0.1, 20.0),
             "VE10": lambda: VESDE(0.01, 10.0), "VE40": lambda: VESDE(0.01, 40.0),
             # members held out of the family fits (judged only): inside the family's range, and beyond its widest
             "VE20": lambda: VESDE(0.01, 20.0), "VE55": lambda: VESDE(0.01, 55.0),
             "VE15": lambda: VESDE(0.01, 15.0), "VE30": lambda: VESDE(0.01, 30.0)}
TRANSFER_LADDER = (6, 7, 8, 9, 10, 11, 12, 14, 19)


def fit(name, steps, process, case, mix, **kw):
    """A grid fitted by optimize_grid on the held-out batch (and whether its tail was flagged)."""
    held = mix.sample(B.HELD_OUT_N, generator=B._gen(B.HELD_OUT_SEED))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GridTailWarning)
        res = optimize_grid(get_sampler_class(name)(num_steps=steps), process, data=held,
                            num_components=B.GRID_COMPONENTS[case], seed=B.OPTIMISER_SEED, tail_rounds=1, **kw)
    return res, any(issubclass(w.category, GridTailWarning) for w in caught)


def judge(name, grid_times, process, mix, args, floors, reference, ref_nll, x_init=None, signed=False):
    """NFE, within-mode SW2 / floor and |mean-NLL gap| / floor (the gap with its sign if ``signed``)."""
    smp = get_sampler(name, grid=list(grid_times), to_zero=True)
    kw = {"x_init": x_init} if x_init is not None else {"shape": (args.n, mix.dim), "generator": B._gen(args.seed)}
    out = smp.sample(mix.score_fn(process), process, dtype=torch.float64, **kw)
    r = B.score_samples(out.samples, mix, reference, ref_nll)
    w, nl = r["wsw"] / floors["wsw"]["mean"], r["nll_gap"] / floors["nll"]["mean"]
    return out.nfe, w, (nl if signed else abs(nl))


def exact_p1(mix, process, n, seed):
    """n exact draws of the process's marginal at t = 1 (data plus sigma_max noise under VE)."""
    sigma_max = float(process.marginal(torch.tensor([1.0], dtype=torch.float64))[1])
    return mix.sample(n, generator=B._gen(seed)) + sigma_max * torch.randn(
        n, mix.dim, generator=B._gen(seed + 1), dtype=torch.float64)


def _times_of(rec):
    """A cached fit's grid as times under the process it was fitted for."""
    process = PROCESSES[rec["process"]]()
    times = process.t_from_log_snr(torch.tensor(rec["log_snr"], dtype=torch.float64))
    times[0], times[-1] = process.t_max, process.t_min
    return times


def carried(log_snr, process, head=0, rule="density", extend="one", family_grid=None):
    if rule == "interpolated":
        lam = FamilyGrid.from_record(family_grid, "cached fit").log_snr(process)
        times = process.t_from_log_snr(lam)
        times[0], times[-1] = process.t_max, process.t_min
        return times
    lam = (absolute_log_snr(log_snr, process, extend=extend) if rule == "absolute"
           else transfer_log_snr(log_snr, process, head=head))
    times = process.t_from_log_snr(lam)
    times[0], times[-1] = process.t_max, process.t_min
    return times


def setup(case, args):
    mix = B.CASES[case][1]()
    floors = B.noise_floors(mix, args.n, args.floor_seeds)
    reference = mix.sample(args.n, generator=B._gen(B.REF_SEED))
    return mix, floors, reference, M.mean_nll(reference, mix)


def part_ladder(args, rows, log):
    for case in args.cases:
        mix, floors, reference, ref_nll = setup(case, args)
        for pname in args.processes.split(","):
            process = PROCESSES[pname]()
            for name in args.samplers:
                for steps in (args.ladder or LADDERS[case]):
                    extra = {**({"loss": args.loss} if args.loss != "auto" else {}),
                             **({"tail_retries": args.tail_retries} if args.tail_retries else {})}
                    res, flagged = fit(name, steps, process, case, mix, **extra)
                    v = res.validation["optimized"]
                    nfe, w, nl = judge(name, res.times.tolist(), process, mix, args, floors, reference, ref_nll)
                    label = name + (f", loss={args.loss}" if args.loss != "auto" else "") + (
                        f", tail_retries={args.tail_retries}" if args.tail_retries else "") + args.label
                    row = {"part": "ladder", "case": case, "process": pname, "sampler": label, "steps": steps, "nfe": nfe,
                           "wsw_ratio": round(w, 3), "nll_ratio": round(nl, 3), "meets": w <= B.CRITERION and nl <= B.CRITERION,
                           "fit_s": round(res.fit_seconds, 1), "evaluations": res.evaluations, "mined": res.mined,
                           "retries": res.retries,
                           "flagged": flagged, "val_far_off": v.far_off, "val_max_error": round(v.max_error, 3),
                           "val_q999": round(v.q999_error, 4), "val_wsw": round(v.wsw_ratio, 2), "val_nll": round(v.nll_ratio, 2)}
                    rows.append(row)
                    log(json.dumps(row))


#: the family fits of the transfer part: label -> optimize_grid options (beside ``family=[sigma_max 10, 40]``)
FAMILY_VARIANTS = {"family": {}, "family nll_weight=30": {"nll_weight": 30.0}, "family nll_weight=300": {"nll_weight": 300.0},
                   "family head=2": {"transfer_head": 2}, "family head=3": {"transfer_head": 3},
                   "family max": {"family_combine": "max"},
                   "family head=1": {"transfer_head": 1},
                   "family head=2 mean": {"transfer_head": 2, "family_combine": "mean"},
                   "family head=2 max": {"transfer_head": 2, "family_combine": "max"},
                   "family head=2 geometric": {"transfer_head": 2, "family_combine": "geometric"},
                   # the absolute rule (clip / extend): fitted under sigma_max 10 for the family 40, 50 (each member
                   # sees every point, plus its one extension step), or under sigma_max 50 for 10, 40 (clipped)
                   "absolute family from 10": {"transfer": "absolute", "_process": "VE10", "_family": ("VE40", "VE")},
                   "absolute family from 50": {"transfer": "absolute"},
                   # (tried after the first: the worst member's objective; a warm start from sigma_max 10's own fit)
                   "absolute family from 10 max": {"transfer": "absolute", "family_combine": "max", "_process": "VE10",
                                                   "_family": ("VE40", "VE")},
                   "absolute family from 10 warm": {"transfer": "absolute", "_process": "VE10", "_family": ("VE40", "VE"),
                                                    "_init_from": "fitted for VE10"},
                   # (tried after the held-out sigma_max 20 did not transfer: sigma_max 20 made a member too)
                   "absolute family from 10 warm +20": {"transfer": "absolute", "_process": "VE10",
                                                        "_family": ("VE20", "VE40", "VE"), "_init_from": "fitted for VE10"},
                   # the interpolated rule (_grid_family): two normalised grids for the extremes sigma_max 50 and 10,
                   # blended by where a member starts; members 10, 20, 40, 50; warm-started from the extremes' own fits
                   "interpolated family": {"transfer": "interpolated", "_process": "VE10", "_family": ("VE20", "VE40", "VE")},
                   "interpolated family warm": {"transfer": "interpolated", "_process": "VE10",
                                                "_family": ("VE20", "VE40", "VE"),
                                                "_init_pair": ("fitted for VE", "fitted for VE10")}}
TRANSFER_PROCESSES = ("VE10", "VE40", "VE")
#: grids of the transfer part carried by the absolute rule (absolute_log_snr: clip / extend): label -> (the cached
#: fit it takes, the rule's extend)
ABSOLUTE_VARIANTS = {"sigma_max 50 fit absolute": ("fitted for VE", "one"),
                     "sigma_max 40 fit absolute": ("fitted for VE40", "one"),
                     "sigma_max 10 fit absolute": ("fitted for VE10", "one"),
                     "sigma_max 10 fit absolute first": ("fitted for VE10", "first")}


def _transfer_fits(args, mix, case, name, log):
    """The grids of the transfer part, fitted once and cached in ``<out>/<tag>_fits.jsonl`` (log-SNR points): per
    budget one grid fitted under each process, and the family grids (``FAMILY_VARIANTS``, fitted under sigma_max 50
    for the family sigma_max 10, 40). All on the held-out batch only."""
    cache = Path(args.out) / f"{args.fits_tag or args.tag}_fits.jsonl"
    fits = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            fits[(r["grid"], r["steps"])] = r
    variants = {k: v for k, v in FAMILY_VARIANTS.items() if k in args.family_variants.split(",")}
    ladder = args.ladder or TRANSFER_LADDER
    for i, steps in enumerate(ladder):
        todo = [(f"fitted for {p}", p, {}) for p in args.transfer_processes] + [
            (label, kw.get("_process", "VE"),
             {"family": [PROCESSES[p]() for p in kw.get("_family", ("VE10", "VE40"))],
              **{k: v for k, v in kw.items() if not k.startswith("_")}}) for label, kw in variants.items()]
        if args.warm and i:  # "<variant> warm": started from the variant's cold fit of the previous budget; the cold
            # and the warm fit of a budget run one after the other, in alternating order (their times are a ratio)
            warm = []
            for label, pname, kw in todo[len(args.transfer_processes):]:
                prev = fits[(label, ladder[i - 1])]
                process = PROCESSES[pname]()
                start = process.t_from_log_snr(torch.tensor(prev["log_snr"], dtype=torch.float64))
                start[0], start[-1] = process.t_max, process.t_min
                warm.append((f"{label} warm", pname, {**kw, "init": start}))
            pairs = [(c, w) if i % 2 else (w, c) for c, w in zip(todo[len(args.transfer_processes):], warm)]
            todo = todo[:len(args.transfer_processes)] + [x for pair in pairs for x in pair]
        for label, pname, kw in todo:
            if (label, steps) in fits:
                continue
            if FAMILY_VARIANTS.get(label, {}).get("_init_from"):  # a warm start from a fit of this budget
                src, process = fits[(FAMILY_VARIANTS[label]["_init_from"], steps)], PROCESSES[pname]()
                start = process.t_from_log_snr(torch.tensor(src["log_snr"], dtype=torch.float64))
                start[0], start[-1] = process.t_max, process.t_min
                kw = {**kw, "init": start}
            if FAMILY_VARIANTS.get(label, {}).get("_init_pair"):  # one warm start per extreme (lowest start first)
                kw = {**kw, "init": tuple(_times_of(fits[(src, steps)]) for src in FAMILY_VARIANTS[label]["_init_pair"])}
            res, flagged = fit(name, steps, PROCESSES[pname](), case, mix, **kw)
            v = res.validation["optimized"]
            r = {"grid": label, "steps": steps, "process": pname, "log_snr": res.log_snr.tolist(),
                 "head": kw.get("transfer_head", 0), "rule": kw.get("transfer", "density"),
                 "fit_s": round(res.fit_seconds, 1), "evaluations": res.evaluations, "flagged": flagged,
                 "loss": res.loss, "family_losses": res.family_losses,
                 "family_grid": res.family_grid.record() if res.family_grid is not None else None,
                 # the held-out report: objective, W-SW2 / NLL ratios and far off, under sigma_max 50 and each member
                 "report": {pname: [v.objective, v.wsw_ratio, v.nll_ratio, v.far_off],
                            **{k: [m.objective, m.wsw_ratio, m.nll_ratio, m.far_off]
                               for k, m in res.family_validation.items()}}}
            fits[(label, steps)] = r
            with cache.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            log(f"[fit] {label}, {steps} steps: {r['fit_s']} s, {r['evaluations']} evaluations")
    return fits


def part_transfer(args, rows, log):
    """One grid for VE sigma_max 10, 40 and 50 (dpmpp_2m, ring) against per-process fits, judged by the 8-seed
    protocol of bench_defaults (each seed its own exact draws of p_1, exact reference set; NLL floor from the
    per-point spread of 100,000 exact points; pass: the seed-means of both ratios <= 1.5)."""
    import bench_defaults as D

    case, name = "ring", "dpmpp_2m"
    mix = B.CASES[case][1]()
    fits = _transfer_fits(args, mix, case, name, log)
    fl = D.floors_of(mix, case, args.n, args.floor_seeds)
    log(f"[floors] {fl}")
    refs = []
    seeds = range(args.judge_seed_offset, args.judge_seed_offset + args.seeds)
    for s in seeds:
        reference = mix.sample(args.n, generator=B._gen(B.REF_SEED + s))
        refs.append((reference, M.mean_nll(reference, mix)))
    variants = [v for v in args.family_variants.split(",") if v]
    variants += [f"{v} warm" for v in variants] if args.warm else []
    for steps in (args.ladder or TRANSFER_LADDER):
        source = torch.tensor(fits[("fitted for VE", steps)]["log_snr"], dtype=torch.float64)
        for pname in args.transfer_processes:
            process = PROCESSES[pname]()
            grids = {"fitted for this process": fits[(f"fitted for {pname}", steps)]}
            if pname != "VE":
                grids["fitted for sigma_max 50, carried"] = {"log_snr": source.tolist()}
            grids.update({v: fits[(v, steps)] for v in variants if (v, steps) in fits})  # (no warm fit at the first)
            for label in [v for v in args.absolute_variants.split(",") if v]:
                src, extend = ABSOLUTE_VARIANTS[label]
                if (src, steps) in fits:
                    grids[label] = {**fits[(src, steps)], "head": 0, "rule": "absolute", "extend": extend}
            for kind, rec in grids.items():
                if (args.judge_kinds and kind not in args.judge_kinds.split(",")) or (
                        args.judge_steps and steps not in [int(v) for v in args.judge_steps.split(",")]):
                    continue
                times = carried(torch.tensor(rec["log_snr"], dtype=torch.float64), process, rec.get("head", 0),
                                rec.get("rule", "density"), rec.get("extend", "one"), rec.get("family_grid"))
                per_seed = []
                for i, s in enumerate(seeds):
                    nfe, w, nl = judge(name, times.tolist(), process, mix, args, {"wsw": {"mean": fl["wsw"]},
                                       "nll": {"mean": fl["nll"]}}, *refs[i],
                                       x_init=exact_p1(mix, process, args.n, 1 + 2 * s), signed=True)
                    per_seed.append((w, nl))
                wm = sum(w for w, _ in per_seed) / len(per_seed)
                nm = sum(abs(v) for _, v in per_seed) / len(per_seed)
                row = {"part": "transfer", "case": case, "process": pname, "sampler": name, "grid": kind,
                       "steps": steps, "nfe": nfe, "wsw_ratio": round(wm, 3), "nll_ratio": round(nm, 3),
                       "meets": wm <= B.CRITERION and nm <= B.CRITERION, "seeds": args.seeds,
                       "judge_seed_offset": args.judge_seed_offset,
                       "signed_nll_ratios": [round(v, 2) for _, v in per_seed],
                       "fit_s": rec.get("fit_s"), "flagged": rec.get("flagged", False)}
                rows.append(row)
                log(json.dumps(row))


CALIB_MARGINS = (0.0, 1.0, 2.0, 3.0, 5.0)


def logistic_rate(margin):
    """Large-set limit of P(max NLL of set B > max NLL of set A + margin) for two independent exact sets: each set's
    largest NLL is Gumbel with scale 1 (Gaussian tails, any dimension), their difference logistic."""
    return 1.0 / (1.0 + math.exp(margin))


def part_calib(args, rows, log):
    """False alarms of the held-out report's tail flag on exact sample sets: two independent exact sets of the
    report's size (4096) as 'outputs' and 'reference outputs'; the flag fires when an output lands more than
    FAR_OFF_MARGIN nats beyond the least likely reference output. (The report itself pairs each output with the
    reference solution from the same draw, so an exact sampler never fires it; this is the rate of an unpaired
    comparison, the upper bound of what sampling noise alone can do.)"""
    for case in args.cases:
        mix = B.CASES[case][1]()
        fired = {m: 0 for m in CALIB_MARGINS}
        counts = []
        for trial in range(args.calib_trials):
            a = mix.sample(args.calib_size, generator=B._gen(7_000_000 + 2 * trial))
            b = mix.sample(args.calib_size, generator=B._gen(7_000_000 + 2 * trial + 1))
            score = OffData(a, mix, scale=1.0, level=1.0)(b)
            for m in CALIB_MARGINS:
                fired[m] += int(bool((score > m).any()))
            counts.append(int((score > FAR_OFF_MARGIN).sum()))
        row = {"part": "calib", "case": case, "trials": args.calib_trials, "size": args.calib_size,
               "rates": {str(m): fired[m] / args.calib_trials for m in CALIB_MARGINS},
               "max_far_off": max(counts)}
        rows.append(row)
        log(json.dumps(row))


def part_reference(args, rows, log):
    """How accurate the optimiser's reference solutions are (cheaper ones would cut its fitting time): dpmpp_3m on
    uniform log-SNR steps with to_zero (what optimize_grid solves, reference_steps=250 by default), float64 and
    float32, against 1000 steps from the same 1024 prior draws: the per-sample error and the mean log-density shift
    (the NLL term fits biases of 1e-3 nats: the ring's floor at N = 10,000 is 0.011)."""
    from score_toolkit.samplers._grid_reference import MixtureScore
    from score_toolkit.samplers.dpm_solver import DPMSolverPP3M

    for case in args.cases:
        mix = B.CASES[case][1]()
        for pname in args.processes.split(","):
            process = PROCESSES[pname]()
            fn = MixtureScore(mix, process)
            x = process.prior_sample((1024, mix.dim), generator=B._gen(3), dtype=torch.float64)

            def solve(steps, dtype=torch.float64, fn=fn, process=process, x=x):
                smp = DPMSolverPP3M(num_steps=steps, grid="log_sigma", lower_order_final=False, to_zero=True)
                return smp.sample(fn, process, x_init=x.clone().to(dtype)).samples.to(torch.float64)

            fine = solve(1000)
            fine_lp = mix.log_prob(fine)
            for steps in (60, 100, 150, 250):
                row = {"part": "reference", "case": case, "process": pname, "steps": steps}
                for tag, dtype in (("f64", torch.float64), ("f32", torch.float32)):
                    out = solve(steps, dtype)
                    err = (out - fine).norm(dim=1)
                    row[f"{tag}_median_error"] = float(err.median())
                    row[f"{tag}_max_error"] = float(err.max())
                    row[f"{tag}_mean_log_density_shift"] = float((mix.log_prob(out) - fine_lp).mean())
                rows.append(row)
                log(json.dumps(row))


def _baseline_optimiser(rev):
    """optimize_grid as it was at git revision ``rev`` (loaded inside the package, so its relative imports resolve)."""
    src = subprocess.run(["git", "show", f"{rev}:score_toolkit/samplers/grids.py"], cwd=HERE.parent, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("score_toolkit.samplers._grids_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "score_toolkit.samplers"
    sys.modules[spec.name] = module  # its dataclasses look their module up
    exec(compile(src, f"{rev}:grids.py", "exec"), module.__dict__)
    return module.optimize_grid


def part_time(args, rows, log):
    old = _baseline_optimiser(args.baseline_rev)
    cases = [spec.split(":") for spec in args.time_cases.split(",")]
    for case, name, steps, pname, *extra in cases:
        steps = int(steps)
        # "family": the transfer part's anchored family fit (family sigma_max 10, 40 under sigma_max 50, transfer_head=2)
        fam = {"family": [PROCESSES["VE10"](), PROCESSES["VE40"]()], "transfer_head": 2} if extra == ["family"] else {}
        evaluations = {"new": [], "old": []}
        mix = B.CASES[case][1]() if case in B.CASES else anisotropic_mixture(dim=64)
        held = mix.sample(B.HELD_OUT_N, generator=B._gen(B.HELD_OUT_SEED))
        process = PROCESSES[pname]()
        times, reports = {"new": [], "old": []}, {"new": [], "old": []}
        for rep in range(args.repeats):
            for which in (("old", "new") if rep % 2 else ("new", "old")):
                fn = optimize_grid if which == "new" else old
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = fn(get_sampler_class(name)(num_steps=steps), process, data=held,
                             num_components=B.GRID_COMPONENTS.get(case, 10), seed=B.OPTIMISER_SEED, loss="nll",
                             tail_rounds=args.time_tail_rounds, **fam)
                reports[which].append(out.validation["optimized"])
                evaluations[which].append(out.evaluations)
                times[which].append(time.perf_counter() - t0)
        ratios = [o / n for o, n in zip(times["old"], times["new"])]
        row = {"part": "time", "case": case + (" family head=2" if fam else ""), "process": pname, "sampler": name,
               "steps": steps, "evaluations": evaluations,
               "tail_rounds": args.time_tail_rounds,
               "old_s": [round(t, 1) for t in times["old"]], "new_s": [round(t, 1) for t in times["new"]],
               "speedup": round(sorted(ratios)[len(ratios) // 2], 2),
               # the held-out reports of the last repeat (both on the same held-out draws): the result, not only the time
               **{f"{w}_report": [round(reports[w][-1].objective, 5), round(reports[w][-1].wsw_ratio, 2),
                                  round(reports[w][-1].nll_ratio, 2), reports[w][-1].far_off] for w in ("old", "new")}}
        rows.append(row)
        log(json.dumps(row))


def part_warm(args, rows, log):
    """Warm start against a cold one: per budget of the ladder, one fit with ``init="best"`` (cold) and one started
    from the previous budget's cold fit (warm; optimize_grid carries it to this budget), run one after the other in
    alternating order (the time ratio, not the times, is the result), the same held-out data, draws and options
    (``tail_rounds=1``, the NLL term); beside the times, both fits' held-out reports and their judged ratios (N, seed
    ``--seed``, the ladder part's judge)."""
    for spec in args.warm_cases.split(","):
        case, name, pname = spec.split(":")
        mix, floors, reference, ref_nll = setup(case, args)
        process = PROCESSES[pname]()
        prev = None
        for i, steps in enumerate(args.ladder or LADDERS[case]):
            out = {}
            for which in (("cold", "warm") if i % 2 else ("warm", "cold")):
                if which == "warm" and prev is None:
                    continue
                res, flagged = fit(name, steps, process, case, mix, **({"init": prev} if which == "warm" else {}))
                v = res.validation["optimized"]
                nfe, w, nl = judge(name, res.times.tolist(), process, mix, args, floors, reference, ref_nll)
                out[which] = {"fit_s": round(res.fit_seconds, 2), "evaluations": res.evaluations, "flagged": flagged,
                              "report": [round(v.objective, 5), round(v.wsw_ratio, 2), round(v.nll_ratio, 2), v.far_off],
                              "judged": [round(w, 3), round(nl, 3)], "res": res}
            prev = out["cold"].pop("res")
            out.get("warm", {}).pop("res", None)
            row = {"part": "warm", "case": case, "process": pname, "sampler": name, "steps": steps, "nfe": nfe, **out}
            if "warm" in out:
                row["time_ratio"] = round(out["cold"]["fit_s"] / out["warm"]["fit_s"], 2)
            rows.append(row)
            log(json.dumps(row))


def _summary(rs) -> str:
    """'smallest NFE meeting it | every larger budget too | the ladder' of one curve."""
    rs = sorted(rs, key=lambda r: r["nfe"])
    passing = [r["nfe"] for r in rs if r["meets"]]
    relapse = bool(passing) and not all(r["meets"] for r in rs if r["nfe"] >= passing[0])
    marks = [("*" if r["meets"] else "") + ("!" if r.get("flagged") else "") for r in rs]
    ladder = ", ".join(f"{r['nfe']}: {r['wsw_ratio']:.2f} / {r['nll_ratio']:.2f}{m}" for r, m in zip(rs, marks))
    return f"{passing[0] if passing else '-'} | {'no' if relapse or not passing else 'yes'} | {ladder}"


def write(args, rows):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic((out / f"{args.tag}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"# Grid optimiser: criterion ladders, transfer, fitting time (N = {args.n}, {args.floor_seeds} floor pairs, "
             "exact scores, float64)", "", args.note, ""]
    ladder = [r for r in rows if r["part"] == "ladder"]
    if ladder:
        lines += ["## Criterion per budget (grids fitted on held-out data only)", "",
                  "Each entry: NFE: W-SW2 / NLL ratios to the floor (N judged); `*` meets both <= 1.5; `!` the optimiser "
                  "flagged the grid's held-out tail (GridTailWarning).", "",
                  "| case | process | sampler | smallest NFE meeting it | every larger budget too | NFE: wsw / nll |",
                  "| --- | --- | --- | --- | --- | --- |"]
        keys = sorted({(r["case"], r["process"], r["sampler"]) for r in ladder})
        for case, proc, name in keys:
            rs = [r for r in ladder if (r["case"], r["process"], r["sampler"]) == (case, proc, name)]
            lines.append(f"| {case} | {proc} | {name} | {_summary(rs)} |")
        lines += ["", "The optimiser's held-out report beside each judged run (its own 4096 draws, against the fitted "
                  "mixture): far off = samples beyond 5 nats past the least likely reference output.", "",
                  "| case | process | sampler | NFE | judged wsw / nll | report wsw / nll | far off | max error | q99.9 | "
                  "flagged | evaluations | mined | fit s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(ladder, key=lambda r: (r["case"], r["process"], r["sampler"], r["nfe"])):
            lines.append(f"| {r['case']} | {r['process']} | {r['sampler']} | {r['nfe']} | {r['wsw_ratio']:.2f} / "
                         f"{r['nll_ratio']:.2f} | {r['val_wsw']:.2f} / {r['val_nll']:.2f} | {r['val_far_off']} | "
                         f"{r['val_max_error']} | {r['val_q999']} | {'yes' if r['flagged'] else ''} | {r['evaluations']} | "
                         f"{r['mined']} | {r['fit_s']} |")
    tr = [r for r in rows if r["part"] == "transfer"]
    if tr:
        seeds = tr[0].get("seeds", 1)
        lines += ["", "## One fitted grid for VE sigma_max 10, 40, 50 (dpmpp_2m, ring, starts from the exact p_1)", "",
                  "Grids (all fitted on the held-out batch only): fitted under each process; fitted under sigma_max 50 and "
                  "carried over (transfer_log_snr); fitted for the family (optimize_grid(family=[sigma_max 10, 40]) under "
                  "sigma_max 50, options in the label) and carried over; 'absolute': carried by the absolute rule "
                  "(absolute_log_snr; 'absolute family from 10': fitted under sigma_max 10 for the family 40, 50). "
                  f"Judged by {seeds} draw seeds (each its own exact "
                  "p_1 draws and exact reference set, N each; the NLL floor from the per-point spread): the ratios are "
                  "seed-means, `*` both <= 1.5. Last column: the signed mean-NLL gap / floor, seed-mean (each seed): "
                  "a bias shows as the same sign at every seed.", "",
                  "| process | grid | smallest NFE meeting it | every larger budget too | NFE: wsw / nll | NFE: mean signed NLL gap (per seed) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        kinds = list(dict.fromkeys(r["grid"] for r in tr))
        procs = list(dict.fromkeys(r["process"] for r in tr))
        for proc in procs:
            for kind in kinds:
                rs = sorted((r for r in tr if r["process"] == proc and r["grid"] == kind), key=lambda r: r["nfe"])
                if rs:
                    signed = ", ".join(f"{r['nfe']}: {sum(r['signed_nll_ratios']) / len(r['signed_nll_ratios']):+.2f} "
                                       f"({' '.join(f'{v:+.1f}' for v in r['signed_nll_ratios'])})"
                                       for r in rs if r.get("signed_nll_ratios"))
                    lines.append(f"| {proc} | {kind} | {_summary(rs)} | {signed} |")
        def curve(proc, kind):
            return sorted((r for r in tr if r["process"] == proc and r["grid"] == kind), key=lambda r: r["nfe"])

        def stable(rs):  # the smallest NFE from which every larger budget of the ladder meets it
            ok = [r["nfe"] for i, r in enumerate(rs) if all(q["meets"] for q in rs[i:])]
            return ok[0] if ok else None

        own = {p: next((r["nfe"] for r in curve(p, "fitted for this process") if r["meets"]), None)
               for p in procs}
        lines += ["", "One grid against the per-process fits: the smallest NFE from which the one grid meets it at every "
                  "larger budget of the ladder / the smallest NFE at which the per-process fit meets it (the harder "
                  "reading of both). Under VE (sigma_max 50) the grid carried from sigma_max 50 is the per-process fit.", "",
                  "| grid | " + " | ".join(procs) + " | worst ratio |", "| --- " * (len(procs) + 2) + "|"]
        top = max((r["nfe"] for r in tr if r["grid"] == "fitted for this process"), default=max(r["nfe"] for r in tr))
        for kind in kinds:
            if kind == "fitted for this process":
                continue
            cells, worst = [], 0.0
            for proc in procs:
                rs = curve(proc, "fitted for this process" if kind == "fitted for sigma_max 50, carried" and proc == "VE"
                           else kind)
                one = stable(rs)
                span = f" (judged {rs[0]['nfe']}-{rs[-1]['nfe']} NFE only)" if rs and rs[-1]["nfe"] < top else ""
                if one is not None and own[proc] is not None:
                    worst = max(worst, one / own[proc])
                    cells.append(f"{one} / {own[proc]} = {one / own[proc]:.2f}x{span}")
                else:
                    worst = math.inf
                    cells.append(f"{one or '-'} / {own[proc] or '-'}{span}")
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {worst:.2f}x |")
        lines += ["", "First pass: the smallest NFE at which the one grid meets it / the smallest at which the per-process "
                  "fit meets it.", "", "| grid | " + " | ".join(procs) + " | worst ratio |", "| --- " * (len(procs) + 2) + "|"]
        for kind in kinds:
            if kind in ("fitted for this process", "fitted for sigma_max 50, carried"):
                continue
            cells, worst = [], 0.0
            for proc in procs:
                one = next((r["nfe"] for r in curve(proc, kind) if r["meets"]), None)
                if one is not None and own[proc] is not None:
                    worst = max(worst, one / own[proc])
                    cells.append(f"{one} / {own[proc]} = {one / own[proc]:.2f}x")
                else:
                    worst = math.inf
                    cells.append(f"{one or '-'} / {own[proc] or '-'}")
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {worst:.2f}x |")
        fits = {}
        for r in tr:  # (fit seconds of the cached fits: a run that fitted them all measures them on one machine state)
            label = f"fitted for {r['process']}" if r["grid"] == "fitted for this process" else r["grid"]
            if r.get("fit_s") is not None:
                fits[(label, r["nfe"])] = r["fit_s"]
        fam = [k for k in kinds if k not in ("fitted for this process", "fitted for sigma_max 50, carried")]
        members = [p for p in procs if p in ("VE10", "VE20", "VE40", "VE")]
        lines += ["", "Fitting time (s) per budget (NFE under sigma_max 10): each family grid against the per-process fits "
                  f"of the members ({', '.join(members)}: their sum) and of every judged process.", "",
                  "| NFE | " + " | ".join(fam) + " | members' own fits, sum | " + " | ".join(procs) + " |",
                  "| --- " * (len(fam) + len(procs) + 2) + "|"]
        for nfe in sorted({r["nfe"] for r in tr if r["process"] == "VE10"}):
            own_s = [fits.get((f"fitted for {p}", nfe)) for p in procs]
            msum = sum(v for p, v in zip(procs, own_s) if p in members and v is not None)
            lines.append(f"| {nfe} | " + " | ".join(str(fits.get((k, nfe), "-")) for k in fam) + f" | {msum:.1f} | "
                         + " | ".join(str(v if v is not None else "-") for v in own_s) + " |")
    cal = [r for r in rows if r["part"] == "calib"]
    if cal:
        lines += ["", "## The tail flag's false-alarm rate on exact sample sets", "",
                  "Two independent exact sets of the report's size as outputs and reference outputs; the rate at which "
                  "some output lands more than the margin (nats) beyond the least likely reference output (the flag: "
                  f"margin {FAR_OFF_MARGIN:g}). Logistic: the large-set limit 1 / (1 + e^margin).", "",
                  "| case | trials | set size | " + " | ".join(f"margin {m:g}" for m in CALIB_MARGINS) + " | most far-off outputs in one trial |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in CALIB_MARGINS) + " | --- |",
                  "| logistic limit | | | " + " | ".join(f"{logistic_rate(m):.4f}" for m in CALIB_MARGINS) + " | |"]
        for r in cal:
            lines.append(f"| {r['case']} | {r['trials']} | {r['size']} | "
                         + " | ".join(f"{r['rates'][str(m)]:.4f}" for m in CALIB_MARGINS) + f" | {r['max_far_off']} |")
    rf = [r for r in rows if r["part"] == "reference"]
    if rf:
        lines += ["", "## Accuracy of the optimiser's reference solutions (dpmpp_3m, uniform log-SNR steps, to_zero; "
                  "1024 prior draws, against 1000 steps)", "",
                  "| case | process | steps | median error f64 / f32 | max error f64 / f32 | mean log-density shift (nats) f64 / f32 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in rf:
            lines.append(f"| {r['case']} | {r['process']} | {r['steps']} | {r['f64_median_error']:.1e} / "
                         f"{r['f32_median_error']:.1e} | {r['f64_max_error']:.1e} / {r['f32_max_error']:.1e} | "
                         f"{r['f64_mean_log_density_shift']:+.1e} / {r['f32_mean_log_density_shift']:+.1e} |")
    tm = [r for r in rows if r["part"] == "time"]
    if tm:
        lines += ["", f"## Fitting time, previous optimiser ({args.baseline_rev}) vs this one, interleaved in one run", "",
                  "Held-out report: objective, W-SW2 / NLL ratios, far off (both fits on the same held-out draws).", "",
                  "| case | process | sampler, steps | tail_rounds | previous s | this s | speed-up (median ratio) | "
                  "previous report | this report | evaluations previous / this |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in tm:
            ev = r.get("evaluations")
            ev = f"{ev['old']} / {ev['new']}" if ev else "-"
            lines.append(f"| {r['case']} | {r['process']} | {r['sampler']}, {r['steps']} | {r.get('tail_rounds', 1)} | "
                         f"{r['old_s']} | {r['new_s']} | {r['speedup']} | {r.get('old_report', '-')} | "
                         f"{r.get('new_report', '-')} | {ev} |")
    wm = [r for r in rows if r["part"] == "warm"]
    if wm:
        lines += ["", "## Warm start against a cold one, per budget (one after the other, alternating order)", "",
                  "Cold: `init=\"best\"`; warm: `init=` the previous budget's cold fit. Report: the held-out objective, "
                  "W-SW2 / NLL ratios, far off (4096 draws); judged: W-SW2 / NLL ratios (N, one seed). Time ratio: "
                  "cold s / warm s (> 1: warm is faster).", "",
                  "| case | process | sampler | NFE | cold s (evaluations) | warm s (evaluations) | time ratio | "
                  "cold report | warm report | cold judged | warm judged |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in wm:
            c, w = r["cold"], r.get("warm")
            lines.append(f"| {r['case']} | {r['process']} | {r['sampler']} | {r['nfe']} | {c['fit_s']} ({c['evaluations']}) | "
                         + (f"{w['fit_s']} ({w['evaluations']}) | {r['time_ratio']} | {c['report']} | {w['report']} | "
                            f"{c['judged']} | {w['judged']} |" if w else f"- | - | {c['report']} | - | {c['judged']} | - |"))
    write_text_atomic((out / f"{args.tag}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--floor-seeds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="ring,aniso16")
    ap.add_argument("--samplers", default="dpmpp_2m,dpmpp_3m")
    ap.add_argument("--parts", default="ladder,transfer,time")
    ap.add_argument("--ladder", default=None, help="num_steps budgets of the ladder part (default: per case)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loss", default="auto", choices=("auto", "mse", "nll"),
                    help="optimize_grid's loss in the ladder and transfer parts")
    ap.add_argument("--processes", default="VE,VP", help="processes of the ladder part")
    ap.add_argument("--tail-retries", type=int, default=0, help="optimize_grid's tail_retries in the ladder part")
    ap.add_argument("--calib-trials", type=int, default=2000, help="exact set pairs per case of the calib part")
    ap.add_argument("--calib-size", type=int, default=4096, help="set size of the calib part (the report's)")
    ap.add_argument("--seeds", type=int, default=8, help="draw seeds of the transfer part's judging (bench_defaults' protocol)")
    ap.add_argument("--judge-seed-offset", type=int, default=0,
                    help="the transfer part judges with draw seeds offset..offset+seeds-1 (a replication on seeds "
                         "no earlier choice saw)")
    ap.add_argument("--family-variants", default="family", help="the family fits of the transfer part (FAMILY_VARIANTS)")
    ap.add_argument("--transfer-processes", default=",".join(TRANSFER_PROCESSES),
                    help="transfer part: the processes fitted for and judged (PROCESSES keys)")
    ap.add_argument("--absolute-variants", default="",
                    help="transfer part: cached fits carried by the absolute rule (ABSOLUTE_VARIANTS, comma-separated)")
    ap.add_argument("--warm", action="store_true",
                    help="transfer part: also fit each family variant warm-started from its previous budget's fit")
    ap.add_argument("--warm-cases", default="ring:dpmpp_2m:VE,ring:dpmpp_2m:VP,aniso16:dpmpp_3m:VP",
                    help="case:sampler:process, comma-separated, for the warm part (cold vs warm start per budget)")
    ap.add_argument("--judge-kinds", default=None, help="judge only these grids of the transfer part (comma-separated)")
    ap.add_argument("--judge-steps", default=None, help="judge the transfer part's grids only at these num_steps")
    ap.add_argument("--fits-tag", default=None, help="the transfer part's cache of fitted grids (<out>/<tag>_fits.jsonl)")
    ap.add_argument("--time-tail-rounds", type=int, default=1, help="tail_rounds of this optimiser in the time part")
    ap.add_argument("--time-cases", default="ring:dpmpp_3m:12:VE,ring:dpmpp_3m:10:VP,aniso16:dpmpp_3m:16:VP,"
                    "aniso64:dpmpp_3m:20:VP",
                    help="case:sampler:num_steps:process, comma-separated, for the time part")
    ap.add_argument("--baseline-rev", default="41f8e0f")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="grids")
    ap.add_argument("--merge", default=None, help="run nothing: merge the .jsonl rows of these tags into --tag")
    ap.add_argument("--note", default="")
    ap.add_argument("--label", default="", help="appended to the ladder rows' sampler label (e.g. the code version)")
    args = ap.parse_args(argv)
    args.cases, args.samplers = args.cases.split(","), args.samplers.split(",")
    args.ladder = [int(v) for v in args.ladder.split(",")] if args.ladder else None
    args.transfer_processes = args.transfer_processes.split(",")
    torch.set_num_threads(1)
    rows: list[dict] = []
    if args.merge:
        for tag in args.merge.split(","):
            rows += [json.loads(line) for line in (Path(args.out) / f"{tag}.jsonl").read_text().splitlines() if line]
        write(args, rows)
        return 0
    t0 = time.time()

    def log(msg):
        print(msg, flush=True)
        write(args, rows)

    for part in args.parts.split(","):
        {"ladder": part_ladder, "transfer": part_transfer, "time": part_time, "calib": part_calib, "warm": part_warm,
         "reference": part_reference}[part](args, rows, log)
    args.note = (args.note + f" Run time {time.time() - t0:.0f} s.").strip()
    write(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
