"""Wall and CPU time of what README.md asks a newcomer to run, as they would run it: fresh processes (imports
included), ``OMP_NUM_THREADS`` and ``SCORE_TOOLKIT_NUM_THREADS`` unset (the thread policy's default), on the
machine as it is, then once more beside ``--load N`` busy-loop processes.

    python benchmarks/bench_front_door.py --load 1

Workloads: the main job (``score-toolkit sample --output-dir DIR -q``), the README's first Python example, the
conformance test of the README's plugin walk-through (its ``my-euler`` files, with the sampler registered in-process
by a ``conftest.py`` instead of installed: the same checks, no ``pip install``), and ``score-toolkit demo -q``.
Writes ``benchmarks/results/front_door.md`` with the 1-minute load average before each run.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFTEST = """from score_toolkit import register_sampler
from my_euler.sampler import MyEuler

register_sampler("my_euler", override=True)(MyEuler)
"""


def readme_files(work: Path) -> Path:
    """The README plugin walk-through's ``# file:`` blocks written under ``work``; returns the plugin folder."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for body in re.findall(r"```\w*\n(.*?)```", text, re.S):
        m = re.match(r"#\s*file:\s*(\S+)\s*\n", body)
        if m:
            path = work / m.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    plugin = work / "my-euler"
    (plugin / "conftest.py").write_text(CONFTEST)
    return plugin


def first_example() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## First example (Python)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one child process; a failure raises."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", type=int, default=1, help="busy-loop processes beside the second pass (default 1)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_front_door_"))
    plugin = readme_files(work)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SCORE_TOOLKIT_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    bin_dir = Path(sys.executable).parent
    workloads = {
        "main job: score-toolkit sample --output-dir DIR -q": lambda i: [str(bin_dir / "score-toolkit"), "sample",
                                                                        "--output-dir", str(work / f"s{i}"), "-q"],
        "README first example (python -c)": lambda i: [sys.executable, "-c", first_example()],
        "README plugin's conformance test (python -m pytest -q tests)": lambda i: [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        "score-toolkit demo -q": lambda i: [str(bin_dir / "score-toolkit"), "demo", "--output",
                                            str(work / f"demo{i}.png"), "-q"],
    }
    rows = []
    for i, extra in enumerate((0, args.load)):
        loaders = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(extra)]
        try:
            time.sleep(2 if extra else 0)
            for name, cmd in workloads.items():
                load = os.getloadavg()[0]
                cwd = plugin if "plugin" in name else work
                wall, cpu = timed(cmd(i), cwd, env)
                rows.append((name, extra, wall, cpu, load))
                print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU, {extra} busy loop(s), load {load:.2f}", flush=True)
        finally:
            for p in loaders:
                p.kill()
                p.wait()
    command = "python benchmarks/bench_front_door.py" + (f" --load {args.load}" if argv is None else
                                                         " " + " ".join(argv))
    lines = ["# The front door: README.md's commands as a newcomer runs them", "",
             f"`{command}` on {os.cpu_count()} CPU cores, `OMP_NUM_THREADS` and `SCORE_TOOLKIT_NUM_THREADS` unset, "
             "fresh process per run (imports included); first pass on the machine as it is (other work may be "
             "running: see the load average), second pass beside busy-loop processes. CPU = user + system time of "
             "the process.", "",
             "| workload | extra busy loops | wall s | CPU s | load avg (1 min) before |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {e} | {w:.1f} | {c:.1f} | {ld:.2f} |" for n, e, w, c, ld in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "front_door.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS / "front_door.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
