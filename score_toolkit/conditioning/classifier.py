"""Noise-conditional classifiers for classifier guidance: the training objective and a small vector network.

Classifier guidance needs ``log p_t(c | x_t)`` at every noise level (Song et al. 2021, Sec. 5 / App. I.1; Dhariwal &
Nichol 2021): a classifier trained on noised data with the cross-entropy

    L = E_{t ~ U[t_min, 1]} E_{x_0, c} E_z [ -log softmax(f(alpha_t x_0 + sigma_t z, t))_c ],

whose minimiser is the exact noise-conditional classifier (the Bayes posterior of the class given x_t at every t;
for a class-conditional Gaussian mixture: :class:`score_toolkit.analytic.MixtureClassifier`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._utils import GeneratorLike, append_dims, rand, randn

__all__ = ["noise_conditional_classifier_loss", "NoisyClassifierMLP"]


def noise_conditional_classifier_loss(classifier, x: torch.Tensor, labels: torch.Tensor, process, *,
                                      t_min: float | None = None, generator: GeneratorLike = None,
                                      reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``classifier(x_t, t) -> logits (B, C)`` on ``x_t = alpha_t x + sigma_t z``, ``t ~ U[t_min, 1]``
    (one t and one z per sample, drawn from ``generator``)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"expected reduction 'mean' or 'none', found {reduction!r}")
    labels = torch.as_tensor(labels, device=x.device).long()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"expected one label per sample ({x.shape[0]},), found {tuple(labels.shape)}")
    lo = process.t_min if t_min is None else float(t_min)
    t = lo + (1 - lo) * rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
    z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    alpha, sigma = process.marginal(t)
    xt = append_dims(alpha, x.ndim) * x + append_dims(sigma, x.ndim) * z
    logits = classifier(xt, t)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"expected the classifier to return logits of shape ({x.shape[0]}, C), found {tuple(logits.shape)}")
    if int(labels.max()) >= logits.shape[1] or int(labels.min()) < 0:
        raise ValueError(f"labels outside the classifier's classes 0..{logits.shape[1] - 1}")
    loss = nn.functional.cross_entropy(logits, labels, reduction="none")
    return loss.mean() if reduction == "mean" else loss


class NoisyClassifierMLP(nn.Module):
    """A small noise-conditional classifier for vectors: an MLP on ``[x, sin/cos features of log(sigma/alpha)]``
    (the noise level as the time input, so it works for any process). ``forward(x, t)`` -> logits (B, num_classes);
    needs the ``process`` to map t to the noise level."""

    def __init__(self, dim: int, num_classes: int, process, hidden_dim: int = 64, num_layers: int = 2,
                 num_frequencies: int = 8):
        super().__init__()
        self.process, self.num_classes = process, int(num_classes)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(16), num_frequencies)) / 4)
        layers, width = [], dim + 2 * num_frequencies
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.process.marginal(t.to(torch.float64))
        lam = torch.log(sigma / alpha).to(x.dtype)[:, None] * self.freqs.to(x.dtype)
        h = torch.cat([x.reshape(x.shape[0], -1), torch.sin(lam), torch.cos(lam)], 1)
        return self.net(h)
