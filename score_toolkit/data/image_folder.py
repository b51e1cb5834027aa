"""Image folders (:func:`load_image_folder`): every image file under a folder, read lazily."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._options import num_workers_option
from .image_sets import ImageDataset
from .transforms import channels_of, make_transform, open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class _FolderReader:
    """Image files read on demand (picklable, for DataLoader workers)."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: Sequence[int]) -> list[tuple[Any, Any, str]]:
        out = []
        for i in indices:
            path = self.files[int(i)]
            out.append((open_image(path, "dataset 'image_folder'"), None, f"image {path}"))
        return out


def load_image_folder(path, image_size: int | None = 32, channels: int | None = 3, *, center_crop: bool = True,
                      random_flip: bool = False, interpolation: str = "bicubic", num_workers: int = 0) -> ImageDataset:
    """Every image under ``path`` (PNG, JPEG, BMP, WebP; recursive, sorted by path), read lazily: files are
    opened only when a batch needs them. Each is converted to ``channels`` (1 grey, 3 RGB, None: as the
    first image), resized (shorter side to ``image_size``, ``interpolation``) and cropped to a square
    (:class:`ImageTransform`), then scaled to [-1, 1]. An unreadable file is an error naming its path (when
    a batch reads it)."""
    where = "dataset 'image_folder'"
    if path is None:
        raise ValueError(f"{where} needs the option path (a folder of images)")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: expected a folder at {folder}, found nothing there"
                                if not folder.exists() else f"{where}: {folder} is not a folder")
    transform = make_transform(where, image_size, channels, center_crop, random_flip, interpolation)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    reader = _FolderReader(files)
    if channels is None:
        transform = dataclasses.replace(transform, channels=channels_of(reader.read([0])[0][0]))
    size = transform.image_size
    mode = "L" if transform.channels == 1 else "RGB"
    return ImageDataset(
        reader, transform, name="image_folder",
        description=f"{len(files)} images from {folder.name} ({f'{size}x{size}' if size else 'as stored'}, {mode})",
        options={"path": str(folder), "image_size": size, "channels": transform.channels, "center_crop": center_crop,
                 "random_flip": random_flip, "interpolation": interpolation},
        hub_id=None, label_column=None, num_classes=None, num_workers=num_workers_option(num_workers, where))
