"""Where a library warning points: helpers that import nothing heavy (the registry and the command line import
them before torch)."""

from __future__ import annotations

import sys


def caller_stacklevel(*also_skip: str) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this: the first frame whose module is
    not score_toolkit's, nor ``contextlib`` (decorators), nor a package of ``also_skip`` (e.g. ``"diffusers"``, whose
    ``from_config`` and ``register_to_config`` wrap the schedulers' constructors), so that the warning names the
    line of the code that called the library, whichever public entry point it went through."""
    skipped = ("score_toolkit", "contextlib", *also_skip)
    frame, level = sys._getframe(1), 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == name or module.startswith(name + ".") for name in skipped):
            break
        frame, level = frame.f_back, level + 1
    return level
