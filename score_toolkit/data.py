"""Training data: toy 2-D sets, scikit-learn's bundled 8x8 digits, image folders, Hugging Face ``datasets``
(map-style or streamed), a file of vectors.

Small sets are a :class:`Dataset`: a float32 tensor ``data`` of shape (N, ...) (points (N, d), images
(N, C, H, W)), validated (non-empty, finite, rank >= 2) before any training starts. Image sets are read
lazily: an :class:`ImageDataset` (an image folder, a ``datasets.Dataset``) reads and transforms the images
of a batch when the batch is needed, a :class:`StreamingImageDataset` reads a stream and never holds the
data. :func:`training_batches` feeds a training loop from any of them (a ``DataLoader`` with workers for
image sets), in an order that does not depend on the number of processes.

=================  ==============================================================================
``ring``           the 8-mode ring of Gaussians of :func:`score_toolkit.analytic.ring_mixture`
                   (radius 4, std 0.2; options ``num_modes``, ``radius``, ``std``); its exact score is
                   known (``Dataset.mixture``)
``checkerboard``   uniform on the dark squares of a 4x4 board on [-4, 4]^2 (FFJORD's toy)
``swiss_roll``     2-D swiss roll, scaled to about [-4, 4]^2, Gaussian jitter ``noise`` (0.1)
``moons``          two interleaving half circles, scaled to about [-4, 4]^2, jitter ``noise`` (0.05)
``circles``        two concentric circles of radii 4 and 2 (``factor`` 0.5), jitter ``noise`` (0.05)
``digits``         scikit-learn's 1797 bundled handwritten digits (8x8, 17 grey levels), as (N, 1, 8, 8)
                   scaled to [-1, 1]; needs ``scikit-learn`` (extra ``score-toolkit[data]``)
``image_folder``   every PNG/JPEG/BMP/WebP under ``path`` (recursively, sorted), read per batch: resized
                   (shorter side to ``image_size``) and cropped to a square, ``channels`` 1 (grey) or 3
                   (RGB), optional ``random_flip``, scaled to [-1, 1] (:func:`load_image_folder`)
``hf``             a Hugging Face ``datasets`` split: a Hub id from the local cache, ``imagefolder`` with
                   ``data_dir``, parquet / arrow files, optionally ``streaming``; an image column and an
                   optional label column by name; the same transforms (:func:`load_hf_dataset`; extra
                   ``score-toolkit[datasets]``)
``vectors``        a ``.npy`` (loaded with ``allow_pickle=False``) or ``.safetensors`` file (option
                   ``key`` names the tensor when it holds several) of shape (N, ...)
=================  ==============================================================================

Toy sets are drawn with a ``torch.Generator`` seeded by ``seed``: the same seed gives the same data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Dataset", "DATASETS", "TOY_DATASETS", "load_dataset", "toy_data", "load_digits", "load_image_folder",
           "load_hf_dataset", "load_vectors", "check_data", "ImageDataset", "StreamingImageDataset", "ImageTransform",
           "SampleOrder", "training_batches", "example_key", "images_to_tensor"]

TOY_DATASETS = ("ring", "checkerboard", "swiss_roll", "moons", "circles")
DATASETS = (*TOY_DATASETS, "digits", "image_folder", "hf", "vectors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# options each dataset accepts besides ``name`` (with defaults)
_OPTIONS: dict[str, dict[str, Any]] = {
    "ring": {"num_samples": 10000, "seed": 0, "num_modes": 8, "radius": 4.0, "std": 0.2},
    "checkerboard": {"num_samples": 10000, "seed": 0},
    "swiss_roll": {"num_samples": 10000, "seed": 0, "noise": 0.1},
    "moons": {"num_samples": 10000, "seed": 0, "noise": 0.05},
    "circles": {"num_samples": 10000, "seed": 0, "noise": 0.05, "factor": 0.5},
    "digits": {},
    "image_folder": {"path": None, "image_size": 32, "channels": 3, "center_crop": True, "random_flip": False,
                     "interpolation": "bicubic", "num_workers": 0},
    "hf": {"path": None, "split": "train", "data_dir": None, "data_files": None, "config_name": None,
           "streaming": False, "image_column": "image", "label_column": None, "num_classes": None,
           "image_size": None, "channels": None, "center_crop": True, "random_flip": False,
           "interpolation": "bilinear", "shuffle_buffer": 1000, "num_workers": 0, "cache_dir": None},
    "vectors": {"path": None, "key": None},
}


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


def _check_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"dataset {name!r}: unknown option(s) {unknown}; its options are {sorted(allowed) or 'none'}")
    return {**allowed, **options}


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {what} to be a positive int, found {value!r}")
    return value


def _nonneg_float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ValueError(f"expected {what} to be a finite number >= 0, found {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------ toy sets
def toy_data(name: str, num_samples: int = 10000, seed: int = 0, **options) -> Dataset:
    """One of the 2-D toy sets (:data:`TOY_DATASETS`), ``num_samples`` points, deterministic in ``seed``."""
    if name not in TOY_DATASETS:
        raise ValueError(f"expected a toy dataset in {TOY_DATASETS}, found {name!r}")
    opts = _check_options(name, {"num_samples": num_samples, "seed": seed, **options})
    n = _positive_int(opts["num_samples"], f"dataset {name!r} option num_samples")
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        raise ValueError(f"expected dataset option seed to be an int, found {opts['seed']!r}")
    g = torch.Generator().manual_seed(opts["seed"])
    mixture = None
    f64 = torch.float64
    if name == "ring":
        from .analytic import ring_mixture

        num_modes = _positive_int(opts["num_modes"], "dataset 'ring' option num_modes")
        radius = _nonneg_float(opts["radius"], "dataset 'ring' option radius")
        std = _nonneg_float(opts["std"], "dataset 'ring' option std")
        if std == 0:
            raise ValueError("expected dataset 'ring' option std > 0, found 0")
        mixture = ring_mixture(num_modes, radius, std)
        x = mixture.sample(n, generator=g)
        desc = f"ring of {num_modes} Gaussians (radius {radius:g}, std {std:g}), {n} points"
    elif name == "checkerboard":
        x1 = torch.rand(n, generator=g, dtype=f64) * 4 - 2
        x2 = torch.rand(n, generator=g, dtype=f64) - torch.randint(0, 2, (n,), generator=g).to(f64) * 2
        x2 = x2 + torch.floor(x1) % 2
        x = torch.stack([x1, x2], 1) * 2
        desc = f"checkerboard on [-4, 4]^2, {n} points"
    elif name == "swiss_roll":
        noise = _nonneg_float(opts["noise"], "dataset 'swiss_roll' option noise")
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=f64))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3.5
        x = x + noise * torch.randn(n, 2, generator=g, dtype=f64)
        desc = f"swiss roll (noise {noise:g}), {n} points"
    elif name == "moons":
        noise = _nonneg_float(opts["noise"], "dataset 'moons' option noise")
        upper = torch.rand(n, generator=g) < 0.5
        a = math.pi * torch.rand(n, generator=g, dtype=f64)
        pts = torch.where(
            upper[:, None],
            torch.stack([torch.cos(a), torch.sin(a)], 1),
            torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1),
        )
        x = (pts - torch.tensor([0.5, 0.25], dtype=f64)) * 2.5 + noise * 2.5 * torch.randn(n, 2, generator=g, dtype=f64)
        desc = f"two moons (noise {noise:g}), {n} points"
    else:
        noise = _nonneg_float(opts["noise"], "dataset 'circles' option noise")
        factor = _nonneg_float(opts["factor"], "dataset 'circles' option factor")
        if not 0 < factor < 1:
            raise ValueError(f"expected dataset 'circles' option factor in (0, 1), found {factor!r}")
        inner = torch.rand(n, generator=g) < 0.5
        a = 2 * math.pi * torch.rand(n, generator=g, dtype=f64)
        r = torch.where(inner, torch.tensor(factor, dtype=f64), torch.tensor(1.0, dtype=f64))
        x = 4 * (r[:, None] * torch.stack([torch.cos(a), torch.sin(a)], 1) + noise * torch.randn(n, 2, generator=g, dtype=f64))
        desc = f"concentric circles (radii 4 and {4 * factor:g}, noise {noise:g}), {n} points"
    data = check_data(x, f"dataset {name!r}")
    return Dataset(data, name, desc, opts, mixture=mixture, extent=(-6.0, 6.0, -6.0, 6.0))


# ------------------------------------------------------------------------------------------ digits
def load_digits() -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, grey levels 0..16; UCI "Optical
    Recognition of Handwritten Digits" test set), as (N, 1, 8, 8) float32 in [-1, 1]. Offline."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(
            "dataset 'digits' needs scikit-learn (pip install 'score-toolkit[data]' or pip install scikit-learn)"
        ) from err
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    x = torch.from_numpy(images / 8.0 - 1.0)[:, None]
    data = check_data(x, "dataset 'digits'")
    return Dataset(data, "digits", "scikit-learn's 1797 handwritten digits (8x8, grey, scaled to [-1, 1])", {},
                   hub_id=None, labels=torch.from_numpy(bunch.target).long())


# ------------------------------------------------------------------------------------------ files
def load_vectors(path, key: str | None = None) -> Dataset:
    """A data array (N, ...) from a ``.npy`` file (no pickles: ``allow_pickle=False``) or a
    ``.safetensors`` file (``key`` names the tensor when the file holds several)."""
    if path is None:
        raise ValueError("dataset 'vectors' needs the option path (a .npy or .safetensors file)")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset 'vectors': expected a file at {p}, found nothing there")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise ValueError(f"dataset 'vectors': option key applies to .safetensors files only, found key={key!r}")
        try:
            x = np.load(p, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"dataset 'vectors': cannot read {p} as a numeric .npy array (pickled objects are "
                             f"refused): {err}") from err
        except (OSError, EOFError) as err:  # EOFError: an empty or truncated file
            size = p.stat().st_size
            raise ValueError(f"dataset 'vectors': expected a numeric .npy array in {p}, found "
                             f"{'an empty file (0 bytes)' if size == 0 else f'{size} bytes that are not one'}: "
                             f"{type(err).__name__}: {err}") from err
    elif suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                keys = list(f.keys())
                if key is None:
                    if len(keys) != 1:
                        raise ValueError(f"dataset 'vectors': {p} holds tensors {keys}: name one with the option key")
                    key = keys[0]
                elif key not in keys:
                    raise ValueError(f"dataset 'vectors': expected a tensor {key!r} in {p}, found {keys}")
                x = f.get_tensor(key)
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"dataset 'vectors': cannot read {p} as safetensors: {err}") from err
    else:
        raise ValueError(f"dataset 'vectors': expected a .npy or .safetensors file, found {p.name}")
    data = check_data(x, f"dataset 'vectors' ({p})")
    return Dataset(data, "vectors", f"{data.shape[0]} samples of shape {tuple(data.shape[1:])} from {p.name}",
                   {"path": str(p), "key": key})


# ------------------------------------------------------------------------------------------ images, read lazily
_M64 = (1 << 64) - 1
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(i) & _M64 for i in ints]).generate_state(1, np.uint64)[0] >> 1)


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def example_key(seed: int, slot: int) -> int:
    """The random bits of the augmentation of the example at ``slot`` of the training stream (flip, crop):
    a pure function of ``(seed, slot)``, so augmentations do not depend on processes, workers or batches."""
    return _splitmix64(_splitmix64(int(seed) & _M64) ^ (int(slot) & _M64))


class SampleOrder:
    """The global order of a map-style training set: an endless concatenation of permutations of
    ``range(n)``, permutation ``e`` seeded by ``(seed, e)``. Slot ``s`` of the stream is a pure function
    of ``(seed, s)``: the examples of a training step do not depend on the number of processes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(_mix(self.seed, 0xDA7A, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        epoch, offset = divmod(start, self.n)
        if offset + count <= self.n:  # the common case: inside one permutation, a slice of it
            return self._perm(epoch)[offset:offset + count]
        slots = torch.arange(start, start + count)
        epochs = slots // self.n
        out = torch.empty(count, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            mask = epochs == e
            out[mask] = self._perm(e)[slots[mask] % self.n]
        return out


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


def _open_image(value, where: str):
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


def _channels_of(image) -> int:
    return 1 if image.mode in _GREY_MODES else 3


def _check_label(label, num_classes: int | None, where: str, column: str) -> int:
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"{where}: expected an integer class label in column {column!r}, found {label!r}")
    label = int(label)
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"0 .. {num_classes - 1} (num_classes = {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{where}: label {label} in column {column!r} is out of range: expected {bound}")
    return label


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
            out.append((_open_image(path, "dataset 'image_folder'"), None, f"image {path}"))
        return out


class _HFReader:
    """Rows of a map-style ``datasets.Dataset`` read on demand (the Arrow table is memory-mapped)."""

    def __init__(self, ds, image_column: str, label_column: str | None, where: str):
        self.ds, self.image_column, self.label_column, self.where = ds, image_column, label_column, where

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, indices: Sequence[int]) -> list[tuple[Any, Any, str]]:
        idx = [int(i) for i in indices]
        rows = self.ds[idx]
        images = rows[self.image_column]
        labels = rows[self.label_column] if self.label_column else [None] * len(idx)
        out = []
        for i, value, label in zip(idx, images, labels):
            where = f"{self.where} row {i} (column {self.image_column!r})"
            if isinstance(value, Mapping) and value.get("path"):
                where += f", file {value['path']}"
            out.append((_open_image(value, where), label, where))
        return out


