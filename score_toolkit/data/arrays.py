"""In-memory sets read whole from arrays: scikit-learn's bundled 8x8 digits and a file of vectors
(``.npy`` / ``.safetensors``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import Dataset, check_data


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
