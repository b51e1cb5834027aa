"""docs/plugins.md's plugin, built as the page says: the sampler of "Writing a sampler" in
``score_toolkit_mysampler/euler.py``, the ``pyproject.toml`` of "Publishing a plugin", the test file of "Testing a
plugin". The fast test checks that the ``pyproject.toml`` is one a build backend accepts and that its entry point
names the page's class; the slow one installs the package in a fresh venv and runs its conformance test."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import tomllib
from test_readme import _pip_flags, _run, _venv_with_current_environment, markdown_blocks

PAGE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _page_files() -> dict[str, str]:
    """The plugin's files as docs/plugins.md lays them out."""
    blocks = markdown_blocks(PAGE)
    (sampler,) = [b.text for b in blocks if b.under("Writing a sampler") and b.language == "python"]
    (pyproject,) = [b.text for b in blocks if b.under("Publishing a plugin") and b.language == "toml"]
    tests = [b.text for b in blocks if b.under("Testing a plugin: the conformance suite") and b.language == "python"]
    assert len(tests) == 1 and tests[0].startswith("# tests/test_my_sampler.py"), "the page's test file moved"
    layout = re.findall(r"`(score_toolkit_mysampler/[\w/]+\.py|tests/test_my_sampler\.py)`",
                        PAGE.read_text(encoding="utf-8"))
    assert {"score_toolkit_mysampler/euler.py", "score_toolkit_mysampler/__init__.py",
            "tests/test_my_sampler.py"} <= set(layout), f"the page no longer says where the files go: {layout}"
    return {"pyproject.toml": pyproject, "score_toolkit_mysampler/euler.py": sampler,
            "score_toolkit_mysampler/__init__.py": "", "tests/test_my_sampler.py": tests[0]}


def test_the_pages_pyproject_is_complete_and_names_the_pages_class(tmp_path):
    files = _page_files()
    path = tmp_path / "pyproject.toml"
    path.write_text(files["pyproject.toml"])
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(path)  # setuptools' own validation: a [project] without a version is refused here
    project = config["project"]
    assert project["name"] and project["version"] and tomllib.loads(files["pyproject.toml"])["build-system"]
    target = project["entry-points"]["score_toolkit.samplers"]["my_euler"]
    module, cls = target.split(":")
    assert module.replace(".", "/") + ".py" in files, f"{target}: the page puts the class elsewhere"
    classes = {n.name: n for n in ast.parse(files[module.replace(".", "/") + ".py"]).body if isinstance(n, ast.ClassDef)}
    assert cls in classes, f"{target}: no class {cls} in the page's sampler"
    names = [s.value.value for s in classes[cls].body if isinstance(s, ast.Assign) and s.targets[0].id == "name"]
    assert names == ["my_euler"], "the class's name must equal the entry-point name"


@pytest.mark.slow
def test_the_pages_plugin_installs_and_passes_its_conformance_test(tmp_path):
    work = tmp_path / "plugin"
    for rel, text in _page_files().items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    python = _venv_with_current_environment(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    _run([str(python), "-m", "pip", "install", "-q", "-e", ".", *_pip_flags(python).split()], work, env=env,
         what="pip install -e . of the page's plugin")
    listed = _run([str(python), "-c", "from score_toolkit.registry import list_samplers; "
                   "print(list_samplers(origin='score-toolkit-mysampler'))"], work, env=env, what="list_samplers")
    assert "my_euler" in listed.stdout
    proc = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], work, env=env, timeout=900,
                what="the page's conformance test")
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\b15 passed\b", summary) and "failed" not in summary, summary


def test_the_readme_walkthrough_installs_pytest_before_running_it():
    """A newcomer's venv has what ``pip install -e .`` brings: pytest is only in the ``test`` extra. The walk-through's
    shell block runs the plugin's tests, so its install line must bring pytest (its test in test_readme.py cannot
    see this: that venv shares the test environment, pytest included)."""
    from test_readme import PLUGIN_SECTION, README, _install_args, _is_pip_install, _shell_commands

    (shell,) = [b for b in markdown_blocks(README) if b.under(PLUGIN_SECTION) and b.language == "bash"]
    commands = _shell_commands(shell.text)
    runs = [i for i, c in enumerate(commands) if "pytest" in c and not _is_pip_install(c)]
    assert runs, "the walk-through no longer runs the plugin's tests"
    installs = [c for c in commands[:runs[0]] if _is_pip_install(c)]
    assert any(any(a.startswith("pytest") for a in _install_args(c))
               for c in installs), f"the walk-through runs pytest without installing it: {installs}"
