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
                   (RGB), optional ``random_flip``, scaled to [-1, 1]; ``labels``: class labels from the
                   first-level sub-folders (:func:`load_image_folder`)
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

import os

from ._options import DATASETS, TOY_DATASETS, check_options
from .arrays import load_digits, load_vectors
from .base import Dataset, check_data
from .batches import training_batches
from .hf_datasets import StreamingMemoryWarning, load_hf_dataset
from .image_folder import load_image_folder
from .image_sets import ImageDataset
from .order import SampleOrder, example_key
from .streaming import StreamingImageDataset
from .toy import toy_data
from .transforms import ImageTransform, images_to_tensor

__all__ = ["Dataset", "DATASETS", "TOY_DATASETS", "load_dataset", "toy_data", "load_digits", "load_image_folder",
           "load_hf_dataset", "load_vectors", "check_data", "ImageDataset", "StreamingImageDataset", "ImageTransform",
           "SampleOrder", "training_batches", "example_key", "images_to_tensor", "StreamingMemoryWarning"]


def load_dataset(name: str, **options) -> Dataset:
    """Build the dataset ``name`` (one of :data:`DATASETS`) with its options; unknown names and options are
    errors."""
    if not isinstance(name, str) or name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Available: {', '.join(DATASETS)}")
    opts = check_options(name, options)
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
