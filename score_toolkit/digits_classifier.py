"""A small CNN classifier of scikit-learn's 8x8 digits: the feature extractor of the digits Frechet distance.

The project trains it with ``scripts/train_digits_classifier.py`` and ships it in ``hub_cards/digits_classifier/``
(``config.json`` + ``diffusion_pytorch_model.safetensors``, loaded strictly: safetensors only, every weight
present with its shape). Its README states the held-out accuracy.

Held-out split (fixed, no random numbers): of scikit-learn's 1797 digits in their bundled order, the last 20%
(indices 1437..1796, 360 images) are held out; the first 1437 train the classifier. The bundled order groups
the images roughly by writer, so the held-out images are mostly by writers the classifier never saw.

Input: images (B, 1, 8, 8) in [-1, 1] (``score_toolkit.data.load_digits``' scaling, ``pixel / 8 - 1``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from .models.base import StrictLoadingMixin

__all__ = ["DigitsClassifier", "held_out_indices", "train_indices", "load_digits_classifier", "SHIPPED_FOLDER",
           "NUM_DIGITS", "HELD_OUT_FRACTION"]

#: images in scikit-learn's bundled digits
NUM_DIGITS = 1797
HELD_OUT_FRACTION = 0.2
#: the classifier the project ships (a checkout of the repository; not inside a wheel)
SHIPPED_FOLDER = Path(__file__).resolve().parent.parent / "hub_cards" / "digits_classifier"


def _split_point(n: int = NUM_DIGITS) -> int:
    return n - math.ceil(HELD_OUT_FRACTION * n)


def held_out_indices(n: int = NUM_DIGITS) -> torch.Tensor:
    """Indices of the held-out digits: the last 20% (``ceil(0.2 n)``) in scikit-learn's order (1437..1796)."""
    return torch.arange(_split_point(n), n)


def train_indices(n: int = NUM_DIGITS) -> torch.Tensor:
    """Indices the classifier is trained on: the first 80% (0..1436)."""
    return torch.arange(0, _split_point(n))


class DigitsClassifier(StrictLoadingMixin, ModelMixin, ConfigMixin):
    """CNN for 8x8 digits: two 3x3 convolutions (``channels``), a 2x2 max-pool, a ``feature_dim`` hidden layer
    (the penultimate features, see :meth:`features`) and a linear head to ``num_classes`` logits.

    ``forward(x)`` returns logits (B, num_classes) for images (B, 1, 8, 8) in [-1, 1]."""

    @register_to_config
    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 64, num_classes: int = 10,
                 image_size: int = 8):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        if min(c1, c2, feature_dim, num_classes) < 1 or image_size % 2:
            raise ValueError(f"expected positive sizes and an even image_size, found channels={channels}, "
                             f"feature_dim={feature_dim}, num_classes={num_classes}, image_size={image_size}")
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.hidden = nn.Linear(c2 * (image_size // 2) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x) -> None:
        size = self.config.image_size
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            found = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"DigitsClassifier expected a floating-point tensor, found {found}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, size, size):
            raise ValueError(f"DigitsClassifier expected images of shape (B, 1, {size}, {size}), found {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): the space of the digits Frechet distance."""
        self._check(x)
        x = x.to(self.head.weight.dtype)
        h = torch.relu(self.conv1(x))
        h = self.pool(torch.relu(self.conv2(h)))
        return torch.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(labels, confidences, features)`` of images, in eval mode, by batches: the argmax class, its softmax
        probability and the penultimate features."""
        was = self.training
        self.eval()
        try:
            out = [(self.head(f), f) for f in (self.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size))]
        finally:
            self.train(was)
        logits = torch.cat([o[0] for o in out])
        feats = torch.cat([o[1] for o in out])
        prob = torch.softmax(logits.double(), 1)
        conf, labels = prob.max(1)
        return labels, conf, feats


def load_digits_classifier(folder=None, *, device=None) -> DigitsClassifier:
    """Load the classifier (default: the one shipped in ``hub_cards/digits_classifier``), strictly, in eval mode."""
    folder = SHIPPED_FOLDER if folder is None else Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"expected the digits classifier at {folder}, found nothing there (it ships in the repository's "
            f"hub_cards/digits_classifier; train one with scripts/train_digits_classifier.py)"
        )
    model = DigitsClassifier.from_pretrained(str(folder))
    model.eval()
    return model.to(device) if device is not None else model
