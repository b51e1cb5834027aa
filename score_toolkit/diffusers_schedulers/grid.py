"""The time grid of a scheduler's sampling loop: from ``num_inference_steps`` and the config's grid settings
(score_toolkit's ``grid``/``rho``, diffusers' ``timestep_spacing``/``steps_offset`` table indices and sigma
grids), or from custom ``timesteps``/``sigmas`` (:func:`custom_values` checks them)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..processes import Process


def custom_values(values, name: str, allow_last_zero: bool = False) -> torch.Tensor:
    """Custom ``timesteps`` or ``sigmas`` as float64: finite, strictly decreasing, > 0 (the final sigma may be 0)."""
    v = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.detach().cpu(),
                        dtype=torch.float64).flatten()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError(f"expected {name} to be a non-empty list of finite numbers, found {values!r}")
    body = v[:-1] if allow_last_zero else v
    if bool((body <= 0).any()) and name == "sigmas" or bool((v < 0).any()):
        raise ValueError(f"expected {name} > 0 (only the final sigma may be 0), found {v.tolist()}")
    if bool((v[1:] >= v[:-1]).any()):
        raise ValueError(f"expected {name} strictly decreasing, found {v.tolist()}")
    return v


def grid_times(process: Process, cfg: Any, n: int, *, zero_snr: bool, spacing_style: str,
               owner: str) -> tuple[list[float], float, torch.Tensor | None]:
    """(times of the n network evaluations, the final time, the network inputs if they are exact integers) of a
    scheduler of ``process`` with config ``cfg`` (``owner``: its class name, for messages)."""
    kind = ("karras" if cfg.use_karras_sigmas else
            "log_sigma" if (cfg.use_exponential_sigmas or cfg.use_lu_lambdas) else None)
    if kind is None and cfg.timestep_spacing is not None:
        idx = spacing_indices(process, cfg, n, spacing_style, owner)
        table_n = process.num_train_timesteps
        ts = ((torch.as_tensor(idx, dtype=torch.float64) + 1) / table_n).tolist()
        return ts, process.t_min, torch.as_tensor(idx, dtype=torch.float32)
    if zero_snr and (kind or cfg.grid) in ("log_sigma", "karras") and not (
            kind is None and cfg.timestep_spacing is not None):
        raise ValueError(
            f"{owner}.set_timesteps: the {kind or cfg.grid!r} grid is spaced in sigma / alpha, which is "
            "infinite at t = 1 for a zero-terminal-SNR table; set timestep_spacing (e.g. 'trailing', as Lin et al. "
            "recommend) or grid='uniform'"
        )
    if kind is not None:  # diffusers' sigma grids: n evaluations from the largest to the smallest sigma
        ts = process.time_grid(n - 1, kind, rho=float(cfg.rho), dtype=torch.float64).tolist() if n > 1 else [
            process.t_max]
        return ts, process.t_min, None
    full = process.time_grid(n, cfg.grid, rho=float(cfg.rho), dtype=torch.float64).tolist()
    return full[:-1], full[-1], None


def spacing_indices(process: Process, cfg: Any, n: int, spacing_style: str, owner: str) -> np.ndarray:
    """diffusers' integer timesteps for ``timestep_spacing`` (DDPMScheduler's formulas, or DPM-Solver's with
    ``lambda_min_clipped`` for the multistep solver)."""
    big_n = int(process.num_train_timesteps)
    spacing, offset = cfg.timestep_spacing, int(cfg.steps_offset)
    if spacing_style == "dpm":
        ac = process.alphas_cumprod.to(torch.float32)
        lam = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
        clipped = torch.searchsorted(torch.flip(lam, [0]), float(cfg.lambda_min_clipped))
        last = int(big_n - int(clipped))
        if spacing == "linspace":
            idx = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            idx = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
        else:
            idx = np.arange(last, 0, -big_n / n).round().copy().astype(np.int64) - 1
    else:
        if spacing == "linspace":
            idx = np.linspace(0, big_n - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = big_n // n
            idx = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + offset
        else:
            idx = np.round(np.arange(big_n, 0, -big_n / n)).astype(np.int64) - 1
    if idx.size != n or idx.min() < 0 or idx.max() > big_n - 1 or (np.diff(idx) >= 0).any():
        raise ValueError(
            f"{owner}.set_timesteps({n}): timestep_spacing={spacing!r} (steps_offset={offset}) gives "
            f"the table indices {idx.tolist()[:8]}...; expected {n} distinct indices in [0, {big_n - 1}] (fewer "
            "steps, or another spacing)"
        )
    return idx
