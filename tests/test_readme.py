"""The front door runs verbatim: README.md's code blocks, the docs' quick starts and the README's plugin walk-through.

Which blocks run (the convention, also stated in README.md and docs/plugins.md):

* README.md: every ```python and ```bash block runs, in the order of the file, from a fresh temporary working
  directory. The Python blocks of one page run in one interpreter, one after the other, so a later block may use
  the names of an earlier one (as a reader's session would). Blocks in the section "Writing a sampler plugin"
  belong to the plugin walk-through below instead.
* docs/*.md: only the blocks under a heading called "Quick start" run (the other blocks are reference fragments
  with placeholders). Each page runs in its own temporary directory, where ``hub_cards`` is a link to the
  repository's folder, so commands written "from the repository root" work and write nothing into the repository.
* A block whose first line is ``# file: PATH`` is not run: it is the content of the file PATH of the walk-through.

Shell blocks cannot reinstall the project in the middle of a test run, so their lines are treated honestly:

* a ``pip install`` of the project itself (``-e .``) is checked against ``.ci/run``: CI executes an install with
  the same pins that covers it (``-e ".[test]"`` installs ``-e .`` and more);
* the test-suite command (``python -m pytest ...``) must be exactly the command ``.ci/run`` executes (it is this
  very run);
* every other command runs verbatim with ``bash -e``, and must exit with 0.

The plugin walk-through (slow) writes the ``# file:`` blocks of README.md's plugin section into a temporary
folder, creates a fresh venv (``python -m venv --system-site-packages``; torch and score_toolkit come from the
current environment, which is added to the venv's path when the current interpreter is itself a venv), and runs
the section's shell block there, line by line: ``pip install`` gets ``--no-deps`` appended (and
``--no-build-isolation`` where the environment's setuptools can build wheels, see ``_pip_flags``), every other line
runs verbatim. The plugin's own conformance test must pass.
"""

from __future__ import annotations

import os
import re
import shlex
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
PLUGIN_SECTION = "Writing a sampler plugin"
QUICK_START = "quick start"
FILE_MARKER = re.compile(r"#\s*file:\s*(\S+)\s*$")
RUN_LANGUAGES = ("python", "bash")


@dataclass
class Block:
    language: str
    text: str
    line: int  # 1-based line of the opening fence
    headings: tuple[str, ...]  # the enclosing headings, outermost first

    @property
    def file(self) -> str | None:
        first = self.text.splitlines()[0] if self.text.strip() else ""
        m = FILE_MARKER.match(first.strip())
        return m.group(1) if m else None

    def under(self, heading: str) -> bool:
        return any(h.lower() == heading.lower() for h in self.headings)


