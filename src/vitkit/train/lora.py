"""Parameter-efficient fine-tuning: the recipe's `finetune: full | linear | lora`.

    full     every parameter trains
    linear   only the classifier head(s) (`head`, and `head_dist` of a DeiT model) train; the
             backbone, final norm and pooling included, is frozen, kept in eval mode (no dropout,
             drop-path or BatchNorm statistics updates) and run without autograd
    lora     low-rank adapters (Hu et al. 2021) on the blocks' Linear layers named in
             `lora_targets` (qkv, proj, fc1, fc2) plus the head(s) train; everything else is frozen

An adapted layer is `LoRALinear`, an `nn.Linear` that keeps its `weight` and `bias` under their
own names and adds `lora_a` (r, in) and `lora_b` (out, r): y = W x + b + (alpha / r) B A x, with
B = 0 at the start so the adapted model begins as the model it was given. Because the base keys
do not move, a checkpoint of the adapted model is the plain model's state plus `*.lora_a/b`, and
`merged(model)` folds each adapter into its weight (W + (alpha / r) B A) and gives back an
ordinary `VisionTransformer` that every loader, exporter and server reads.

Written here rather than with peft: peft wraps a layer as `base_layer` + `lora_A.default`, which
renames every adapted weight (`attn.qkv.base_layer.weight`) and would leak into vitkit's own key
names, checkpoint mappings and EMA; it is also not a dependency of vitkit. The adapter is 40 lines.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

TARGETS = ("qkv", "proj", "fc1", "fc2")  # the Linear layers of a block, by attribute name
HEADS = ("head", "head_dist")


class LoRALinear(nn.Linear):
    """`base` (its own weight and bias, frozen) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear (and peft) do
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_dropout(x) @ self.lora_a.t() @ self.lora_b.t()
        return super().forward(x) + self.scaling * update

    def merge(self) -> nn.Linear:
        """A plain Linear with the update folded into its weight."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scaling
            out.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def apply_finetune(model: nn.Module, recipe) -> nn.Module:
    """Freeze `model` (a `VisionTransformer`) as `recipe.finetune` says and add the LoRA
    adapters, in place; returns the model."""
    if recipe.finetune == "full":
        return model
    model.requires_grad_(False)
    if recipe.finetune == "lora":
        add_adapters(model, rank=recipe.lora_rank, alpha=recipe.lora_alpha,
                     dropout=recipe.lora_dropout, targets=recipe.lora_targets)  # fmt: skip
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    return model


def add_adapters(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 targets: tuple[str, ...] = TARGETS) -> int:  # fmt: skip
    """Replace the Linear layers named `targets` inside `model.blocks` by `LoRALinear`; returns
    how many were adapted."""
    count = 0
    for block in model.blocks:
        for parent in block.modules():
            for name in targets:
                layer = getattr(parent, name, None)
                if type(layer) is nn.Linear:
                    setattr(parent, name, LoRALinear(layer, rank=rank, alpha=alpha,
                                                     dropout=dropout))  # fmt: skip
                    count += 1
    return count


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged(model: nn.Module) -> nn.Module:
    """`model` itself when it has no adapters, else a copy with every adapter folded into its
    Linear layer (the original keeps training unchanged)."""
    if not has_adapters(model):
        return model
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())
    return out
