"""Line charts (:func:`line_chart`) and the error-vs-NFE curves of the sampler benchmark's CSV
(:func:`read_benchmark_csv`, :func:`error_vs_nfe_chart`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .figures import DPI, axes_or_new, check_size, figure_to_image, finish, matplotlib_classes

_MARKERS = "osD^v<>p*h"


def _clean_series(series, log_x: bool, log_y: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    clean: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label, (xs, ys) in series.items():
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"series {label!r}: expected xs and ys of the same length, found {x.shape} and {y.shape}")
        keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) if log_x else True) & ((y > 0) if log_y else True)
        order = np.argsort(x[keep])
        clean[str(label)] = (x[keep][order], y[keep][order])
    return clean


def _draw_lines(ax, clean, refs, styles: dict[str, int], *, log_x: bool, log_y: bool, title: str, xlabel: str,
                ylabel: str) -> None:
    for label, (x, y) in clean.items():
        i = styles[label]
        # colours repeat after ten series: the marker changes instead
        ax.plot(x, y, marker=_MARKERS[(i // 10) % len(_MARKERS)], markersize=4, linewidth=1.5, label=label,
                color=f"C{i % 10}")
    for label, v in refs.items():
        ax.axhline(v, linestyle="--", color="0.45", linewidth=1.0, label=str(label))
    if log_x:
        ax.set_xscale("log")
        _plain_log_labels(ax.xaxis)
    if log_y:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    ax.grid(True, which="major", color="0.9")
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, log_x: bool = True,
               log_y: bool = True, title: str = "", xlabel: str = "", ylabel: str = "",
               hlines: dict[str, float] | None = None, size: tuple[int, int] = (640, 400), ax=None):
    """A line chart: ``series`` maps a label to ``(xs, ys)`` (markers joined by lines, sorted by x); ``hlines`` maps
    a label to a horizontal dashed reference line (e.g. a noise floor). Log axes by default (non-positive values are
    left out of log axes). The legend sits outside the plot, on the right."""
    if not series:
        raise ValueError("expected at least one series to draw, found none")
    clean = _clean_series(series, log_x, log_y)
    refs = {k: float(v) for k, v in (hlines or {}).items() if math.isfinite(v) and (v > 0 or not log_y)}
    if not any(len(x) for x, _ in clean.values()):
        raise ValueError("no finite (and, on log axes, positive) points to draw")
    ax, own = axes_or_new(ax, size)
    _draw_lines(ax, clean, refs, {k: i for i, k in enumerate(clean)}, log_x=log_x, log_y=log_y, title=title,
                xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return finish(ax, own)


def _plain_log_labels(axis) -> None:
    """Tick labels of a log axis as plain numbers (20, 0.05) where matplotlib would write 2 x 10^1; minor ticks are
    labelled when the axis holds at most one power of ten."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter(10))
    axis.set_minor_formatter(PlainLogFormatter(10))


#: error columns :func:`error_vs_nfe_chart` picks by default, in this order, when ``metric`` is not given
DEFAULT_ERROR_COLUMNS = ("wsw", "sw", "nll_gap", "mwe", "error", "mmd", "energy_distance")


def read_benchmark_csv(path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings (e.g. ``benchmarks/results/samplers_accuracy.csv``)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a CSV file at {path}, found nothing there")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: expected a header and at least one row, found none")
    return rows


def _as_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def error_vs_nfe_chart(rows, metric: str | None = None, *, series_by: Sequence[str] = ("sampler", "variant"),
                       panel_by: Sequence[str] = ("case", "process"), log_y: bool = True,
                       size: tuple[int, int] = (640, 400)) -> Image.Image:
    """Error-vs-NFE curves from the sampler benchmark: one panel per value of the ``panel_by`` columns (those
    present; two panels a row, each about ``size`` pixels), one curve per value of the ``series_by`` columns,
    x = the ``nfe`` column (log axis), y = ``metric``.

    ``rows``: a CSV path or rows as dicts (:func:`read_benchmark_csv`). Required columns: ``nfe`` and the metric
    (default: the first of :data:`DEFAULT_ERROR_COLUMNS` present). Optional: ``sampler``, ``variant``, ``case``,
    ``process`` (grouping, whichever exist) and ``<metric>_floor`` (drawn as a dashed noise-floor line, the mean
    over the panel's rows). Rows with a non-numeric ``nfe`` or metric (e.g. failed runs) are skipped."""
    if isinstance(rows, (str, os.PathLike)):
        rows = read_benchmark_csv(rows)
    rows = list(rows)
    if not rows:
        raise ValueError("expected benchmark rows, found none")
    columns = list(rows[0].keys())
    if "nfe" not in columns:
        raise ValueError(f"expected an 'nfe' column, found columns {columns}")
    if metric is None:
        metric = next((c for c in DEFAULT_ERROR_COLUMNS if c in columns), None)
        if metric is None:
            raise ValueError(f"no error column found: pass metric= one of {columns} (defaults tried: "
                             f"{DEFAULT_ERROR_COLUMNS})")
    elif metric not in columns:
        raise ValueError(f"expected the metric column {metric!r}, found columns {columns}")
    series_cols = [c for c in series_by if c in columns]
    panel_cols = [c for c in panel_by if c in columns]
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    floors: dict[str, list[float]] = {}
    for r in rows:
        x, y = _as_float(r.get("nfe")), _as_float(r.get(metric))
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        pkey = " / ".join(str(r[c]) for c in panel_cols) or metric
        skey = " ".join(str(r[c]) for c in series_cols if str(r[c]) not in ("", "-")) or "all"
        panels.setdefault(pkey, {}).setdefault(skey, []).append((x, y))
        fl = _as_float(r.get(f"{metric}_floor"))
        if math.isfinite(fl):
            floors.setdefault(pkey, []).append(fl)
    if not panels:
        raise ValueError(f"no row has numeric 'nfe' and {metric!r} values")
    # one style per series over all panels, one legend for the figure
    keys = sorted({k for ser in panels.values() for k in ser})
    styles = {k: i for i, k in enumerate(keys)}
    cols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / cols)
    w, h = check_size(size)
    per_col = max(1, (nrows * h - 40) // 15)
    legend_cols = math.ceil((len(keys) + 1) / per_col)
    legend_w = legend_cols * (7 * max(len(k) for k in [*keys, "noise floor"]) + 40)
    Figure, FigureCanvasAgg = matplotlib_classes()
    fig = Figure(figsize=((cols * w + legend_w) / DPI, nrows * h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [ax for row in fig.subplots(nrows, cols, squeeze=False) for ax in row]
    for ax, (pkey, ser) in zip(axes, panels.items()):
        clean = _clean_series({k: ([p[0] for p in v], [p[1] for p in v]) for k, v in sorted(ser.items())}, True, log_y)
        refs = {"noise floor": float(np.mean(floors[pkey]))} if pkey in floors else {}
        _draw_lines(ax, clean, refs, styles, log_x=True, log_y=log_y, title=f"{pkey}: {metric} vs NFE",
                    xlabel="NFE (score evaluations)", ylabel=metric)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax in axes[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = [k for k in keys if k in handles] + (["noise floor"] if "noise floor" in handles else [])
    fig.legend([handles[k] for k in order], order, loc="outside right upper", fontsize=7, frameon=False,
               ncols=legend_cols)
    return figure_to_image(fig)
