"""Dependency-light pictures (Pillow only, which diffusers already needs), written atomically as PNG.

* 2-D densities (:func:`density_panel`), sample histograms and scatters (:func:`histogram_panel`,
  :func:`scatter_panel`), samples over the true density's contour lines (:func:`contour_panel`, iso-lines by
  marching squares: :func:`contour_segments`);
* image grids (:func:`image_grid`) and side-by-side panels (:func:`side_by_side`);
* trajectories of a few samples over time (:func:`trajectory_panel` for 2-D points, :func:`trajectory_grid`
  for images), from ``SamplerOutput.trajectory`` (``return_trajectory=True``);
* the score field as arrows (:func:`score_field_panel`);
* line charts with log axes (:func:`line_chart`) and error-vs-NFE curves from the sampler benchmark's CSV
  (:func:`read_benchmark_csv`, :func:`error_vs_nfe_chart`).

Every function returns a ``PIL.Image``; :func:`save_png` writes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._io import atomic_write

__all__ = [
    "colorize",
    "density_panel",
    "histogram_panel",
    "scatter_panel",
    "image_grid",
    "side_by_side",
    "save_png",
    "contour_segments",
    "contour_panel",
    "trajectory_panel",
    "trajectory_grid",
    "score_field_panel",
    "line_chart",
    "read_benchmark_csv",
    "error_vs_nfe_chart",
    "PALETTE",
]

# anchor colours of the "viridis" colour map (0, 0.25, 0.5, 0.75, 1)
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a viridis-like ramp."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    w = (v - lo)[..., None]
    return ((1 - w) * _ANCHORS[lo] + w * _ANCHORS[lo + 1]).round().astype(np.uint8)


def _title(img: Image.Image, text: str) -> Image.Image:
    if not text:
        return img
    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(img, (0, 18))
    ImageDraw.Draw(out).text((4, 3), text, fill="black")
    return out


def _grid(extent: Sequence[float], size: int) -> tuple[torch.Tensor, int]:
    x0, x1, y0, y1 = extent
    xs = torch.linspace(x0, x1, size, dtype=torch.float64)
    ys = torch.linspace(y1, y0, size, dtype=torch.float64)  # image rows run top to bottom
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1), size


def density_panel(log_prob, extent: Sequence[float], size: int = 256, title: str = "") -> Image.Image:
    """Picture of a 2-D density given its ``log_prob(points (n, 2)) -> (n,)`` over
    ``extent = (xmin, xmax, ymin, ymax)`` (density scaled to its maximum)."""
    pts, n = _grid(extent, size)
    with torch.no_grad():
        lp = log_prob(pts).reshape(n, n).double()
    dens = torch.exp(lp - lp.max()).numpy()
    return _title(Image.fromarray(colorize(np.sqrt(dens))), title)


def histogram_panel(samples: torch.Tensor, extent: Sequence[float], size: int = 256, bins: int = 128, title: str = "") -> Image.Image:
    """2-D histogram of samples (n, 2) over ``extent`` on the same colour scale as :func:`density_panel`."""
    s = samples.detach().double().cpu().numpy()
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"expected 2-D points of shape (n, 2), found {s.shape}")
    x0, x1, y0, y1 = extent
    h, _, _ = np.histogram2d(s[:, 1], s[:, 0], bins=bins, range=[[y0, y1], [x0, x1]])
    h = h[::-1] / max(h.max(), 1)
    img = Image.fromarray(colorize(np.sqrt(h))).resize((size, size), Image.NEAREST)
    return _title(img, title)


def scatter_panel(samples: torch.Tensor, extent: Sequence[float], size: int = 256, background: Image.Image | None = None,
                  color=(255, 80, 40), title: str = "") -> Image.Image:
    """Samples (n, 2) as dots, optionally over a background panel (e.g. the true density)."""
    s = samples.detach().double().cpu().numpy()
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"expected 2-D points of shape (n, 2), found {s.shape}")
    img = background.copy().convert("RGB").resize((size, size)) if background is not None else Image.new("RGB", (size, size), "white")
    x0, x1, y0, y1 = extent
    px = (s[:, 0] - x0) / (x1 - x0) * (size - 1)
    py = (y1 - s[:, 1]) / (y1 - y0) * (size - 1)
    draw = ImageDraw.Draw(img)
    for u, v in zip(px, py):
        if 0 <= u < size and 0 <= v < size:
            draw.point((float(u), float(v)), fill=color)
    return _title(img, title)


def image_grid(images: torch.Tensor, nrow: int | None = None, *, value_range=(-1.0, 1.0), scale: int = 4, padding: int = 2) -> Image.Image:
    """Grid picture of images (B, C, H, W) with C in {1, 3}, values in ``value_range``."""
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
    """Panels next to each other on a white background."""
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    out = Image.new("RGB", (width, height), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename; usual file permissions)."""
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# ============================================================================================ geometry helpers
#: qualitative colours for series (tab10)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _check_extent(extent) -> tuple[float, float, float, float]:
    try:
        x0, x1, y0, y1 = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise ValueError(f"expected extent = (xmin, xmax, ymin, ymax), found {extent!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"expected extent with xmin < xmax and ymin < ymax, found {extent!r}")
    return x0, x1, y0, y1


def _to_pixels(points: np.ndarray, extent, size: int) -> np.ndarray:
    """Data coordinates (n, 2) -> pixel coordinates (n, 2) of a ``size`` x ``size`` panel (y up)."""
    x0, x1, y0, y1 = extent
    px = (points[:, 0] - x0) / (x1 - x0) * (size - 1)
    py = (y1 - points[:, 1]) / (y1 - y0) * (size - 1)
    return np.stack([px, py], 1)


def _points_2d(samples, what: str = "samples") -> np.ndarray:
    s = samples.detach().double().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, float)
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"expected 2-D {what} of shape (n, 2), found {s.shape}")
    return s


