"""Multi-head self-attention with PyTorch SDPA by default and attention maps on request."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention (paper eq. 5-7) with one fused q/k/v projection.

    `implementation="sdpa"` calls `F.scaled_dot_product_attention`, which dispatches to Flash or
    memory-efficient kernels on GPU. The attention probabilities are only materialised when the
    caller asks for them (`need_weights=True`) or when `implementation="eager"`; both paths give
    the same output.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        implementation: str = "sdpa",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.implementation = implementation
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(
        self, x: Tensor, need_weights: bool = False, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D) -> (output (B, T, D), probabilities (B, H, T, T) or None)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, Dh)
        dropout = self.attn_drop if self.training else 0.0
        weights = None
        if need_weights or self.implementation == "eager":
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            x = F.dropout(weights, dropout) @ v if dropout else weights @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(x)), (weights if need_weights else None)
