"""The shipped reference grids (``grid="reference"``): the table of fits and the rule that carries them to a
process and budget. Kept apart from :mod:`score_toolkit.samplers.reference_grids` (the family and the fit, which run
the samplers) so that the samplers' grid option can read the table without an import cycle."""

from __future__ import annotations

import math

import torch

from ..processes import Process
from .grid_store import transfer_log_snr

__all__ = ["REFERENCE_GRIDS", "reference_log_snr"]

#: the shipped fits: ``{sampler name: {num_steps: log-SNR points lambda(1) < ... < lambda(t_min)}}`` fitted by
#: :func:`fit_reference_grid` on :func:`reference_family` under VPSDE(0.1, 20) (log-SNR range [-5.025, 4.558])
REFERENCE_GRIDS: dict[str, dict[int, tuple[float, ...]]] = {
    "unipc": {
        11: (-5.025, -3.7699, -2.5535, -1.6178, -0.4333, 0.2327, 0.9351, 1.5007, 2.4243, 2.7465, 3.4944, 4.5577),
        14: (-5.025, -4.1907, -3.357, -2.5281, -1.7142, -0.9094, -0.2728, 0.2257, 0.7484, 1.1921, 1.606, 2.2693,
             2.7149, 3.2943, 4.5577),
        19: (-5.025, -4.2492, -3.4679, -2.6927, -1.9514, -1.3244, -0.8598, -0.5327, -0.2996, -0.0758, 0.3157, 0.541,
             0.8771, 1.2231, 1.6285, 1.9962, 2.7024, 3.0655, 3.6375, 4.5577),
        24: (-5.025, -3.3741, -2.0878, -1.6297, -1.0003, -0.8337, -0.5645, -0.2911, -0.2251, 0.0851, 0.1371, 0.3758,
             0.4197, 0.6107, 0.7742, 0.9766, 1.1908, 1.4684, 1.6393, 2.2563, 2.4468, 2.9289, 3.7346, 3.9388, 4.5577),
        29: (-5.025, -3.1574, -2.3038, -1.7468, -1.326, -1.0551, -0.7908, -0.7277, -0.4997, -0.2302, -0.17, 0.112,
             0.1603, 0.3221, 0.4815, 0.5152, 0.6674, 0.8395, 0.9557, 1.128, 1.3286, 1.4795, 1.8178, 1.9401, 2.5247,
             2.6614, 3.044, 3.8589, 4.0293, 4.5577),
    },
}


def reference_log_snr(process: Process, num_steps: int, sampler: str) -> torch.Tensor:
    """The reference grid of ``sampler`` for ``num_steps`` steps under ``process`` as float64 log-SNR values
    ``lambda(1) < ... < lambda(t_min)``: the shipped fit of the nearest budget (in log steps), carried over to the
    process's range and step count as a step density over absolute log-SNR."""
    fits = REFERENCE_GRIDS.get(sampler)
    if not fits:
        raise ValueError(f"grid 'reference': no reference grid is shipped for sampler {sampler!r}; shipped for "
                         f"{sorted(REFERENCE_GRIDS)}")
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"grid 'reference': expected num_steps >= 1, found {num_steps!r}")
    nearest = min(fits, key=lambda m: (abs(math.log(m / n)), m))
    return transfer_log_snr(torch.tensor(fits[nearest], dtype=torch.float64), process, n)
