"""Per-step overhead of the fixed-grid samplers against k-diffusion's ``k_diffusion.sampling`` loops.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py              # d = 2, 16, 64; batch 100 and 10,000; float32/64
    python benchmarks/bench_overhead.py --dims 2 --batches 100 --repeats 3 --out /tmp/ov   # a quick look

Overhead is what a sampler costs beyond its score function: ``(time of the run - time inside the score) / NFE``, timed
by default in this thread's CPU time (``time.thread_time``: on a busy machine, time spent waiting for a core then
counts for neither side; ``--clock wall`` for wall time; with one torch thread all of torch's work runs on it). Both
sides run on the same sigma grid (VE, ``sigma_min = 0.01``, ``sigma_max = 50``, log-sigma spacing, ending at
``sigma_min``: no step to zero on either side) from the same initial state, with the same exact score of a
Gaussian mixture (8 isotropic components). Each side's score function is timed whole, as that library calls it:
k-diffusion's is the denoiser ``D(x, sigma) = x + sigma^2 s`` (the score, then the conversion), ours is
``s(x, t)`` (the map from ``t`` to ``sigma``, then the score). Stochastic k-diffusion samplers get plain
``torch.randn_like`` noise (its cheapest noise sampler, not its default Brownian tree). The pairs run interleaved (ours, theirs, then theirs, ours, ...) in one process with
one torch thread; a timed repeat is as many consecutive runs as take ``--min-run`` seconds (0.05), so that short runs
are not timed one by one; the reported ratio is the median over repeats of the paired ratio ours / theirs.

k-diffusion is not a dependency: install it without its dependencies (its wheel requires torchvision, which this
project does not use), ``pip install --no-deps k-diffusion``. Only ``k_diffusion/sampling.py`` is loaded (by path,
with a two-line stand-in for ``k_diffusion.utils``; the package's ``__init__`` imports torchvision). Without it the
benchmark prints why and exits 0.

Writes ``overhead.csv`` (one row per configuration) and ``overhead.md`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0
#: the clock: CPU time of this thread (torch runs its one thread's work on it), so that time spent waiting for a
#: core on a busy machine counts for neither side; ``--clock wall`` uses wall time instead
_clock = time.thread_time


def load_k_sampling():
    """``k_diffusion.sampling`` loaded by path (the package's ``__init__`` needs torchvision), or None."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):  # k_diffusion.utils.append_dims
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
        mod = importlib.util.module_from_spec(sspec)
        sspec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


class Mixture:
    """8 isotropic Gaussian components in d dimensions; exact score of the VE marginal at noise level sigma.
    ``seconds`` accumulates the time spent inside :meth:`score`."""

    def __init__(self, d: int, dtype: torch.dtype, k: int = 8):
        g = torch.Generator().manual_seed(0)
        self.mu = (3.0 * torch.randn(k, d, generator=g)).to(dtype)
        self.var0 = (0.05 + 0.2 * torch.rand(k, generator=g)).to(dtype)
        self.logw = torch.log_softmax(torch.randn(k, generator=g), 0).to(dtype)
        self.mu_sq = (self.mu**2).sum(1)
        self.d = d
        self.seconds = 0.0

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        start = _clock()
        var = self.var0 + sigma.to(x.dtype).unsqueeze(1) ** 2  # (B, K)
        # ||x - mu_k||^2 = |x|^2 - 2 x.mu_k + |mu_k|^2
        dist = (x * x).sum(1, keepdim=True) - 2.0 * x @ self.mu.T + self.mu_sq
        logits = self.logw - 0.5 * dist / var - 0.5 * self.d * torch.log(var)
        r = torch.softmax(logits, 1) / var  # responsibilities / variance
        s = r @ self.mu - r.sum(1, keepdim=True) * x
        self.seconds += _clock() - start
        return s


def k_callers(kd):
    """Our sampler name -> (score evaluations per step, our options, k-diffusion's loop on (model, x, sigmas))."""
    def plain(x):
        return lambda sigma, sigma_next: torch.randn_like(x)

    return {
        "dpmpp_2m": (1, {"lower_order_final": False, "to_zero": False}, lambda m, x, s: kd.sample_dpmpp_2m(m, x, s, disable=True)),
        "heun": (2, {}, lambda m, x, s: kd.sample_heun(m, x, s, disable=True)),
        "euler": (1, None, lambda m, x, s: kd.sample_euler(m, x, s, disable=True)),
        "ancestral": (1, {"variance": "posterior"},
                      lambda m, x, s: kd.sample_euler_ancestral(m, x, s, disable=True, noise_sampler=plain(x))),
        "dpmpp_2s": (2, {}, lambda m, x, s: kd.sample_dpmpp_2s_ancestral(m, x, s, eta=0.0, disable=True,
                                                                           noise_sampler=plain(x))),
        "dpmpp_sde": (2, {}, lambda m, x, s: kd.sample_dpmpp_sde(m, x, s, disable=True, noise_sampler=plain(x))),
        "dpmpp_2m_sde": (1, {"lower_order_final": False},
                         lambda m, x, s: kd.sample_dpmpp_2m_sde(m, x, s, disable=True, solver_type="heun",
                                                                noise_sampler=plain(x))),
        "dpmpp_3m_sde": (1, {"lower_order_final": False},
                         lambda m, x, s: kd.sample_dpmpp_3m_sde(m, x, s, disable=True, noise_sampler=plain(x))),
    }


def our_sampler(name: str, opts: dict, num_steps: int, times: list[float]):
    from score_toolkit import get_sampler

    if name == "euler":  # the deterministic Euler step of the PF-ODE: pf_ode's fixed-grid Euler
        return get_sampler("pf_ode", method="euler", num_steps=num_steps, grid="log_sigma")
    if name == "ancestral":
        return get_sampler("ancestral", num_steps=num_steps, grid="log_sigma", **opts)
    return get_sampler(name, grid=times, **opts)


def run_once(fn, mix: Mixture, inner: int = 1):
    """Wall time and score time of ``inner`` consecutive runs of ``fn``, and its last output."""
    mix.seconds = 0.0
    start = _clock()
    for _ in range(inner):
        out = fn()
    wall = _clock() - start
    return wall, mix.seconds, out


def measure(kd, name, d, batch, dtype, num_steps, repeats, process, min_run=0.05):
    nfe_per_step, opts, kcall = k_callers(kd)[name]
    steps = num_steps if nfe_per_step == 1 else max(2, num_steps // nfe_per_step)
    ts = process.time_grid(steps, "log_sigma", dtype=torch.float64)
    sigmas = process.sigma(ts).to(dtype)  # k-diffusion's sigmas are in the state's dtype (its get_sigmas_* default)
    mix = Mixture(d, dtype)
    g = torch.Generator().manual_seed(1)
    x0 = (SIGMA_MAX * torch.randn(batch, d, generator=g, dtype=torch.float64)).to(dtype)
    sampler = our_sampler(name, opts or {}, steps, ts.tolist())

    def our_score(x, t):  # the score function as we receive it: t -> sigma, then the mixture (all timed)
        before = mix.seconds
        start = _clock()
        s = mix.score(x, process.sigma(t))
        mix.seconds = before + (_clock() - start)
        return s

    k_calls = []

    def k_model(x, sigma):
        k_calls.append(1)
        before = mix.seconds
        start = _clock()
        s = mix.score(x, sigma)
        out = x + (sigma.to(x.dtype) ** 2).unsqueeze(1) * s
        mix.seconds = before + (_clock() - start)
        return out

    ours_fn = lambda: sampler.sample(our_score, process, x0)  # noqa: E731
    k_fn = lambda: kcall(k_model, x0.clone(), sigmas)  # noqa: E731
    rows = {"ours": [], "k": []}
    outs = {}
    slowest = 0.0
    for fn, key in ((ours_fn, "ours"), (k_fn, "k")):  # warm-up (and the outputs compared below)
        wall, _, out = run_once(fn, mix)
        slowest = max(slowest, wall)
        outs[key] = out.samples if key == "ours" else out
    inner = max(1, math.ceil(min_run / slowest))  # runs per timed repeat: a repeat takes >= min_run seconds
    nfe = steps * nfe_per_step
    counted = []
    counter = lambda x, t: counted.append(1) or our_score(x, t)  # noqa: E731
    sampler.sample(counter, process, x0)
    k_calls.clear()
    k_fn()
    if len(counted) != nfe or len(k_calls) != nfe:
        raise RuntimeError(f"{name}: expected {nfe} score evaluations, counted {len(counted)} (ours) and "
                           f"{len(k_calls)} (k-diffusion)")
    for r in range(repeats):
        order = (("ours", ours_fn), ("k", k_fn)) if r % 2 == 0 else (("k", k_fn), ("ours", ours_fn))
        for key, fn in order:
            wall, score_s, _ = run_once(fn, mix, inner)
            rows[key].append(((wall - score_s) / (nfe * inner) * 1e3, score_s / (nfe * inner) * 1e3))
    ratios = [o[0] / k[0] for o, k in zip(rows["ours"], rows["k"])]
    diff = float((outs["ours"].double() - outs["k"].double()).norm(dim=1).median())
    return {
        "sampler": name, "d": d, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "steps": steps,
        "nfe": nfe, "ours_overhead_ms": statistics.median(v[0] for v in rows["ours"]),
        "k_overhead_ms": statistics.median(v[0] for v in rows["k"]),
        "score_ms": statistics.median(v[1] for v in rows["ours"] + rows["k"]),
        "runs_per_repeat": inner, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "median_diff": diff,
    }


def t_dtype_rows(n: int = 20000, d: int = 16) -> list[dict]:
    """What rounding ``t`` to float32 inside ``ScoreAdapter`` costs: an exact epsilon-prediction "network" (the
    mixture's noise prediction at the time it is handed, in float32) behind ``ScoreAdapter``, sampled in float32 by
    dpmpp_2m, against (a) the same network with the epsilon-to-score conversion at the float64 ``t`` and (b) the
    analytic score given the float64 ``t``; each against the float64 run from the same initial state."""
    from score_toolkit import get_sampler
    from score_toolkit.analytic import GaussianMixture
    from score_toolkit.processes import VESDE, VPSDE
    from score_toolkit.scores import ScoreAdapter

    g = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(6, d, generator=g, dtype=torch.float64)
    covs = torch.stack([torch.diag(0.05 + 0.2 * torch.rand(d, generator=g, dtype=torch.float64)) for _ in range(6)])
    mix = GaussianMixture(means, covs)
    rows = []
    for pname, proc in (("VE", VESDE(0.01, 50.0)), ("VP", VPSDE(0.1, 20.0))):
        exact = mix.score_fn(proc)

        class ExactEpsilon(torch.nn.Module):
            def forward(self, x, t, proc=proc, exact=exact):
                t64 = t.double()
                return (-proc.sigma(t64)[:, None] * exact(x.double(), t64)).to(x.dtype)

        net = ExactEpsilon()
        adapter = ScoreAdapter(net, proc, prediction_type="epsilon", time_input="t")

        def converted_at_float64_t(x, t, net=net, proc=proc):
            return (-net(x, t.to(x.dtype)).double() / proc.sigma(t)[:, None]).to(x.dtype)

        for steps in (10, 25):
            sampler = get_sampler("dpmpp_2m", num_steps=steps)
            x0 = proc.prior_sample((n, d), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            ref = sampler.sample(exact, proc, x0).samples
            for label, fn in (("ScoreAdapter (t rounded to float32)", adapter),
                              ("same network, conversion at float64 t", converted_at_float64_t),
                              ("analytic score, float64 t", exact)):
                err = (sampler.sample(fn, proc, x0.float()).samples.double() - ref).norm(dim=1)
                rows.append({"process": pname, "steps": steps, "score": label, "median": float(err.median()),
                             "p99": float(err.quantile(0.99)), "max": float(err.max())})
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)  # atomic: a crash leaves the former file


def write_results(rows: list[dict], trows: list[dict], out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        _write_csv(rows, out / "overhead.csv")
    if trows:
        _write_csv(trows, out / "overhead_tdtype.csv")
    lines = [
        "# Per-step overhead: score_toolkit's samplers vs k-diffusion",
        "",
        "Written by `benchmarks/bench_overhead.py` (read its docstring for the method). Overhead = (time of the run - time",
        "inside the score) / NFE, in ms of the clock named in the settings; ratio = median over the interleaved repeats of ours / k-diffusion's (min-max",
        "in brackets). `median diff`: median distance between the two samplers' outputs from the same initial state",
        "(deterministic samplers; stochastic ones draw different noise; the formulas differ in their error terms).",
        "`euler` is our `pf_ode(method='euler')` (its own fixed-grid Euler loop, the Euler step in t) against",
        "`sample_euler` (the Euler step in sigma); `ancestral` against `sample_euler_ancestral`;",
        "`dpmpp_2s` against `sample_dpmpp_2s_ancestral(eta=0)`.",
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()),
        "",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows):
            sub = [r for r in rows if r["dtype"] == dtype and r["batch"] == batch]
            if not sub:
                continue
            dims = list(dict.fromkeys(r["d"] for r in sub))
            lines += [f"## {dtype}, batch {batch}", "",
                      "| sampler | NFE | " + " | ".join(f"d={d}: ours / k-diff (ms), ratio" for d in dims) + " |",
                      "|---|---|" + "---|" * len(dims)]
            for name in dict.fromkeys(r["sampler"] for r in sub):
                cells = []
                nfe = ""
                for d in dims:
                    r = next((r for r in sub if r["sampler"] == name and r["d"] == d), None)
                    if r is None:
                        cells.append("")
                        continue
                    nfe = r["nfe"]
                    cells.append(f"{r['ours_overhead_ms']:.3f} / {r['k_overhead_ms']:.3f}, **{r['ratio_median']:.2f}** "
                                 f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]")
                lines.append(f"| {name} | {nfe} | " + " | ".join(cells) + " |")
            lines.append("")
    if rows:
        lines += ["## Score time and agreement", "",
                  "| sampler | dtype | batch | d | score ms/NFE | median distance ours vs k-diff |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['sampler']} | {r['dtype']} | {r['batch']} | {r['d']} | {r['score_ms']:.3f} | "
                         f"{r['median_diff']:.3g} |")
    else:
        lines += ["(overhead part not run: k-diffusion not installed, or not requested)", ""]
    if trows:
        lines += ["", "## The time a network sees: float32 t inside ScoreAdapter", "",
                  "dpmpp_2m in float32 (default grid, `to_zero`), 16-D mixture of 6 Gaussians, N = "
                  f"{settings.get('tdtype N', '')}: distance of each float32 run's samples from the float64 run's (same "
                  "initial state). The \"network\" is the exact noise prediction at the time it is handed.", "",
                  "| process | steps | score function | median | 99th percentile | max |", "|---|---|---|---|---|---|"]
        for r in trows:
            lines.append(f"| {r['process']} | {r['steps']} | {r['score']} | {r['median']:.2e} | {r['p99']:.2e} | "
                         f"{r['max']:.2e} |")
    tmp = out / "overhead.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out / "overhead.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="overhead,tdtype",
                    help="overhead (against k-diffusion) and/or tdtype (float32 time inside ScoreAdapter)")
    ap.add_argument("--dims", default="2,16,64")
    ap.add_argument("--batches", default="100,10000")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--samplers", default=None, help="comma-separated (default: every pair)")
    ap.add_argument("--nfe", type=int, default=20, help="score evaluations per run (steps = nfe / evaluations per step)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--min-run", type=float, default=0.05, help="seconds per timed repeat (several runs when short)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (robust to a busy machine); wall: wall time")
    ap.add_argument("--tdtype-n", type=int, default=20000, help="samples of the tdtype part")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    global _clock
    _clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if parts - {"overhead", "tdtype"}:
        raise SystemExit(f"unknown part(s) {sorted(parts - {'overhead', 'tdtype'})}; known: overhead, tdtype")
    torch.set_num_threads(1)
    rows, trows = [], []
    start = time.time()
    load0 = os.getloadavg()[0]
    kd = load_k_sampling() if "overhead" in parts else None
    if "overhead" in parts and kd is None:
        print("bench_overhead: k-diffusion is not installed; the overhead part is skipped. Install it without its "
              "dependencies (pip install --no-deps k-diffusion) to run it.")
        parts.discard("overhead")
    if "overhead" in parts:
        from score_toolkit.processes import VESDE

        process = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
        names = args.samplers.split(",") if args.samplers else list(k_callers(kd))
        unknown = sorted(set(names) - set(k_callers(kd)))
        if unknown:
            raise SystemExit(f"unknown sampler(s) {unknown}; known: {list(k_callers(kd))}")
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for batch in (int(b) for b in args.batches.split(",")):
                for d in (int(v) for v in args.dims.split(",")):
                    for name in names:
                        r = measure(kd, name, d, batch, dtype, args.nfe, args.repeats, process, args.min_run)
                        rows.append(r)
                        print(f"{name:13s} {dtype_name} B={batch:6d} d={d:3d}  ours {r['ours_overhead_ms']:.3f}  "
                              f"k {r['k_overhead_ms']:.3f} ms/NFE  ratio {r['ratio_median']:.2f} "
                              f"[{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]  diff {r['median_diff']:.2g}", flush=True)
    if "tdtype" in parts:
        trows = t_dtype_rows(args.tdtype_n)
        for r in trows:
            print(f"tdtype {r['process']} {r['steps']:3d} steps  {r['score']:40s} median {r['median']:.2e}  "
                  f"p99 {r['p99']:.2e}  max {r['max']:.2e}", flush=True)
    if not rows and not trows:
        return 0
    settings = {
        "process": f"VESDE({SIGMA_MIN}, {SIGMA_MAX})", "grid": "log_sigma", "NFE": args.nfe, "repeats": args.repeats,
        "seconds per repeat (at least)": args.min_run, "clock": "thread CPU time" if args.clock == "cpu" else "wall", "torch threads": 1, "torch": torch.__version__,
        "python": platform.python_version(), "commit": git_commit(), "tdtype N": args.tdtype_n,
        "load average (start/end)": f"{load0:.1f}/{os.getloadavg()[0]:.1f}", "duration": f"{time.time() - start:.0f} s",
        "command": "`" + " ".join(["python", "benchmarks/bench_overhead.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
    }
    write_results(rows, trows, Path(args.out), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
