"""Dependency-light pictures (Pillow only, which diffusers already needs): 2-D densities, sample
histograms and scatters, image grids, side-by-side panels, written atomically as PNG."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["colorize", "density_panel", "histogram_panel", "scatter_panel", "image_grid", "side_by_side", "save_png"]

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
    """Write a PNG atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
