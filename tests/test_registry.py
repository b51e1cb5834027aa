"""The sampler registry (entry points, laziness, broken plugins, duplicates, in-process registration)
and the ``score-toolkit samplers`` command.

Fake plugins are real distributions: a ``*.dist-info`` folder (METADATA + entry_points.txt) and a module
written to a temporary directory put on ``sys.path``, so they go through importlib.metadata exactly like
an installed package. Each test gets a fresh shared registry (monkeypatched), so nothing leaks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from score_toolkit import registry
from score_toolkit.cli import main
from score_toolkit.registry import PluginLoadError, SamplerPluginWarning, SamplerRegistry
from score_toolkit.samplers.base import Sampler, SamplerProperties

ROOT = Path(__file__).resolve().parents[1]

SAMPLER_SOURCE = '''
from score_toolkit.samplers.base import Sampler, SamplerProperties


class {cls}(Sampler):
    name = {name!r}
    description = "A fake plugin sampler that returns its initial state"
    properties = SamplerProperties(stochastic=False, order=1.0)
    options = {{"num_steps": 3}}

    def _run(self, ctx, x):
        return x
'''


def _pyproject_builtins() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["entry-points"][registry.ENTRY_POINT_GROUP])


@pytest.fixture
def fresh(monkeypatch) -> SamplerRegistry:
    """A fresh shared registry reading the installed entry points."""
    reg = SamplerRegistry()
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    return reg


@pytest.fixture
def make_plugin(tmp_path, monkeypatch):
    """make_plugin(dist_name, {entry point name: module source or "module:attr"}) -> {ep name: module name}.
    Writes one module per entry point (unless a target string is given) and the distribution's metadata."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created_modules = []

    def make(dist_name: str, entries: dict[str, str]) -> dict[str, str]:
        lines, modules = [], {}
        for ep_name, source in entries.items():
            if ":" in source and "\n" not in source:
                lines.append(f"{ep_name} = {source}")
                continue
            mod = f"fake_{ep_name}_{uuid.uuid4().hex[:8]}"
            (tmp_path / f"{mod}.py").write_text(source)
            lines.append(f"{ep_name} = {mod}:Plugin")
            modules[ep_name] = mod
            created_modules.append(mod)
        info = tmp_path / f"{dist_name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
        importlib.invalidate_caches()
        return modules

    yield make
    for mod in created_modules:
        sys.modules.pop(mod, None)


@pytest.fixture
def isolated(tmp_path, monkeypatch, make_plugin) -> SamplerRegistry:
    """A shared registry that sees only the fake distributions of this test (not the built-ins, whose
    state these tests must not depend on)."""

    def fake_entry_points():
        for dist in importlib.metadata.distributions(path=[str(tmp_path)]):
            yield from (ep for ep in dist.entry_points if ep.group == registry.ENTRY_POINT_GROUP)

    reg = SamplerRegistry(entry_points=fake_entry_points)
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    return reg


def good(name: str) -> str:
    return SAMPLER_SOURCE.format(cls="Plugin", name=name)


# ---------------------------------------------------------------------- built-ins through entry points
def test_every_builtin_is_an_installed_entry_point(fresh):
    declared = _pyproject_builtins()
    assert declared, "pyproject.toml declares no built-in samplers"
    assert set(declared) <= set(registry.list_samplers())
    assert set(registry.list_samplers(origin="built-in")) == set(declared)
    # the installed metadata is not stale: same names, same targets as pyproject.toml
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("score-toolkit").entry_points
        if ep.group == registry.ENTRY_POINT_GROUP
    }
    assert installed == declared, "reinstall with `pip install -e .`: the installed entry points differ from pyproject.toml"


