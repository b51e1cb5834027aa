"""The order of the training stream: which example fills slot ``s`` (:class:`SampleOrder`) and the random
key of its augmentation (:func:`example_key`), both pure functions of ``(seed, s)`` so that training does
not depend on the number of processes or DataLoader workers."""

from __future__ import annotations

import numpy as np
import torch

_M64 = (1 << 64) - 1


def _mix(*ints: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(i) & _M64 for i in ints]).generate_state(1, np.uint64)[0] >> 1)


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def example_key(seed: int, slot: int) -> int:
    """The random bits of the augmentation of the example at ``slot`` of the training stream (flip, crop):
    a pure function of ``(seed, slot)``, so augmentations do not depend on processes, workers or batches."""
    return _splitmix64(_splitmix64(int(seed) & _M64) ^ (int(slot) & _M64))


class SampleOrder:
    """The global order of a map-style training set: an endless concatenation of permutations of
    ``range(n)``, permutation ``e`` seeded by ``(seed, e)``. Slot ``s`` of the stream is a pure function
    of ``(seed, s)``: the examples of a training step do not depend on the number of processes."""

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