class _ImageSet:
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
                labels.append(_check_label(label, self.num_classes, where, self.label_column))
        return images_to_tensor(arrays), (torch.tensor(labels, dtype=torch.long) if self.label_column else None)


class ImageDataset(_ImageSet):
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


class StreamingImageDataset(_ImageSet):
    """An image training set read as a stream (a streaming ``datasets.IterableDataset``): nothing but a
    shuffle buffer of encoded images is held in memory, whatever the size of the data. It has no ``len()``.

    Order: the stream of epoch ``e`` is the source shuffled by ``datasets`` with seed ``seed + e`` (shard
    order and a buffer of ``shuffle_buffer`` examples); training takes consecutive examples of that stream
    across epochs. Every process (and every DataLoader worker) reads the whole stream and decodes only the
    examples of its own part of each global batch, so the examples of a step -- and their augmentations --
    do not depend on the number of processes or workers; reading (not decoding) costs each process the whole
    stream."""

    streaming = True

    def __init__(self, stream, transform: ImageTransform, *, image_column: str, shuffle_buffer: int, where: str,
                 **kwargs):
        self.stream, self.image_column, self.shuffle_buffer, self.where = stream, image_column, shuffle_buffer, where
        first = next(_rows(self.stream.take(1)), None)
        if first is None:
            raise ValueError(f"{where}: the stream holds no examples")
        super().__init__(transform, _open_image(first[image_column], f"{where} example 0"), **kwargs)

    def _item(self, row: Mapping, position: int):
        where = f"{self.where} example {position} of the stream (column {self.image_column!r})"
        value = row[self.image_column]
        if isinstance(value, Mapping) and value.get("path"):
            where += f", file {value['path']}"
        return _open_image(value, where), (row[self.label_column] if self.label_column else None), where

    def shuffled(self, seed: int):
        return self.stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer)

    def head(self, n: int) -> torch.Tensor:
        rows = list(_rows(self.stream.take(n)))
        return self._examples([self._item(r, i) for i, r in enumerate(rows)], None)[0]

    def draw(self, n: int, seed: int, skip: int = 0) -> torch.Tensor:
        rows = list(_rows(self.shuffled(seed).skip(skip).take(n)))
        return self._examples([self._item(r, skip + i) for i, r in enumerate(rows)], None)[0]

    @property
    def data(self):
        raise TypeError(f"{self.where} is streamed: it has no .data tensor (read it with training_batches or head)")


