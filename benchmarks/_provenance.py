"""Provenance of a benchmark run: the commit it ran from, marked ``+dirty`` when the code it ran differs from it.

A result file that names a commit is only reproducible from that commit if the library, the plugins and the
benchmark scripts had no uncommitted (or untracked) changes; the result files themselves are not looked at, since a
run writes them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a run executes: changes here make the commit alone an incomplete description of the run
CODE_PATHS = ("score_toolkit", "plugins", ":(glob)benchmarks/*.py", "pyproject.toml")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


def git_commit() -> str:
    """``"<short hash>"``, ``"<short hash>+dirty"`` if the run's code has uncommitted or untracked changes, or
    ``"unknown"`` outside a git checkout."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", *CODE_PATHS)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head
