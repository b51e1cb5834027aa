"""The options of :func:`~score_toolkit.likelihood.log_likelihood` (divergences, probes, torchdiffeq methods and
their defaults) and the checks of its inputs: the score function, the data against the model's sample shape and
range, and the solver options.
"""

from __future__ import annotations

import math

import torch

from .._utils import check_tensor
from ..processes import TIME_GRIDS

__all__ = ["DIVERGENCES", "PROBES", "TIME_VARIABLES", "METHODS", "DEFAULT_RTOL", "DEFAULT_ATOL", "DEFAULT_MAX_NUM_STEPS", "DEFAULT_METHOD", "DEFAULT_NUM_PROBES", "DEFAULT_BATCH_SIZE"]


DIVERGENCES = ("exact", "hutchinson")
TIME_VARIABLES = ("auto", "vp_t", "log_sigma", "t")
PROBES = ("rademacher", "gaussian")
#: methods: name -> adaptive? (``dopri5_per_sample``: score_toolkit's own per-sample stepper; the rest torchdiffeq's)
METHODS: dict[str, bool] = {
    "dopri5_per_sample": True,
    "dopri5": True,
    "dopri8": True,
    "bosh3": True,
    "adaptive_heun": True,
    "euler": False,
    "midpoint": False,
    "heun2": False,
    "heun3": False,
    "rk4": False,
}
DEFAULT_METHOD = "dopri5_per_sample"
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_MAX_NUM_STEPS = 10_000
DEFAULT_NUM_PROBES = 4
DEFAULT_BATCH_SIZE = 256


def _resolve_time_variable(time_variable: str, process, score_fn=None) -> str:
    """``"auto"``: ``"log_sigma"`` for a network (a :class:`~score_toolkit.scores.ScoreAdapter`: its noise
    prediction stays of order one as t -> 0, so its score grows like 1 / sigma and the ODE is singular at t_min in
    t, like 1 / sqrt(t) under VP, and in the VP clock alike, while in ln(sigma / alpha) it is smooth); ``"vp_t"``
    for an analytic or plain score function under every process (for VP(0.1, 20) it is t itself; under VE it
    needs 0.6 to 0.75 times the calls of ln(sigma / alpha)). docs/likelihood.md, "The integration variable", has
    the measurements."""
    if time_variable not in TIME_VARIABLES:
        raise ValueError(f"log_likelihood: expected time_variable in {TIME_VARIABLES}, found {time_variable!r}")
    if time_variable != "auto":
        return time_variable
    from ..scores import ScoreAdapter

    return "log_sigma" if isinstance(score_fn, ScoreAdapter) else "vp_t"


def _expected_sample_shape(score_fn) -> tuple[int, ...] | int | None:
    """What the wrapped network expects per sample: a shape (C, H, W), a feature count, or None if unknown."""
    from ..scores import ScoreAdapter

    if not isinstance(score_fn, ScoreAdapter):
        mixture = getattr(score_fn, "mixture", None)
        return int(mixture.dim) if mixture is not None and hasattr(mixture, "dim") else None
    cfg = getattr(score_fn.model, "config", None)
    if cfg is None:
        return None
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    if get("dim") is not None:
        return int(get("dim"))
    if get("sample_size") is not None and get("in_channels") is not None:
        size = get("sample_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(get("in_channels")), int(h), int(w))
    return None


def _check_data(x, score_fn, sample_shape, data_range) -> torch.Tensor:
    check_tensor(x, "x", min_rank=2)
    if x.dtype not in (torch.float32, torch.float64):
        # a half state ran (bfloat16: ten times the error of float32) or failed with NaN times (float16)
        raise TypeError(f"log_likelihood: expected x in float32 or float64, found {x.dtype}: the log-density sums "
                        "hundreds of steps of divergence estimates, which half precision cannot carry; pass x.float() "
                        "(a reduced-precision network: see docs/likelihood.md, Precision)")
    _check_device(x.device)
    if x.shape[0] == 0:
        raise ValueError("log_likelihood: expected at least one sample, found an empty batch")
    expected = tuple(sample_shape) if sample_shape is not None else _expected_sample_shape(score_fn)
    if isinstance(expected, int):
        if x[0].numel() != expected:
            raise ValueError(f"log_likelihood: expected samples with {expected} features (the model's), found "
                             f"shape {tuple(x.shape)}")
    elif expected is not None and tuple(x.shape[1:]) != expected:
        raise ValueError(f"log_likelihood: expected data of shape (B, {', '.join(map(str, expected))}) (the model's "
                         f"sample shape), found {tuple(x.shape)}")
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"log_likelihood: expected finite data, found NaN or infinity in {int((~finite).sum())} "
                         f"of {x.shape[0]} samples")
    if data_range is not None:
        lo, hi = (float(v) for v in data_range)
        if not lo < hi:
            raise ValueError(f"log_likelihood: expected data_range (lo, hi) with lo < hi, found {data_range!r}")
        mn, mx = float(x.min()), float(x.max())
        if mn < lo or mx > hi:
            raise ValueError(f"log_likelihood: expected data in the model's range [{lo:g}, {hi:g}], found values in "
                             f"[{mn:g}, {mx:g}]")
    return x