# ------------------------------------------------------------------------------------------ training batches
def _check_batch_layout(batch_size: int, accumulation: int, num_processes: int) -> tuple[int, int]:
    per_step = num_processes * accumulation
    if batch_size % per_step:
        raise ValueError(f"the global batch {batch_size} must divide by num_processes x gradient_accumulation_steps "
                         f"= {num_processes} x {accumulation}")
    return batch_size // accumulation, batch_size // per_step


class _MapBatches:
    """torch Dataset over (stream slot, data index) pairs: DataLoader workers read and transform images."""

    def __init__(self, source: ImageDataset, seed: int):
        self.source, self.seed = source, seed

    def __getitems__(self, items):
        slots, indices = zip(*items)
        return self.source.examples(list(indices), [example_key(self.seed, s) for s in slots])

    def __getitem__(self, item):
        return self.__getitems__([item])


class _StepSampler:
    """Batch sampler: for every step and micro-step, the (slot, index) pairs of this process."""

    def __init__(self, order: SampleOrder, batch_size, accumulation, rank, local, start_step, stop_step):
        self.order, self.batch_size, self.accumulation = order, batch_size, accumulation
        self.rank, self.local, self.start_step, self.stop_step = rank, local, start_step, stop_step

    def __iter__(self):
        micro_batch = self.batch_size // self.accumulation
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            step += 1
            for micro in range(self.accumulation):
                first = (step - 1) * self.batch_size + micro * micro_batch + self.rank * self.local
                idx = self.order.indices(first, self.local).tolist()
                yield list(zip(range(first, first + self.local), idx))


