"""Images from what a source holds (:func:`open_image`), the per-example transform of diffusers' training
scripts in PIL (:class:`ImageTransform`), and the scaling of a batch to a [-1, 1] tensor
(:func:`images_to_tensor`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._options import bool_option, positive_int

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class ImageTransform:
    """The per-example image transform of diffusers' training scripts, in PIL (no torchvision): convert to
    ``channels`` (1 grey, 3 RGB); with ``image_size``, resize the shorter side to it (``interpolation``) and
    crop a square (centred, or at a random position when ``center_crop`` is false); ``random_flip`` mirrors
    half the images left-right. Random choices come from an integer key (:func:`example_key`). Without
    ``image_size`` every image must have the size ``expected_size`` (width, height) of the first one."""

    image_size: int | None = None
    channels: int = 3
    center_crop: bool = True
    random_flip: bool = False
    interpolation: str = "bilinear"
    expected_size: tuple[int, int] | None = None

    def __call__(self, image, key: int, where: str) -> np.ndarray:
        """``image`` (PIL) -> uint8 array (H, W, channels)."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        im = image if image.mode == mode else image.convert(mode)
        w, h = im.size
        s = self.image_size
        if s is None:
            if self.expected_size is not None and (w, h) != tuple(self.expected_size):
                ew, eh = self.expected_size
                raise ValueError(
                    f"{where} is {w}x{h} pixels but the first image is {ew}x{eh}: images of mixed sizes need a "
                    f"resize (set the data option image_size)"
                )
        else:
            if min(w, h) != s:
                scale = s / min(w, h)
                w, h = max(s, round(w * scale)), max(s, round(h * scale))
                im = im.resize((w, h), getattr(Image.Resampling, self.interpolation.upper()))
            if (w, h) != (s, s):
                if self.center_crop:
                    left, top = (w - s) // 2, (h - s) // 2
                else:
                    left, top = (key >> 1) % (w - s + 1), (key >> 21) % (h - s + 1)
                im = im.crop((left, top, left + s, top + s))
        arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.random_flip and key & 1:
            arr = arr[:, ::-1]
        return arr


def images_to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 arrays (H, W, C) -> float32 tensor (B, C, H, W) scaled from [0, 255] to [-1, 1]."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def open_image(value, where: str):
    """A PIL image from what a data source holds: a PIL image, encoded bytes, a path, or the
    ``{"bytes", "path"}`` dict of a ``datasets`` Image column read with ``decode=False``."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    path = None
    data = None
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = value
    elif isinstance(value, (str, os.PathLike)):
        path = value
    elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return Image.fromarray(value)
    else:
        raise TypeError(f"{where}: expected an image (PIL image, encoded bytes or a file path), found "
                        f"{type(value).__name__}")
    if data is None and path is None:
        raise ValueError(f"{where}: the image is missing (no bytes and no path)")
    try:
        im = Image.open(io.BytesIO(data) if data is not None else path)
        im.load()
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
        name = f" {path}" if path else ""
        raise ValueError(f"{where}: cannot read the image{name}: {err}") from err
    return im


def channels_of(image) -> int:
    return 1 if image.mode in _GREY_MODES else 3


def make_transform(where: str, image_size, channels, center_crop, random_flip, interpolation) -> ImageTransform:
    if image_size is not None:
        image_size = positive_int(image_size, f"{where} option image_size")
    if channels not in (None, 1, 3):
        raise ValueError(f"{where}: expected channels 1 (grey), 3 (RGB) or null (as the images are), found {channels!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}: expected interpolation in {INTERPOLATIONS}, found {interpolation!r}")
    return ImageTransform(image_size, channels or 3, bool_option(center_crop, f"{where} option center_crop"),
                          bool_option(random_flip, f"{where} option random_flip"), interpolation)
