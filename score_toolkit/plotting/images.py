"""Image grids (:func:`image_grid`) and side-by-side pictures (:func:`side_by_side`), with Pillow only: sampling
and exporting image models never need matplotlib."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


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
