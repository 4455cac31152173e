"""Exponential moving average of model weights (Polyak averaging), evaluated beside the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`ema = decay * ema + (1 - decay) * weights` after each optimizer step; buffers are copied.

    The effective decay warms up as `min(decay, (1 + n) / (10 + n))` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._source: nn.Module | None = None
        self._pairs: tuple[tuple[list, list], list] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._pairs is None or self._source is not model:
            self._source, self._pairs = model, self._match(model)
        floats, others = self._pairs
        if floats[0]:
            torch._foreach_lerp_(floats[0], floats[1], 1 - d)
        for e, v in others:
            e.copy_(v)

    def _match(self, model: nn.Module) -> tuple[tuple[list, list], list]:
        """The (EMA tensor, model tensor) pairs, found once: state_dict() on every step cost
        more than the averaging itself on small models."""
        ema = self.module.state_dict(keep_vars=True)
        floats: tuple[list, list] = ([], [])
        others = []
        for name, value in model.state_dict(keep_vars=True).items():
            e, v = ema[name].detach(), value.detach()
            if v.dtype.is_floating_point:
                floats[0].append(e)
                floats[1].append(v)
            else:
                others.append((e, v))
        return floats, others

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
