"""The package's import structure: every module imports on its own, and the import graph has no cycle.

Two checks, both over every module file of ``score_toolkit``:

* each module imports alone: in a fresh interpreter that has loaded the heavy third-party libraries (torch,
  diffusers, ...) but no module of ``score_toolkit``, one forked child per module imports just that module.
  An import that only works after another module of the package was imported first fails here;
* the static import graph has no cycle. Rule: every ``import`` / ``from ... import`` statement of a module,
  at module level or inside a function or class body, is an edge from that module to the ``score_toolkit``
  module it names (``from pkg import name`` names the module ``pkg.name`` when that is a module, else ``pkg``);
  statements under ``if TYPE_CHECKING:`` never run and are not edges; the implicit import of a module's parent
  packages is not an edge. So a function-level import that only breaks a cycle at run time still counts.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "score_toolkit"


def package_modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` for every .py file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """The static import graph of ``package`` (the rule is in the module docstring)."""
    modules = package_modules(root, package)

    def owner(name: str) -> str | None:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    found = owner(target)
                    if found is not None and found != name:
                        graph[name].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 50 and graph[f"{PACKAGE}.samplers.dpm_solver"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles(tmp_path):
    """The checker itself: a function-level import closing a loop is a cycle, a TYPE_CHECKING import is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                              "thing = 1\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == set()
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("thing = 1\n\ndef f():\n    import pkg.a\n")
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c"}


_IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    # the heavy third-party libraries once, so that each child only pays for the package's own code
    import numpy, torch, diffusers, accelerate, safetensors.torch, torchdiffeq, torchsde, huggingface_hub, yaml
    from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel
    assert not [m for m in sys.modules if m == "score_toolkit" or m.startswith("score_toolkit.")]
    failed = []
    for name in sys.argv[1:]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: import one module, report, exit without cleanup
            os.close(r)
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                os.write(w, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            report = f.read().decode()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failed.append(f"{name} (status {status}):\\n{report}")
    print("\\n".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="uses os.fork")
def test_every_module_imports_alone():
    names = sorted(package_modules(ROOT, PACKAGE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"modules that fail to import alone:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_importing_one_module_alone_can_fail(tmp_path):
    """The same script reports a module that needs another one imported first."""
    pkg = tmp_path / "score_toolkit_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("X = 1\n")
    (pkg / "bad.py").write_text("import sys\nX = sys.modules['score_toolkit_probe.good'].X\n")
    script = _IMPORT_EACH.replace("score_toolkit", "score_toolkit_probe")
    proc = subprocess.run([sys.executable, "-c", script, "score_toolkit_probe.good", "score_toolkit_probe.bad"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and "score_toolkit_probe.bad" in proc.stdout and "KeyError" in proc.stdout
    assert "score_toolkit_probe.good (status" not in proc.stdout


def test_the_scheduler_config_reader_knows_the_keys_of_score_sde_scheduler():
    """scheduler_configs sits below schedulers (no cycle), so it names ScoreSDEScheduler's config keys itself."""
    from score_toolkit._config import config_keys
    from score_toolkit.scheduler_configs import SCORE_SDE_SCHEDULER_KEYS
    from score_toolkit.schedulers import ScoreSDEScheduler

    assert config_keys(ScoreSDEScheduler) == SCORE_SDE_SCHEDULER_KEYS


# ---------------------------------------------------------------------------------------------- module size
#: a module longer than this states why it is one module, in a docstring paragraph starting with SIZE_MARKER
MAX_LINES = 400
SIZE_MARKER = "Why one module of this length:"
#: modules over the limit without a stated reason yet, being reworked elsewhere: listed, so that they are seen
PENDING_SIZE_REASON: dict[str, str] = {}  # module -> why it is still long (none today)


def size_problem(path: Path) -> str | None:
    """Why ``path`` breaks the size rule (over :data:`MAX_LINES` lines and no docstring paragraph that starts
    with :data:`SIZE_MARKER` and gives a reason of at least ten words), or None."""
    text = path.read_text(encoding="utf-8")
    n = len(text.splitlines())
    if n <= MAX_LINES:
        return None
    doc = ast.get_docstring(ast.parse(text)) or ""
    for paragraph in doc.split("\n\n"):
        if paragraph.startswith(SIZE_MARKER) and len(paragraph[len(SIZE_MARKER):].split()) >= 10:
            return None
    return f"{n} lines and no '{SIZE_MARKER} ...' paragraph (ten words or more) in its docstring"


def _size_cases():
    for name, (path, _) in package_modules(ROOT, PACKAGE).items():
        marks = [pytest.mark.xfail(reason=PENDING_SIZE_REASON[name])] if name in PENDING_SIZE_REASON else []
        yield pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", list(_size_cases()))
def test_a_long_module_states_why_it_is_one_module(path):
    """Modules over MAX_LINES lines are split into modules of one responsibility each, or say in their docstring
    why they are one (README "Layout")."""
    assert size_problem(path) is None, f"{path.relative_to(ROOT)}: {size_problem(path)}"


def test_the_size_check_finds_long_modules_without_a_reason(tmp_path):
    body = "x = 1\n" * MAX_LINES
    short = tmp_path / "short.py"
    short.write_text('"""Short."""\n' + "x = 1\n" * (MAX_LINES - 1))
    assert size_problem(short) is None
    long = tmp_path / "long.py"
    long.write_text('"""Long."""\n' + body)
    assert "401 lines" in size_problem(long)
    long.write_text(f'"""Long.\n\n{SIZE_MARKER} because.\n"""\n' + body)  # a reason of one word is no reason
    assert size_problem(long) is not None
    long.write_text(f'"""Long.\n\n{SIZE_MARKER} it is one class whose parts all act on the same state.\n"""\n' + body)
    assert size_problem(long) is None
