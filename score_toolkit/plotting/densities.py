"""Pictures of 2-D distributions: densities (:func:`density_panel`), sample histograms and scatters
(:func:`histogram_panel`, :func:`scatter_panel`), samples over contour lines (:func:`contour_panel`), and the
score field as arrows (:func:`score_field_panel`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .figures import axes_or_new, finish, label_axes, matplotlib_classes


def check_extent(extent) -> tuple[float, float, float, float]:
    try:
        x0, x1, y0, y1 = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise ValueError(f"expected extent = (xmin, xmax, ymin, ymax), found {extent!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"expected extent with xmin < xmax and ymin < ymax, found {extent!r}")
    return x0, x1, y0, y1


def points_2d(samples, what: str = "samples") -> np.ndarray:
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


def draw_contours(ax, log_prob, extent, levels, resolution: int, color="0.25"):
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


def density_panel(log_prob, extent: Sequence[float], size=420, title: str = "", *, resolution: int = 200,
                  ax=None):
    """A 2-D density given its ``log_prob(points (n, 2)) -> (n,)`` over ``extent = (xmin, xmax, ymin, ymax)``,
    relative to its maximum (square-root colour scale, so that the tails stay visible), with a colour bar."""
    matplotlib_classes()  # the install hint first
    from matplotlib.colors import PowerNorm

    extent = check_extent(extent)
    _, _, rel = _log_density_grid(log_prob, extent, resolution)
    ax, own = axes_or_new(ax, size)
    im = ax.imshow(np.exp(rel), origin="lower", extent=extent, cmap="viridis", norm=PowerNorm(0.5, 0.0, 1.0),
                   interpolation="nearest", aspect="auto")
    ax.figure.colorbar(im, ax=ax, label="density / its maximum")
    label_axes(ax, title)
    return finish(ax, own)


def histogram_panel(samples: torch.Tensor, extent: Sequence[float], size=420, bins: int = 96, title: str = "", *,
                    ax=None):
    """2-D histogram of samples (n, 2) over ``extent`` (square-root colour scale as :func:`density_panel`), with a
    colour bar of the count per bin; the number of samples outside the extent is said in the corner."""
    matplotlib_classes()  # the install hint first
    from matplotlib.colors import PowerNorm

    s = points_2d(samples)
    extent = check_extent(extent)
    x0, x1, y0, y1 = extent
    counts, _, _ = np.histogram2d(s[:, 0], s[:, 1], bins=bins, range=[[x0, x1], [y0, y1]])
    ax, own = axes_or_new(ax, size)
    im = ax.imshow(counts.T, origin="lower", extent=extent, cmap="viridis", interpolation="nearest", aspect="auto",
                   norm=PowerNorm(0.5, 0.0, max(float(counts.max()), 1.0)))
    ax.figure.colorbar(im, ax=ax, label="samples per bin")
    _outside_note(ax, s, extent)
    label_axes(ax, title)
    return finish(ax, own)


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
    s = points_2d(samples)
    extent = check_extent(extent)
    ax, own = axes_or_new(ax, size)
    if background is not None:
        draw_contours(ax, log_prob_of(background), extent, None, 160)
    ax.scatter(s[:, 0], s[:, 1], s=4 if len(s) <= 2000 else 1.5, color=color, alpha=0.7, linewidths=0,
               label=f"{len(s)} samples")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    _outside_note(ax, s, extent)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    label_axes(ax, title)
    return finish(ax, own)


def log_prob_of(background):
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
    matplotlib_classes()  # the install hint first
    from matplotlib.colors import PowerNorm

    extent = check_extent(extent)
    ax, own = axes_or_new(ax, size)
    xs, ys, rel, _ = draw_contours(ax, log_prob, extent, levels, resolution, color=line_color)
    if shade:
        im = ax.imshow(np.exp(rel), origin="lower", extent=extent, cmap="Blues", norm=PowerNorm(0.5, 0.0, 1.0),
                       interpolation="bilinear", aspect="auto", alpha=0.6, zorder=0)
        ax.figure.colorbar(im, ax=ax, label="density / its maximum")
    if samples is not None:
        s = points_2d(samples)
        ax.scatter(s[:, 0], s[:, 1], s=4 if len(s) <= 2000 else 1.5, color=dot_color, alpha=0.8, linewidths=0,
                   label=f"{len(s)} samples", zorder=3)
        _outside_note(ax, s, extent)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    label_axes(ax, title)
    return finish(ax, own)


def score_field_panel(score_fn, extent: Sequence[float], t=None, *, grid: int = 17, size=420, background=None,
                      title: str = "", ax=None):
    """The score field as arrows on a ``grid`` x ``grid`` lattice over ``extent``: ``score_fn(points (n, 2), t)``
    (``t`` a float, or None for a time-free score ``score_fn(points)``). Directions are exact; lengths are scaled
    so that the longest arrow spans 0.9 lattice spacing, and the colour (colour bar) gives ``|s|``.
    ``background`` (optional) is a ``log_prob`` whose contour lines are drawn underneath."""
    extent = check_extent(extent)
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
    s = points_2d(s, "scores")
    if not np.isfinite(s).all():
        raise ValueError("score_fn returned NaN or infinite values over the extent")
    norm = np.linalg.norm(s, axis=1)
    # arrow (u, v) in data units: the longest spans 0.9 of the smaller lattice spacing
    spacing = min((x1 - x0), (y1 - y0)) / grid
    k = 0.9 * spacing / norm.max() if norm.max() > 0 else 0.0
    ax, own = axes_or_new(ax, size)
    if background is not None:
        draw_contours(ax, log_prob_of(background), extent, None, 160, color="0.65")
    q = ax.quiver(pts[:, 0].numpy(), pts[:, 1].numpy(), s[:, 0] * k, s[:, 1] * k, norm, cmap="viridis",
                  angles="xy", scale_units="xy", scale=1.0, width=0.004)
    ax.figure.colorbar(q, ax=ax, label="|score|")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    label_axes(ax, title)
    return finish(ax, own)
