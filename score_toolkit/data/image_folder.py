"""Image folders (:func:`load_image_folder`): every image file under a folder, read lazily."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._options import bool_option, num_workers_option
from .image_sets import ImageDataset
from .transforms import channels_of, make_transform, open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


#: the name errors give the class labels of an image folder (its first-level sub-folders)
FOLDER_LABELS = "sub-folder"


class _FolderReader:
    """Image files (and their class labels, or None) read on demand (picklable, for DataLoader workers)."""

    def __init__(self, files: list[str], labels: list[int] | None = None):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: Sequence[int]) -> list[tuple[Any, Any, str]]:
        out = []
        for i in indices:
            path = self.files[int(i)]
            label = self.labels[int(i)] if self.labels is not None else None
            out.append((open_image(path, "dataset 'image_folder'"), label, f"image {path}"))
        return out


def _folder_labels(folder: Path, files: list[str], where: str) -> tuple[list[int], list[str]]:
    """Class labels from the first-level sub-folders (classes sorted by name, as torchvision's ImageFolder and
    ``datasets``' imagefolder do)."""
    tops = []
    for f in files:
        rel = Path(f).relative_to(folder)
        if len(rel.parts) < 2:
            raise ValueError(f"{where}: option labels takes class labels from the sub-folders of {folder}, but the "
                             f"image {f} is not in a sub-folder")
        tops.append(rel.parts[0])
    names = sorted(set(tops))
    index = {name: i for i, name in enumerate(names)}
    return [index[t] for t in tops], names


def load_image_folder(path, image_size: int | None = 32, channels: int | None = 3, *, center_crop: bool = True,
                      random_flip: bool = False, interpolation: str = "bicubic", num_workers: int = 0,
                      labels: bool = False) -> ImageDataset:
    """Every image under ``path`` (PNG, JPEG, BMP, WebP; recursive, sorted by path), read lazily: files are
    opened only when a batch needs them. Each is converted to ``channels`` (1 grey, 3 RGB, None: as the
    first image), resized (shorter side to ``image_size``, ``interpolation``) and cropped to a square
    (:class:`ImageTransform`), then scaled to [-1, 1]. An unreadable file is an error naming its path (when
    a batch reads it). With ``labels``, each image's class label is the index of its first-level sub-folder
    (``path/<class>/...``; classes sorted by name, recorded as the option ``class_names``) and every image must
    be in one."""
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
    bool_option(labels, f"{where} option labels")
    label_ids, class_names = _folder_labels(folder, files, where) if labels else (None, None)
    reader = _FolderReader(files, label_ids)
    if channels is None:
        transform = dataclasses.replace(transform, channels=channels_of(reader.read([0])[0][0]))
    size = transform.image_size
    mode = "L" if transform.channels == 1 else "RGB"
    return ImageDataset(
        reader, transform, name="image_folder",
        description=f"{len(files)} images from {folder.name} ({f'{size}x{size}' if size else 'as stored'}, {mode})",
        options={"path": str(folder), "image_size": size, "channels": transform.channels, "center_crop": center_crop,
                 "random_flip": random_flip, "interpolation": interpolation, "labels": labels,
                 **({"class_names": class_names} if labels else {})},
        hub_id=None, label_column=FOLDER_LABELS if labels else None,
        num_classes=len(class_names) if labels else None, num_workers=num_workers_option(num_workers, where))