def contour_segments(values: np.ndarray, level: float) -> np.ndarray:
    """Iso-line ``values == level`` of a 2-D array (H, W) by marching squares, as line segments (m, 2, 2) in
    array coordinates (column, row), with linear interpolation along cell edges. Saddle cells are resolved
    with the cell-centre average."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or min(v.shape) < 2:
        raise ValueError(f"expected a 2-D array of at least 2 x 2 values, found shape {v.shape}")
    tl, tr, bl, br = v[:-1, :-1], v[:-1, 1:], v[1:, :-1], v[1:, 1:]
    rows, cols = np.meshgrid(np.arange(v.shape[0] - 1), np.arange(v.shape[1] - 1), indexing="ij")

    def crossing(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (level - a) / (b - a)
        hit = ((a < level) != (b < level)) & np.isfinite(f)
        return hit, np.clip(np.nan_to_num(f), 0, 1)

    # the four edges: top (tl->tr), right (tr->br), bottom (bl->br), left (tl->bl); points as (col, row)
    ht, ft = crossing(tl, tr)
    hr, fr = crossing(tr, br)
    hb, fb = crossing(bl, br)
    hl, fl = crossing(tl, bl)
    pts = {
        "t": (ht, np.stack([cols + ft, rows], -1)),
        "r": (hr, np.stack([cols + 1.0, rows + fr], -1)),
        "b": (hb, np.stack([cols + fb, rows + 1.0], -1)),
        "l": (hl, np.stack([cols + 0.0, rows + fl], -1)),
    }
    count = ht.astype(int) + hr + hb + hl
    segs = []
    two = count == 2
    names = list(pts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sel = two & pts[a][0] & pts[b][0]
            if sel.any():
                segs.append(np.stack([pts[a][1][sel], pts[b][1][sel]], 1))
    four = count == 4
    if four.any():
        centre = (tl + tr + bl + br)[four] / 4
        same = (centre < level) == (tl[four] < level)  # centre on tl's side: tl is cut off alone with br
        t, r, b, lft = (pts[k][1][four] for k in "trbl")
        first = np.where(same[:, None], np.stack([t, r], 1).reshape(-1, 4), np.stack([t, lft], 1).reshape(-1, 4))
        second = np.where(same[:, None], np.stack([b, lft], 1).reshape(-1, 4), np.stack([b, r], 1).reshape(-1, 4))
        segs.append(first.reshape(-1, 2, 2))
        segs.append(second.reshape(-1, 2, 2))
    return np.concatenate(segs, 0) if segs else np.zeros((0, 2, 2))


def _draw_segments(draw: ImageDraw.ImageDraw, segs: np.ndarray, fill, width: int = 1) -> None:
    for (a, b) in segs:
        draw.line([tuple(a), tuple(b)], fill=fill, width=width)


# ============================================================================================ 2-D panels
def contour_panel(log_prob, extent: Sequence[float], samples: torch.Tensor | None = None, *, size: int = 256,
                  levels: Sequence[float] | None = None, shade: bool = True, line_color=(40, 40, 90),
                  dot_color=(255, 80, 40), title: str = "") -> Image.Image:
    """Samples (n, 2) as dots over the contour lines of a 2-D density ``log_prob(points (n, 2)) -> (n,)``.

    ``levels``: contour levels as fractions of the maximum density (default: ``exp(-k)`` for k = 0.5, 2, 4.5, 8,
    i.e. the 1-, 2-, 3- and 4-sigma lines of a Gaussian component). With ``shade`` the density is drawn faintly
    underneath (:func:`density_panel`'s colours)."""
    extent = _check_extent(extent)
    pts, n = _grid(extent, size)
    with torch.no_grad():
        lp = log_prob(pts).reshape(n, n).double().cpu().numpy()
    if not np.isfinite(lp).any():
        raise ValueError("log_prob returned no finite value over the extent")
    rel = lp - np.nanmax(lp)
    if shade:
        # white where the density vanishes, light blue at its maximum
        w = np.sqrt(np.exp(rel))[..., None]
        img = Image.fromarray((255 - w * (255 - np.array([120, 170, 230]))).round().astype(np.uint8))
    else:
        img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    fractions = levels if levels is not None else [math.exp(-k * k / 2) for k in (1, 2, 3, 4)]
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"expected contour levels strictly between 0 and 1 (fractions of the maximum), found {f!r}")
        _draw_segments(draw, contour_segments(rel, math.log(f)), line_color)
    if samples is not None:
        for u, v in _to_pixels(_points_2d(samples), extent, size):
            if 0 <= u < size and 0 <= v < size:
                draw.ellipse([u - 1, v - 1, u + 1, v + 1], fill=dot_color)
    return _title(img, title)


