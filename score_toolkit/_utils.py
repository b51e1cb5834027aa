"""Small shared helpers: per-sample broadcasting, input validation, seeded noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to a per-sample tensor ``v`` (B,) so it broadcasts
    against a tensor of rank ``ndim`` (B, ...). Works for points, signals and images alike."""
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"expected a tensor of rank <= {ndim}, found rank {v.ndim}")
    return v.reshape(*v.shape, *([1] * missing))


def check_tensor(x, name: str = "x", *, min_rank: int = 1) -> torch.Tensor:
    """Validate that ``x`` is a floating-point tensor of rank >= ``min_rank``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, found {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected {name} to be a floating-point tensor, found dtype {x.dtype}")
    if x.ndim < min_rank:
        raise ValueError(
            f"expected {name} to have a batch dimension (rank >= {min_rank}), found shape {tuple(x.shape)}"
        )
    return x


def check_finite(x: torch.Tensor, name: str, owner: str = "") -> torch.Tensor:
    """Raise a ValueError naming ``name`` (and ``owner``, the function or class it was given to) when ``x`` holds NaN
    or infinite values: once per call at a public boundary, never per step."""
    if not bool(torch.isfinite(x).all()):
        rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
        bad = (~torch.isfinite(rows)).any(1)
        where = (f"in {int(bad.sum())} of {rows.shape[0]} samples (first: sample {int(bad.nonzero()[0, 0])})"
                 if x.ndim > 1 else f"in {int(bad.sum())} of {rows.shape[0]} values")
        raise ValueError(f"{owner + ': ' if owner else ''}expected finite {name}, found NaN or infinite values {where}")
    return x


def check_state(x: torch.Tensor, name: str, owner: str) -> torch.Tensor:
    """A sampler's initial state: (B, d, ...) with B >= 1 samples of at least one value, all finite."""
    if x.ndim < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{owner}: expected {name} with at least one sample (B >= 1) of at least one value, of shape "
                         f"(B, d, ...) (scalars are (B, 1)), found shape {tuple(x.shape)}")
    return check_finite(x, name, owner)


def resolve_torch_dtype(value, name: str = "torch_dtype"):
    """``value`` as a floating-point ``torch.dtype``: a ``torch.dtype``, or a name torch knows ("bfloat16",
    "float16", "half", "torch.float32", ...); ``None`` stays ``None``. Anything else is a ``TypeError`` (diffusers
    only warns about a string and loads float32)."""
    if value is None:
        return None
    dtype = getattr(torch, value.strip().removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point torch.dtype or its name (e.g. torch.bfloat16, "
                        f"'bfloat16', 'float16', 'float32'), found {value!r}")
    return dtype


def resolve_device(value, name: str = "device") -> torch.device | None:
    """``value`` (a ``torch.device``, a string such as "cpu" or "cuda:0", or ``None``) as a device this machine
    has, else a ``ValueError`` (torch itself fails with an ``AssertionError`` when CUDA is missing)."""
    if value is None:
        return None
    try:
        device = torch.device(value)
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: expected a device available on this machine (e.g. 'cpu'"
                         f"{', cuda' if torch.cuda.is_available() else ''}), found {value!r} ({err})") from err
    return device


def as_time(t, batch: int, *, like: torch.Tensor, name: str = "t") -> torch.Tensor:
    """Turn ``t`` (float, 0-d tensor or (batch,) tensor) into a float tensor of shape (batch,)
    on ``like``'s device and dtype."""
    if isinstance(t, (int, float)):
        return torch.full((batch,), float(t), device=like.device, dtype=like.dtype)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a float or a tensor of shape ({batch},), found {type(t).__name__}")
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"expected {name} of shape ({batch},) or a scalar, found shape {tuple(t.shape)}")
    return t.to(device=like.device, dtype=like.dtype)


def check_positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"expected {name} to be a positive number, found {value!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"expected {name} > 0 (finite), found {value!r}")
    return v


