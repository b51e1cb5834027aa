"""Training data: toy 2-D sets, scikit-learn's bundled 8x8 digits, a folder of images, a file of vectors.

Every loader returns a :class:`Dataset`: a float32 tensor ``data`` of shape (N, ...) (points (N, d),
images (N, C, H, W)), validated (non-empty, finite, rank >= 2) before any training starts.

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
``image_folder``   every PNG/JPEG/BMP/WebP under ``path`` (recursively, sorted), centre-cropped to a
                   square, resized to ``image_size``, ``channels`` 1 (grey) or 3 (RGB), scaled to [-1, 1]
``vectors``        a ``.npy`` (loaded with ``allow_pickle=False``) or ``.safetensors`` file (option
                   ``key`` names the tensor when it holds several) of shape (N, ...)
=================  ==============================================================================

Toy sets are drawn with a ``torch.Generator`` seeded by ``seed``: the same seed gives the same data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Dataset", "DATASETS", "TOY_DATASETS", "load_dataset", "toy_data", "load_digits", "load_image_folder",
           "load_vectors", "check_data"]

TOY_DATASETS = ("ring", "checkerboard", "swiss_roll", "moons", "circles")
DATASETS = (*TOY_DATASETS, "digits", "image_folder", "vectors")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# options each dataset accepts besides ``name`` (with defaults)
_OPTIONS: dict[str, dict[str, Any]] = {
    "ring": {"num_samples": 10000, "seed": 0, "num_modes": 8, "radius": 4.0, "std": 0.2},
    "checkerboard": {"num_samples": 10000, "seed": 0},
    "swiss_roll": {"num_samples": 10000, "seed": 0, "noise": 0.1},
    "moons": {"num_samples": 10000, "seed": 0, "noise": 0.05},
    "circles": {"num_samples": 10000, "seed": 0, "noise": 0.05, "factor": 0.5},
    "digits": {},
    "image_folder": {"path": None, "image_size": 32, "channels": 3},
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
    """

    data: torch.Tensor
    name: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    mixture: Any = None
    extent: tuple[float, float, float, float] | None = None
    hub_id: str | None = None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (d,) for points, (C, H, W) for images."""
        return tuple(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.ndim == 4


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
    images = sk_load_digits().images.astype(np.float32)  # (1797, 8, 8), values 0..16
    x = torch.from_numpy(images / 8.0 - 1.0)[:, None]
    data = check_data(x, "dataset 'digits'")
    return Dataset(data, "digits", "scikit-learn's 1797 handwritten digits (8x8, grey, scaled to [-1, 1])", {},
                   hub_id=None)


# ------------------------------------------------------------------------------------------ files
def load_image_folder(path, image_size: int = 32, channels: int = 3) -> Dataset:
    """Every image under ``path`` (PNG, JPEG, BMP, WebP; recursive, sorted by path), centre-cropped to a
    square, resized to ``image_size`` x ``image_size`` (bicubic), converted to ``channels`` (1 = grey,
    3 = RGB) and scaled to [-1, 1]: a tensor (N, channels, image_size, image_size)."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise ValueError("dataset 'image_folder' needs the option path (a folder of images)")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset 'image_folder': expected a folder at {folder}, found nothing there"
                                if not folder.exists() else f"dataset 'image_folder': {folder} is not a folder")
    size = _positive_int(image_size, "dataset 'image_folder' option image_size")
    if channels not in (1, 3):
        raise ValueError(f"dataset 'image_folder': expected channels 1 (grey) or 3 (RGB), found {channels!r}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"dataset 'image_folder': no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), size, size, channels), dtype=np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"dataset 'image_folder': cannot read the image {f}: {err}") from err
        out[i] = arr.reshape(size, size, channels)
    x = torch.from_numpy(out).permute(0, 3, 1, 2) / 127.5 - 1.0
    data = check_data(x, f"dataset 'image_folder' ({folder})")
    return Dataset(data, "image_folder", f"{len(files)} images from {folder.name} ({size}x{size}, {mode})",
                   {"path": str(folder), "image_size": size, "channels": channels})


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
        return load_image_folder(os.fspath(opts["path"]) if opts["path"] is not None else None,
                                 opts["image_size"], opts["channels"])
    return load_vectors(opts["path"], opts["key"])