def trajectory_panel(trajectory, extent: Sequence[float], *, num_paths: int = 16, size: int = 256,
                     background: Image.Image | None = None, title: str = "") -> Image.Image:
    """Paths of the first ``num_paths`` samples of a 2-D trajectory: a list of (B, 2) states (as
    ``SamplerOutput.trajectory``) or a tensor (T, B, 2). Each path is a polyline coloured from blue (start)
    to orange (end), its start a grey dot, its end a red one."""
    extent = _check_extent(extent)
    traj = torch.stack(list(trajectory)) if not isinstance(trajectory, torch.Tensor) else trajectory
    if traj.ndim != 3 or traj.shape[2] != 2 or traj.shape[0] < 2:
        raise ValueError(f"expected a trajectory of at least 2 states of shape (B, 2), found {tuple(traj.shape)}")
    traj = traj[:, :num_paths].detach().double().cpu().numpy()
    img = background.copy().convert("RGB").resize((size, size)) if background is not None else Image.new(
        "RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    steps = traj.shape[0] - 1
    for b in range(traj.shape[1]):
        px = _to_pixels(traj[:, b], extent, size)
        for i in range(steps):
            w = i / max(steps - 1, 1)
            col = tuple(int(round((1 - w) * c0 + w * c1)) for c0, c1 in zip((31, 119, 180), (255, 127, 14)))
            draw.line([tuple(px[i]), tuple(px[i + 1])], fill=col, width=1)
        (u0, v0), (u1, v1) = px[0], px[-1]
        draw.ellipse([u0 - 2, v0 - 2, u0 + 2, v0 + 2], fill=(150, 150, 150))
        draw.ellipse([u1 - 2, v1 - 2, u1 + 2, v1 + 2], fill=(214, 39, 40))
    return _title(img, title)


def trajectory_grid(trajectory, *, num_samples: int = 8, num_frames: int = 10, value_range=(-1.0, 1.0),
                    scale: int = 4, times: Sequence[float] | None = None) -> Image.Image:
    """Image trajectories: one row per sample (the first ``num_samples``), ``num_frames`` states evenly spaced
    over the trajectory (first and last included) from left to right. ``trajectory``: a list of (B, C, H, W)
    states or a tensor (T, B, C, H, W); ``times`` (optional, one per state) label the columns."""
    traj = torch.stack(list(trajectory)) if not isinstance(trajectory, torch.Tensor) else trajectory
    if traj.ndim != 5:
        raise ValueError(f"expected an image trajectory (T, B, C, H, W), found shape {tuple(traj.shape)}")
    t_len = traj.shape[0]
    idx = np.unique(np.linspace(0, t_len - 1, min(num_frames, t_len)).round().astype(int))
    frames = traj[idx, :num_samples]  # (F, b, C, H, W)
    f, b = frames.shape[:2]
    tiles = frames.transpose(0, 1).reshape(f * b, *frames.shape[2:])
    img = image_grid(tiles, nrow=f, value_range=value_range, scale=scale)
    if times is not None:
        if len(times) != t_len:
            raise ValueError(f"expected one time per state ({t_len}), found {len(times)}")
        head = Image.new("RGB", (img.width, 14), "white")
        d = ImageDraw.Draw(head)
        col_w = img.width / f
        for j, i in enumerate(idx):
            d.text((j * col_w + 2, 1), f"{float(times[i]):.2g}", fill="black")
        img = _stack_vertical([head, img])
    return img


def _stack_vertical(panels: Sequence[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    return out


def _arrow_segments(origins: np.ndarray, vectors: np.ndarray, head: float = 0.3) -> np.ndarray:
    """Line segments (n * 3, 2, 2) drawing arrows from ``origins`` along ``vectors`` (pixel units), each a
    shaft and two head strokes of ``head`` times its length at +-25 degrees."""
    tips = origins + vectors
    ang = math.radians(25)
    rot = [np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) for a in (ang, -ang)]
    back = -vectors * head
    segs = [np.stack([origins, tips], 1)]
    for r in rot:
        segs.append(np.stack([tips, tips + back @ r.T], 1))
    return np.concatenate(segs, 0)


def score_field_panel(score_fn, extent: Sequence[float], t=None, *, grid: int = 17, size: int = 256,
                      background: Image.Image | None = None, color=(20, 20, 20), title: str = "") -> Image.Image:
    """The score field as arrows on a ``grid`` x ``grid`` lattice over ``extent``: ``score_fn(points (n, 2), t)``
    (``t`` a float or None for a time-free score). Arrow lengths are proportional to ``|s|`` scaled so that the
    longest is one lattice spacing (the directions are exact, the lengths relative)."""
    extent = _check_extent(extent)
    if not isinstance(grid, int) or grid < 2:
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
    pix = _to_pixels(pts.numpy(), extent, size)
    vec = np.stack([s[:, 0] / (x1 - x0), -s[:, 1] / (y1 - y0)], 1) * (size - 1)  # data -> pixel directions
    longest = np.linalg.norm(vec, axis=1).max()
    spacing = (size - 1) / grid
    vec = vec * (0.9 * spacing / longest) if longest > 0 else vec
    img = background.copy().convert("RGB").resize((size, size)) if background is not None else Image.new(
        "RGB", (size, size), "white")
    _draw_segments(ImageDraw.Draw(img), _arrow_segments(pix, vec), color)
    return _title(img, title)


# ============================================================================================ charts
def _nice_ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        inside = [t for t in (10.0**k for k in range(a, b + 1)) if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if len(inside) <= 2:
            finer = sorted({m * 10.0**k for k in range(a, b + 1) for m in (1, 2, 5)})
            inside = [t for t in finer if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        return inside
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1.0
    for m in (1, 2, 5, 10):
        if span / (m * step) <= 6:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt_tick(v: float) -> str:
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:g}"


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, log_x: bool = True,
               log_y: bool = True, title: str = "", xlabel: str = "", ylabel: str = "",
               hlines: dict[str, float] | None = None, size: tuple[int, int] = (360, 260)) -> Image.Image:
    """A line chart: ``series`` maps a label to ``(xs, ys)`` (drawn as markers joined by lines, sorted by x);
    ``hlines`` maps a label to a horizontal dashed reference line (e.g. a noise floor). Log axes by default
    (non-positive values are left out of log axes). Legend on the right; the picture grows beyond ``size`` when the
    legend needs it."""
    if not series:
        raise ValueError("expected at least one series to draw, found none")
    clean: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label, (xs, ys) in series.items():
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"series {label!r}: expected xs and ys of the same length, found {x.shape} and {y.shape}")
        keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) if log_x else True) & ((y > 0) if log_y else True)
        order = np.argsort(x[keep])
        clean[label] = (x[keep][order], y[keep][order])
    refs = {k: float(v) for k, v in (hlines or {}).items() if math.isfinite(v) and (v > 0 or not log_y)}
    all_x = np.concatenate([v[0] for v in clean.values()])
    all_y = np.concatenate([v[1] for v in clean.values()] + [np.array(list(refs.values()))])
    if all_x.size == 0 or all_y.size == 0:
        raise ValueError("no finite (and, on log axes, positive) points to draw")
    fx = (np.log10 if log_x else (lambda a: a))
    fy = (np.log10 if log_y else (lambda a: a))
    xlo, xhi = float(all_x.min()), float(all_x.max())
    ylo, yhi = float(all_y.min()), float(all_y.max())
    if xlo == xhi:
        xlo, xhi = (xlo / 2, xhi * 2) if log_x else (xlo - 1, xhi + 1)
    if ylo == yhi:
        ylo, yhi = (ylo / 2, yhi * 2) if log_y else (ylo - 1, yhi + 1)
    pad_x = (fx(xhi) - fx(xlo)) * 0.05
    pad_y = (fy(yhi) - fy(ylo)) * 0.08
    ax_x0, ax_x1 = fx(xlo) - pad_x, fx(xhi) + pad_x
    ax_y0, ax_y1 = fy(ylo) - pad_y, fy(yhi) + pad_y
    legend_w = 10 + 6 * max(len(str(k)) for k in [*clean, *refs]) + 20
    left0, top = 52 + (14 if ylabel else 0), 22 if title else 8
    # the plot area keeps at least 160 x 120 pixels: long or many legend entries widen / heighten the picture
    width = max(size[0], left0 + 160 + legend_w)
    height = max(size[1], top + 120 + 34, top + 13 * (len(clean) + len(refs)) + 8)
    left, right, bottom = left0, width - legend_w, height - 34
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def to_px(x, y):
        u = left + (fx(x) - ax_x0) / (ax_x1 - ax_x0) * (right - left)
        v = bottom - (fy(y) - ax_y0) / (ax_y1 - ax_y0) * (bottom - top)
        return float(u), float(v)

    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    tx_lo, tx_hi = (10**ax_x0, 10**ax_x1) if log_x else (ax_x0, ax_x1)
    ty_lo, ty_hi = (10**ax_y0, 10**ax_y1) if log_y else (ax_y0, ax_y1)
    for t in _nice_ticks(tx_lo, tx_hi, log_x):
        u, _ = to_px(t, ylo)
        d.line([(u, bottom), (u, bottom + 3)], fill=(0, 0, 0))
        d.line([(u, top), (u, bottom)], fill=(235, 235, 235))
        d.text((u - 3 * len(_fmt_tick(t)), bottom + 5), _fmt_tick(t), fill="black")
    for t in _nice_ticks(ty_lo, ty_hi, log_y):
        _, v = to_px(xlo, t)
        d.line([(left - 3, v), (left, v)], fill=(0, 0, 0))
        d.line([(left, v), (right, v)], fill=(235, 235, 235))
        d.text((left - 5 - 6 * len(_fmt_tick(t)), v - 5), _fmt_tick(t), fill="black")
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if title:
        d.text((left, 4), title, fill="black")
    if xlabel:
        d.text(((left + right) / 2 - 3 * len(xlabel), height - 14), xlabel, fill="black")
    if ylabel:
        lab = Image.new("RGB", (6 * len(ylabel) + 4, 12), "white")
        ImageDraw.Draw(lab).text((2, 0), ylabel, fill="black")
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (0, max(top, int((top + bottom) / 2 - lab.height / 2))))
    ly = top + 2
    for label, val in refs.items():
        _, v = to_px(xlo, val)
        for u in range(left, right, 8):
            d.line([(u, v), (min(u + 4, right), v)], fill=(110, 110, 110))
        d.line([(right + 8, ly + 5), (right + 22, ly + 5)], fill=(110, 110, 110))
        d.text((right + 25, ly), str(label), fill="black")
        ly += 13
    for i, (label, (x, y)) in enumerate(clean.items()):
        col = PALETTE[i % len(PALETTE)]
        shape = (i // len(PALETTE)) % 3  # colours repeat after 10 series: the marker changes instead
        pts = [to_px(a, b) for a, b in zip(x, y)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for u, v in [*pts, (right + 15, ly + 5)]:
            if shape == 0:
                d.ellipse([u - 2, v - 2, u + 2, v + 2], fill=col)
            elif shape == 1:
                d.rectangle([u - 2, v - 2, u + 2, v + 2], fill=col)
            else:
                d.polygon([(u, v - 3), (u - 3, v + 2), (u + 3, v + 2)], fill=col)
        d.line([(right + 8, ly + 5), (right + 22, ly + 5)], fill=col, width=2)
        d.text((right + 25, ly), str(label), fill="black")
        ly += 13
    return img


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
                       size: tuple[int, int] = (600, 300)) -> Image.Image:
    """Error-vs-NFE curves from the sampler benchmark: one panel per value of the ``panel_by`` columns (those
    present), one curve per value of the ``series_by`` columns, x = the ``nfe`` column, y = ``metric``.

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
    images = []
    for pkey, ser in panels.items():
        data = {k: ([p[0] for p in v], [p[1] for p in v]) for k, v in sorted(ser.items())}
        hl = {"noise floor": float(np.mean(floors[pkey]))} if pkey in floors else None
        images.append(line_chart(data, log_x=True, log_y=log_y, title=f"{pkey}: {metric} vs NFE", xlabel="NFE",
                                 ylabel=metric, hlines=hl, size=size))
    cols = min(len(images), 2)
    rows_img = [side_by_side(images[i:i + cols]) for i in range(0, len(images), cols)]
    return _stack_vertical(rows_img)