def _check_device(device: torch.device) -> None:
    if device.type == "mps":  # the solvers' times and the log-density components are float64 tensors on x's device
        raise ValueError(f"log_likelihood: expected x on a CPU or CUDA device (the solvers keep float64 times and "
                         f"log-densities on x's device, and MPS has no float64), found {device}; pass x.cpu()")


def _check_score_fn(score_fn) -> None:
    from ..scores import ScoreAdapter

    if isinstance(score_fn, torch.nn.Module) and not isinstance(score_fn, ScoreAdapter):
        raise TypeError(
            f"log_likelihood: expected a score function score_fn(x, t), found the network {type(score_fn).__name__}, "
            f"whose prediction type is unknown: wrap it as ScoreAdapter(model, process, prediction_type=..., "
            f"time_input=...) (score, epsilon, v_prediction, sample and energy networks all work)"
        )
    if not callable(score_fn):
        raise TypeError(f"log_likelihood: expected score_fn to be callable, found {type(score_fn).__name__}")


def _resolve_options(divergence, num_probes, probe, method, rtol, atol, num_steps, grid, max_num_steps):
    if divergence not in DIVERGENCES:
        raise ValueError(f"log_likelihood: expected divergence in {DIVERGENCES}, found {divergence!r}")
    if divergence == "exact":
        given = [k for k, v in (("num_probes", num_probes), ("probe", probe)) if v is not None]
        if given:
            raise ValueError(f"log_likelihood: {', '.join(given)} only apply to divergence='hutchinson'")
        num_probes, probe = 0, None
    else:
        num_probes = DEFAULT_NUM_PROBES if num_probes is None else num_probes
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"log_likelihood: expected num_probes to be an int >= 1, found {num_probes!r}")
        probe = "rademacher" if probe is None else probe
        if probe not in PROBES:
            raise ValueError(f"log_likelihood: expected probe in {PROBES}, found {probe!r}")
    if method not in METHODS:
        raise ValueError(f"log_likelihood: expected method in {tuple(METHODS)}, found {method!r}")
    if METHODS[method]:
        given = [k for k, v in (("num_steps", num_steps), ("grid", grid)) if v is not None]
        if given:
            raise ValueError(f"log_likelihood: {' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to "
                             f"fixed-grid methods "
                             f"{tuple(m for m, a in METHODS.items() if not a)}, found method={method!r}")
        rtol = DEFAULT_RTOL if rtol is None else rtol
        atol = DEFAULT_ATOL if atol is None else atol
        for name, v in (("rtol", rtol), ("atol", atol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ValueError(f"log_likelihood: expected {name} > 0 (finite), found {v!r}")
        max_num_steps = DEFAULT_MAX_NUM_STEPS if max_num_steps is None else max_num_steps
        if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
            raise ValueError(f"log_likelihood: expected max_num_steps to be an int >= 1, found {max_num_steps!r}")
    else:
        given = [k for k, v in (("rtol", rtol), ("atol", atol), ("max_num_steps", max_num_steps)) if v is not None]
        if given:
            raise ValueError(f"log_likelihood: {', '.join(given)} only apply to adaptive methods "
                             f"{tuple(m for m, a in METHODS.items() if a)}, found method={method!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"log_likelihood: fixed-grid method {method!r} needs num_steps, an int >= 1; "
                             f"found {num_steps!r}")
        grid = "uniform" if grid is None else grid
        if grid not in TIME_GRIDS:
            raise ValueError(f"log_likelihood: expected grid in {TIME_GRIDS}, found {grid!r}")
    return num_probes, probe, rtol, atol, grid, max_num_steps