def _collate(batch):
    return batch


def _stream_batches_iter(source: StreamingImageDataset, seed, micro_batch, local, rank, start_micro, stop_micro,
                         worker: int, num_workers: int):
    ds = source.shuffled(seed)
    lo, hi = rank * local, (rank + 1) * local
    start_slot = start_micro * micro_batch
    slot, epoch = 0, 0
    pending: list = []
    keys: list[int] = []
    while True:
        ds.set_epoch(epoch)
        seen = 0
        for row in _rows(ds):
            s = slot
            slot += 1
            seen += 1
            if s < start_slot:
                continue
            mb, pos = divmod(s, micro_batch)
            if stop_micro is not None and mb >= stop_micro:
                return
            if (mb - start_micro) % num_workers != worker or not lo <= pos < hi:
                continue
            pending.append(source._item(row, s))
            keys.append(example_key(seed, s))
            if pos == hi - 1:
                yield source._examples(pending, keys)
                pending, keys = [], []
        if seen == 0:
            raise ValueError(f"{source.where}: the stream holds no examples")
        epoch += 1


def _rows(ds, chunk: int = 256):
    """The rows of a ``datasets.IterableDataset`` in order. ``IterableDataset.iter`` (unlike ``__iter__``)
    never splits shards between DataLoader workers: each worker sees the whole stream."""
    for batch in ds.iter(batch_size=chunk):
        columns = list(batch)
        yield from (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))


