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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = self.module.state_dict()
        floats, others = [], []
        for name, value in model.state_dict().items():
            (floats if value.dtype.is_floating_point else others).append((ema[name], value))
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [v.detach() for _, v in floats], 1 - d)
        for e, v in others:
            e.copy_(v)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
