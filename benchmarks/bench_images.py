"""Image-scale benchmarks: training throughput, sampling against diffusers, memory of a streamed data set.

Runs unchanged on a CPU (here) and on a CUDA machine (``--device cuda --mixed-precision bf16``), printing the
same tables. Parts (``--part``; ``all`` runs the first three):

* ``training``: steps/s of score_toolkit's training loop (``train()``, what ``score-toolkit train`` runs) divided
  by a minimal hand-written loop of diffusers' unconditional-training recipe (``UNet2DModel``,
  ``DDPMScheduler.add_noise``, MSE on epsilon, AdamW, ``accelerator.backward``), same network, same data (an
  in-memory set of random 32x32 RGB images), same batch, no EMA and no clipping in either; alternating runs in one
  process (B A, A B, ...: the side that runs first alternates), the first ``--warmup`` steps of each run excluded, median over ``--repeats``. Two
  settings: the reduced-width DDPM preset at batch 16 and the full 35.7M preset at batch 2.
* ``sampling``: ``ScorePipeline`` with ``dpmpp_2m`` at 25 steps against diffusers' ``DDPMPipeline`` with
  ``DPMSolverMultistepScheduler`` at 25 steps (dpmsolver++, order 2, ``final_sigmas_type="sigma_min"``; the
  ScorePipeline grid is the scheduler's timesteps, ending at sigma_min like it: ``to_zero=False``), the 35.7M DDPM CIFAR-10 network with random weights, batch 4,
  the same initial noise: NFE of both, wall-time ratio (alternating, median), and the largest difference of the
  output images (both in [0, 1], as DDPMPipeline returns them).
* ``memory``: peak RSS of a training run over a streamed parquet data set of 20,000 and of 200,000 32x32 images
  (written by the benchmark, PNG-encoded), each run in a fresh process; the ratio must stay near 1. The table
  gives each process's peak RSS and the peak of the summed RSS and PSS of the training process and its
  DataLoader workers (sampled every 0.1 s).
* ``compile``: ``train.compile`` (torch.compile, inductor) against eager on a small UNet, alternating runs:
  steps/s after warm-up and the time to the end of the first step (compilation).

    python benchmarks/bench_images.py [--part all] [--device cpu|cuda] [--mixed-precision no|bf16]
        [--repeats 3] [--steps 12] [--out benchmarks/results/images.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- training
def _load() -> str:
    """The 1/5/15-minute load averages now (as ``uptime`` prints them)."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def hand_written(preset: str, batch: int, steps: int, warmup: int, device: str, mixed: str,
                 data_file: Path) -> tuple[float, float]:
    """diffusers' unconditional-training recipe, minimal. Returns steps/s after ``warmup`` steps (wall clock, and
    this process's CPU time: on a shared machine the CPU clock is not inflated by waiting for a core)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from score_toolkit.models.presets import build_unet

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mixed)
    torch.manual_seed(0)
    data = torch.from_numpy(np.load(data_file))
    model = build_unet(preset)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(data), generator=g), 0
    t0 = None
    for step in range(steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
        if pos + batch > len(data):
            perm, pos = torch.randperm(len(data), generator=g), 0
        x = data[perm[pos:pos + batch]].to(accelerator.device)
        pos += batch
        noise = torch.randn_like(x)
        timesteps = torch.randint(0, 1000, (batch,), device=x.device)
        noisy = noise_scheduler.add_noise(x, noise, timesteps)
        pred = model(noisy, timesteps).sample
        loss = F.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (steps - warmup) / (time.perf_counter() - t0), (steps - warmup) / (time.process_time() - c0)


def ours(preset: str, batch: int, steps: int, warmup: int, device: str, mixed: str, data_file: Path,
         run: Path, compile: bool = False, model_options: dict | None = None,
         first_step: list | None = None) -> tuple[float, float]:
    """score_toolkit's loop (``train()``, what ``score-toolkit train`` runs) on the same data. Steps/s after
    ``warmup`` steps, timed by a callback at the end of each step (the final checkpoint is not timed)."""
    from score_toolkit.models.presets import PRESET_RECIPES
    from score_toolkit.training import train

    recipe = PRESET_RECIPES[preset]
    cfg = {
        "output_dir": str(run), "seed": 0,
        "data": {"name": "vectors", "options": {"path": str(data_file)}},
        "process": recipe["process"],
        "model": {"name": "UNet2DModel", "preset": preset, "prediction_type": recipe["prediction_type"],
                  "time_input": recipe["time_input"], **({"options": model_options} if model_options else {})},
        "objective": {"name": recipe["objective"]["name"]},
        "train": {"steps": steps, "batch_size": batch, "learning_rate": 1e-4, "ema_decay": None, "max_grad_norm": None,
                  "checkpoint_every": 10 ** 9, "log_every": 10 ** 9, "progress": False, "mixed_precision": mixed,
                  "cpu": device == "cpu", "compile": compile},
        "export": {"enabled": False},
    }
    stamps: dict[int, tuple[float, float]] = {}

    def clock(info):
        if device == "cuda":
            torch.cuda.synchronize()
        stamps[info["step"]] = (time.perf_counter(), time.process_time())

    start = time.perf_counter()
    train(cfg, callbacks=[clock])
    if first_step is not None:  # wall time from the call to the end of step 1 (setup, and compilation)
        first_step.append(stamps[1][0] - start)
    return ((steps - warmup) / (stamps[steps][0] - stamps[warmup][0]),
            (steps - warmup) / (stamps[steps][1] - stamps[warmup][1]))


def bench_training(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "images.npy"
        np.save(data_file, _images(512).numpy())
        for preset, batch in (("ddpm_cifar10_small", 16), ("ddpm_cifar10", 2)):
            a, b = [], []
            for r in range(args.repeats):
                # alternate which side runs first (B A, A B, ...), so a drift in the machine's load cancels
                for side in (("theirs", "ours") if r % 2 == 0 else ("ours", "theirs")):
                    if side == "theirs":
                        b.append(hand_written(preset, batch, args.steps, args.warmup, args.device, args.mixed_precision,
                                              data_file))
                    else:
                        a.append(ours(preset, batch, args.steps, args.warmup, args.device, args.mixed_precision,
                                      data_file, Path(tmp) / f"run-{preset}-{r}"))
                print(f"  {preset} batch {batch} repeat {r}: ours {a[-1][0]:.3f} steps/s ({a[-1][1]:.3f} per CPU s), "
                      f"hand-written {b[-1][0]:.3f} ({b[-1][1]:.3f})", flush=True)
            ratios = [x[0] / y[0] for x, y in zip(a, b)]
            cpu_ratios = [x[1] / y[1] for x, y in zip(a, b)]
            rows.append({"preset": preset, "batch": batch, "load_average": _load(), "ours_steps_per_s": statistics.median(x[0] for x in a),
                         "hand_steps_per_s": statistics.median(y[0] for y in b), "ratio_median": statistics.median(ratios),
                         "ratios": [round(r, 3) for r in ratios], "cpu_ratio_median": statistics.median(cpu_ratios),
                         "cpu_ratios": [round(r, 3) for r in cpu_ratios]})
    return rows


def bench_compile(args) -> dict:
    """``train.compile`` (torch.compile, inductor) against eager on a small UNet (widths 32-64, 32x32, batch 8):
    steps/s after warm-up (alternating runs) and the wall time to the end of the first step (compilation)."""
    options = {"block_out_channels": [32, 64], "layers_per_block": 1, "down_block_types": ["DownBlock2D"] * 2,
               "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 8}
    eager, compiled, first_eager, first_compiled = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "images.npy"
        np.save(data_file, _images(256).numpy())
        for r in range(args.repeats):
            for flag in ((False, True) if r % 2 == 0 else (True, False)):
                out, first = (compiled, first_compiled) if flag else (eager, first_eager)
                out.append(ours("ddpm_cifar10_small", 8, args.steps, args.warmup, args.device, args.mixed_precision,
                                data_file, Path(tmp) / f"run-{flag}-{r}", compile=flag, model_options=options,
                                first_step=first))
            print(f"  compile repeat {r}: compiled {compiled[-1][0]:.2f} steps/s, eager {eager[-1][0]:.2f}; first step "
                  f"{first_compiled[-1]:.1f} s vs {first_eager[-1]:.1f} s", flush=True)
    ratios = [c[0] / e[0] for c, e in zip(compiled, eager)]
    cpu_ratios = [c[1] / e[1] for c, e in zip(compiled, eager)]
    return {"compiled_steps_per_s": statistics.median(c[0] for c in compiled),
            "eager_steps_per_s": statistics.median(e[0] for e in eager), "ratio_median": statistics.median(ratios),
            "ratios": [round(x, 3) for x in ratios], "cpu_ratio_median": statistics.median(cpu_ratios),
            "first_step_compiled_s": statistics.median(first_compiled), "first_step_eager_s": statistics.median(first_eager),
            "load_average": _load()}


# ---------------------------------------------------------------------------------------------- sampling
def bench_sampling(args) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

    from score_toolkit.models.presets import build_unet
    from score_toolkit.pipeline import ScorePipeline

    torch.manual_seed(0)
    unet = build_unet("ddpm_cifar10").eval()
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    unet = unet.to(args.device, dtype)
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                      solver_order=2, algorithm_type="dpmsolver++", solver_type="heun",
                                      lower_order_final=True, final_sigmas_type="sigma_min")
    theirs = DDPMPipeline(unet=unet, scheduler=dpm).to(args.device)
    theirs.set_progress_bar_config(disable=True)
    mine = ScorePipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).to(args.device)
    mine.set_progress_bar_config(disable=True)
    dpm.set_timesteps(25)
    process = mine.spec[0]
    grid = [(int(k) + 1) / 1000.0 for k in dpm.timesteps] + [float(process.t_min)]
    calls = {"n": 0}
    original = unet.forward

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    unet.forward = counting
    times_a, times_b, out = [], [], {}
    cpu_a, cpu_b = [], []
    load_start = _load()

    def run_theirs():
        calls["n"] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            img = theirs(batch_size=4, generator=torch.Generator(args.device).manual_seed(0), num_inference_steps=25,
                         output_type="np").images
        if args.device == "cuda":
            torch.cuda.synchronize()
        times_b.append(time.perf_counter() - t0)
        cpu_b.append(time.process_time() - c0)
        return img, calls["n"]

    def run_mine():
        calls["n"] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            res = mine(batch_size=4, sampler="dpmpp_2m", sampler_options={"grid": grid, "to_zero": False},
                       generator=torch.Generator(args.device).manual_seed(0), output_type="pt")
        if args.device == "cuda":
            torch.cuda.synchronize()
        times_a.append(time.perf_counter() - t0)
        cpu_a.append(time.process_time() - c0)
        return (res.samples.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy(), calls["n"]

    for r in range(args.repeats):
        # alternate which side runs first, so a drift in the machine's load cancels
        if r % 2 == 0:
            img_b, nfe_b = run_theirs()
            img_a, nfe_a = run_mine()
        else:
            img_a, nfe_a = run_mine()
            img_b, nfe_b = run_theirs()
        out = {"nfe_ours": nfe_a, "nfe_diffusers": nfe_b, "max_abs_diff": float(np.abs(img_a - img_b).max())}
        print(f"  sampling: ours {times_a[-1]:.2f} s ({cpu_a[-1]:.2f} CPU s), diffusers {times_b[-1]:.2f} s "
              f"({cpu_b[-1]:.2f} CPU s), NFE {nfe_a} / {nfe_b}, max |diff| {out['max_abs_diff']:.2e}", flush=True)
    unet.forward = original
    ratios = [a / b for a, b in zip(times_a, times_b)]
    cpu_ratios = [a / b for a, b in zip(cpu_a, cpu_b)]
    return {**out, "ours_s": statistics.median(times_a), "diffusers_s": statistics.median(times_b),
            "wall_ratio_median": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios],
            "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": [round(r, 3) for r in cpu_ratios],
            "load_average": f"{load_start} at the start, {_load()} at the end",
            "parameters": sum(p.numel() for p in unet.parameters())}


# ---------------------------------------------------------------------------------------------- memory
def write_parquet(path: Path, n: int, chunk: int = 5000) -> None:
    """``n`` random 32x32 RGB images, PNG-encoded, as a parquet file with the Hugging Face Image feature."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    # a pool of distinct images, cycled (encoding 200,000 PNGs would dominate the benchmark's time)
    pool = []
    for _ in range(1000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        pool.append(buf.getvalue())
    schema = pa.schema([pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))],
                       metadata={"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})})
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, n, chunk):
            rows = [{"bytes": pool[i % len(pool)], "path": None} for i in range(start, min(start + chunk, n))]
            writer.write_table(pa.table({"image": rows}, schema=schema))


