"""The transformer block's feed-forward network: Linear -> activation -> Linear, or SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The activation named in the config: exact GELU, its tanh approximation, or quick-GELU."""
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class SwiGLU(nn.Module):
    """SiLU(x W1) * (x W2), then W3 (Shazeer 2020), as DINOv2 giant uses it.

    W1 and W2 are packed into one `fc1` of width `hidden_dim` (gate half first), as timm's
    SwiGLUPacked and transformers' `weights_in` store them; `fc2` reads `hidden_dim / 2`.
    """

    def __init__(self, *, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim // 2, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # each (B, T, hidden / 2)
        x = self.drop(F.silu(gate) * value)
        return self.drop(self.fc2(x))
