"""Linear measurement operators ``A`` for inverse problems: ``y = A x + sigma_y n``.

Every operator maps a batch ``x`` of shape (B, *sample_shape) to measurements (B, *measurement_shape) and
offers what the conditioning methods need:

* ``A(x)`` / :meth:`LinearOperator.forward`, :meth:`~LinearOperator.adjoint` (``A^T``),
  :meth:`~LinearOperator.pinv` (``A^+``, the Moore-Penrose pseudo-inverse),
* :meth:`~LinearOperator.gram_solve` ``(a A A^T + b I)^{-1} v`` in measurement space (PiGDM's and the exact
  replacement's covariance solve), cheap for every operator here because ``A A^T`` is diagonal in a known basis,
* :meth:`~LinearOperator.matrix` (the dense ``(m, n)`` matrix for a given sample shape, for small problems and
  the exact posterior of :mod:`score_toolkit.analytic`) and :meth:`~LinearOperator.measurements` (the observation
  as the vector that matrix produces).

Operators: :class:`Mask` (inpainting), :class:`Downsample` (average pooling: super-resolution),
:class:`Greyscale` (colourisation), :class:`GaussianBlur` (circular blur, diagonal in Fourier space) and
:class:`MatrixOperator` (any matrix on the flattened sample). Shapes are checked on every call with messages
that say what was expected and what was found.

Why one module of this length: it is one interface and its five implementations, each a few exact formulas
(forward, adjoint, pseudo-inverse, Gram solve, singular values) that must agree with the base class's dense
views; the methods of docs/conditioning.md read them side by side.
"""

from __future__ import annotations

import math

import torch

from .._utils import check_finite, check_tensor

__all__ = [
    "LinearOperator",
    "Mask",
    "Downsample",
    "Greyscale",
    "GaussianBlur",
    "MatrixOperator",
    "make_operator",
    "replace_observed",
]


