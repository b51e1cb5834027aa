"""What the loop asks of the network before and during training: whether ``train.compile`` can work here
(:func:`check_compile`), the size of its class-label table, and the score of a labelled micro-batch (labels
checked against the table, dropped to the null label for classifier-free guidance).
"""

from __future__ import annotations

import torch

from .config import ConfigError


def check_compile(on_cpu: bool) -> None:
    """A clear :class:`ConfigError` when ``train.compile`` cannot work here: no ``torch.compile``, dynamo not
    supported on this Python, or (on CPU, where inductor writes C++) no C++ compiler."""
    import sys

    if not hasattr(torch, "compile"):
        raise ConfigError(f"train.compile: torch {torch.__version__} has no torch.compile (needs torch >= 2.0); "
                          f"set train.compile: false")
    from torch import _dynamo

    if not _dynamo.is_dynamo_supported():
        raise ConfigError(f"train.compile: torch.compile is not supported by torch {torch.__version__} on Python "
                          f"{sys.version.split()[0]}; set train.compile: false")
    if on_cpu:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # an older or newer torch: let torch.compile report what it needs
            return
        try:
            get_cpp_compiler()
        except Exception as err:  # noqa: BLE001 -- torch raises its own error types for a missing compiler
            raise ConfigError(f"train.compile: torch.compile (inductor) needs a C++ compiler on CPU and found none "
                              f"({type(err).__name__}: {err}); install g++ (or set CXX), or set train.compile: "
                              f"false") from err


def _label_table(model) -> int | None:
    """Rows of the network's class-label table (``num_class_embeds`` / ``num_classes`` in its config), or None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    n = cfg.get("num_class_embeds") if hasattr(cfg, "get") else None
    if n is None:
        n = cfg.get("num_classes") if hasattr(cfg, "get") else None
    return int(n) if n is not None else None


def _labelled_score(model, comps, labels, table: int, dropout: float, device, seed: int, column: str | None = None):
    """The score function of one micro-batch with its labels (null label ``table - 1`` with prob. ``dropout``);
    ``column`` names where the labels come from in errors."""
    from ..conditioning import drop_labels
    from ..scores import ScoreAdapter

    if labels is None:
        raise ValueError(f"the network has a class-label table ({table} rows) but the batch has no labels")
    labels = torch.as_tensor(labels).to(device).long()
    if bool(((labels < 0) | (labels >= table - 1)).any()):
        bad = sorted({v for v in labels.tolist() if not 0 <= v < table - 1})
        source = f" (label column {column!r})" if column else ""
        raise ValueError(f"data label(s) {bad}{source} do not fit the network's class-label table of "
                         f"{table} rows (classes 0..{table - 2}, the last row is the null label)")
    labels = drop_labels(labels, table - 1, dropout, generator=torch.Generator(device=device).manual_seed(seed))
    return ScoreAdapter(lambda y, t: model(y, t, class_labels=labels), comps.process, comps.prediction_type,
                        comps.time_input, check_inputs=False)
