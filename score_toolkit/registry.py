"""Sampler registry: names -> sampler classes, filled from the entry-point group ``score_toolkit.samplers``.

Built-in samplers are entry points of the ``score-toolkit`` distribution (its ``pyproject.toml``), so
they are found exactly like third-party plugins, and registration never depends on a module being
imported first. In-process registrations (:func:`register_sampler`) come on top.

Rules (docs/plugins.md):

* **Lazy.** Listing reads package metadata only (scanned once, then cached; :func:`refresh_registry`
  rescans). A sampler's module is imported the first time its class is asked for.
* **A broken plugin never breaks the others.** An entry point that fails to import (any exception,
  ``SystemExit`` from a ``sys.exit()`` included; only ``KeyboardInterrupt`` passes), whose object is
  not a :class:`~score_toolkit.samplers.base.Sampler` subclass, whose ``name`` disagrees with the
  entry-point name, or whose declarations are malformed (a blank or non-str ``description``,
  ``properties`` that are not a ``SamplerProperties``, ``options`` that are not a mapping) is reported (a :class:`SamplerPluginWarning` naming the distribution, the entry
  point and the error, and its status in :func:`sampler_info` / ``score-toolkit samplers``); asking
  for it raises :class:`PluginLoadError`. With ``strict=True`` or the environment variable
  ``SCORE_TOOLKIT_STRICT_PLUGINS=1`` a failure raises at once instead of being reported.
* **Duplicates.** When several distributions declare one name, a warning names all of them and the
  winner is: the built-in ``score-toolkit`` distribution first, then third parties in alphabetical
  order of their (normalised) distribution names. An in-process registration may take a name that
  is already used only with ``override=True``, and then wins.
* **Unknown names** raise ``ValueError`` with the close matches and the list of available names.

Why one module of this length: it is the one place where sampler names are resolved, and most of it is
the isolation of third-party plugins (each failure kept to its plugin, reported with its distribution) and
the rules above, which must be read together.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._warnings import caller_stacklevel

if TYPE_CHECKING:  # imported lazily at run time: listing must not import torch
    from .samplers.base import Sampler

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_DISTRIBUTION",
    "STRICT_ENV_VAR",
    "PluginLoadError",
    "SamplerPluginWarning",
    "SamplerRegistry",
    "list_samplers",
    "get_sampler",
    "get_sampler_class",
    "register_sampler",
    "sampler_info",
    "refresh_registry",
]

ENTRY_POINT_GROUP = "score_toolkit.samplers"
BUILTIN_DISTRIBUTION = "score-toolkit"
STRICT_ENV_VAR = "SCORE_TOOLKIT_STRICT_PLUGINS"

BUILTIN_ORIGIN = "built-in"
IN_PROCESS_ORIGIN = "in-process"


class PluginLoadError(ImportError):
    """A registered sampler could not be loaded (import error, not a Sampler subclass, name mismatch).
    The original exception, if any, is its ``__cause__``."""


class SamplerPluginWarning(UserWarning):
    """A sampler plugin is broken or two distributions declare the same sampler name."""


def _canonical(dist_name: str) -> str:
    """PEP 503 normalised distribution name (``Score_Toolkit`` -> ``score-toolkit``)."""
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _strict_from_env() -> bool:
    value = os.environ.get(STRICT_ENV_VAR, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


@dataclass
class _Candidate:
    """One declaration of a sampler name: an entry point of a distribution, or an in-process class."""

    name: str
    origin: str  # "built-in", a distribution name, or "in-process"
    target: str  # "module:Class"
    entry_point: Any = None  # importlib.metadata.EntryPoint (or any object with .name, .value, .load())
    cls: type | None = None  # set for in-process registrations

    @property
    def rank(self) -> tuple[int, str, str]:
        """Precedence among entry points: built-in first, then third parties alphabetically
        (the target only breaks ties, so the order never depends on the file system)."""
        return (0 if self.origin == BUILTIN_ORIGIN else 1, self.origin, self.target)


@dataclass
class _Loaded:
    cls: type | None = None
    error: PluginLoadError | None = None


@dataclass
class _Scan:
    winners: dict[str, _Candidate]
    shadowed: dict[str, list[_Candidate]] = field(default_factory=dict)


class SamplerRegistry:
    """A registry of samplers. The module-level functions use one shared instance that reads the
    installed entry points; build your own (e.g. with fake entry points in a test) with
    ``SamplerRegistry(entry_points=[...])``.

    Args:
        entry_points: where the entry points come from: ``None`` reads the installed packages'
            metadata (group :data:`ENTRY_POINT_GROUP`) and requires the ``score-toolkit``
            distribution's own entry points to be there; otherwise an iterable of entry-point objects
            (``.name``, ``.value``, ``.dist.name``, ``.load()``) or a callable returning one, used as is.
        strict: raise on the first broken plugin instead of reporting it (``None``: read the
            environment variable ``SCORE_TOOLKIT_STRICT_PLUGINS`` at each call).
    """

    def __init__(
        self,
        entry_points: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
        *,
        strict: bool | None = None,
    ):
        if strict is not None and not isinstance(strict, bool):
            raise TypeError(f"expected strict to be a bool or None, found {strict!r}")
        self._source = entry_points
        self._strict = strict
        self._scan_cache: _Scan | None = None
        self._loaded: dict[str, _Loaded] = {}
        self._in_process: dict[str, _Candidate] = {}

    # ------------------------------------------------------------------ scanning (no imports)
    def refresh(self) -> None:
        """Forget the cached entry-point scan and loaded classes (e.g. after installing a plugin).
        In-process registrations are kept."""
        self._scan_cache = None
        self._loaded.clear()

    def _is_strict(self, strict: bool | None) -> bool:
        if strict is not None:
            return bool(strict)
        if self._strict is not None:
            return self._strict
        return _strict_from_env()

    def _read_entry_points(self) -> list[Any]:
        if self._source is None:
            eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
            if not any(_origin(ep) == BUILTIN_ORIGIN for ep in eps):
                raise RuntimeError(
                    f"no sampler entry points of the {BUILTIN_DISTRIBUTION!r} distribution were found in group "
                    f"{ENTRY_POINT_GROUP!r}: its package metadata is not installed (running from a bare source "
                    "tree?) or is stale. Install the package with `pip install -e .` from the repository root "
                    "(and reinstall after editing [project.entry-points] in pyproject.toml)."
                )
            return eps
        source = self._source() if callable(self._source) else self._source
        return list(source)

    def _scan(self) -> _Scan:
        if self._scan_cache is not None:
            return self._scan_cache
        by_name: dict[str, list[_Candidate]] = {}
        for ep in self._read_entry_points():
            cand = _Candidate(name=ep.name, origin=_origin(ep), target=ep.value, entry_point=ep)
            same = by_name.setdefault(ep.name, [])
            # one distribution found twice on sys.path with the same declaration: not a conflict
            if not any(c.origin == cand.origin and c.target == cand.target for c in same):
                same.append(cand)
        scan = _Scan(winners={})
        for name in sorted(by_name):
            cands = sorted(by_name[name], key=lambda c: c.rank)
            scan.winners[name] = cands[0]
            if len(cands) > 1:
                scan.shadowed[name] = cands[1:]
                warnings.warn(
                    f"sampler name {name!r} is declared by several distributions: "
                    + ", ".join(f"{_describe_origin(c.origin)} ({c.target})" for c in cands)
                    + f"; using the one from {_describe_origin(cands[0].origin)} (the built-in score-toolkit "
                    "distribution wins, then the alphabetically first distribution name)",
                    SamplerPluginWarning,
                    stacklevel=caller_stacklevel(),
                )
        self._scan_cache = scan
        return scan

    def _candidate(self, name: str) -> _Candidate:
        if not isinstance(name, str):
            raise TypeError(f"expected a sampler name (str), found {type(name).__name__}")
        if name in self._in_process:
            return self._in_process[name]
        scan = self._scan()
        if name in scan.winners:
            return scan.winners[name]
        available = self.names()
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown sampler {name!r}.{hint} Available samplers: {', '.join(available) or '(none)'}. "
            f"Plugins add samplers through the entry-point group {ENTRY_POINT_GROUP!r}."
        )

    def names(self, origin: str | None = None) -> list[str]:
        """Sorted names of the registered samplers (imports nothing); with ``origin``, only those
        whose winning declaration comes from it (``"built-in"``, a distribution name, ``"in-process"``)."""
        winners = {**self._scan().winners, **self._in_process}
        if origin is not None:
            origin = origin if origin in (BUILTIN_ORIGIN, IN_PROCESS_ORIGIN) else _canonical(origin)
            return sorted(name for name, cand in winners.items() if cand.origin == origin)
        return sorted(winners)

    # ------------------------------------------------------------------ loading
    def get_class(self, name: str) -> type[Sampler]:
        """The sampler class registered as ``name`` (imported on first use).

        Raises:
            ValueError: unknown name (with close matches and the available names).
            PluginLoadError: the plugin is broken (always, strict or not: there is no class to return);
                the original exception is its ``__cause__``.
        """
        cand = self._candidate(name)
        if cand.cls is not None:
            return cand.cls
        loaded = self._load(cand)
        if loaded.error is not None:
            raise loaded.error
        return loaded.cls  # type: ignore[return-value]

    def get(self, name: str, /, **options: Any) -> Sampler:
        """An instance of the sampler ``name`` built with ``options`` (unknown options: ``TypeError``)."""
        return self.get_class(name)(**options)

    def _load(self, cand: _Candidate) -> _Loaded:
        if cand.name in self._loaded:
            return self._loaded[cand.name]
        from .samplers.base import Sampler

        where = f"entry point {cand.name!r} = {cand.target!r} of {_describe_origin(cand.origin)}"
        try:
            obj = cand.entry_point.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin may raise anything on import, even SystemExit (sys.exit())
            err = PluginLoadError(
                f"sampler {cand.name!r} failed to load ({where}): {type(exc).__name__}: {exc}. "
                + _fix_hint(cand.origin)
            )
            err.__cause__ = exc
            result = _Loaded(error=err)
        else:
            problem = None
            if not (isinstance(obj, type) and issubclass(obj, Sampler)):
                problem = f"expected a subclass of score_toolkit.samplers.base.Sampler, found {obj!r}"
            elif obj.name != cand.name:
                problem = f"the class's name attribute is {obj.name!r}, which disagrees with the entry-point name"
            else:
                problem = _declaration_problem(obj)
            if problem is None:
                result = _Loaded(cls=obj)
            else:
                result = _Loaded(
                    error=PluginLoadError(f"sampler {cand.name!r} is invalid ({where}): {problem}. " + _fix_hint(cand.origin))
                )
        self._loaded[cand.name] = result
        return result

    # ------------------------------------------------------------------ registration
    def register(self, name: str, *, override: bool = False) -> Callable[[type[Sampler]], type[Sampler]]:
        """Decorator registering a :class:`Sampler` subclass in this process under ``name`` (which must
        equal the class's ``name``). A name already registered (by an entry point or in-process) is a
        ``ValueError`` unless ``override=True``, in which case this class wins."""
        if not isinstance(name, str) or not name or name != name.strip() or any(ch.isspace() for ch in name):
            raise ValueError(f"expected a sampler name without whitespace, found {name!r}")
        if not isinstance(override, bool):
            raise TypeError(f"expected override to be a bool, found {override!r}")

        def decorator(cls: type[Sampler]) -> type[Sampler]:
            from .samplers.base import Sampler

            if not (isinstance(cls, type) and issubclass(cls, Sampler)):
                raise TypeError(f"register_sampler({name!r}): expected a subclass of Sampler, found {cls!r}")
            if cls.name != name:
                raise ValueError(
                    f"register_sampler({name!r}): the class {cls.__qualname__} has name {cls.name!r}; "
                    "the registered name must equal the class's name attribute"
                )
            problem = _declaration_problem(cls)
            if problem is not None:
                raise TypeError(f"register_sampler({name!r}): {problem}")
            if not override:
                taken = self._in_process.get(name) or self._scan().winners.get(name)
                if taken is not None:
                    raise ValueError(
                        f"sampler name {name!r} is already registered by {_describe_origin(taken.origin)} "
                        f"({taken.target}); pass override=True to replace it in this process"
                    )
            target = f"{cls.__module__}:{cls.__qualname__}"
            self._in_process[name] = _Candidate(name=name, origin=IN_PROCESS_ORIGIN, target=target, cls=cls)
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an in-process registration (an entry point it overrode becomes visible again)."""
        if name not in self._in_process:
            raise ValueError(
                f"sampler {name!r} is not registered in-process; in-process names: {sorted(self._in_process)}"
            )
        del self._in_process[name]

    # ------------------------------------------------------------------ reporting
    def info(self, *, strict: bool | None = None) -> list[dict[str, Any]]:
        """One record per sampler name (sorted): ``name``, ``origin`` (``"built-in"``, a distribution
        name, or ``"in-process"``), ``target`` (``"module:Class"``), ``description``, ``properties``
        (``SamplerProperties.as_dict()``), ``options`` (defaults), ``status`` (``"ok"`` or the error)
        and ``shadows`` (the other declarations of the name, which lost). This imports every sampler;
        broken ones are warned about (or raised in strict mode)."""
        strict = self._is_strict(strict)
        scan = self._scan()
        records = []
        for name in self.names():
            cand = self._candidate(name)
            shadowed = list(scan.shadowed.get(name, []))
            if cand.origin == IN_PROCESS_ORIGIN and name in scan.winners:
                shadowed.insert(0, scan.winners[name])
            record: dict[str, Any] = {
                "name": name,
                "origin": cand.origin,
                "target": cand.target,
                "description": None,
                "properties": None,
                "options": None,
                "status": "ok",
                "shadows": [f"{c.origin} ({c.target})" for c in shadowed],
            }
            if cand.cls is not None:
                cls = cand.cls
            else:
                loaded = self._load(cand)
                if loaded.error is not None:
                    if strict:
                        raise loaded.error
                    warnings.warn(str(loaded.error), SamplerPluginWarning, stacklevel=caller_stacklevel())
                    record["status"] = str(loaded.error)
                    records.append(record)
                    continue
                cls = loaded.cls
            record["description"] = cls.description.strip().splitlines()[0]
            record["properties"] = cls.properties.as_dict()
            record["options"] = dict(cls.options)
            records.append(record)
        return records


def _declaration_problem(cls: type) -> str | None:
    """What is malformed in a sampler class's declarations (``None`` if nothing): they are read by listings,
    pipelines and the conformance suite, so a malformed one is reported like an import error."""
    from collections.abc import Mapping

    from .samplers.base import SamplerProperties

    description = getattr(cls, "description", None)
    if not isinstance(description, str) or not description.strip():
        return f"expected description to be a non-blank one-line str, found {description!r}"
    properties = getattr(cls, "properties", None)
    if not isinstance(properties, SamplerProperties):
        return f"expected properties to be a SamplerProperties instance, found {type(properties).__name__} {properties!r}"
    options = getattr(cls, "options", None)
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        return f"expected options to be a mapping of option names (str) to defaults, found {options!r}"
    return None


def _origin(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    dist_name = getattr(dist, "name", None) if dist is not None else None
    if not dist_name:
        return "unknown distribution"
    canonical = _canonical(dist_name)
    return BUILTIN_ORIGIN if canonical == BUILTIN_DISTRIBUTION else canonical


def _describe_origin(origin: str) -> str:
    if origin == BUILTIN_ORIGIN:
        return f"distribution {BUILTIN_DISTRIBUTION!r} (built-in)"
    if origin == IN_PROCESS_ORIGIN:
        return "an in-process registration"
    return f"distribution {origin!r}"


def _fix_hint(origin: str) -> str:
    if origin == BUILTIN_ORIGIN:
        return f"This is a built-in sampler: reinstall {BUILTIN_DISTRIBUTION} (`pip install -e .` in a checkout)."
    return f"Update or reinstall {origin!r}, or uninstall it (`pip uninstall {origin}`); other samplers are unaffected."


# ---------------------------------------------------------------------- the shared registry
_REGISTRY = SamplerRegistry()


def list_samplers(origin: str | None = None) -> list[str]:
    """Sorted names of all registered samplers (built-in, plugins, in-process). Imports no sampler.
    With ``origin`` (``"built-in"``, a distribution name such as ``"score-toolkit-edm"``, or
    ``"in-process"``), only the names that origin provides."""
    return _REGISTRY.names(origin)


def get_sampler_class(name: str) -> type[Sampler]:
    """The sampler class registered as ``name`` (imported on first use).

    Raises ``ValueError`` for an unknown name (with close matches and the list of available names)
    and :class:`PluginLoadError` if its plugin is broken.
    """
    return _REGISTRY.get_class(name)


def get_sampler(name: str, /, **options: Any) -> Sampler:
    """The sampler ``name`` built with ``options``, e.g. ``get_sampler("pf_ode", rtol=1e-5)``.
    Unknown options raise ``TypeError``; see :func:`get_sampler_class` for the other errors."""
    return _REGISTRY.get(name, **options)


def register_sampler(name: str, *, override: bool = False) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator registering a :class:`~score_toolkit.samplers.base.Sampler` subclass in this
    process (no packaging needed)::

        @register_sampler("my_sampler")
        class MySampler(Sampler):
            name = "my_sampler"
            ...

    A name already taken (by a built-in, a plugin or an earlier registration) raises ``ValueError``
    unless ``override=True``. To publish a sampler, declare an entry point instead (docs/plugins.md).
    """
    return _REGISTRY.register(name, override=override)


def sampler_info(*, strict: bool | None = None) -> list[dict[str, Any]]:
    """A record per sampler (see :meth:`SamplerRegistry.info`); imports every sampler to describe it."""
    return _REGISTRY.info(strict=strict)


def refresh_registry() -> None:
    """Rescan the installed entry points (e.g. after ``pip install`` of a plugin in a running session)."""
    _REGISTRY.refresh()
