"""Score adapters: turn any network into the canonical ``score_fn(x, t) -> tensor like x``.

This is the only place that knows a network's prediction type and what it receives as its time
input. For ``x_t = alpha x_0 + sigma eps`` (FORMULAS.md, "Score conversions"):

* ``score``:        s
* ``epsilon``:      s = -eps / sigma
* ``v_prediction``: v = alpha eps - sigma x_0, so eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
* ``sample`` (x0):  s = -(x_t - alpha x_0) / sigma^2
* ``energy``:       s = -grad_x E(x_t, t) (through autograd)

and the derived views: the denoiser (Tweedie) ``D = (x + sigma^2 s) / alpha`` and ``eps = -sigma s``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._utils import append_dims, as_time, check_tensor
from .processes import Process

__all__ = [
    "PREDICTION_TYPES",
    "TIME_INPUTS",
    "ScoreAdapter",
    "prediction_to_score",
    "score_to_prediction",
    "denoiser_from_score",
    "epsilon_from_score",
]

PREDICTION_TYPES = ("score", "epsilon", "v_prediction", "sample", "energy")
TIME_INPUTS = ("t", "sigma", "index")

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"expected prediction_type in {PREDICTION_TYPES}, found {prediction_type!r}")


def prediction_to_score(pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a network prediction at ``x`` (per-sample ``alpha``, ``sigma`` of shape (B,)) to the score.
    (``energy`` needs autograd and is handled by :class:`ScoreAdapter`.)"""
    _check_prediction_type(prediction_type)
    a, s = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
    if prediction_type == "score":
        return pred
    if prediction_type == "epsilon":
        return -pred / s
    if prediction_type == "v_prediction":
        eps = (s * x + a * pred) / (a * a + s * s)
        return -eps / s
    if prediction_type == "sample":
        return -(x - a * pred) / (s * s)
    raise ValueError("prediction_type 'energy' is converted by ScoreAdapter through autograd")