def test_every_sampler_class_of_the_package_has_an_entry_point():
    """A named Sampler subclass in score_toolkit/samplers/ without an entry point would be invisible."""
    import pkgutil

    import score_toolkit.samplers as package

    declared = _pyproject_builtins()
    missing = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Sampler) and obj.__module__ == module.__name__ and obj.name:
                target = f"{module.__name__}:{obj.__qualname__}"
                if declared.get(obj.name) != target:
                    missing.append(f'{obj.name} = "{target}"')
    assert not missing, (
        'declare in [project.entry-points."score_toolkit.samplers"] of pyproject.toml, then `pip install -e .`: '
        + "; ".join(sorted(missing))
    )


def test_listing_imports_no_sampler_and_no_torch():
    code = (
        "import json, sys\n"
        "from score_toolkit import list_samplers\n"
        "names = list_samplers()\n"
        "mods = sorted(m for m in sys.modules if m.startswith('score_toolkit.samplers') or m == 'torch')\n"
        "print(json.dumps({'names': names, 'modules': mods}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(_pyproject_builtins()) <= set(out["names"])
    assert out["modules"] == [], f"listing imported {out['modules']}"


def test_missing_distribution_metadata_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    with pytest.raises(RuntimeError, match="pip install -e"):
        SamplerRegistry().names()


def test_scan_is_cached_until_refresh(fresh, monkeypatch):
    calls = []
    real = importlib.metadata.entry_points

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", counting)
    fresh.names()
    fresh.names()
    registry.list_samplers()
    assert len(calls) == 1
    registry.refresh_registry()
    registry.list_samplers()
    assert len(calls) == 2


# ---------------------------------------------------------------------- plugins
def test_plugin_is_listed_without_import_and_loaded_on_first_get(fresh, make_plugin):
    mods = make_plugin("fancy_Plugin", {"fancy": good("fancy")})
    assert "fancy" in registry.list_samplers()
    assert registry.list_samplers(origin="fancy-plugin") == ["fancy"]
    assert mods["fancy"] not in sys.modules, "listing must not import the plugin"
    cls = registry.get_sampler_class("fancy")
    assert mods["fancy"] in sys.modules
    assert issubclass(cls, Sampler) and cls.name == "fancy"
    assert registry.get_sampler_class("fancy") is cls
    sampler = registry.get_sampler("fancy", num_steps=7)
    assert isinstance(sampler, cls) and sampler.config["num_steps"] == 7
    with pytest.raises(TypeError, match="num_stepz"):
        registry.get_sampler("fancy", num_stepz=7)
    info = {r["name"]: r for r in registry.sampler_info()}["fancy"]
    assert info["origin"] == "fancy-plugin"  # normalised distribution name
    assert info["status"] == "ok"
    assert info["description"] == cls.description
    assert info["properties"] == cls.properties.as_dict()
    assert info["options"] == {"num_steps": 3}


BROKEN = {
    "ok_one": good("ok_one"),
    "raises_on_import": "raise RuntimeError('boom at import')\n",
    "missing_module": "no_such_module_abc:Sampler",
    "not_a_sampler": "class Plugin:\n    name = 'not_a_sampler'\n",
    "wrong_name": SAMPLER_SOURCE.format(cls="Plugin", name="another_name"),
}


def _assert_load_errors(get, expected: dict[str, str], dist: str) -> None:
    """``get(name)`` raises a PluginLoadError for every entry point ``name`` of ``expected``, whose message holds
    the expected fragment, the entry point and its distribution ``dist``."""
    for name, fragment in expected.items():
        with pytest.raises(PluginLoadError) as info:
            get(name)
        msg = str(info.value)
        assert fragment in msg and dist in msg and f"entry point {name!r}" in msg, msg


def test_broken_plugins_are_reported_and_others_work(isolated, make_plugin):
    make_plugin("broken-dist", BROKEN)
    names = registry.list_samplers()
    assert set(BROKEN) <= set(names)
    assert registry.get_sampler("ok_one").name == "ok_one"
    expected = {
        "raises_on_import": "boom at import",
        "missing_module": "No module named 'no_such_module_abc'",
        "not_a_sampler": "expected a subclass of score_toolkit.samplers.base.Sampler",
        "wrong_name": "'another_name', which disagrees with the entry-point name",
    }
    _assert_load_errors(registry.get_sampler_class, expected, "broken-dist")
    with pytest.raises(PluginLoadError) as info:
        registry.get_sampler("raises_on_import")
    assert isinstance(info.value.__cause__, RuntimeError)

    with pytest.warns(SamplerPluginWarning) as record:
        records = {r["name"]: r for r in registry.sampler_info()}
    warned = [str(w.message) for w in record if issubclass(w.category, SamplerPluginWarning)]
    for name, fragment in expected.items():
        assert records[name]["status"] != "ok" and fragment in records[name]["status"]
        assert any(name in w and "broken-dist" in w and fragment in w for w in warned), name
    assert records["ok_one"]["status"] == "ok"


def test_strict_mode_raises(isolated, make_plugin, monkeypatch):
    make_plugin("broken-dist", {"raises_on_import": BROKEN["raises_on_import"]})
    monkeypatch.delenv(registry.STRICT_ENV_VAR, raising=False)
    with pytest.raises(PluginLoadError, match="boom at import"):
        registry.sampler_info(strict=True)
    monkeypatch.setenv(registry.STRICT_ENV_VAR, "1")
    with pytest.raises(PluginLoadError, match="boom at import"):
        registry.sampler_info()
    monkeypatch.setenv(registry.STRICT_ENV_VAR, "0")
    with pytest.warns(SamplerPluginWarning):
        records = registry.sampler_info()
    assert any(r["name"] == "raises_on_import" and "boom" in r["status"] for r in records)
    with pytest.warns(SamplerPluginWarning):  # the argument beats the environment
        monkeypatch.setenv(registry.STRICT_ENV_VAR, "1")
        registry.sampler_info(strict=False)


# ---------------------------------------------------------------------- duplicates
class FakeEntryPoint:
    def __init__(self, name, dist, target):
        self.name, self.value, self.dist = name, target, SimpleNamespace(name=dist)

    def load(self):
        raise AssertionError("listing must not load entry points")


@pytest.mark.parametrize("reverse", [False, True])
def test_duplicate_precedence_is_deterministic(reverse):
    eps = [
        FakeEntryPoint("shared", "zeta-plugin", "zeta:Z"),
        FakeEntryPoint("shared", "alpha-plugin", "alpha:A"),
        FakeEntryPoint("core", "beta-plugin", "beta:B"),
        FakeEntryPoint("core", "score_toolkit", "score_toolkit.x:Core"),  # the built-in, any spelling
    ]
    reg = SamplerRegistry(entry_points=eps[::-1] if reverse else eps)
    with pytest.warns(SamplerPluginWarning) as record:
        assert reg.names() == ["core", "shared"]
    messages = [str(w.message) for w in record]
    assert any("'shared'" in m and "zeta-plugin" in m and "alpha-plugin" in m for m in messages)
    assert any("'core'" in m and "beta-plugin" in m and "score-toolkit" in m for m in messages)
    scan = reg._scan()
    assert scan.winners["shared"].origin == "alpha-plugin"  # alphabetical among third parties
    assert scan.winners["core"].origin == "built-in"  # the built-in beats every third party
    assert [c.origin for c in scan.shadowed["core"]] == ["beta-plugin"]


def test_same_distribution_twice_is_not_a_conflict():
    eps = [FakeEntryPoint("x", "dist-a", "a:X"), FakeEntryPoint("x", "dist_a", "a:X")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SamplerRegistry(entry_points=eps).names() == ["x"]


def test_plugin_cannot_take_a_builtin_name(fresh, make_plugin):
    builtin = sorted(_pyproject_builtins())[0]
    mods = make_plugin("usurper", {builtin: good(builtin)})
    with pytest.warns(SamplerPluginWarning, match="usurper"):
        assert builtin in registry.list_samplers()
    assert fresh._scan().winners[builtin].origin == "built-in"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerPluginWarning)
        record = {r["name"]: r for r in registry.sampler_info()}[builtin]
    assert record["origin"] == "built-in" and any("usurper" in s for s in record["shadows"])
    assert mods[builtin] not in sys.modules


# ---------------------------------------------------------------------- names and registration
def test_unknown_name_suggests_close_matches_and_lists_all(fresh):
    builtin = sorted(_pyproject_builtins())[0]
    typo = builtin[:-1] + ("x" if builtin[-1] != "x" else "y")
    with pytest.raises(ValueError) as info:
        registry.get_sampler(typo)
    msg = str(info.value)
    assert f"Did you mean {builtin!r}" in msg
    assert "Available samplers: " + ", ".join(registry.list_samplers()) in msg
    with pytest.raises(ValueError, match="Available samplers"):
        registry.get_sampler_class("zzzzzzzz")
    with pytest.raises(TypeError, match="sampler name"):
        registry.get_sampler_class(3)


class _InProcess(Sampler):
    name = "in_process_test"
    description = "returns its initial state"
    properties = SamplerProperties(stochastic=False, order=1.0)

    def _run(self, ctx, x):
        return x


def test_register_sampler(fresh):
    assert registry.register_sampler("in_process_test")(_InProcess) is _InProcess
    assert "in_process_test" in registry.list_samplers(origin="in-process")
    assert isinstance(registry.get_sampler("in_process_test"), _InProcess)
    info = {r["name"]: r for r in registry.sampler_info()}["in_process_test"]
    assert info["origin"] == "in-process" and info["status"] == "ok"
    with pytest.raises(ValueError, match="already registered by an in-process registration"):
        registry.register_sampler("in_process_test")(_InProcess)
    with pytest.raises(ValueError, match="must equal the class's name"):
        registry.register_sampler("other_name")(_InProcess)
    with pytest.raises(TypeError, match="subclass of Sampler"):
        registry.register_sampler("in_process_test", override=True)(object)
    with pytest.raises(ValueError, match="without whitespace"):
        registry.register_sampler("has space")


def test_register_sampler_collides_with_entry_points(fresh):
    builtin = sorted(_pyproject_builtins())[0]
    impostor = type("Impostor", (_InProcess,), {"name": builtin})
    with pytest.raises(ValueError, match="built-in"):
        registry.register_sampler(builtin)(impostor)
    registry.register_sampler(builtin, override=True)(impostor)
    assert registry.get_sampler_class(builtin) is impostor
    assert builtin in registry.list_samplers(origin="in-process")
    record = {r["name"]: r for r in registry.sampler_info()}[builtin]
    assert record["origin"] == "in-process" and record["shadows"][0].startswith("built-in")
    fresh.unregister(builtin)
    assert builtin in registry.list_samplers(origin="built-in")


# ---------------------------------------------------------------------- the command line
def test_cli_samplers_table_and_json(isolated, make_plugin, capsys, monkeypatch):
    monkeypatch.delenv(registry.STRICT_ENV_VAR, raising=False)
    make_plugin("broken-dist", {"ok_one": BROKEN["ok_one"], "raises_on_import": BROKEN["raises_on_import"]})
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ORIGIN", "STATUS", "PROPERTIES", "DESCRIPTION"]
    ok_line = next(line for line in lines if line.startswith("ok_one "))
    assert "broken-dist" in ok_line and " ok " in ok_line and "deterministic, order 1, fixed grid" in ok_line
    bad = lines.index(next(line for line in lines if line.startswith("raises_on_import ")))
    assert "ERROR" in lines[bad] and "boom at import" in lines[bad + 1]
    assert lines[-1] == "2 samplers, 1 broken"

    assert main(["samplers", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["ok_one"]["status"] == "ok" and records["ok_one"]["origin"] == "broken-dist"
    assert records["ok_one"]["properties"]["order"] == 1.0
    assert "boom at import" in records["raises_on_import"]["status"]

    assert main(["samplers", "--strict"]) == 1
    assert "boom at import" in capsys.readouterr().err


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "samplers" in capsys.readouterr().out


@pytest.mark.slow  # a fresh interpreter importing torch, diffusers and every sampler: 5 s idle, ~25 s on a loaded machine
def test_cli_entry_point_script(tmp_path):
    """The installed ``score-toolkit`` script lists built-ins and shows a broken plugin with its error."""
    script = Path(sysconfig.get_path("scripts")) / "score-toolkit"
    assert script.exists(), f"console script not installed at {script}: pip install -e ."
    info = tmp_path / "broken_cli_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-cli-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ncli_broken = not_there_xyz:S\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop(registry.STRICT_ENV_VAR, None)
    res = subprocess.run([str(script), "samplers", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    records = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(_pyproject_builtins()) <= set(records)
    assert records["cli_broken"]["origin"] == "broken-cli-dist"
    assert "No module named 'not_there_xyz'" in records["cli_broken"]["status"]


# ---------------------------------------------------------------------- isolation against anything a plugin does
MALFORMED_SOURCE = '''
from score_toolkit.samplers.base import Sampler, SamplerProperties


class Plugin(Sampler):
    name = {name!r}
    description = {description!r}
    properties = {properties}
    options = {options}

    def _run(self, ctx, x):
        return x
'''

MALFORMED = {
    "exits_at_import": "import sys\nsys.exit(0)\n",
    "blank_description": MALFORMED_SOURCE.format(name="blank_description", description="   ",
                                                 properties="SamplerProperties(stochastic=False, order=1.0)",
                                                 options="{}"),
    "dict_properties": MALFORMED_SOURCE.format(name="dict_properties", description="dict properties",
                                               properties="{'stochastic': False, 'order': 1.0}", options="{}"),
    "list_options": MALFORMED_SOURCE.format(name="list_options", description="list options",
                                            properties="SamplerProperties(stochastic=False, order=1.0)",
                                            options="['num_steps']"),
}


def test_sys_exit_and_malformed_declarations_are_reported_not_fatal(isolated, make_plugin, capsys, monkeypatch):
    """A plugin calling sys.exit() at import, or declaring a blank description, a dict of properties or a list
    of options, is one broken entry of the listing; the other samplers list and load."""
    monkeypatch.delenv(registry.STRICT_ENV_VAR, raising=False)
    make_plugin("malformed-dist", {"ok_one": good("ok_one"), **MALFORMED})
    expected = {
        "exits_at_import": "SystemExit",
        "blank_description": "expected description to be a non-blank one-line str, found '   '",
        "dict_properties": "expected properties to be a SamplerProperties instance, found dict",
        "list_options": "expected options to be a mapping of option names",
    }
    _assert_load_errors(registry.get_sampler, expected, "malformed-dist")
    with pytest.raises(PluginLoadError) as info:
        registry.get_sampler_class("exits_at_import")
    assert isinstance(info.value.__cause__, SystemExit)
    assert registry.get_sampler("ok_one").name == "ok_one"

    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"{len(expected) + 1} samplers, {len(expected)} broken", out
    assert main(["samplers", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["ok_one"]["status"] == "ok"
    for name, fragment in expected.items():
        assert fragment in records[name]["status"], records[name]


def test_register_sampler_refuses_malformed_declarations(fresh):
    class Blank(Sampler):
        name = "blank_registered"
        description = ""
        properties = SamplerProperties(stochastic=False, order=1.0)

    with pytest.raises(TypeError, match="expected description to be a non-blank"):
        registry.register_sampler("blank_registered")(Blank)
    assert "blank_registered" not in registry.list_samplers()


def test_keyboard_interrupt_in_a_plugin_is_not_swallowed(isolated, make_plugin):
    make_plugin("interrupt-dist", {"interrupts": "raise KeyboardInterrupt\n"})
    with pytest.raises(KeyboardInterrupt):
        registry.get_sampler_class("interrupts")
