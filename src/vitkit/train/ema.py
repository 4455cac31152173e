"""Exponential moving average of model weights (Polyak averaging), evaluated beside the model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`ema = decay * ema + (1 - decay) * weights` after each optimizer step; buffers are copied.

    The effective decay warms up as `min(decay, (1 + n) / (10 + n))` so early averages are not
    dominated by the random initialisation; `update(model, decay)` takes a schedule's value
    instead. `module` adopts an existing copy of the model as the average; `params_only`
    averages the parameters alone and leaves the copy its own buffers, for a copy that runs its
    own forward passes (DINO's teacher and its BatchNorm statistics).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, module: nn.Module | None = None,
                 params_only: bool = False):  # fmt: skip
        self.module = copy.deepcopy(model).eval() if module is None else module
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.params_only = params_only
        self.updates = 0
        self._source: nn.Module | None = None
        self._pairs: tuple[tuple[list, list], list] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if decay is None else decay
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
        if self.params_only:
            ema, values = dict(self.module.named_parameters()), model.named_parameters()
        else:
            ema = self.module.state_dict(keep_vars=True)
            values = model.state_dict(keep_vars=True).items()
        floats: tuple[list, list] = ([], [])
        others = []
        for name, value in values:
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