def markdown_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file with their language and enclosing headings."""
    blocks: list[Block] = []
    headings: list[tuple[int, str]] = []
    fence, language, start, body = None, "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", line)
            if m:
                fence, language, start, body = m.group(1), m.group(2).lower(), number, []
                continue
            h = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if h:
                level = len(h.group(1))
                headings = [x for x in headings if x[0] < level] + [(level, h.group(2))]
        elif line.startswith(fence) and not line[len(fence):].strip():
            blocks.append(Block(language, "\n".join(body) + "\n", start, tuple(t for _, t in headings)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path}: unclosed code fence opened at line {start}"
    return blocks


def ci_commands() -> list[str]:
    """The commands .ci/run executes (one per non-comment line)."""
    lines = [ln.strip() for ln in CI_SCRIPT.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _shell_commands(text: str) -> list[str]:
    """The commands of a shell block: lines without comments, split at ``&&``."""
    out = []
    for line in text.splitlines():
        code = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        out += [c.strip() for c in code.split("&&") if c.strip()]
    return out


def _is_pip_install(cmd: str) -> bool:
    words = shlex.split(cmd)
    return "pip" in words and "install" in words


def _install_args(cmd: str) -> set[str]:
    """The requirements of a pip install command, with ``-e X`` as one item and extras dropped from local paths."""
    words = shlex.split(cmd)
    words = words[words.index("install") + 1:]
    out, i = set(), 0
    while i < len(words):
        w = words[i]
        if w in ("-e", "--editable"):
            out.add("-e " + re.sub(r"\[.*\]$", "", words[i + 1]))
            i += 2
            continue
        if not w.startswith("-"):
            out.add(w)
        i += 1
    return out


def check_against_ci(cmd: str) -> None:
    """A README command that installs the project or runs the test suite: CI must execute (a cover of) it."""
    ci = ci_commands()
    if _is_pip_install(cmd):
        ci_installs = [c for line in ci for c in _shell_commands(line) if _is_pip_install(c)]
        assert any(_install_args(cmd) <= _install_args(c) for c in ci_installs), (
            f"README installs {cmd!r}, but .ci/run installs no superset of it: {ci_installs}")
    else:
        assert any(cmd in _shell_commands(line) for line in ci), f"README's test command {cmd!r} is not what .ci/run runs"


def _is_test_suite(cmd: str) -> bool:
    return "pytest" in cmd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's commands
    return env


def _run(args, cwd: Path, *, env=None, timeout=900, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def run_blocks(blocks: list[Block], cwd: Path, source: str) -> dict[str, str]:
    """Run the Python blocks in one interpreter and the shell blocks' commands, as described in the module
    docstring. Returns the outputs, keyed by "python" and "bash"."""
    out = {"python": "", "bash": ""}
    python = [b for b in blocks if b.language == "python"]
    if python:
        script = "".join(f"# --- {source}:{b.line}\n{b.text}" for b in python)
        out["python"] = _run([sys.executable, "-c", script], cwd, what=f"Python blocks of {source}").stdout
    for b in blocks:
        if b.language != "bash":
            continue
        for cmd in _shell_commands(b.text):
            if _is_pip_install(cmd) or _is_test_suite(cmd):
                check_against_ci(cmd)
            else:
                out["bash"] += _run(["bash", "-e", "-c", cmd], cwd, what=f"{source}:{b.line}: {cmd!r}").stdout
    return out


def _runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language in RUN_LANGUAGES and b.file is None]


# ----------------------------------------------------------------------------------------------- parsing
def test_block_parser_finds_languages_headings_and_files(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# T\n\n## Quick start\n\n```python\nprint(1)\n```\n\n### Deeper\n```bash\n# file: a/b.toml\nx\n```\n"
                  "\n## Other\n````python\n```\n````\n")
    blocks = markdown_blocks(md)
    assert [(b.language, b.line, b.headings) for b in blocks] == [
        ("python", 5, ("T", "Quick start")), ("bash", 10, ("T", "Quick start", "Deeper")), ("python", 16, ("T", "Other"))]
    assert blocks[1].file == "a/b.toml" and blocks[0].file is None and blocks[1].under("quick start")
    assert blocks[2].text == "```\n"
    assert _shell_commands("a x && b  # c\n# d\n\nc") == ["a x", "b", "c"]
    assert _install_args('pip install "torch==2.13.0" -e ".[test]" -e ./p') == {"torch==2.13.0", "-e .", "-e ./p"}


def test_ci_check_rejects_commands_ci_does_not_run():
    check_against_ci('pip install "torch==2.13.0" -e .')
    with pytest.raises(AssertionError, match="no superset"):
        check_against_ci('pip install "torch==2.12.0" -e .')
    with pytest.raises(AssertionError, match="not what .ci/run runs"):
        check_against_ci("python -m pytest -q tests/test_readme.py")


# ----------------------------------------------------------------------------------------------- README
def test_readme_blocks_run_verbatim(tmp_path):
    blocks = [b for b in _runnable(markdown_blocks(README)) if not b.under(PLUGIN_SECTION)]
    assert {b.language for b in blocks} == {"python", "bash"}, "README has lost its Python or shell examples"
    out = run_blocks(blocks, tmp_path, "README.md")
    # what the README says the blocks print and write
    assert "torch.Size([2000, 2]) 500" in out["python"]
    for name in ("samples.png", "samples.safetensors", "manifest.json"):
        assert (tmp_path / "samples" / name).is_file(), f"the main job did not write samples/{name}"


@pytest.mark.slow
def test_first_example_beats_twice_the_floor(tmp_path):
    """The first example prints the sliced W2 of its samples and the noise floor: with the seeded reference
    set the printed distance is reproducible and within twice the floor (500 exact-score Euler-Maruyama steps)."""
    block = next(b for b in markdown_blocks(README) if b.under("First example (Python)") and b.language == "python")
    out = _run([sys.executable, "-c", block.text], tmp_path, what="first example").stdout.splitlines()
    dist, floor = re.search(r"([\d.e-]+) vs floor ([\d.e-]+)", out[-1]).groups()
    assert 0 < float(dist) < 2 * float(floor)
    again = _run([sys.executable, "-c", block.text], tmp_path, what="first example").stdout.splitlines()
    assert again == out


DOC_PAGES = sorted(p for p in (ROOT / "docs").glob("*.md")
                   if any(b.under(QUICK_START) for b in _runnable(markdown_blocks(p))))


def test_docs_have_quick_starts():
    assert len(DOC_PAGES) >= 4, f"only {[p.name for p in DOC_PAGES]} have a runnable quick start"


@pytest.mark.slow
@pytest.mark.parametrize("page", DOC_PAGES, ids=[p.stem for p in DOC_PAGES])
def test_docs_quick_start_runs_verbatim(page, tmp_path, monkeypatch):
    (tmp_path / "hub_cards").symlink_to(ROOT / "hub_cards", target_is_directory=True)
    monkeypatch.setenv("SCORE_TOOLKIT_GRID_DIR", str(tmp_path / "grids"))
    blocks = [b for b in _runnable(markdown_blocks(page)) if b.under(QUICK_START)]
    before = sorted(p.name for p in (ROOT / "hub_cards").iterdir())
    run_blocks(blocks, tmp_path, f"docs/{page.name}")
    assert sorted(p.name for p in (ROOT / "hub_cards").iterdir()) == before, "a quick start wrote into hub_cards/"


# ----------------------------------------------------------------------------------------------- plugin walk-through
def _venv_with_current_environment(folder: Path) -> Path:
    """A fresh venv that sees the current environment's packages (torch, score_toolkit, pytest, pip, setuptools).

    Created ``--without-pip`` so that pip and setuptools are the current environment's too (a venv's bundled
    setuptools may be too old to build wheels); ``bin/pip`` is a launcher for ``python -m pip`` of the venv."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)], folder.parent,
         what="python -m venv")
    python = folder / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # the current interpreter is a venv: --system-site-packages does not reach it
        purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       folder.parent, what="venv site dir").stdout.strip()
        lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
        Path(purelib, "zz_parent_environment.pth").write_text("\n".join(lines) + "\n")
    pip = folder / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{python}" -m pip "$@"\n')
    pip.chmod(0o755)
    return python


