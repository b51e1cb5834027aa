#!/usr/bin/env python
"""Per-step overhead of ``unipc`` against a hand-written loop of the same algorithm (k-diffusion has no UniPC).

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead_unipc.py      # d = 2, 16, 64; batch 100 and 10,000; float32/64

Overhead = ``(time of the run - time inside the score) / NFE`` in this thread's CPU time, as in bench_overhead.py (its
mixture score, VE sigma_min 0.01 / sigma_max 50, uniform log-sigma grid, no final step on either side: ``to_zero=False``).
The hand-written loop is the textbook form of UniPC-3 (bh2, data prediction, VE so alpha = 1): per step the denoiser
``D = x + sigma^2 s``, the corrector ``x_c = a x_prev + sum_j c_j D_j`` (from the second step on) and the predictor
``x = a x_c + sum_j w_j D_j``, with the coefficients precomputed (by ``unipc_coefficients``, outside the timing) and
plain out-of-place tensor arithmetic. Both sides must give the same samples (median difference printed). Pairs run
interleaved; the ratio is the median over repeats of ours / the loop's. Writes ``overhead_unipc.md`` to --out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import SIGMA_MAX, SIGMA_MIN, Mixture, _clock, run_once  # noqa: E402

from score_toolkit import get_sampler  # noqa: E402
from score_toolkit._io import write_text_atomic
from score_toolkit.processes import VESDE  # noqa: E402
from score_toolkit.samplers.dpm_solver import multistep_orders  # noqa: E402
from score_toolkit.samplers.unipc import unipc_coefficients  # noqa: E402


def hand_loop(score, x, sigmas, co):
    """UniPC-3 written out (VE: alpha = 1, D = x + sigma^2 s); ``co``: float coefficients per step."""
    a, pred, corr = co["a"], co["pred"], co["corr"]
    hist, x_prev = [], None
    for i in range(len(sigmas) - 1):
        d = x + sigmas[i] ** 2 * score(x, i)
        hist = [d] + hist[:3]
        if i > 0:
            xc = a[i - 1] * x_prev
            for j, c in enumerate(corr[i - 1]):
                xc = xc + c * hist[j]
            x = xc
        x_prev = x
        xn = a[i] * x
        for j, w in enumerate(pred[i]):
            xn = xn + w * hist[j]
        x = xn
    return x


def measure(d, batch, dtype, steps, repeats, process, min_run=0.05):
    ts = process.time_grid(steps, "log_sigma", dtype=torch.float64)
    sig = process.sigma(ts).tolist()
    orders = multistep_orders(steps, 3, False)
    raw = unipc_coefficients(process, ts, orders)
    co = {"a": [float(v) for v in raw["a"]], "pred": [[float(v) for v in w] for w in raw["pred"]],
          "corr": [[float(v) for v in w] for w in raw["corr"]]}
    mix = Mixture(d, dtype)
    x0 = (SIGMA_MAX * torch.randn(batch, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).to(dtype)
    sampler = get_sampler("unipc", grid=ts.tolist(), to_zero=False)
    sig_t = [torch.full((batch,), s, dtype=torch.float64) for s in sig]

    def our_score(x, t):  # t -> sigma, then the mixture (all timed as score time)
        before = mix.seconds
        start = _clock()
        s = mix.score(x, process.sigma(t))
        mix.seconds = before + (_clock() - start)
        return s

    def loop_score(x, i):
        return mix.score(x, sig_t[i])

    ours_fn = lambda: sampler.sample(our_score, process, x0)  # noqa: E731
    loop_fn = lambda: hand_loop(loop_score, x0.clone(), sig, co)  # noqa: E731
    w1, _, o1 = run_once(ours_fn, mix)
    w2, _, o2 = run_once(loop_fn, mix)
    diff = float((o1.samples.double() - o2.double()).norm(dim=1).median())
    inner = max(1, math.ceil(min_run / max(w1, w2)))
    rows = {"ours": [], "loop": []}
    for r in range(repeats):
        order = (("ours", ours_fn), ("loop", loop_fn)) if r % 2 == 0 else (("loop", loop_fn), ("ours", ours_fn))
        for key, fn in order:
            wall, score_s, _ = run_once(fn, mix, inner)
            rows[key].append((wall - score_s) / (steps * inner) * 1e3)
    ratios = [o / h for o, h in zip(rows["ours"], rows["loop"])]
    return {"d": d, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "ours_ms": statistics.median(rows["ours"]),
            "loop_ms": statistics.median(rows["loop"]), "ratio": statistics.median(ratios), "diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="2,16,64")
    ap.add_argument("--batches", default="100,10000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    process = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    lines = ["# unipc: per-step overhead against a hand-written loop of the same algorithm", "",
             f"{args.steps} steps (NFE {args.steps}), VESDE({SIGMA_MIN}, {SIGMA_MAX}), uniform log-sigma grid, no final step; "
             f"thread CPU time, {args.repeats} interleaved repeats, median of the paired ratios "
             "(benchmarks/bench_overhead_unipc.py).", "",
             "| d | batch | dtype | ours ms/step | loop ms/step | ratio | median sample difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in (int(v) for v in args.dims.split(",")):
        for batch in (int(v) for v in args.batches.split(",")):
            for dtype in (torch.float32, torch.float64):
                r = measure(d, batch, dtype, args.steps, args.repeats, process)
                line = (f"| {r['d']} | {r['batch']} | {r['dtype']} | {r['ours_ms']:.4f} | {r['loop_ms']:.4f} | "
                        f"{r['ratio']:.2f} | {r['diff']:.1e} |")
                print(line, flush=True)
                lines.append(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic((out / "overhead_unipc.md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