def score_to_prediction(score: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`prediction_to_score` (for score, epsilon, v_prediction, sample)."""
    _check_prediction_type(prediction_type)
    a, s = append_dims(alpha, x.ndim), append_dims(sigma, x.ndim)
    if prediction_type == "score":
        return score
    eps = -s * score
    x0 = (x + s * s * score) / a
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "sample":
        return x0
    raise ValueError("an energy is not determined by the score alone")


def _model_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"expected the model to return a tensor (or an output with .sample), found {type(out).__name__}")


class ScoreAdapter:
    """Wrap a network as the canonical score function of a process.

    Args:
        model: a callable ``model(x, time_input)`` (any ``torch.nn.Module``, a diffusers
            ``UNet2DModel`` or our vector networks); an output with ``.sample`` is unwrapped.
        process: the :class:`~score_toolkit.processes.Process` the network was trained on.
        prediction_type: one of ``score``, ``epsilon``, ``v_prediction``, ``sample``, ``energy``.
        time_input: what the network receives as its time input: ``"t"`` (continuous time),
            ``"sigma"`` (sigma(t)), ``"index"`` (the discrete label ``process.timestep_index(t)``:
            ``t (N - 1)`` for continuous processes as in score_sde, the table index for
            :class:`~score_toolkit.processes.DiscreteVP`), or a function ``t -> tensor (B,)``.
        check_inputs: validate shapes, dtypes and the range of ``t`` on every call.

    Calling the adapter returns the score; :meth:`denoiser` and :meth:`epsilon` give the derived views.
    """

    def __init__(
        self,
        model: Callable,
        process: Process,
        prediction_type: str = "epsilon",
        time_input: str | Callable[[torch.Tensor], torch.Tensor] = "t",
        *,
        check_inputs: bool = True,
    ):
        if not callable(model):
            raise TypeError(f"expected model to be callable, found {type(model).__name__}")
        if not isinstance(process, Process):
            raise TypeError(f"expected process to be a score_toolkit Process, found {type(process).__name__}")
        _check_prediction_type(prediction_type)
        if not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"expected time_input in {TIME_INPUTS} or a callable, found {time_input!r}")
        self.model = model
        self.process = process
        self.prediction_type = prediction_type
        self.time_input = time_input
        self.check_inputs = check_inputs

    def __repr__(self) -> str:
        ti = self.time_input if isinstance(self.time_input, str) else getattr(self.time_input, "__name__", "callable")
        return (
            f"ScoreAdapter(model={type(self.model).__name__}, process={self.process!r}, "
            f"prediction_type={self.prediction_type!r}, time_input={ti!r})"
        )

    # ------------------------------------------------------------------ internals
    def _prepare(self, x, t):
        if self.check_inputs:
            check_tensor(x, "x")
        t = as_time(t, x.shape[0], like=x)
        if self.check_inputs and t.device.type == "cpu":  # on an accelerator, reading the check would wait for it
            self.process.check_t(t)
        return t

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input handed to the network for times ``t`` (B,)."""
        ti = self.time_input
        if callable(ti):
            return ti(t)
        if ti == "t":
            return t
        if ti == "sigma":
            return self.process.sigma(t)
        return self.process.timestep_index(t)

    def raw(self, x: torch.Tensor, t) -> torch.Tensor:
        """The network's own prediction at (x, t) (not defined for energy models: see :meth:`energy`)."""
        t = self._prepare(x, t)
        return self._raw(x, t)

    def _raw(self, x, t):
        out = _model_output(self.model(x, self.network_time(t)))
        if self.check_inputs and out.shape != x.shape:
            raise ValueError(
                f"expected {type(self.model).__name__} to return a {self.prediction_type} prediction of shape "
                f"{tuple(x.shape)} (like x), found shape {tuple(out.shape)}"
            )
        return out

    def energy(self, x: torch.Tensor, t) -> torch.Tensor:
        """Per-sample energy E(x, t) of an energy-parameterised network (shape (B,))."""
        if self.prediction_type != "energy":
            raise ValueError(f"energy() needs prediction_type='energy', found {self.prediction_type!r}")
        t = self._prepare(x, t)
        return self._energy(x, t)

    def _energy(self, x, t):
        e = _model_output(self.model(x, self.network_time(t)))
        if e.ndim == 2 and e.shape[1] == 1:
            e = e[:, 0]
        if e.shape != (x.shape[0],):
            raise ValueError(
                f"expected the energy network {type(self.model).__name__} to return shape ({x.shape[0]},) or "
                f"({x.shape[0]}, 1), found {tuple(e.shape)}"
            )
        return e

    def _score(self, x, t):
        if self.prediction_type == "energy":
            create_graph = torch.is_grad_enabled()  # training through the score needs a graph
            with torch.enable_grad():
                xg = x if (x.requires_grad and create_graph) else x.detach().requires_grad_(True)
                e = self._energy(xg, t)
                (grad,) = torch.autograd.grad(e.sum(), xg, create_graph=create_graph)
            return -grad
        alpha, sigma = self.process.marginal(t)
        return prediction_to_score(self._raw(x, t), x, alpha, sigma, self.prediction_type)

    # ------------------------------------------------------------------ public views
    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = self._prepare(x, t)
        return self._score(x, t)

    score = __call__

    def epsilon(self, x: torch.Tensor, t) -> torch.Tensor:
        """Predicted noise eps = -sigma s."""
        t = self._prepare(x, t)
        if self.prediction_type == "epsilon":
            return self._raw(x, t)
        return -append_dims(self.process.sigma(t), x.ndim) * self._score(x, t)

    def denoiser(self, x: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's denoiser D(x, t) = E[x_0 | x_t = x] = (x + sigma^2 s) / alpha."""
        t = self._prepare(x, t)
        if self.prediction_type == "sample":
            return self._raw(x, t)
        alpha, sigma = self.process.marginal(t)
        s = self._score(x, t)
        return (x + append_dims(sigma**2, x.ndim) * s) / append_dims(alpha, x.ndim)


def denoiser_from_score(score_fn: ScoreFn, process: Process) -> ScoreFn:
    """Tweedie's denoiser ``D(x, t) = (x + sigma^2 s(x, t)) / alpha`` of any score function."""
    if isinstance(score_fn, ScoreAdapter):
        return score_fn.denoiser

    def denoiser(x, t):
        t = as_time(t, x.shape[0], like=x)
        alpha, sigma = process.marginal(t)
        return (x + append_dims(sigma**2, x.ndim) * score_fn(x, t)) / append_dims(alpha, x.ndim)

    return denoiser


def epsilon_from_score(score_fn: ScoreFn, process: Process) -> ScoreFn:
    """The noise prediction ``eps(x, t) = -sigma(t) s(x, t)`` of any score function."""
    if isinstance(score_fn, ScoreAdapter):
        return score_fn.epsilon

    def epsilon(x, t):
        t = as_time(t, x.shape[0], like=x)
        return -append_dims(process.sigma(t), x.ndim) * score_fn(x, t)

    return epsilon
