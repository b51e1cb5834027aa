"""The 2-D toy sets (:data:`TOY_DATASETS`), drawn with a ``torch.Generator`` seeded by ``seed``."""

from __future__ import annotations

import math

import torch

from ._options import TOY_DATASETS, check_options, nonneg_float, positive_int
from .base import Dataset, check_data


def toy_data(name: str, num_samples: int = 10000, seed: int = 0, **options) -> Dataset:
    """One of the 2-D toy sets (:data:`TOY_DATASETS`), ``num_samples`` points, deterministic in ``seed``."""
    if name not in TOY_DATASETS:
        raise ValueError(f"expected a toy dataset in {TOY_DATASETS}, found {name!r}")
    opts = check_options(name, {"num_samples": num_samples, "seed": seed, **options})
    n = positive_int(opts["num_samples"], f"dataset {name!r} option num_samples")
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        raise ValueError(f"expected dataset option seed to be an int, found {opts['seed']!r}")
    g = torch.Generator().manual_seed(opts["seed"])
    mixture = None
    f64 = torch.float64
    if name == "ring":
        from ..analytic import ring_mixture

        num_modes = positive_int(opts["num_modes"], "dataset 'ring' option num_modes")
        radius = nonneg_float(opts["radius"], "dataset 'ring' option radius")
        std = nonneg_float(opts["std"], "dataset 'ring' option std")
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
        noise = nonneg_float(opts["noise"], "dataset 'swiss_roll' option noise")
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=f64))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 3.5
        x = x + noise * torch.randn(n, 2, generator=g, dtype=f64)
        desc = f"swiss roll (noise {noise:g}), {n} points"
    elif name == "moons":
        noise = nonneg_float(opts["noise"], "dataset 'moons' option noise")
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
        noise = nonneg_float(opts["noise"], "dataset 'circles' option noise")
        factor = nonneg_float(opts["factor"], "dataset 'circles' option factor")
        if not 0 < factor < 1:
            raise ValueError(f"expected dataset 'circles' option factor in (0, 1), found {factor!r}")
        inner = torch.rand(n, generator=g) < 0.5
        a = 2 * math.pi * torch.rand(n, generator=g, dtype=f64)
        r = torch.where(inner, torch.tensor(factor, dtype=f64), torch.tensor(1.0, dtype=f64))
        x = 4 * (r[:, None] * torch.stack([torch.cos(a), torch.sin(a)], 1) + noise * torch.randn(n, 2, generator=g, dtype=f64))
        desc = f"concentric circles (radii 4 and {4 * factor:g}, noise {noise:g}), {n} points"
    data = check_data(x, f"dataset {name!r}")
    return Dataset(data, name, desc, opts, mixture=mixture, extent=(-6.0, 6.0, -6.0, 6.0))
