"""Sampling trajectories of a few samples over time, from ``SamplerOutput.trajectory``: paths of 2-D points
(:func:`trajectory_panel`) and frames of images (:func:`trajectory_grid`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .densities import check_extent, draw_contours, label_axes, log_prob_of
from .figures import axes_or_new, finish, matplotlib_classes
from .images import image_grid


def _as_trajectory(trajectory) -> torch.Tensor:
    if isinstance(trajectory, torch.Tensor):
        return trajectory
    return torch.stack([torch.as_tensor(s) for s in trajectory])


def trajectory_panel(trajectory, extent: Sequence[float], *, num_paths: int = 16, size=420, background=None,
                     times: Sequence[float] | None = None, title: str = "", ax=None):
    """Paths of the first ``num_paths`` samples of a 2-D trajectory: a list of (B, 2) states (as
    ``SamplerOutput.trajectory``) or a tensor (T, B, 2). Each path is coloured along its way (colour bar: the time
    ``t`` when ``times``, one per state, is given, else the step), its start a grey dot, its end a red one;
    ``background`` (optional) is a ``log_prob`` whose contour lines are drawn underneath."""
    matplotlib_classes()  # the install hint first
    from matplotlib.collections import LineCollection

    extent = check_extent(extent)
    traj = _as_trajectory(trajectory)
    if traj.ndim != 3 or traj.shape[2] != 2 or traj.shape[0] < 2:
        raise ValueError(f"expected a trajectory of at least 2 states of shape (B, 2), found {tuple(traj.shape)}")
    if times is not None and len(times) != traj.shape[0]:
        raise ValueError(f"expected one time per state ({traj.shape[0]}), found {len(times)}")
    paths = traj[:, :num_paths].detach().double().cpu().numpy()  # (T, b, 2)
    steps = paths.shape[0]
    along = np.asarray([float(t) for t in times]) if times is not None else np.arange(steps, dtype=float)
    ax, own = axes_or_new(ax, size)
    if background is not None:
        draw_contours(ax, log_prob_of(background), extent, None, 160, color="0.6")
    segs = np.stack([paths[:-1], paths[1:]], 2).transpose(1, 0, 2, 3).reshape(-1, 2, 2)  # (b * (T-1), 2, 2)
    seg_val = np.tile(0.5 * (along[:-1] + along[1:]), paths.shape[1])
    lc = LineCollection(segs, cmap="plasma", linewidths=1.0)
    lc.set_array(seg_val)
    lc.set_clim(float(along.min()), float(along.max()) if along.max() > along.min() else float(along.min()) + 1)
    ax.add_collection(lc)
    ax.figure.colorbar(lc, ax=ax, label="time t" if times is not None else "step")
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=14, color="0.55", label="start", zorder=3)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=14, color="tab:red", label="end", zorder=3)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.legend(loc="upper right", fontsize=7)
    label_axes(ax, title)
    return finish(ax, own)


def trajectory_grid(trajectory, *, num_samples: int = 8, num_frames: int = 10, value_range=(-1.0, 1.0),
                    scale: int = 4, times: Sequence[float] | None = None, title: str = "", ax=None):
    """Image trajectories: one row per sample (the first ``num_samples``), ``num_frames`` states evenly spaced
    over the trajectory (first and last included) from left to right. ``trajectory``: a list of (B, C, H, W)
    states or a tensor (T, B, C, H, W); the columns are labelled with ``times`` (optional, one per state) or the
    step. ``scale``: pixels per image pixel of the picture."""
    traj = _as_trajectory(trajectory)
    if traj.ndim != 5:
        raise ValueError(f"expected an image trajectory (T, B, C, H, W), found shape {tuple(traj.shape)}")
    t_len = traj.shape[0]
    if times is not None and len(times) != t_len:
        raise ValueError(f"expected one time per state ({t_len}), found {len(times)}")
    idx = np.unique(np.linspace(0, t_len - 1, min(num_frames, t_len)).round().astype(int))
    frames = traj[idx, :num_samples]  # (F, b, C, H, W)
    f, b, _, h, w = frames.shape
    pad = 2
    tiles = frames.transpose(0, 1).reshape(f * b, *frames.shape[2:])
    grid = np.asarray(image_grid(tiles, nrow=f, value_range=value_range, scale=1, padding=pad))
    px = max(int(scale), 1)
    ax, own = axes_or_new(ax, (max(grid.shape[1] * px + 120, 240), max(grid.shape[0] * px + 110, 160)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([pad + j * (w + pad) + (w - 1) / 2 for j in range(f)])
    ax.set_xticklabels([f"{float(times[i]):.2g}" for i in idx] if times is not None else [str(int(i)) for i in idx],
                       fontsize=7)
    ax.set_yticks([pad + r * (h + pad) + (h - 1) / 2 for r in range(b)])
    ax.set_yticklabels([str(r) for r in range(b)], fontsize=7)
    ax.set_xlabel("time t" if times is not None else "step")
    ax.set_ylabel("sample")
    ax.tick_params(length=0)
    if title:
        ax.set_title(title)
    return finish(ax, own)
