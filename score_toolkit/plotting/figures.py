"""The matplotlib plumbing of every chart here: figures on an explicit Agg canvas (never ``pyplot``), one or
many panels (:func:`figure_grid`), rendered to a ``PIL.Image`` (:func:`figure_to_image`) and written
atomically as PNG (:func:`save_png`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import atomic_write
from .._warnings import caller_stacklevel

#: dots per inch of every figure made here: sizes are given in pixels
DPI = 100
_INSTALL_HINT = "pip install 'score-toolkit[plot]' (or pip install matplotlib)"


def matplotlib_classes(what: str = "score_toolkit.plotting draws charts with matplotlib"):
    """``(Figure, FigureCanvasAgg)``, with an install hint when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{what}, which is not installed: {_INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg


def require_matplotlib(what: str) -> None:
    """Raise ImportError with the install hint unless matplotlib can be imported; ``what`` says who needs it
    (e.g. ``"score-toolkit demo draws its picture with matplotlib"``). Call it before long work."""
    matplotlib_classes(what)


def figure_grid(ncols: int = 1, nrows: int = 1, *, panel_size: tuple[int, int] = (420, 380)):
    """A matplotlib figure of ``nrows`` x ``ncols`` axes on an Agg canvas (no window, no pyplot), each panel about
    ``panel_size`` pixels (width, height). Returns ``(figure, axes)`` with ``axes`` a flat list (row by row).
    Draw into the axes with the ``ax=`` argument of the panel functions, then :func:`save_png` the figure."""
    for v, what in ((ncols, "ncols"), (nrows, "nrows")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expected {what} to be an int >= 1, found {v!r}")
    w, h = check_size(panel_size, "panel_size")
    Figure, FigureCanvasAgg = matplotlib_classes()
    fig = Figure(figsize=(ncols * w / DPI, nrows * h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def figure_grid_or_warn(ncols: int, missing: str):
    """:func:`figure_grid` of ``ncols`` panels, or, without matplotlib, None and a warning ``"{missing}: {the
    install hint}"`` (for pictures that are a by-product: the work goes on without them)."""
    try:
        return figure_grid(ncols)
    except ImportError as err:
        warnings.warn(f"{missing}: {err}", stacklevel=caller_stacklevel())
        return None


def figure_to_image(fig) -> Image.Image:
    """Render a matplotlib figure (on its Agg canvas) to an RGB ``PIL.Image``."""
    _, FigureCanvasAgg = matplotlib_classes()
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def check_size(size, what: str = "size") -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    try:
        w, h = (int(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what} in pixels (an int or a (width, height) pair), found {size!r}") from None
    if w < 64 or h < 64:
        raise ValueError(f"expected {what} of at least 64 x 64 pixels, found {size!r}")
    return w, h


def axes_or_new(ax, size):
    """``(ax, own)``: the given axes, or the single axes of a new figure of ``size`` pixels."""
    if ax is not None:
        return ax, False
    return figure_grid(1, 1, panel_size=check_size(size))[1][0], True


def finish(ax, own: bool):
    return figure_to_image(ax.figure) if own else ax


def label_axes(ax, title: str, xlabel: str = "$x_1$", ylabel: str = "$x_2$") -> None:
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def save_png(img, path: str | os.PathLike) -> Path:
    """Write a ``PIL.Image`` or a matplotlib figure as PNG, atomically (temporary file in the same folder, then
    rename; usual file permissions)."""
    if not isinstance(img, Image.Image):
        if not hasattr(img, "savefig"):
            raise TypeError(f"expected a PIL.Image or a matplotlib Figure, found {type(img).__name__}")
        img = figure_to_image(img)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
