"""Multi-head attention pooling (MAP): one learned query attends over the tokens.

SigLIP's image tower pools this way instead of reading a [CLS] token (Zhai et al. 2023, after
Lee et al. 2019's set transformer). Names follow timm's `AttentionPoolLatent`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.mlp import Mlp


class AttentionPool(nn.Module):
    """(B, N, D) tokens -> (B, D): attend from a learned latent, then x + MLP(LN(x))."""

    def __init__(
        self, *, dim: int, num_heads: int, mlp_hidden_dim: int, act: str = "gelu", eps: float = 1e-6
    ):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden_dim=mlp_hidden_dim, act=act)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        H = self.num_heads
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, H, D // H).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
        y = self.proj(y.transpose(1, 2).reshape(B, 1, D))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
