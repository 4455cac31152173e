"""The pre-norm transformer encoder block (paper eq. 2-3), LayerScale and stochastic depth."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitkit.layers.attention import Attention
from vitkit.layers.mlp import Mlp, SwiGLU


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (Touvron et al. 2021, CaiT), started
    small so each block begins close to the identity; DINOv2 and DeiT III use it."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + MSA(LN(x)), then x + MLP(LN(x)); each branch optionally scaled (LayerScale) and
    dropped (stochastic depth)."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        act: str = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attn_implementation: str = "sdpa",
        mlp_layer: str = "mlp",
        layer_scale_init: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(
            dim=dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            implementation=attn_implementation,
        )
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        if mlp_layer == "swiglu":
            self.mlp = SwiGLU(dim=dim, hidden_dim=mlp_hidden_dim, drop=drop)
        else:
            self.mlp = Mlp(dim=dim, hidden_dim=mlp_hidden_dim, act=act, drop=drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: Tensor, need_weights: bool = False, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights=need_weights, attn_mask=attn_mask)
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, weights
