"""Pictures of samples, densities, trajectories, score fields and benchmark curves, written atomically as PNG.

Charts are drawn with matplotlib (the ``plot`` extra: ``pip install 'score-toolkit[plot]'``), with axes, colour
bars, legends and titles; image grids are plain Pillow (which diffusers already needs), so sampling and
exporting image models never need matplotlib.

* 2-D densities (:func:`density_panel`), sample histograms and scatters (:func:`histogram_panel`,
  :func:`scatter_panel`), samples over the true density's contour lines (:func:`contour_panel`);
* image grids (:func:`image_grid`, Pillow only) and side-by-side pictures (:func:`side_by_side`);
* trajectories of a few samples over time (:func:`trajectory_panel` for 2-D points, :func:`trajectory_grid`
  for images), from ``SamplerOutput.trajectory`` (``return_trajectory=True``);
* the score field as arrows (:func:`score_field_panel`);
* line charts (:func:`line_chart`) and error-vs-NFE curves from the sampler benchmark's CSV
  (:func:`read_benchmark_csv`, :func:`error_vs_nfe_chart`).

Every drawing function returns a ``PIL.Image`` (:func:`save_png` writes it), or, given ``ax=`` (a matplotlib
``Axes``), draws into that axes and returns it, so that panels can share one figure (:func:`figure_grid`).

Figures are made with ``matplotlib.figure.Figure`` on an explicit Agg canvas, never through ``pyplot``: no window
opens, whatever the user's matplotlib backend, and no figure stays registered in pyplot's global list (nothing to
close; a figure is freed with its last reference).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._io import atomic_write

__all__ = [
    "density_panel",
    "histogram_panel",
    "scatter_panel",
    "image_grid",
    "side_by_side",
    "save_png",
    "contour_panel",
    "trajectory_panel",
    "trajectory_grid",
    "score_field_panel",
    "line_chart",
    "read_benchmark_csv",
    "error_vs_nfe_chart",
    "figure_grid",
    "figure_to_image",
    "require_matplotlib",
    "DEFAULT_ERROR_COLUMNS",
]

#: dots per inch of every figure made here: sizes are given in pixels
DPI = 100
_INSTALL_HINT = "pip install 'score-toolkit[plot]' (or pip install matplotlib)"


# ============================================================================================ matplotlib plumbing
def _matplotlib(what: str = "score_toolkit.plotting draws charts with matplotlib"):
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
    _matplotlib(what)


def figure_grid(ncols: int = 1, nrows: int = 1, *, panel_size: tuple[int, int] = (420, 380)):
    """A matplotlib figure of ``nrows`` x ``ncols`` axes on an Agg canvas (no window, no pyplot), each panel about
    ``panel_size`` pixels (width, height). Returns ``(figure, axes)`` with ``axes`` a flat list (row by row).
    Draw into the axes with the ``ax=`` argument of the panel functions, then :func:`save_png` the figure."""
    for v, what in ((ncols, "ncols"), (nrows, "nrows")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expected {what} to be an int >= 1, found {v!r}")
    w, h = _check_size(panel_size, "panel_size")
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(ncols * w / DPI, nrows * h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def figure_to_image(fig) -> Image.Image:
    """Render a matplotlib figure (on its Agg canvas) to an RGB ``PIL.Image``."""
    _, FigureCanvasAgg = _matplotlib()
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _check_size(size, what: str = "size") -> tuple[int, int]:
    pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    try:
        w, h = (int(v) for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"expected {what} in pixels (an int or a (width, height) pair), found {size!r}") from None
    if w < 64 or h < 64:
        raise ValueError(f"expected {what} of at least 64 x 64 pixels, found {size!r}")
    return w, h


def _axes(ax, size):
    """``(ax, own)``: the given axes, or the single axes of a new figure of ``size`` pixels."""
    if ax is not None:
        return ax, False
    return figure_grid(1, 1, panel_size=_check_size(size))[1][0], True


def _done(ax, own: bool):
    return figure_to_image(ax.figure) if own else ax


def _label_axes(ax, title: str, xlabel: str = "$x_1$", ylabel: str = "$x_2$") -> None:
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _check_extent(extent) -> tuple[float, float, float, float]:
    try:
        x0, x1, y0, y1 = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise ValueError(f"expected extent = (xmin, xmax, ymin, ymax), found {extent!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"expected extent with xmin < xmax and ymin < ymax, found {extent!r}")
    return x0, x1, y0, y1


def _points_2d(samples, what: str = "samples") -> np.ndarray:
    s = samples.detach().double().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, float)
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"expected 2-D {what} of shape (n, 2), found {s.shape}")
    return s


def _log_density_grid(log_prob, extent, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xs, ys, log_prob - max)`` on a ``resolution`` x ``resolution`` grid over ``extent`` (rows: y up)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"expected resolution to be an int >= 8, found {resolution!r}")
    x0, x1, y0, y1 = extent
    xs = np.linspace(x0, x1, resolution)
    ys = np.linspace(y0, y1, resolution)
    xx, yy = np.meshgrid(xs, ys)
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float64)
    with torch.no_grad():
        lp = log_prob(pts)
    lp = (lp.detach().double().cpu().numpy() if isinstance(lp, torch.Tensor) else np.asarray(lp, float))
    if lp.shape != (resolution * resolution,):
        raise ValueError(f"expected log_prob(points (n, 2)) to return shape (n,), found {lp.shape}")
    lp = lp.reshape(resolution, resolution)
    if not np.isfinite(lp).any():
        raise ValueError("log_prob returned no finite value over the extent")
    return xs, ys, lp - np.nanmax(lp)


#: default contour levels, as fractions of the maximum density: the 1- to 4-sigma lines of a Gaussian component
_SIGMA_LEVELS = (1, 2, 3, 4)


def _draw_contours(ax, log_prob, extent, levels, resolution: int, color="0.25"):
    """Contour lines of ``log_prob`` at ``levels`` (fractions of the maximum), with a legend entry saying which."""
    xs, ys, rel = _log_density_grid(log_prob, extent, resolution)
    if levels is None:
        fractions = [math.exp(-k * k / 2) for k in _SIGMA_LEVELS]
        label = "density contours: 1-4σ lines"
    else:
        fractions = [float(f) for f in levels]
        label = "density contours: " + ", ".join(f"{f:.2g}" for f in sorted(fractions)) + " x max"
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"expected contour levels strictly between 0 and 1 (fractions of the maximum), found {f!r}")
    cs = ax.contour(xs, ys, rel, levels=sorted(math.log(f) for f in fractions), colors=color, linewidths=0.9,
                    negative_linestyles="solid")
    ax.plot([], [], color=color, linewidth=0.9, label=label)  # the legend entry (an empty line draws nothing)
    return xs, ys, rel, cs


# ============================================================================================ 2-D panels
def density_panel(log_prob, extent: Sequence[float], size=420, title: str = "", *, resolution: int = 200,
                  ax=None):
    """A 2-D density given its ``log_prob(points (n, 2)) -> (n,)`` over ``extent = (xmin, xmax, ymin, ymax)``,
    relative to its maximum (square-root colour scale, so that the tails stay visible), with a colour bar."""
    _matplotlib()  # the install hint first
    from matplotlib.colors import PowerNorm

    extent = _check_extent(extent)
    _, _, rel = _log_density_grid(log_prob, extent, resolution)
    ax, own = _axes(ax, size)
    im = ax.imshow(np.exp(rel), origin="lower", extent=extent, cmap="viridis", norm=PowerNorm(0.5, 0.0, 1.0),
                   interpolation="nearest", aspect="auto")
    ax.figure.colorbar(im, ax=ax, label="density / its maximum")
    _label_axes(ax, title)
    return _done(ax, own)


def histogram_panel(samples: torch.Tensor, extent: Sequence[float], size=420, bins: int = 96, title: str = "", *,
                    ax=None):
    """2-D histogram of samples (n, 2) over ``extent`` (square-root colour scale as :func:`density_panel`), with a
    colour bar of the count per bin; the number of samples outside the extent is said in the corner."""
    _matplotlib()  # the install hint first
    from matplotlib.colors import PowerNorm

    s = _points_2d(samples)
    extent = _check_extent(extent)
    x0, x1, y0, y1 = extent
    counts, _, _ = np.histogram2d(s[:, 0], s[:, 1], bins=bins, range=[[x0, x1], [y0, y1]])
    ax, own = _axes(ax, size)
    im = ax.imshow(counts.T, origin="lower", extent=extent, cmap="viridis", interpolation="nearest", aspect="auto",
                   norm=PowerNorm(0.5, 0.0, max(float(counts.max()), 1.0)))
    ax.figure.colorbar(im, ax=ax, label="samples per bin")
    _outside_note(ax, s, extent)
    _label_axes(ax, title)
    return _done(ax, own)


def _outside_note(ax, s: np.ndarray, extent) -> None:
    x0, x1, y0, y1 = extent
    out = int((~((s[:, 0] >= x0) & (s[:, 0] <= x1) & (s[:, 1] >= y0) & (s[:, 1] <= y1))).sum())
    if out:
        ax.text(0.02, 0.02, f"{out} of {len(s)} outside", transform=ax.transAxes, fontsize=7, color="0.3",
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})


def scatter_panel(samples: torch.Tensor, extent: Sequence[float], size=420, background=None, color="tab:red",
                  title: str = "", *, ax=None):
    """Samples (n, 2) as dots over ``extent``; ``background`` (optional) is a ``log_prob(points (n, 2)) -> (n,)``
    whose contour lines (1..4 sigma) are drawn underneath."""
    s = _points_2d(samples)
    extent = _check_extent(extent)
    ax, own = _axes(ax, size)
    if background is not None:
        _draw_contours(ax, _log_prob_of(background), extent, None, 160)
    ax.scatter(s[:, 0], s[:, 1], s=4 if len(s) <= 2000 else 1.5, color=color, alpha=0.7, linewidths=0,
               label=f"{len(s)} samples")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    _outside_note(ax, s, extent)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    _label_axes(ax, title)
    return _done(ax, own)


def _log_prob_of(background):
    if not callable(background):
        raise TypeError(f"expected background to be a log_prob(points (n, 2)) -> (n,) callable (its contour lines "
                        f"are drawn underneath), found {type(background).__name__}")
    return background


def contour_panel(log_prob, extent: Sequence[float], samples: torch.Tensor | None = None, *, size=420,
                  levels: Sequence[float] | None = None, shade: bool = True, line_color="0.25", dot_color="tab:red",
                  title: str = "", resolution: int = 200, ax=None):
    """Samples (n, 2) as dots over the contour lines of a 2-D density ``log_prob(points (n, 2)) -> (n,)``.

    ``levels``: contour levels as fractions of the maximum density (default: ``exp(-k^2/2)`` for k = 1..4, the
    1- to 4-sigma lines of a Gaussian component, labelled so). With ``shade`` the density is drawn faintly
    underneath, with a colour bar."""
    _matplotlib()  # the install hint first
    from matplotlib.colors import PowerNorm

    extent = _check_extent(extent)
    ax, own = _axes(ax, size)
    xs, ys, rel, _ = _draw_contours(ax, log_prob, extent, levels, resolution, color=line_color)
    if shade:
        im = ax.imshow(np.exp(rel), origin="lower", extent=extent, cmap="Blues", norm=PowerNorm(0.5, 0.0, 1.0),
                       interpolation="bilinear", aspect="auto", alpha=0.6, zorder=0)
        ax.figure.colorbar(im, ax=ax, label="density / its maximum")
    if samples is not None:
        s = _points_2d(samples)
        ax.scatter(s[:, 0], s[:, 1], s=4 if len(s) <= 2000 else 1.5, color=dot_color, alpha=0.8, linewidths=0,
                   label=f"{len(s)} samples", zorder=3)
        _outside_note(ax, s, extent)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    _label_axes(ax, title)
    return _done(ax, own)


def _as_trajectory(trajectory) -> torch.Tensor:
    if isinstance(trajectory, torch.Tensor):
        return trajectory
    return torch.stack([torch.as_tensor(s) for s in trajectory])


def trajectory_panel(trajectory, extent: Sequence[float], *, num_paths: int = 16, size=420, background=None,
                     times: Sequence[float] | None = None, title: str = "", ax=None):
    """Paths of the first ``num_paths`` samples of a 2-D trajectory: a list of (B, 2) states (as
    ``SamplerOutput.trajectory``) or a tensor (T, B, 2). Each path is coloured along its way (colour bar: the time
    ``t`` when ``times``, one per state, is given, else the step), its start a grey dot, its end a red one;
    ``background`` (optional) is a ``log_prob`` whose contour lines are drawn underneath."""
    _matplotlib()  # the install hint first
    from matplotlib.collections import LineCollection

    extent = _check_extent(extent)
    traj = _as_trajectory(trajectory)
    if traj.ndim != 3 or traj.shape[2] != 2 or traj.shape[0] < 2:
        raise ValueError(f"expected a trajectory of at least 2 states of shape (B, 2), found {tuple(traj.shape)}")
    if times is not None and len(times) != traj.shape[0]:
        raise ValueError(f"expected one time per state ({traj.shape[0]}), found {len(times)}")
    paths = traj[:, :num_paths].detach().double().cpu().numpy()  # (T, b, 2)
    steps = paths.shape[0]
    along = np.asarray([float(t) for t in times]) if times is not None else np.arange(steps, dtype=float)
    ax, own = _axes(ax, size)
    if background is not None:
        _draw_contours(ax, _log_prob_of(background), extent, None, 160, color="0.6")
    segs = np.stack([paths[:-1], paths[1:]], 2).transpose(1, 0, 2, 3).reshape(-1, 2, 2)  # (b * (T-1), 2, 2)
    seg_val = np.tile(0.5 * (along[:-1] + along[1:]), paths.shape[1])
    lc = LineCollection(segs, cmap="plasma", linewidths=1.0)
    lc.set_array(seg_val)
    lc.set_clim(float(along.min()), float(along.max()) if along.max() > along.min() else float(along.min()) + 1)
    ax.add_collection(lc)
    ax.figure.colorbar(lc, ax=ax, label="time t" if times is not None else "step")
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=14, color="0.55", label="start", zorder=3)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=14, color="tab:red", label="end", zorder=3)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.legend(loc="upper right", fontsize=7)
    _label_axes(ax, title)
    return _done(ax, own)


def trajectory_grid(trajectory, *, num_samples: int = 8, num_frames: int = 10, value_range=(-1.0, 1.0),
                    scale: int = 4, times: Sequence[float] | None = None, title: str = "", ax=None):
    """Image trajectories: one row per sample (the first ``num_samples``), ``num_frames`` states evenly spaced
    over the trajectory (first and last included) from left to right. ``trajectory``: a list of (B, C, H, W)
    states or a tensor (T, B, C, H, W); the columns are labelled with ``times`` (optional, one per state) or the
    step. ``scale``: pixels per image pixel of the picture."""
    traj = _as_trajectory(trajectory)
    if traj.ndim != 5:
        raise ValueError(f"expected an image trajectory (T, B, C, H, W), found shape {tuple(traj.shape)}")
    t_len = traj.shape[0]
    if times is not None and len(times) != t_len:
        raise ValueError(f"expected one time per state ({t_len}), found {len(times)}")
    idx = np.unique(np.linspace(0, t_len - 1, min(num_frames, t_len)).round().astype(int))
    frames = traj[idx, :num_samples]  # (F, b, C, H, W)
    f, b, _, h, w = frames.shape
    pad = 2
    tiles = frames.transpose(0, 1).reshape(f * b, *frames.shape[2:])
    grid = np.asarray(image_grid(tiles, nrow=f, value_range=value_range, scale=1, padding=pad))
    px = max(int(scale), 1)
    ax, own = _axes(ax, (max(grid.shape[1] * px + 120, 240), max(grid.shape[0] * px + 110, 160)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([pad + j * (w + pad) + (w - 1) / 2 for j in range(f)])
    ax.set_xticklabels([f"{float(times[i]):.2g}" for i in idx] if times is not None else [str(int(i)) for i in idx],
                       fontsize=7)
    ax.set_yticks([pad + r * (h + pad) + (h - 1) / 2 for r in range(b)])
    ax.set_yticklabels([str(r) for r in range(b)], fontsize=7)
    ax.set_xlabel("time t" if times is not None else "step")
    ax.set_ylabel("sample")
    ax.tick_params(length=0)
    if title:
        ax.set_title(title)
    return _done(ax, own)


def score_field_panel(score_fn, extent: Sequence[float], t=None, *, grid: int = 17, size=420, background=None,
                      title: str = "", ax=None):
    """The score field as arrows on a ``grid`` x ``grid`` lattice over ``extent``: ``score_fn(points (n, 2), t)``
    (``t`` a float, or None for a time-free score ``score_fn(points)``). Directions are exact; lengths are scaled
    so that the longest arrow spans 0.9 lattice spacing, and the colour (colour bar) gives ``|s|``.
    ``background`` (optional) is a ``log_prob`` whose contour lines are drawn underneath."""
    extent = _check_extent(extent)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"expected grid to be an int >= 2, found {grid!r}")
    x0, x1, y0, y1 = extent
    # lattice at cell centres, so arrows do not start on the border
    xs = x0 + (np.arange(grid) + 0.5) / grid * (x1 - x0)
    ys = y0 + (np.arange(grid) + 0.5) / grid * (y1 - y0)
    xx, yy = np.meshgrid(xs, ys)
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=torch.float64)
    with torch.no_grad():
        s = score_fn(pts) if t is None else score_fn(pts, torch.full((pts.shape[0],), float(t), dtype=torch.float64))
    s = _points_2d(s, "scores")
    if not np.isfinite(s).all():
        raise ValueError("score_fn returned NaN or infinite values over the extent")
    norm = np.linalg.norm(s, axis=1)
    # arrow (u, v) in data units: the longest spans 0.9 of the smaller lattice spacing
    spacing = min((x1 - x0), (y1 - y0)) / grid
    k = 0.9 * spacing / norm.max() if norm.max() > 0 else 0.0
    ax, own = _axes(ax, size)
    if background is not None:
        _draw_contours(ax, _log_prob_of(background), extent, None, 160, color="0.65")
    q = ax.quiver(pts[:, 0].numpy(), pts[:, 1].numpy(), s[:, 0] * k, s[:, 1] * k, norm, cmap="viridis",
                  angles="xy", scale_units="xy", scale=1.0, width=0.004)
    ax.figure.colorbar(q, ax=ax, label="|score|")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    _label_axes(ax, title)
    return _done(ax, own)


# ============================================================================================ Pillow pictures
def image_grid(images: torch.Tensor, nrow: int | None = None, *, value_range=(-1.0, 1.0), scale: int = 4,
               padding: int = 2) -> Image.Image:
    """Grid picture of images (B, C, H, W) with C in {1, 3}, values in ``value_range`` (Pillow only)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), found {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    b, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(b)))
    ncol = int(np.ceil(b / nrow))
    canvas = np.ones((ncol * (h + padding) + padding, nrow * (w + padding) + padding, 3), dtype=np.float32)
    for i in range(b):
        r, q = divmod(i, nrow)
        tile = x[i].permute(1, 2, 0).numpy()
        if c == 1:
            tile = np.repeat(tile, 3, axis=2)
        canvas[padding + r * (h + padding): padding + r * (h + padding) + h, padding + q * (w + padding): padding + q * (w + padding) + w] = tile
    img = Image.fromarray((canvas * 255).round().astype(np.uint8))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def side_by_side(panels: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures next to each other on a white background (Pillow only)."""
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    out = Image.new("RGB", (width, height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def save_png(img, path: str | os.PathLike) -> Path:
    """Write a ``PIL.Image`` or a matplotlib figure as PNG, atomically (temporary file in the same folder, then
    rename; usual file permissions)."""
    if not isinstance(img, Image.Image):
        if not hasattr(img, "savefig"):
            raise TypeError(f"expected a PIL.Image or a matplotlib Figure, found {type(img).__name__}")
        img = figure_to_image(img)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ============================================================================================ charts
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
    ax, own = _axes(ax, size)
    _draw_lines(ax, clean, refs, {k: i for i, k in enumerate(clean)}, log_x=log_x, log_y=log_y, title=title,
                xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return _done(ax, own)


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
    w, h = _check_size(size)
    per_col = max(1, (nrows * h - 40) // 15)
    legend_cols = math.ceil((len(keys) + 1) / per_col)
    legend_w = legend_cols * (7 * max(len(k) for k in [*keys, "noise floor"]) + 40)
    Figure, FigureCanvasAgg = _matplotlib()
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
