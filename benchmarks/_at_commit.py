"""A subpackage of score_toolkit as it was at an earlier commit, read from git and imported next to the current one,
so that a benchmark can time the previous implementation against the current one in the same run.

    old = package_at("70f080a", "likelihood")   # score_toolkit.likelihood at that commit
    old.log_likelihood(...)

The files of ``score_toolkit/<package>/`` at the commit are imported as ``score_toolkit._<package>_at_<hash>``: their
relative imports of the rest of score_toolkit (``from ..processes import ...``) resolve to the current modules, their
imports inside the package to the old ones. Nothing is written to disk.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout


class _Sources(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, name: str, sources: dict[str, str], label: str):
        self.name, self.sources, self.label = name, sources, label

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or (fullname.startswith(self.name + ".") and fullname[len(self.name) + 1:]
                                     in self.sources):
            return importlib.util.spec_from_loader(fullname, self, is_package=fullname == self.name)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        stem = "__init__" if module.__name__ == self.name else module.__name__[len(self.name) + 1:]
        code = compile(self.sources[stem], f"{self.label}/{stem}.py", "exec")
        exec(code, module.__dict__)  # noqa: S102 - this repository's own source, from its git history


def package_at(commit: str, package: str):
    """``score_toolkit.<package>`` as of ``commit`` (a flat package of .py files), imported under another name."""
    import score_toolkit  # noqa: F401 - the parent package of the old copy

    full = _git("rev-parse", commit).strip()
    name = f"score_toolkit._{package}_at_{full[:10]}"
    if name not in sys.modules:
        files = [f for f in _git("ls-tree", "--name-only", full, f"score_toolkit/{package}/").split() if f.endswith(".py")]
        sources = {Path(f).stem: _git("show", f"{full}:{f}") for f in files}
        sys.meta_path.insert(0, _Sources(name, sources, f"score_toolkit/{package}@{full[:10]}"))
        importlib.import_module(name)
    return sys.modules[name]