_MEMORY_CHILD = r"""
import json, resource, sys
from score_toolkit._io import write_text_atomic
from score_toolkit.training import train
cfg = json.loads(sys.argv[1])
train(cfg)
print(json.dumps({"self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += _tree(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _rss_pss_mb(pid: int) -> tuple[float, float] | None:
    """(RSS, PSS) of one process in MB; PSS shares pages between the processes that map them (a forked
    DataLoader worker shares the training process's pages), so PSS sums to the memory really used."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split(":")[0] in ("Rss", "Pss")}
        return fields["Rss"] / 1024, fields["Pss"] / 1024
    except (FileNotFoundError, ProcessLookupError, KeyError, ValueError, PermissionError):
        return None


def run_watched(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd``, sampling every 0.1 s the memory of its whole process tree (the training process and its
    DataLoader workers). Returns the finished process and the peaks: of the summed RSS, of the summed PSS,
    and of each process's RSS."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"total_rss_mb": 0.0, "total_pss_mb": 0.0, "per_process_rss_mb": {}}
    while proc.poll() is None:
        rss = pss = 0.0
        for pid in _tree(proc.pid):
            m = _rss_pss_mb(pid)
            if m is None:
                continue
            rss, pss = rss + m[0], pss + m[1]
            name = "main" if pid == proc.pid else f"worker {pid}"
            peak["per_process_rss_mb"][name] = max(peak["per_process_rss_mb"].get(name, 0.0), m[0])
        peak["total_rss_mb"] = max(peak["total_rss_mb"], rss)
        peak["total_pss_mb"] = max(peak["total_pss_mb"], pss)
        time.sleep(0.1)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak


def bench_memory(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (20_000, 200_000):
            path = Path(tmp) / f"images-{n}.parquet"
            t0 = time.perf_counter()
            write_parquet(path, n)
            print(f"  wrote {n} images to {path.name} ({path.stat().st_size / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            cfg = {
                "output_dir": str(Path(tmp) / f"run-{n}"), "seed": 0,
                "data": {"name": "hf", "options": {"path": str(path), "streaming": True, "shuffle_buffer": 1000,
                                                   "num_workers": 1, "cache_dir": str(Path(tmp) / "cache")}},
                "process": {"name": "DiscreteVP"},
                "model": {"name": "UNet2DModel", "preset": "ddpm_cifar10_small", "prediction_type": "epsilon",
                          "time_input": "index",
                          "options": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}},
                "objective": {"name": "epsilon"},
                "train": {"steps": args.memory_steps, "batch_size": 16, "ema_decay": None,
                          "checkpoint_every": 10 ** 9, "log_every": 10 ** 9, "progress": False,
                          "cpu": args.device == "cpu"},
                "export": {"enabled": False},
            }
            res, peak = run_watched([sys.executable, "-c", _MEMORY_CHILD, json.dumps(cfg)],
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                raise RuntimeError(res.stderr[-3000:])
            usage = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"num_images": n, "file_mb": round(path.stat().st_size / 1e6, 1),
                         "peak_rss_mb": round(usage["self_kb"] / 1024, 1),
                         "worker_peak_rss_mb": round(usage["children_kb"] / 1024, 1),
                         "total_rss_mb": round(peak["total_rss_mb"], 1), "total_pss_mb": round(peak["total_pss_mb"], 1),
                         "load_average": _load()})
            print(f"  {n} images: peak RSS {rows[-1]['peak_rss_mb']} MB (main), "
                  f"{rows[-1]['worker_peak_rss_mb']} MB (largest worker); peak of main + workers: RSS "
                  f"{rows[-1]['total_rss_mb']} MB, PSS {rows[-1]['total_pss_mb']} MB", flush=True)
            path.unlink()
    return rows


# ---------------------------------------------------------------------------------------------- report
def report(args, results: dict) -> str:
    lines = [f"# Image-scale benchmarks ({args.device}, mixed precision {args.mixed_precision})", "",
             f"python benchmarks/bench_images.py --part {args.part} --device {args.device} --mixed-precision "
             f"{args.mixed_precision} --repeats {args.repeats} --steps {args.steps} --warmup {args.warmup} "
             f"--memory-steps {args.memory_steps}", "",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
             f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end", ""]
    if "training" in results:
        lines += ["## Training throughput (ours / hand-written diffusers recipe; target >= 0.95)", "",
                  "| preset | batch | ours steps/s | hand-written steps/s | wall ratio (median) | wall ratios | "
                  "CPU-time ratio (median) | CPU-time ratios | load averages (1, 5, 15 min) at the end |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["training"]:
            lines.append(f"| {r['preset']} | {r['batch']} | {r['ours_steps_per_s']:.3f} | {r['hand_steps_per_s']:.3f} | "
                         f"{r['ratio_median']:.3f} | {r['ratios']} | {r['cpu_ratio_median']:.3f} | {r['cpu_ratios']} | "
                         f"{r['load_average']} |")
        lines.append("")
    if "sampling" in results:
        s = results["sampling"]
        lines += ["## Sampling: ScorePipeline dpmpp_2m 25 vs DDPMPipeline + DPMSolverMultistepScheduler 25 "
                  f"({s['parameters']:,} parameters, random weights, batch 4)", "",
                  "| NFE ours | NFE diffusers | ours s | diffusers s | wall ratio (median; target <= 1.05) | "
                  "CPU-time ratio (median) | max abs diff of the images (target <= 1e-3) |",
                  "|---|---|---|---|---|---|---|",
                  f"| {s['nfe_ours']} | {s['nfe_diffusers']} | {s['ours_s']:.2f} | {s['diffusers_s']:.2f} | "
                  f"{s['wall_ratio_median']:.3f} {s['ratios']} | {s['cpu_ratio_median']:.3f} {s['cpu_ratios']} | "
                  f"{s['max_abs_diff']:.2e} |", "", f"load averages (1, 5, 15 min): {s['load_average']}", ""]
    if "compile" in results:
        c = results["compile"]
        lines += ["## train.compile (torch.compile, inductor) vs eager: UNet widths 32-64, 32x32, batch 8", "",
                  "| compiled steps/s | eager steps/s | ratio (median) | ratios | CPU-time ratio (median) | first step "
                  "compiled s | first step eager s | load averages at the end |", "|---|---|---|---|---|---|---|---|",
                  f"| {c['compiled_steps_per_s']:.3f} | {c['eager_steps_per_s']:.3f} | {c['ratio_median']:.3f} | "
                  f"{c['ratios']} | {c['cpu_ratio_median']:.3f} | {c['first_step_compiled_s']:.1f} | "
                  f"{c['first_step_eager_s']:.1f} | {c['load_average']} |", ""]
    if "memory" in results:
        rows = results["memory"]
        lines += [f"## Memory: training over a streamed parquet set ({args.memory_steps} steps, batch 16)", "",
                  "| images | file MB | peak RSS MB (main) | peak RSS MB (largest worker) | peak of the summed RSS MB "
                  "(main + workers) | peak of the summed PSS MB (main + workers) |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['num_images']:,} | {r['file_mb']} | {r['peak_rss_mb']} | {r['worker_peak_rss_mb']} | "
                         f"{r['total_rss_mb']} | {r['total_pss_mb']} |")
        if len(rows) == 2:
            ratio = {k: rows[1][k] / max(rows[0][k], 1e-9) for k in ("peak_rss_mb", "worker_peak_rss_mb",
                                                                      "total_rss_mb", "total_pss_mb")}
            lines += ["", f"ratio 200,000 / 20,000 (target within 10%): main {ratio['peak_rss_mb']:.3f}, worker "
                      f"{ratio['worker_peak_rss_mb']:.3f}, summed RSS {ratio['total_rss_mb']:.3f}, summed PSS "
                      f"{ratio['total_pss_mb']:.3f}; load averages at the end of each run: "
                      f"{rows[0]['load_average']} / {rows[1]['load_average']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "training", "sampling", "memory", "compile"), default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="bf16" if torch.cuda.is_available() else "no", choices=("no", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the Markdown tables here (and a .json beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict = {}
    parts = ("training", "sampling", "memory") if args.part == "all" else (args.part,)
    for part in parts:
        print(f"{part}:", flush=True)
        results[part] = {"training": bench_training, "sampling": bench_sampling, "memory": bench_memory,
                         "compile": bench_compile}[part](args)
    text = report(args, results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from score_toolkit._io import write_text_atomic

        write_text_atomic(out, text + "\n")
        write_text_atomic(out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