def _make_stream_dataset(source, seed, micro_batch, local, rank, start_micro, stop_micro):
    class _StreamBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
            return _stream_batches_iter(source, seed, micro_batch, local, rank, start_micro, stop_micro, worker, num)

    return _StreamBatches()


def training_batches(source, *, seed: int, batch_size: int, gradient_accumulation_steps: int = 1, rank: int = 0,
                     num_processes: int = 1, start_step: int = 0, stop_step: int | None = None,
                     num_workers: int | None = None, pin_memory: bool = False):
    """This process's micro-batches for training steps ``start_step + 1, ..., stop_step`` (endless without
    ``stop_step``): an iterator of ``(x, labels)`` CPU tensors, ``gradient_accumulation_steps`` per step,
    each of ``batch_size / (num_processes * gradient_accumulation_steps)`` examples (``labels`` is None
    without a label column).

    ``batch_size`` is the global batch of a step. Step ``k`` takes slots ``(k - 1) * batch_size ...`` of the
    training stream, split into micro-batches and then between processes in rank order, so the examples of a
    step and their augmentations (:func:`example_key`) are the same for any number of processes and workers:
    map-style sets follow :class:`SampleOrder`; streamed sets their shuffled stream (see
    :class:`StreamingImageDataset`). In-memory sets (:class:`Dataset`) are sliced directly; image sets are
    read by a ``torch.utils.data.DataLoader`` with ``num_workers`` worker processes (default: the source's
    ``num_workers`` option)."""
    micro_batch, local = _check_batch_layout(batch_size, gradient_accumulation_steps, num_processes)
    workers = source.num_workers if num_workers is None else num_workers
    if isinstance(source, Dataset):
        return _tensor_batches(source, seed, batch_size, gradient_accumulation_steps, rank, local, start_step, stop_step)
    from torch.utils.data import DataLoader

    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    if isinstance(source, StreamingImageDataset):
        stop_micro = None if stop_step is None else stop_step * gradient_accumulation_steps
        ds = _make_stream_dataset(source, seed, micro_batch, local, rank, start_step * gradient_accumulation_steps,
                                  stop_micro)
        return iter(DataLoader(ds, batch_size=None, **common))
    if isinstance(source, ImageDataset):
        sampler = _StepSampler(SampleOrder(len(source), seed), batch_size, gradient_accumulation_steps, rank, local,
                               start_step, stop_step)
        return iter(DataLoader(_MapBatches(source, seed), batch_sampler=sampler, collate_fn=_collate, **common))
    raise TypeError(f"expected a Dataset, ImageDataset or StreamingImageDataset, found {type(source).__name__}")


