"""Wall time of the README's first Python example and of ``score-toolkit demo`` with 1 and 2 torch threads, on a
machine whose cores are busy with other work (the case the thread policy of ``score_toolkit/threads.py`` is
for), and with the policy's default.

    python benchmarks/bench_threads.py                      # 3 repeats, demo at 300 steps, 2 busy-loop processes
    python benchmarks/bench_threads.py --full-demo          # also time the default demo once (the README's figure)

Each run is a fresh process (as a user runs it, imports included). The thread count is set through
``SCORE_TOOLKIT_NUM_THREADS`` (``OMP_NUM_THREADS`` is removed from the environment, so torch would otherwise start
one thread per core); "policy" runs with neither variable set. The arms are interleaved within each repeat, so a
change of the machine's other load hits them alike; the result is reported as ratios within one run, with the
load average next to them. ``--load N`` adds N busy-loop processes for the whole run (default 2, one per core of
the 2-core machine this was measured on) on top of whatever else runs.

Writes ``benchmarks/results/threads.csv`` (one row per run) and ``benchmarks/results/threads.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def readme_block(heading: str) -> str:
    """The first Python block under ``## heading`` of README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(cmd: list[str], threads: str, cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SCORE_TOOLKIT_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    if threads != "policy":
        env["SCORE_TOOLKIT_NUM_THREADS"] = threads
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo-steps", type=int, default=300, help="training steps of the timed demo runs")
    ap.add_argument("--demo-samples", type=int, default=4000, help="samples drawn by the timed demo runs")
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes started for the run")
    ap.add_argument("--full-demo", action="store_true", help="also time the default demo (3000 steps) once, policy")
    ap.add_argument("--arms", default="1,2,policy", help="thread settings of the README example")
    ap.add_argument("--demo-arms", default="1,2", help="thread settings of the shortened demo")
    args = ap.parse_args(argv)
    arms = {"readme_30s_example": args.arms.split(","), "demo": args.demo_arms.split(",")}
    work = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    example = readme_block("First example (Python)")
    demo_bin = str(Path(sys.executable).parent / "score-toolkit")
    workloads = {
        "readme_30s_example": [sys.executable, "-c", example],
        "demo": [demo_bin, "demo", "--output", str(work / "demo.png"), "--steps", str(args.demo_steps),
                 "--num-samples", str(args.demo_samples), "-q"],
    }
    loaders = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    rows = []
    try:
        time.sleep(2)
        for rep in range(args.repeats):
            for name, cmd in workloads.items():
                label = name if name != "demo" else f"demo_{args.demo_steps}_steps_{args.demo_samples}_samples"
                for arm in arms[name]:
                    load_before = os.getloadavg()[0]
                    seconds = run(cmd, arm, work)
                    rows.append({"workload": label, "threads": arm, "repeat": rep, "seconds": round(seconds, 2),
                                 "load_avg_1min": round(load_before, 2), "extra_busy_processes": args.load})
                    print(rows[-1], flush=True)
                    write_results(rows, args)
        if args.full_demo:
            load_before = os.getloadavg()[0]
            seconds = run([demo_bin, "demo", "--output", str(work / "demo_full.png"), "-q"], "policy", work)
            rows.append({"workload": "demo_default_3000_steps", "threads": "policy", "repeat": 0,
                         "seconds": round(seconds, 2), "load_avg_1min": round(load_before, 2),
                         "extra_busy_processes": args.load})
            print(rows[-1], flush=True)
    finally:
        for p in loaders:
            p.kill()
    write_results(rows, args)
    return 0


def write_results(rows: list[dict], args) -> None:
    """The CSV of all runs so far and the Markdown summary (rewritten after every run: an interrupted benchmark
    keeps what it measured)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "threads.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Thread policy: wall time with 1 and 2 torch threads on 2 busy cores", "",
             f"`python benchmarks/bench_threads.py --repeats {args.repeats} --demo-steps {args.demo_steps} "
             f"--demo-samples {args.demo_samples} --load {args.load}{' --full-demo' if args.full_demo else ''}` "
             f"on 2 CPU cores shared with other work "
             f"plus {args.load} busy-loop processes; fresh process per run (imports included), arms interleaved. "
             "Rows: `benchmarks/results/threads.csv`.", "",
             "| workload | threads | runs | median s | min s | max s | median / 1 thread | load avg (1 min) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["workload"] for r in rows):
        base = [r["seconds"] for r in rows if r["workload"] == name and r["threads"] == "1"]
        for arm in dict.fromkeys(r["threads"] for r in rows if r["workload"] == name):
            sec = [r["seconds"] for r in rows if r["workload"] == name and r["threads"] == arm]
            loads = [r["load_avg_1min"] for r in rows if r["workload"] == name and r["threads"] == arm]
            ratio = f"{statistics.median(sec) / statistics.median(base):.2f}" if base else "-"
            lines.append(f"| {name} | {arm} | {len(sec)} | {statistics.median(sec):.1f} | {min(sec):.1f} | "
                         f"{max(sec):.1f} | {ratio} | {min(loads):.1f}-{max(loads):.1f} |")
    from score_toolkit._io import write_text_atomic

    write_text_atomic(RESULTS / "threads.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
