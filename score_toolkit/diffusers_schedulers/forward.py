"""The forward-process side of diffusers' scheduler contract, shared by every scheduler here
(:class:`ForwardProcessMixin`): the beta table (``betas``/``alphas``/``alphas_cumprod``) of a beta-table
config, ``add_noise`` and ``get_velocity`` (what training scripts and img2img pipelines call), and the
inverse of the network-time map (:meth:`~ForwardProcessMixin.t_from_network_time`)."""

from __future__ import annotations

import torch

from .._utils import append_dims, check_tensor
from ..processes import DiscreteVP


class ForwardProcessMixin:
    """Needs ``process``, ``time_input``, ``_adapter`` (the score adapter's time map), ``timesteps`` and ``_t``
    (the current grid), as :class:`~score_toolkit.diffusers_schedulers.base.ScoreSchedulerBase` sets them."""

    def _has_table(self) -> bool:
        return isinstance(self.process, DiscreteVP) and self.time_input == "index"

    # ------------------------------------------------------------------ the beta table
    def _table(self) -> torch.Tensor:
        if not self._has_table():
            raise AttributeError(
                f"{type(self).__name__} of {type(self.process).__name__} with time input {self.time_input!r} has no "
                "beta table (betas/alphas/alphas_cumprod exist for beta-table configs whose network receives the "
                "table index); use .process.marginal(t) for alpha and sigma"
            )
        return self.process.alphas_cumprod

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The table ``alpha_bar_i`` (float32, as diffusers' schedulers hold it)."""
        return self._table().to(torch.float32)

    @property
    def alphas(self) -> torch.Tensor:
        """``alpha_i = alpha_bar_i / alpha_bar_{i-1}`` (float32)."""
        ac = self._table()
        return torch.cat([ac[:1], ac[1:] / ac[:-1]]).to(torch.float32)

    @property
    def betas(self) -> torch.Tensor:
        """``beta_i = 1 - alpha_i`` (float32)."""
        ac = self._table()
        return (1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])).to(torch.float32)

    # ------------------------------------------------------------------ the forward process
    def _times_of(self, timesteps, batch: int) -> torch.Tensor:
        """Times (float64, (B,)) of network inputs: a scheduled timestep's exact grid time, else the inverse of
        the network-time map."""
        ts = torch.as_tensor(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps,
                             dtype=torch.float64).flatten()
        if ts.numel() == 1:
            ts = ts.expand(batch)
        if ts.numel() != batch:
            raise ValueError(f"expected one timestep or one per sample ({batch}), found {ts.numel()}")
        t = self.t_from_network_time(ts) if not self._t else None
        if t is None:
            sched = self.timesteps.detach().to("cpu", torch.float64)
            grid = torch.tensor(self._t[:-1], dtype=torch.float64)
            close = (ts.unsqueeze(1) - sched.unsqueeze(0)).abs() <= 1e-6 * sched.abs().clamp_min(1.0)
            on_grid = close.any(1)
            t = torch.empty_like(ts)
            if bool(on_grid.any()):
                t[on_grid] = grid[close[on_grid].to(torch.int64).argmax(1)]
            if bool((~on_grid).any()):
                t[~on_grid] = self.t_from_network_time(ts[~on_grid])
        return t

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward marginal ``x_t = alpha(t) x_0 + sigma(t) noise`` at network inputs ``timesteps`` (a number,
        or one per sample: e.g. training indices of a DDPM table), for samples of any rank. A timestep of the
        current schedule uses its exact grid time."""
        x0 = _checked(original_samples, noise, "original_samples", "add_noise")
        t = self._times_of(timesteps, x0.shape[0])
        work = torch.float64 if x0.device.type == "cpu" else torch.float32
        out = self.process.perturb(x0.to(work), t.to(x0.device, work), noise.to(work))
        return out.to(x0.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ``v = alpha(t) noise - sigma(t) x_0`` (``sample`` is the clean ``x_0``, as in
        diffusers' training scripts) at network inputs ``timesteps``."""
        _checked(sample, noise, "sample", "get_velocity")
        t = self._times_of(timesteps, sample.shape[0])
        work = torch.float64 if sample.device.type == "cpu" else torch.float32
        alpha, sigma = self.process.marginal(t.to(sample.device, work))
        v = append_dims(alpha, sample.ndim) * noise.to(work) - append_dims(sigma, sample.ndim) * sample.to(work)
        return v.to(sample.dtype)

    def t_from_network_time(self, values: torch.Tensor) -> torch.Tensor:
        """Inverse of the network-time map (continuous time ``t`` of network inputs; float64)."""
        v = torch.as_tensor(values, dtype=torch.float64)
        if self.time_input == "t":
            t = v
        elif self.time_input == "index":  # the index map is affine in t
            lo, hi = self._adapter.network_time(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
            t = (v - lo) / (hi - lo)
        else:  # sigma(t) increases in t: bisection
            ends = self.process.sigma(torch.tensor([self.process.t_min, self.process.t_max], dtype=torch.float64))
            s_lo, s_hi = ends.tolist()
            if not bool(((v >= s_lo * (1 - 1e-6)) & (v <= s_hi * (1 + 1e-6))).all()):
                raise ValueError(
                    f"expected timesteps (sigma, the network's time input) in [{s_lo:.6g}, {s_hi:.6g}], found values in "
                    f"[{float(v.min()):.6g}, {float(v.max()):.6g}]"
                )
            lo = torch.full_like(v, self.process.t_min)
            hi = torch.full_like(v, self.process.t_max)
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                below = self.process.sigma(mid) < v
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            t = 0.5 * (lo + hi)
        self.process.check_t(t, name="the time of timesteps", tol=1e-6)
        return self.process.clamp_t(t)


def _checked(x: torch.Tensor, noise: torch.Tensor, name: str, method: str) -> torch.Tensor:
    """``x`` a floating tensor (B, ...) and ``noise`` of its shape (diffusers' schedulers broadcast a mismatch and
    truncate integer samples silently)."""
    check_tensor(x, name)
    if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:
        found = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"{method}: expected noise of the shape of {name} {tuple(x.shape)}, found {found}")
    return x