def _tensor_batches(source: Dataset, seed, batch_size, accumulation, rank, local, start_step, stop_step):
    order = SampleOrder(len(source), seed)
    micro_batch = batch_size // accumulation
    step = start_step
    while stop_step is None or step < stop_step:
        step += 1
        for micro in range(accumulation):
            first = (step - 1) * batch_size + micro * micro_batch + rank * local
            idx = order.indices(first, local)
            yield source.data[idx], (source.labels[idx] if source.labels is not None else None)


# ------------------------------------------------------------------------------------------ image sources
def _bool_option(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected {what} to be true or false, found {value!r}")
    return value


def _transform(where: str, image_size, channels, center_crop, random_flip, interpolation) -> ImageTransform:
    if image_size is not None:
        image_size = _positive_int(image_size, f"{where} option image_size")
    if channels not in (None, 1, 3):
        raise ValueError(f"{where}: expected channels 1 (grey), 3 (RGB) or null (as the images are), found {channels!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}: expected interpolation in {INTERPOLATIONS}, found {interpolation!r}")
    return ImageTransform(image_size, channels or 3, _bool_option(center_crop, f"{where} option center_crop"),
                          _bool_option(random_flip, f"{where} option random_flip"), interpolation)


def _num_workers(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected {where} option num_workers to be an int >= 0, found {value!r}")
    return value


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
    transform = _transform(where, image_size, channels, center_crop, random_flip, interpolation)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{where}: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    reader = _FolderReader(files)
    if channels is None:
        transform = dataclasses.replace(transform, channels=_channels_of(reader.read([0])[0][0]))
    size = transform.image_size
    mode = "L" if transform.channels == 1 else "RGB"
    return ImageDataset(
        reader, transform, name="image_folder",
        description=f"{len(files)} images from {folder.name} ({f'{size}x{size}' if size else 'as stored'}, {mode})",
        options={"path": str(folder), "image_size": size, "channels": transform.channels, "center_crop": center_crop,
                 "random_flip": random_flip, "interpolation": interpolation},
        hub_id=None, label_column=None, num_classes=None, num_workers=_num_workers(num_workers, where))


_DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


def load_hf_dataset(path=None, *, dataset=None, split: str = "train", data_dir=None, data_files=None,
                    config_name: str | None = None, streaming: bool = False, image_column: str = "image",
                    label_column: str | None = None, num_classes: int | None = None, image_size: int | None = None,
                    channels: int | None = None, center_crop: bool = True, random_flip: bool = False,
                    interpolation: str = "bilinear", shuffle_buffer: int = 1000, num_workers: int = 0,
                    cache_dir=None) -> ImageDataset | StreamingImageDataset:
    """An image training set through Hugging Face ``datasets`` (extra ``score-toolkit[datasets]``).

    ``path`` is what ``datasets.load_dataset`` takes: a builder (``"imagefolder"`` with ``data_dir``,
    ``"parquet"`` / ``"arrow"`` with ``data_files``), a local folder or a ``.parquet`` / ``.arrow`` file, or
    a Hub id, read from the local cache when ``HF_HUB_OFFLINE=1`` (this toolkit never downloads data itself);
    or pass a ready ``datasets.Dataset`` / ``IterableDataset`` as ``dataset``. ``streaming`` reads the data as
    a stream (never all in memory). ``image_column`` names the images; ``label_column`` optional integer
    class labels, checked against ``num_classes`` (default: the number of names of a ``ClassLabel``
    column). Transforms as :class:`ImageTransform`; without ``image_size`` all images must have one size."""
    where = "dataset 'hf'"
    transform = _transform(where, image_size, channels, center_crop, random_flip, interpolation)
    workers = _num_workers(num_workers, where)
    _bool_option(streaming, f"{where} option streaming")
    shuffle_buffer = _positive_int(shuffle_buffer, f"{where} option shuffle_buffer")
    if num_classes is not None:
        num_classes = _positive_int(num_classes, f"{where} option num_classes")
    try:
        import datasets as hf
    except ImportError as err:
        raise ImportError(f"{where} needs the datasets package: pip install 'score-toolkit[datasets]'") from err
    if dataset is None:
        if path is None:
            raise ValueError(f"{where} needs the option path (a Hub id, a builder such as imagefolder or parquet, "
                             f"or a local folder or data file)")
        path = os.fspath(path)
        kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
        suffix = Path(path).suffix.lower()
        if os.path.isfile(path) and suffix in _DATA_FILE_BUILDERS and data_files is None:
            kwargs["data_files"] = [path]
            builder = _DATA_FILE_BUILDERS[suffix]
        else:
            builder = path
            if data_files is not None:
                kwargs["data_files"] = data_files
        if data_dir is not None:
            if not Path(data_dir).is_dir():
                raise FileNotFoundError(f"{where}: expected a folder at data_dir {data_dir}, found nothing there")
            kwargs["data_dir"] = os.fspath(data_dir)
        if config_name is not None:
            kwargs["name"] = config_name
        if cache_dir is not None:
            kwargs["cache_dir"] = os.fspath(cache_dir)
        try:
            dataset = hf.load_dataset(builder, **kwargs)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            offline = "" if os.environ.get("HF_HUB_OFFLINE") else " (set HF_HUB_OFFLINE=1 to read Hub ids from the local cache only)"
            raise ValueError(f"{where}: cannot load {path!r} (split {split!r}) with datasets: {err}{offline}") from err
        label = f"{path!r} split {split!r}"
    else:
        label = f"{type(dataset).__name__}"
        path = getattr(dataset.info, "dataset_name", None) or "dataset"
    if not isinstance(dataset, (hf.Dataset, hf.IterableDataset)):
        raise TypeError(f"{where}: expected a datasets.Dataset or IterableDataset (one split), found "
                        f"{type(dataset).__name__}")
    is_stream = isinstance(dataset, hf.IterableDataset)
    features = dataset.features
    if features is None and is_stream:
        first = next(iter(dataset.take(1)), None)
        columns = list(first) if first is not None else []
    else:
        columns = list(features)
    for option, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{where} {label}: expected a column {column!r} (data option {option}), found the "
                             f"columns {columns}")
    if features is not None and isinstance(features.get(image_column), hf.Image):
        dataset = dataset.cast_column(image_column, hf.Image(decode=False))
    if label_column is not None:
        feat = features.get(label_column) if features is not None else None
        if isinstance(feat, hf.ClassLabel):
            if num_classes is not None and num_classes != feat.num_classes:
                raise ValueError(f"{where} {label}: num_classes = {num_classes} but column {label_column!r} is a "
                                 f"ClassLabel with {feat.num_classes} classes")
            num_classes = feat.num_classes
    keep = [image_column] + ([label_column] if label_column else [])
    dataset = dataset.select_columns(keep)
    where_rows = f"{where} {label}"
    if channels is None:
        if is_stream:
            first = next(iter(dataset.take(1)), None)
            if first is None:
                raise ValueError(f"{where_rows}: the stream holds no examples")
            value = first[image_column]
        else:
            if len(dataset) == 0:
                raise ValueError(f"{where_rows}: the split holds no examples")
            value = dataset[0][image_column]
        transform = dataclasses.replace(transform, channels=_channels_of(_open_image(value, f"{where_rows} row 0")))
    size = transform.image_size
    mode = "L" if transform.channels == 1 else "RGB"
    hub_id = path if isinstance(path, str) and path.count("/") == 1 and not os.path.exists(path) else None
    options = {"path": path if isinstance(path, str) else None, "split": split, "streaming": is_stream,
               "image_column": image_column, "label_column": label_column, "image_size": size,
               "channels": transform.channels, "random_flip": random_flip}
    common = {"name": "hf", "options": options, "hub_id": hub_id, "label_column": label_column,
              "num_classes": num_classes, "num_workers": workers}
    if is_stream:
        return StreamingImageDataset(
            dataset, transform, image_column=image_column, shuffle_buffer=shuffle_buffer, where=where_rows,
            description=f"{path} ({split}, streamed; {f'{size}x{size}' if size else 'as stored'}, {mode})", **common)
    if len(dataset) == 0:
        raise ValueError(f"{where_rows}: the split holds no examples")
    return ImageDataset(_HFReader(dataset, image_column, label_column, where_rows), transform,
                        description=f"{len(dataset)} images of {path} ({split}; {f'{size}x{size}' if size else 'as stored'}, {mode})",
                        **common)


def load_dataset(name: str, **options) -> Dataset:
    """Build the dataset ``name`` (one of :data:`DATASETS`) with its options; unknown names and options are
    errors."""
    if not isinstance(name, str) or name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Available: {', '.join(DATASETS)}")
    opts = _check_options(name, options)
    if name in TOY_DATASETS:
        return toy_data(name, **opts)
    if name == "digits":
        return load_digits()
    if name == "image_folder":
        path = opts.pop("path")
        return load_image_folder(os.fspath(path) if path is not None else None, **opts)
    if name == "hf":
        return load_hf_dataset(**opts)
    return load_vectors(opts["path"], opts["key"])
