"""The in-memory training set (:class:`Dataset`) and the validation of a data tensor (:func:`check_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Dataset:
    """A validated training set.

    Attributes:
        data: float32 tensor (N, ...).
        name: the dataset's name (one of :data:`DATASETS`).
        description: one line for model cards.
        options: the options it was built with.
        mixture: the exact :class:`~score_toolkit.analytic.GaussianMixture` when known (``ring``), else None.
        extent: (xmin, xmax, ymin, ymax) for pictures of 2-D data, else None.
        hub_id: the Hub data-set id for model cards, when there is one.
        labels: class labels (N,) (long) when the set has them (``digits``), else None; class-conditional
            training reads them (docs/conditioning.md).
    """

    data: torch.Tensor
    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    mixture: Any = None
    extent: tuple[float, float, float, float] | None = None
    hub_id: str | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (d,) for points, (C, H, W) for images."""
        return tuple(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.ndim == 4

    # the interface shared with the lazy image sets (ImageDataset, StreamingImageDataset)
    streaming = False
    num_classes = None
    num_workers = 0

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` samples (fewer if the set is smaller)."""
        return self.data[:n]

    def draw(self, n: int, seed: int, skip: int = 0) -> torch.Tensor:
        """Samples ``skip .. skip + n`` of a permutation seeded by ``seed`` (disjoint draws share a seed)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.data[perm[skip:skip + n]]


def check_data(x, source: str) -> torch.Tensor:
    """Validate a data tensor (N, ...): a real array, N >= 1, rank >= 2, finite. Returns float32."""
    if isinstance(x, np.ndarray):
        if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{source}: expected a numeric array, found dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{source}: expected an array or tensor, found {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{source}: expected real numbers, found dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{source}: expected shape (N, ...) with one row per sample (rank >= 2), found shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{source}: expected at least one sample with at least one feature, found shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:, 0]
        raise ValueError(
            f"{source}: expected finite values, found NaN or infinity in {bad.numel()} of {x.shape[0]} samples "
            f"(first at row {int(bad[0])})"
        )
    return x.contiguous()
