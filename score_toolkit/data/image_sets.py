"""Map-style image sets read lazily (:class:`ImageDataset`): images are read and transformed only when a batch
needs them, and what every lazy image set shares (shape, transform, labels)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .transforms import ImageTransform, images_to_tensor


def check_label(label, num_classes: int | None, where: str, column: str) -> int:
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"{where}: expected an integer class label in column {column!r}, found {label!r}")
    label = int(label)
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"0 .. {num_classes - 1} (num_classes = {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{where}: label {label} in column {column!r} is out of range: expected {bound}")
    return label


class LazyImageSet:
    """What the lazy image sets share: shape, transform, labels, batches as tensors."""

    is_image = True
    mixture = None
    extent = None

    def __init__(self, transform: ImageTransform, first_image, *, name: str, description: str,
                 options: dict[str, Any], hub_id: str | None, label_column: str | None, num_classes: int | None,
                 num_workers: int):
        if transform.image_size is None:
            transform = dataclasses.replace(transform, expected_size=tuple(first_image.size))
            w, h = first_image.size
        else:
            w = h = transform.image_size
        self.transform = transform
        self.sample_shape = (transform.channels, h, w)
        self.name, self.description, self.options, self.hub_id = name, description, options, hub_id
        self.label_column, self.num_classes = label_column, num_classes
        self.num_workers = num_workers

    def _examples(self, items, keys: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        arrays, labels = [], []
        for j, (image, label, where) in enumerate(items):
            arrays.append(self.transform(image, 0 if keys is None else keys[j], where))
            if self.label_column is not None:
                labels.append(check_label(label, self.num_classes, where, self.label_column))
        return images_to_tensor(arrays), (torch.tensor(labels, dtype=torch.long) if self.label_column else None)


class ImageDataset(LazyImageSet):
    """A map-style image training set whose images are read and transformed only when a batch needs them
    (an image folder, or a ``datasets.Dataset``). ``len()`` is the number of images; ``sample_shape`` is
    (C, H, W). :meth:`examples` reads given indices; :func:`training_batches` feeds a training loop through a
    ``DataLoader`` (with ``num_workers`` worker processes)."""

    streaming = False

    def __init__(self, reader, transform: ImageTransform, **kwargs):
        self.reader = reader
        first = reader.read([0])[0][0]
        super().__init__(transform, first, **kwargs)

    def __len__(self) -> int:
        return len(self.reader)

    def examples(self, indices: Sequence[int], keys: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images ``indices`` as a float32 tensor (B, C, H, W) in [-1, 1] and their labels (or None);
        ``keys`` (one per image) drive the random flip and crop (none without keys)."""
        return self._examples(self.reader.read(indices), keys)

    def head(self, n: int) -> torch.Tensor:
        return self.examples(range(min(n, len(self))))[0]

    def draw(self, n: int, seed: int, skip: int = 0) -> torch.Tensor:
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.examples(perm[skip:skip + n].tolist())[0]

    @property
    def data(self) -> torch.Tensor:
        """Every image as one tensor (N, C, H, W), read now (no augmentation): for small sets and tools that
        need all samples at once; training reads batches instead (:func:`training_batches`)."""
        return torch.cat([self.examples(range(i, min(i + 256, len(self))))[0] for i in range(0, len(self), 256)])
