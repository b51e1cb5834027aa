"""Vector score and energy networks: residual MLPs conditioned on a Gaussian-Fourier embedding.

This module path is recorded in saved pipelines (``model_index.json`` stores ``score_toolkit.models.mlp``):
keep it stable. diffusers' pipeline loader also looks for the name ``ModelMixin`` in the module, hence the
module-level import below.
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from torch import nn

from .._config import REQUIRED, init_from_fields
from .._utils import as_time
from .base import StrictLoadingMixin

__all__ = ["ScoreMLP", "EnergyMLP", "GaussianFourierEmbedding"]

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh,
               "softplus": nn.Softplus}
TIME_EMBEDDINGS = ("log", "linear")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected {name} to be an int >= {minimum}, found {value!r}")
    return value


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Song et al. 2021, "Score-based generative modeling through SDEs",
    Appendix H / ``GaussianFourierProjection``): ``[sin(2 pi W c), cos(2 pi W c)]`` with ``W ~ N(0, scale^2)``
    drawn once and frozen. ``W`` is a persistent buffer, so it is saved with the weights and follows ``.to()`` to
    another device, but it stays float32 when the network goes to half precision, and the phases ``2 pi W c`` are
    computed in float32 (float64 for a float64 ``c``): in bfloat16 a phase near 100 rad is rounded to a whole
    radian, so the features of a half-precision network would barely depend on the time. The features come out
    in ``c``'s precision; the caller casts them to the network's dtype."""

    def __init__(self, embedding_dim: int, scale: float):
        super().__init__()
        dtype = torch.promote_types(torch.get_default_dtype(), torch.float32)  # also when built in half precision
        self.register_buffer("W", torch.randn(embedding_dim // 2, dtype=dtype) * scale)

    def _apply(self, fn, recurse=True):
        exact = self.W
        super()._apply(fn, recurse)
        if self.W.dtype in (torch.float16, torch.bfloat16) and exact.dtype not in (torch.float16, torch.bfloat16):
            self.W = exact.to(device=self.W.device, dtype=torch.float32)  # moved, not rounded
        return self

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(c.dtype, torch.float32)
        proj = c.to(dtype)[:, None] * self.W.to(dtype)[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class _ResidualBlock(nn.Module):
    def __init__(self, hidden_dim: int, activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]()
        self.lin1 = nn.Linear(hidden_dim, hidden_dim)
        self.emb = nn.Linear(hidden_dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.lin2(self.act(self.lin1(self.act(h)) + self.emb(emb)))


#: the config fields of both networks (name: (default, annotation)); ScoreMLP adds ``num_classes``
_TRUNK_FIELDS = {
    "dim": (REQUIRED, "int"),
    "hidden_dim": (128, "int"),
    "num_layers": (3, "int"),
    "embedding_dim": (64, "int"),
    "fourier_scale": (1.0, "float"),
    "time_embedding": ("log", "str"),
    "activation": ("silu", "str"),
}


class _MLPTrunk(nn.Module):
    """Shared body: input projection, conditioning embedding, residual blocks, output head."""

    # diffusers assigns the loaded tensors in place of the network's when the first one's dtype matches (here the
    # float32 Fourier frequencies), which would load a half-precision network as float32: copy them instead
    _supports_param_buffer_assignment = False

    def _build(self, dim, hidden_dim, num_layers, embedding_dim, fourier_scale, time_embedding, activation, out_dim,
               num_classes=None):
        _check_int(dim, "dim", 1)
        _check_int(hidden_dim, "hidden_dim", 1)
        _check_int(num_layers, "num_layers", 1)
        _check_int(embedding_dim, "embedding_dim", 2)
        if embedding_dim % 2:
            raise ValueError(f"expected an even embedding_dim (sin and cos halves), found {embedding_dim}")
        if isinstance(fourier_scale, bool) or not isinstance(fourier_scale, (int, float)) or not (
            0 < fourier_scale < math.inf
        ):
            raise ValueError(f"expected fourier_scale > 0 (finite), found {fourier_scale!r}")
        if time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"expected time_embedding in {TIME_EMBEDDINGS}, found {time_embedding!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"expected activation in {sorted(ACTIVATIONS)}, found {activation!r}")
        self.time_embed = GaussianFourierEmbedding(embedding_dim, float(fourier_scale))
        self.time_mlp = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim), ACTIVATIONS[activation](), nn.Linear(hidden_dim, hidden_dim)
        )
        self.input = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList([_ResidualBlock(hidden_dim, activation) for _ in range(num_layers)])
        self.out_act = ACTIVATIONS[activation]()
        self.output = nn.Linear(hidden_dim, out_dim)
        if num_classes is not None:
            _check_int(num_classes, "num_classes", 2)
            # a label table added to the time embedding; the last row is the null label of label dropout
            self.class_embed = nn.Embedding(num_classes, hidden_dim)

    def _check_inputs(self, x, t) -> tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        dim = self.config.dim
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expected x to be a torch.Tensor, found {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} expected a floating-point x, found dtype {x.dtype}")
        features = math.prod(x.shape[1:]) if x.ndim >= 2 else None
        if features != dim:
            raise ValueError(
                f"{name} expected x of shape (B, ...) with {dim} features per sample (dim={dim}), "
                f"found shape {tuple(x.shape)}"
            )
        param_dtype = self.output.weight.dtype
        if x.dtype != param_dtype:
            raise TypeError(
                f"{name} expected x of dtype {param_dtype} (the network's dtype), found {x.dtype}: "
                f"convert x, or the network with .to({x.dtype})"
            )
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise TypeError(f"{name} expected a real t, found dtype {t.dtype}")
        # the time stays float32 for a half-precision network (bfloat16 holds t = 0.999 only to within 0.004)
        t = as_time(t, x.shape[0], like=x if x.dtype == torch.float64 else x.new_empty(0, dtype=torch.float32))
        if t.device.type != "cpu":  # reading a check of t would make the host wait for the device at every call
            return x.reshape(x.shape[0], dim), t
        lo, hi = torch.aminmax(t)  # one reduction for both checks (NaN makes both NaN)
        lo, hi = float(lo), float(hi)
        if not -math.inf < lo <= hi < math.inf:
            raise ValueError(f"{name} expected finite t, found {t}")
        if self.config.time_embedding == "log" and not lo > 0:
            raise ValueError(f"{name} with time_embedding='log' expected t > 0 (it embeds log t), found min {lo:g}")
        return x.reshape(x.shape[0], dim), t

    def _features(self, x_flat: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        c = torch.log(t) if self.config.time_embedding == "log" else t
        emb = self.time_mlp(self.time_embed(c).to(x_flat.dtype))
        num_classes = getattr(self.config, "num_classes", None)
        if class_labels is not None and num_classes is None:
            raise ValueError(f"{type(self).__name__} was built without class labels (num_classes=None): it cannot take "
                             "class_labels")
        if num_classes is not None:
            if class_labels is None:  # no label: the null label (the unconditional model of label dropout)
                class_labels = torch.full((x_flat.shape[0],), num_classes - 1, dtype=torch.long, device=x_flat.device)
            class_labels = torch.as_tensor(class_labels, device=x_flat.device).long().reshape(-1)
            if class_labels.shape[0] == 1:
                class_labels = class_labels.expand(x_flat.shape[0])
            if class_labels.shape[0] != x_flat.shape[0] or bool(((class_labels < 0) | (class_labels >= num_classes)).any()):
                raise ValueError(f"{type(self).__name__} expected class_labels of shape ({x_flat.shape[0]},) in "
                                 f"0..{num_classes - 1}, found {class_labels.tolist()}")
            emb = emb + self.class_embed(class_labels)
        h = self.input(x_flat)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(self.out_act(h))


class ScoreMLP(StrictLoadingMixin, _MLPTrunk, ModelMixin, ConfigMixin):
    """Residual MLP ``f(x, t)`` returning a tensor shaped like ``x``: a vector score network for points,
    signals or small images (any rank: ``x`` of shape (B, ...) with ``prod(...) == dim`` is flattened and the
    output reshaped back).

    What the output means (score, epsilon, v, x0) and what ``t`` is (continuous time, sigma, a discrete label)
    is decided by :class:`~score_toolkit.scores.ScoreAdapter`, not by the network.

    Args:
        dim: number of features per sample.
        hidden_dim: width of the residual blocks.
        num_layers: number of residual blocks (each ``h + W2 act(W1 act(h) + E emb)``).
        embedding_dim: size of the Gaussian-Fourier embedding of the conditioning (even).
        fourier_scale: standard deviation of the frozen random frequencies. Song et al. 2021 use 16 for large
            U-Nets; with small MLPs such high frequencies make the conditioning rough and training slow and
            seed-dependent, so the default here is 1 (see docs/models.md for the measurements).
        time_embedding: ``"log"`` embeds ``log t`` (use it when ``t`` is sigma spanning decades; needs t > 0),
            ``"linear"`` embeds ``t`` itself (continuous time in [0, 1], discrete labels).
        activation: one of ``silu`` (default), ``gelu``, ``relu``, ``elu``, ``tanh``, ``softplus``.
        num_classes: rows of a class-label table added to the time embedding (``None``: no labels). The last row
            is the null label of label dropout (classifier-free guidance): classes ``0..num_classes - 2`` (see
            docs/conditioning.md).

    ``forward(x, t, class_labels=None)``: ``t`` is a float tensor of shape (B,) or a scalar (tensor or number). Raises ValueError
    on a wrong number of features or a wrong shape of ``t``; TypeError on a dtype that differs from the
    network's. ``from_pretrained`` is strict (safetensors only, every weight present with its shape):
    see :func:`score_toolkit.models.strict_from_pretrained`.
    """

    @init_from_fields({**_TRUNK_FIELDS, "num_classes": (None, "int | None")})
    def __init__(self, **config):
        super().__init__()
        self._build(out_dim=config["dim"], **config)

    def forward(self, x: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        x_flat, t = self._check_inputs(x, t)
        return self._features(x_flat, t, class_labels).reshape(x.shape)


class EnergyMLP(StrictLoadingMixin, _MLPTrunk, ModelMixin, ConfigMixin):
    """Residual MLP energy ``E(x, t)`` returning shape (B,); its score is ``-grad_x E`` (use it through
    ``ScoreAdapter(net, process, prediction_type="energy")``). Same arguments and input rules as
    :class:`ScoreMLP`. Prefer a smooth activation (the default ``silu``): the score is a derivative of the
    network, and objectives such as ISM or sliced score matching differentiate it once more."""

    @init_from_fields(_TRUNK_FIELDS)
    def __init__(self, **config):
        super().__init__()
        self._build(out_dim=1, **config)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        x_flat, t = self._check_inputs(x, t)
        return self._features(x_flat, t)[:, 0]
