"""Optimizers and learning-rate schedules.

- Decoupled weight decay (AdamW, or SGD with `weight_decay` as plain L2) skips what the model's
  `no_weight_decay()` names: norms, biases, tokens and position tables.
- Layer-wise lr decay for fine-tuning: the head gets `lr`, block i gets `lr * decay**(depth - i)`,
  embeddings `lr * decay**(depth + 1)` (BEiT / MAE recipe).
- The schedule is per optimizer step: linear warmup from 0, then cosine (or linear) down to
  `min_lr`. Each param group keeps its own `lr_scale`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitkit.errors import ConfigError


def param_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float | None = None
) -> list[dict[str, Any]]:
    """Parameter groups: (decay, no decay) x (one per layer when `layer_decay` is set).

    The model states its own protocol (as timm's models do): `no_weight_decay()` names the
    parameters never decayed, `layer_id(name)` and `num_layers` give the layer-wise lr groups.
    """
    skip = set(model.no_weight_decay())
    last = model.num_layers - 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name in skip
        lid = model.layer_id(name) if layer_decay is not None else last
        scale = layer_decay ** (last - lid) if layer_decay is not None else 1.0
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum) over `param_groups`, as the recipe says."""
    groups = param_groups(model, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay)
    for g in groups:
        g["lr"] = recipe.lr * g["lr_scale"]
    if recipe.optimizer == "adamw":
        # fused: one kernel over every tensor instead of torch's per-tensor Python loop (its CPU
        # default), which dominated the optimizer step of small models (benchmarks/RESULTS.md)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups,
            lr=recipe.lr,
            betas=tuple(recipe.betas),
            weight_decay=recipe.weight_decay,
            fused=fused or None,
        )
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    raise ConfigError(f"unknown optimizer {recipe.optimizer!r}; choose adamw or sgd")


def lr_at(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    min_lr: float,
    schedule: str = "cosine",
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then decay to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return min_lr + (base_lr - min_lr) * (1 - t)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr * lr_scale`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