def _pip_flags(python: Path) -> str:
    """``--no-deps`` (everything is there already), and ``--no-build-isolation`` when the environment's setuptools
    can build wheels by itself (>= 70.1, or the ``wheel`` package): then nothing is downloaded. Otherwise pip
    fetches setuptools for the build from the index, as CI's own install of the project does."""
    probe = ("import importlib.util, setuptools; v = tuple(int(p) for p in setuptools.__version__.split('.')[:2]); "
             "print(v >= (70, 1) or importlib.util.find_spec('wheel') is not None)")
    can_build = _run([str(python), "-c", probe], python.parent, what="setuptools probe").stdout.strip() == "True"
    return " --no-deps --no-build-isolation" if can_build else " --no-deps"


@pytest.mark.slow
def test_readme_plugin_walkthrough_in_a_fresh_venv(tmp_path):
    blocks = [b for b in markdown_blocks(README) if b.under(PLUGIN_SECTION)]
    files = {b.file: b.text for b in blocks if b.file}
    assert {"my-euler/pyproject.toml", "my-euler/my_euler/sampler.py",
            "my-euler/tests/test_my_euler.py"} <= set(files), f"the plugin section lost a file: {sorted(files)}"
    for rel, text in files.items():
        path = tmp_path / "work" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for text in files.values():  # what the README shows is what a newcomer copies: it must be complete
        assert "..." not in text
    python = _venv_with_current_environment(tmp_path / "venv")
    env = _env()
    env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env.pop("PYTHONPATH", None)
    shell = [b for b in blocks if b.language == "bash" and b.file is None]
    assert len(shell) == 1, "the plugin section should have one shell block (install and test)"
    script = []
    for cmd in _shell_commands(shell[0].text):
        script.append(cmd + _pip_flags(python) if _is_pip_install(cmd) else cmd)
    proc = _run(["bash", "-e", "-c", "\n".join(script)], tmp_path / "work", env=env, timeout=1500,
                what="README plugin walk-through")
    assert "MyEuler" in proc.stdout
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15 and "failed" not in summary and "error" not in summary, summary
    # the entry point is registered in the venv's metadata, not only importable
    listed = _run([str(python), "-c", "from score_toolkit.registry import list_samplers; "
                   "print(list_samplers(origin='my-euler'))"], tmp_path, env=env, what="list_samplers").stdout
    assert "my_euler" in listed
