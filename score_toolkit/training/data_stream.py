"""The data order and the noise seeds of a run: functions of ``(seed, step)`` only, so that a resumed run
reproduces the uninterrupted one and the global batch of a step does not depend on the number of processes.
"""

from __future__ import annotations

import numpy as np
import torch


def _mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFFFFFFFFFF for i in ints]).generate_state(1, np.uint64)[0] >> 1)


class _DataStream:
    """The global sample order: an endless concatenation of permutations of the data set, permutation
    ``e`` seeded by ``(seed, e)``. Slot ``s`` of the stream is a pure function of ``(seed, s)``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(_mix(self.seed, 0xDA7A, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        epoch, offset = divmod(start, self.n)
        if offset + count <= self.n:  # the common case: inside one permutation, a slice of it
            return self._perm(epoch)[offset:offset + count]
        slots = torch.arange(start, start + count)
        epochs = slots // self.n
        out = torch.empty(count, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            mask = epochs == e
            out[mask] = self._perm(e)[slots[mask] % self.n]
        return out
