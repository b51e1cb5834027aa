"""Strict reading of diffusers-style configs (scheduler and process configs, like network configs).

diffusers' ``ConfigMixin.from_config`` is lenient in two ways that silently change what a saved model means:

* an unknown key (a typo such as ``beta_mx`` or ``predicton_type``) is only logged, and the default is used;
* a key listed in ``_use_default_values`` is dropped even when the config sets it, so the class default wins
  over the value written in the file (diffusers never writes that list to a file; it marks the keys that an
  in-memory config filled with defaults, which then hold exactly those defaults).

:func:`strict_config` is the one rule used by every reader here: the values present in a config are the
values used (``_use_default_values`` is removed, never applied), and a key that the class does not take is a
``ValueError`` naming it, with the close matches and the accepted keys.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["init_keys", "config_keys", "strict_config", "strict_from_config", "init_from_fields", "REQUIRED"]

#: the default of a field that has none (a required argument)
REQUIRED = inspect.Parameter.empty


def init_keys(cls: type) -> set[str]:
    """The keyword arguments ``cls.__init__`` takes (without ``self``, ``*args``/``**kwargs`` and the
    class's ``ignore_for_config``)."""
    params = inspect.signature(cls.__init__).parameters
    keys = {n for n, p in params.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)} - {"self"}
    return keys - set(getattr(cls, "ignore_for_config", []) or [])


def config_keys(cls: type) -> set[str]:
    """The keys a config of ``cls`` may hold: what it takes, plus, for a diffusers scheduler, what the schedulers
    it is compatible with take (diffusers keeps those keys when converting a config between them)."""
    keys = init_keys(cls)
    if getattr(cls, "has_compatibles", False):
        for other in cls._get_compatibles():
            keys |= init_keys(other)
    return keys


def strict_config(config: Mapping[str, Any], allowed: Iterable[str], where: str) -> dict[str, Any]:
    """A copy of ``config`` without ``_use_default_values``; raises ``ValueError`` if it holds a key (other than
    private ``_...`` keys) outside ``allowed``. ``where`` names the config in the message."""
    if not isinstance(config, Mapping):
        raise TypeError(f"expected {where} to be a mapping, found {type(config).__name__}")
    allowed = set(allowed)
    cfg = {k: v for k, v in config.items() if k != "_use_default_values"}
    unknown = sorted(k for k in cfg if not (isinstance(k, str) and k.startswith("_")) and k not in allowed)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown key(s) {', '.join(hints)} in {where}; expected a subset of {sorted(allowed)}")
    return cfg


#: keyword arguments that diffusers' loaders pass on to ``from_config`` and that configure the loading, not the
#: object (``SchedulerMixin.from_pretrained`` forwards what ``load_config`` did not use, e.g. ``torch_dtype``)
LOADING_KWARGS = frozenset({"torch_dtype", "use_safetensors", "low_cpu_mem_usage", "device_map", "variant",
                            "disable_mmap", "dduf_entries", "provider", "sess_options", "use_flashpack"})


def strict_from_config(config: Mapping[str, Any], kwargs: Mapping[str, Any], allowed: Iterable[str], name: str, *,
                       kind: str = "config") -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``config`` and keyword arguments of ``name.from_config`` (``extract_init_dict``'s), checked strictly: an
    unknown key in either is a ``ValueError`` with a did-you-mean (diffusers drops unknown keyword arguments
    silently); diffusers' loading arguments (:data:`LOADING_KWARGS`, which ``from_pretrained`` passes on and
    diffusers' own classes ignore) are dropped. The messages name "the ``name`` ``kind``". Returns both without
    ``_use_default_values``."""
    allowed = set(allowed)
    kwargs = {k: v for k, v in kwargs.items() if k not in LOADING_KWARGS}
    config = strict_config(config, allowed | set(kwargs), f"the {name} {kind}")
    return config, strict_config(kwargs, allowed, f"the keyword arguments of {name}.from_config")


def init_from_fields(fields: Mapping[str, tuple[Any, str]]) -> Callable:
    """Decorator of the ``__init__(self, **config)`` of a diffusers ``ConfigMixin`` class whose config fields are
    the table ``fields`` (name: (default, annotation); default :data:`REQUIRED`: none), so that classes sharing
    most of their fields write the shared ones once. The ``__init__``'s signature -- which diffusers reads as
    the config's keys and defaults -- becomes the table; the decorated ``__init__`` receives every field (given
    or default) and is registered with diffusers' ``register_to_config``; an unknown or missing argument is a
    ``TypeError``, as for a written-out signature."""
    from diffusers.configuration_utils import register_to_config

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter("self", kind)] + [
        inspect.Parameter(name, kind, default=default, annotation=annotation)
        for name, (default, annotation) in fields.items()])

    def decorate(init: Callable) -> Callable:
        @functools.wraps(init)
        def with_fields(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            init(self, **{k: v for k, v in bound.arguments.items() if k != "self"})

        with_fields.__signature__ = signature
        return register_to_config(with_fields)

    return decorate
