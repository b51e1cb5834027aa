"""The exponential moving average of a model's weights kept during training (:class:`EMA`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging) with a warm-up: the decay used at
    update ``n`` (0, 1, 2, ...) is ``min(decay, (1 + n) / (10 + n))``. This is the warm-up of diffusers'
    ``EMAModel`` except at the first update, where ``EMAModel`` copies the weights (decay 0) and this class uses
    0.1, keeping a tenth of the initial weights; from the second update on the decays are the same
    (``tests/test_training.py`` compares the two).
    Shadow weights are float32 copies; :meth:`state_dict` / :meth:`load_state_dict` are tensors only
    (saved as safetensors in checkpoints)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"expected an EMA decay in [0, 1), found {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters() if p.requires_grad]
        self._params: tuple | None = None

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        # the parameter list is built once per model (a per-step list comprehension over the parameters
        # was measurable per-step overhead for small networks); float32 parameters are used as they are
        cached = self._params
        if cached is None or cached[0] is not model:
            params = [p for p in model.parameters() if p.requires_grad]
            cached = self._params = (model, params, all(p.dtype == torch.float32 for p in params))
        _, params, all_float = cached
        torch._foreach_lerp_(self.shadow, params if all_float else [p.float() for p in params], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, s in zip([p for p in model.parameters() if p.requires_grad], self.shadow):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], num_updates: int) -> None:
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in self.names]
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {extra}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])
        self.num_updates = int(num_updates)