def check_generator(generator, batch: int | None = None, *, name: str = "generator") -> GeneratorLike:
    """Validate ``generator``: ``None``, a ``torch.Generator``, or a list/tuple of them (one per sample: ``batch``
    of them when ``batch`` is given). Anything else (an int seed, a list of ints) is a ``TypeError``."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"expected {name} to be a torch.Generator or a list of torch.Generator (one per sample), "
                            f"found a {type(generator).__name__} holding {sorted(set(bad))} (seed one with "
                            f"torch.Generator().manual_seed(seed))")
        if batch is not None and len(generator) != batch:
            raise ValueError(f"expected one generator per sample ({batch}), found a list of {len(generator)}")
        return generator
    raise TypeError(f"expected {name} to be a torch.Generator, a list of them (one per sample) or None, found "
                    f"{type(generator).__name__} {generator!r} (seed one with torch.Generator().manual_seed(seed))")


def _draw(fn, shape: Sequence[int], generator: GeneratorLike, device, dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    check_generator(generator)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"expected one generator per sample ({shape[0]}), found a list of {len(generator)}"
            )
        rows = [fn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        out = torch.stack(rows) if rows else torch.empty(shape, dtype=dtype)
        return out.to(device)
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randn(
    shape: Sequence[int],
    *,
    generator: GeneratorLike = None,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """Standard normal noise of ``shape``. ``generator`` may be one ``torch.Generator`` or a list
    with one generator per sample (then row ``i`` is drawn from ``generator[i]`` only, so a sample's
    noise does not depend on the batch it is in). Noise is drawn on the generator's device and
    moved to ``device``."""
    return _draw(torch.randn, shape, generator, device, dtype)


def randn_like(x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """:func:`randn` of ``x``'s shape, dtype and device, the same numbers, for a ``generator`` already checked. With
    no generator or one on ``x``'s device it draws with ``torch.randn_like`` (contiguous, as :func:`randn`), a shorter
    path than :func:`randn`'s general one, which the samplers would pay once or twice per step."""
    if generator is None or (isinstance(generator, torch.Generator) and generator.device == x.device):
        return torch.randn_like(x, memory_format=torch.contiguous_format, generator=generator)
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rand(
    shape: Sequence[int],
    *,
    generator: GeneratorLike = None,
    device=None,
    dtype=None,
) -> torch.Tensor:
    """Uniform [0, 1) noise with the same generator rules as :func:`randn`."""
    return _draw(torch.rand, shape, generator, device, dtype)


def sample_seed(seed: int, index: int, stream: int | None = None) -> int:
    """The 64-bit seed of sample ``index`` of a run seeded by ``seed``: numpy's ``SeedSequence`` with entropy
    ``seed`` and spawn key ``(index,)`` (a hash of both), so distinct (seed, index) pairs get unrelated
    streams (an affine map such as ``seed * K + index`` makes seed 1's sample 0 equal seed 0's sample K).

    ``stream`` (an int >= 0) names an independent stream of the same sample (spawn key ``(index, stream)``):
    two kinds of randomness of one sample, e.g. dequantization noise and Hutchinson probes, must never share
    a stream even when they are given the same seed."""
    import numpy as np

    checks = (("seed", seed), ("index", index)) + ((("stream", stream),) if stream is not None else ())
    for name, value in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"expected {name} to be an int >= 0, found {value!r}")
    key = (int(index),) if stream is None else (int(index), int(stream))
    state = np.random.SeedSequence(int(seed), spawn_key=key).generate_state(2, np.uint32)
    return int(state[0]) | (int(state[1]) << 32)


def per_sample_generators(seed: int, indices: Sequence[int] | torch.Tensor, device="cpu", *,
                          stream: int | None = None) -> list[torch.Generator]:
    """One generator per sample, seeded by :func:`sample_seed` of ``seed``, the sample's global index and
    ``stream``, so that a sample's randomness is the same whatever batch or process it is drawn in."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(seed, int(i), stream))
        gens.append(g)
    return gens


def flat_dim(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n