class LinearOperator:
    """Base class: subclasses implement ``_forward``, ``_adjoint``, ``_pinv``, ``_gram_solve`` and
    ``measurement_shape`` (per-sample shape of ``A x`` for a per-sample shape of ``x``; a ``ValueError`` for a
    shape the operator cannot act on)."""

    name = "operator"

    # ------------------------------------------------------------------ shapes
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if ``x`` (B, ...) has a per-sample shape the operator cannot act on (as
        :meth:`measurement_shape` says)."""
        check_tensor(x, "x", min_rank=2)
        self.measurement_shape(tuple(x.shape[1:]))

    def measurement_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_observation(self, y: torch.Tensor, sample_shape: tuple[int, ...], batch: int | None = None) -> torch.Tensor:
        """Check that ``y`` is a measurement of samples shaped ``sample_shape``: either one observation
        (``measurement_shape``) shared by the batch or one per sample (B, *measurement_shape). Returns y batched
        (1 or B leading)."""
        check_tensor(y, "observation", min_rank=1)
        expected = tuple(self.measurement_shape(tuple(sample_shape)))
        if tuple(y.shape) == expected:
            return y[None]
        if tuple(y.shape[1:]) == expected and (batch is None or y.shape[0] in (1, batch)):
            return y
        batch_txt = "B" if batch is None else str(batch)
        raise ValueError(
            f"{self.name}: expected an observation of shape {expected} or ({batch_txt}, {', '.join(map(str, expected))}) "
            f"for samples of shape {tuple(sample_shape)}, found {tuple(y.shape)}"
        )

    # ------------------------------------------------------------------ the maps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for x of shape (B, ...)."""
        self.check_input(x)
        return self._forward(x)

    __call__ = forward

    def adjoint(self, y: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """``A^T y`` for measurements (B, *measurement_shape), returned shaped (B, *sample_shape)."""
        y = self.check_observation(y, sample_shape)
        return self._adjoint(y, tuple(sample_shape))

    def pinv(self, y: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """``A^+ y`` (Moore-Penrose pseudo-inverse), shaped (B, *sample_shape)."""
        y = self.check_observation(y, sample_shape)
        return self._pinv(y, tuple(sample_shape))

    def gram_solve(self, v: torch.Tensor, a, b, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """``(a A A^T + b I)^{-1} v`` in measurement space, with ``a, b >= 0`` floats or per-sample (B,) tensors
        (``a A A^T + b I`` must be invertible on the measurements)."""
        v = self.check_observation(v, sample_shape)
        return self._gram_solve(v, a, b, tuple(sample_shape))

    # ------------------------------------------------------------------ dense views (small problems)
    def matrix(self, sample_shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
        """The dense (m, n) matrix of the operator on samples of ``sample_shape`` (n = their size)."""
        n = math.prod(sample_shape)
        eye = torch.eye(n, dtype=dtype).reshape(n, *sample_shape)
        return self._forward(eye).reshape(n, -1).T.contiguous()

    def measurements(self, y: torch.Tensor, sample_shape: tuple[int, ...]) -> torch.Tensor:
        """The observation(s) as vectors (B, m) matching :meth:`matrix`."""
        y = self.check_observation(y, sample_shape)
        return y.reshape(y.shape[0], -1)

    def singular_values(self, sample_shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
        """Singular values of :meth:`matrix` (computed densely unless an operator knows them)."""
        return torch.linalg.svdvals(self.matrix(sample_shape, dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _per_sample(v, like: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor, broadcastable against ``like`` (B, ...)."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


class Mask(LinearOperator):
    """Inpainting: observe the entries where ``mask`` is 1 (``A x = mask * x``).

    ``mask`` (0/1 or bool) has the per-sample shape of x, or a shape that broadcasts to it (e.g. (1, H, W) for all
    channels of (C, H, W) images). Measurements are zero-filled and shaped like x: entries outside the mask are
    ignored (the measurement space is the observed entries; :meth:`matrix` selects them). ``A A^T = I`` there,
    ``A^+ = A^T``."""

    name = "mask"

    def __init__(self, mask: torch.Tensor):
        mask = torch.as_tensor(mask)
        if mask.ndim == 0:
            raise ValueError("expected a mask with at least one dimension (the per-sample shape), found a scalar")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("expected a mask of zeros and ones (or bool)")
            mask = mask != 0
        self.mask = mask

    def _mask(self, sample_shape, like: torch.Tensor) -> torch.Tensor:
        sample_shape = tuple(sample_shape)
        try:
            ok = torch.broadcast_shapes(tuple(self.mask.shape), sample_shape) == sample_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask: expected a mask of the per-sample shape {sample_shape} (or broadcastable to it), "
                f"found {tuple(self.mask.shape)}"
            )
        return self.mask.to(device=like.device, dtype=like.dtype)

    def measurement_shape(self, sample_shape):
        self._mask(tuple(sample_shape), torch.zeros(()))
        return tuple(sample_shape)

    def _forward(self, x):
        return x * self._mask(x.shape[1:], x)

    def _adjoint(self, y, sample_shape):
        return y * self._mask(sample_shape, y)

    _pinv = _adjoint

    def _gram_solve(self, v, a, b, sample_shape):
        return v * self._mask(sample_shape, v) / (_per_sample(a, v) + _per_sample(b, v))

    def observed(self, sample_shape) -> torch.Tensor:
        """Flat indices of the observed entries of a sample."""
        m = self.mask.expand(tuple(sample_shape)) if self.mask.shape != tuple(sample_shape) else self.mask
        return torch.nonzero(m.reshape(-1)).reshape(-1)

    def matrix(self, sample_shape, dtype=torch.float64):
        self._mask(sample_shape, torch.zeros((), dtype=dtype))
        n = math.prod(sample_shape)
        return torch.eye(n, dtype=dtype)[self.observed(sample_shape)]

    def measurements(self, y, sample_shape):
        y = self.check_observation(y, sample_shape)
        return y.reshape(y.shape[0], -1)[:, self.observed(sample_shape)]

    def singular_values(self, sample_shape, dtype=torch.float64):
        return torch.ones(len(self.observed(sample_shape)), dtype=dtype)

    def __repr__(self):
        return f"Mask(shape={tuple(self.mask.shape)}, observed={int(self.mask.sum())})"


def _spatial_dims(ndim: int) -> int:
    """Spatial dims of a sample of rank ``ndim`` (excluding batch): (d,) -> 1, (C, L) -> 1, (C, H, W) -> 2."""
    return 1 if ndim <= 2 else ndim - 1


class Downsample(LinearOperator):
    """Super-resolution: average pooling by ``factor`` over the spatial dimensions (the last two of (C, H, W)
    images, the last one of (C, L) signals and (d,) vectors). ``A A^T = I / factor^k`` (k spatial dims),
    ``A^+`` = nearest-neighbour upsampling."""

    name = "downsample"

    def __init__(self, factor: int):
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"expected an integer downsampling factor >= 1, found {factor!r}")
        self.factor = factor

    def _check_shape(self, sample_shape):
        k = _spatial_dims(len(sample_shape))
        bad = [s for s in sample_shape[-k:] if s % self.factor]
        if bad:
            raise ValueError(
                f"downsample: expected spatial sizes {tuple(sample_shape[-k:])} of samples shaped {tuple(sample_shape)} "
                f"to be multiples of the factor {self.factor}"
            )
        return k

    def measurement_shape(self, sample_shape):
        k = self._check_shape(tuple(sample_shape))
        return tuple(sample_shape[:-k]) + tuple(s // self.factor for s in sample_shape[-k:])

    def _blocks(self, x, k):
        lead = x.shape[: x.ndim - k]
        shape = list(lead)
        for s in x.shape[x.ndim - k:]:
            shape += [s // self.factor, self.factor]
        return x.reshape(shape), len(lead)

    def _forward(self, x):
        k = _spatial_dims(x.ndim - 1)
        xb, nl = self._blocks(x, k)
        return xb.mean(dim=tuple(nl + 2 * i + 1 for i in range(k)))

    def _upsample(self, y, k):
        for i in range(k):
            y = y.repeat_interleave(self.factor, dim=y.ndim - k + i)
        return y

    def _adjoint(self, y, sample_shape):
        k = self._check_shape(sample_shape)
        return self._upsample(y, k) / self.factor**k

    def _pinv(self, y, sample_shape):
        return self._upsample(y, self._check_shape(sample_shape))

    def _gram_solve(self, v, a, b, sample_shape):
        k = self._check_shape(sample_shape)
        return v / (_per_sample(a, v) / self.factor**k + _per_sample(b, v))

    def singular_values(self, sample_shape, dtype=torch.float64):
        m = math.prod(self.measurement_shape(sample_shape))
        return torch.full((m,), self.factor ** (-_spatial_dims(len(sample_shape)) / 2), dtype=dtype)

    def __repr__(self):
        return f"Downsample(factor={self.factor})"


class Greyscale(LinearOperator):
    """Colourisation: the weighted channel sum ``y = sum_c w_c x_c`` of (C, ...) samples (channel dim 1 of the
    batch), one channel out. Default weights: the channel mean. ``A A^T = ||w||^2 I``."""

    name = "greyscale"

    def __init__(self, weights=(1 / 3, 1 / 3, 1 / 3)):
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.ndim != 1 or w.numel() < 1 or not bool(w.abs().sum() > 0):
            raise ValueError(f"expected a non-zero vector of channel weights, found {weights!r}")
        self.weights = w

    def _w(self, sample_shape, like):
        if len(sample_shape) < 1 or sample_shape[0] != self.weights.numel():
            raise ValueError(
                f"greyscale: expected samples with {self.weights.numel()} channels (shape (C, ...) with "
                f"C = {self.weights.numel()}), found per-sample shape {tuple(sample_shape)}"
            )
        return self.weights.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (len(sample_shape) - 1)))

    def measurement_shape(self, sample_shape):
        self._w(tuple(sample_shape), torch.zeros(()))
        return (1,) + tuple(sample_shape[1:])

    def _forward(self, x):
        return (x * self._w(tuple(x.shape[1:]), x)).sum(1, keepdim=True)

    def _adjoint(self, y, sample_shape):
        return y * self._w(sample_shape, y)

    def _pinv(self, y, sample_shape):
        return y * self._w(sample_shape, y) / float(self.weights.pow(2).sum())

    def _gram_solve(self, v, a, b, sample_shape):
        return v / (_per_sample(a, v) * float(self.weights.pow(2).sum()) + _per_sample(b, v))

    def singular_values(self, sample_shape, dtype=torch.float64):
        m = math.prod(self.measurement_shape(sample_shape))
        return torch.full((m,), float(self.weights.norm()), dtype=dtype)

    def __repr__(self):
        return f"Greyscale(weights={self.weights.tolist()})"


class GaussianBlur(LinearOperator):
    """Deblurring: circular convolution with a normalised Gaussian kernel of standard deviation ``std`` (pixels)
    over the spatial dimensions (as :class:`Downsample`). Circular boundaries make ``A`` diagonal in the discrete
    Fourier basis (transfer function ``H``, real and even), so ``A^T = A``, ``A^+`` and ``(a A A^T + b)^{-1}`` are
    divisions by ``H``, ``a H^2 + b``. Frequencies with ``|H| < pinv_tol`` count as unobserved in ``A^+``."""

    name = "gaussian_blur"

    def __init__(self, std: float, pinv_tol: float = 1e-6):
        if not float(std) > 0:
            raise ValueError(f"expected a blur std > 0, found {std!r}")
        self.std, self.pinv_tol = float(std), float(pinv_tol)

    def measurement_shape(self, sample_shape):
        return tuple(sample_shape)

    def _transfer(self, spatial, like):
        # the kernel on the circular grid: exp(-d^2 / (2 std^2)) with d the circular distance to 0, normalised
        h = None
        for n in spatial:
            i = torch.arange(n, dtype=torch.float64)
            d = torch.minimum(i, n - i)
            k1 = torch.exp(-0.5 * (d / self.std) ** 2)
            k1 = torch.fft.fft(k1 / k1.sum()).real  # even kernel -> real transfer function
            h = k1 if h is None else h[..., None] * k1
        return h.to(device=like.device, dtype=like.dtype)

    def _apply(self, x, fn):
        k = _spatial_dims(x.ndim - 1)
        dims = tuple(range(x.ndim - k, x.ndim))
        h = self._transfer(x.shape[x.ndim - k:], x)
        out = torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * fn(h), dim=dims).real
        return out.to(x.dtype)

    def _forward(self, x):
        return self._apply(x, lambda h: h)

    def _adjoint(self, y, sample_shape):
        return self._apply(y, lambda h: h)

    def _pinv(self, y, sample_shape):
        return self._apply(y, lambda h: torch.where(h.abs() > self.pinv_tol, 1 / h, torch.zeros_like(h)))

    def _gram_solve(self, v, a, b, sample_shape):
        a, b = _per_sample(a, v), _per_sample(b, v)
        if a.ndim == 0 and b.ndim == 0:
            return self._apply(v, lambda h: 1 / (a * h * h + b))
        k = _spatial_dims(v.ndim - 1)
        dims = tuple(range(v.ndim - k, v.ndim))
        h = self._transfer(v.shape[v.ndim - k:], v)
        return torch.fft.ifftn(torch.fft.fftn(v, dim=dims) / (a * h * h + b), dim=dims).real.to(v.dtype)

    def singular_values(self, sample_shape, dtype=torch.float64):
        k = _spatial_dims(len(sample_shape))
        h = self._transfer(tuple(sample_shape[-k:]), torch.zeros((), dtype=dtype)).abs().reshape(-1)
        reps = math.prod(sample_shape[:-k]) if len(sample_shape) > k else 1
        return h.repeat(reps).sort(descending=True).values

    def __repr__(self):
        return f"GaussianBlur(std={self.std:g})"


class MatrixOperator(LinearOperator):
    """A general (m, n) matrix acting on the flattened sample (n = its size): ``y = A x.flatten()``, measurements
    of shape (m,). Its SVD ``A = U diag(s) V^T`` is computed once; ``A^+`` and ``(a A A^T + b I)^{-1}`` use it
    (singular values below ``rcond * s_max`` count as zero in ``A^+``)."""

    name = "matrix"

    def __init__(self, matrix: torch.Tensor, rcond: float = 1e-10):
        a = torch.as_tensor(matrix)
        if a.ndim != 2 or not a.is_floating_point():
            raise ValueError(f"expected a floating-point (m, n) matrix, found shape {tuple(a.shape)} and dtype {a.dtype}")
        check_finite(a.reshape(-1), "matrix entries", "MatrixOperator")
        self.A = a
        u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        self._u, self._s, self._vh = u, s, vh
        self.rcond = float(rcond)

    def _n(self, sample_shape):
        n = math.prod(sample_shape)
        if n != self.A.shape[1]:
            raise ValueError(
                f"matrix: expected samples with {self.A.shape[1]} entries (the matrix is {tuple(self.A.shape)}), "
                f"found per-sample shape {tuple(sample_shape)} ({n} entries)"
            )
        return n

    def measurement_shape(self, sample_shape):
        self._n(tuple(sample_shape))
        return (self.A.shape[0],)

    def _forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.A.to(device=x.device, dtype=x.dtype).T

    def _adjoint(self, y, sample_shape):
        return (y @ self.A.to(device=y.device, dtype=y.dtype)).reshape(y.shape[0], *sample_shape)

    def _pinv(self, y, sample_shape):
        s = self._s
        inv = torch.where(s > self.rcond * s.max(), 1 / s, torch.zeros_like(s))
        p = self._vh.T @ torch.diag(inv) @ self._u.T  # (n, m)
        return (y @ p.T.to(device=y.device, dtype=y.dtype)).reshape(y.shape[0], *sample_shape)

    def _gram_solve(self, v, a, b, sample_shape):
        # A A^T = U diag(s^2) U^T on the range of U; directions outside it (m > rank) have eigenvalue 0 there
        u = self._u.to(device=v.device, dtype=v.dtype)
        s2 = (self._s**2).to(device=v.device, dtype=v.dtype)
        a = _per_sample(a, v).reshape(-1, 1) if isinstance(a, torch.Tensor) and a.ndim == 1 else _per_sample(a, v)
        b = _per_sample(b, v).reshape(-1, 1) if isinstance(b, torch.Tensor) and b.ndim == 1 else _per_sample(b, v)
        c = v @ u  # (B, r)
        inside = (c / (a * s2 + b)) @ u.T
        outside = (v - c @ u.T) / b if u.shape[1] < v.shape[1] else 0.0
        return inside + outside

    def matrix(self, sample_shape, dtype=torch.float64):
        self._n(tuple(sample_shape))
        return self.A.to(dtype)

    def singular_values(self, sample_shape, dtype=torch.float64):
        self._n(tuple(sample_shape))
        return self._s.to(dtype)

    def __repr__(self):
        return f"MatrixOperator(shape={tuple(self.A.shape)})"


def make_operator(name: str, **kwargs) -> LinearOperator:
    """Build an operator by name: ``mask`` (mask=), ``downsample`` (factor=), ``greyscale`` (weights=),
    ``gaussian_blur`` (std=), ``matrix`` (matrix=)."""
    table = {"mask": Mask, "downsample": Downsample, "greyscale": Greyscale, "gaussian_blur": GaussianBlur,
             "matrix": MatrixOperator}
    if name not in table:
        import difflib

        close = difflib.get_close_matches(str(name), list(table), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown operator {name!r}{hint}; expected one of {sorted(table)}")
    return table[name](**kwargs)


def replace_observed(operator: LinearOperator, x: torch.Tensor, observation: torch.Tensor, alpha: float, sigma: float,
                     noise: torch.Tensor) -> torch.Tensor:
    """Replace the observed part of ``x`` by a noised observation (Song et al. 2021, App. I.2):
    ``x + A^+ (alpha y + sigma A z - A x)``, so that ``A x_new = alpha y + sigma A z`` (for ``A`` of full row rank)
    while the part of ``x`` in the null space of ``A`` is kept. For a :class:`Mask` this is
    ``(1 - m) x + m (alpha y + sigma z)``."""
    shape = tuple(x.shape[1:])
    y = operator.check_observation(observation, shape, x.shape[0]).to(device=x.device, dtype=x.dtype)
    target = alpha * y + sigma * operator.forward(noise)
    return x + operator.pinv(target - operator.forward(x), shape)


def check_operator_options(sampler: str, operator, observation) -> None:
    """Validate the ``operator`` / ``observation`` options of the conditional samplers."""
    if (operator is None) != (observation is None):
        raise ValueError(f"sampler {sampler!r}: pass both operator and observation (or neither, for unconditional sampling)")
    if operator is not None:
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"sampler {sampler!r}: expected option operator to be a LinearOperator, found "
                            f"{type(operator).__name__}")
        if not isinstance(observation, torch.Tensor) or not observation.is_floating_point():
            raise TypeError(f"sampler {sampler!r}: expected option observation to be a floating-point tensor, found "
                            f"{type(observation).__name__}")
        check_finite(observation, "observation", f"sampler {sampler!r}")
