"""The building blocks of a Vision Transformer, one module each."""

from vitkit.layers.attention import Attention
from vitkit.layers.block import Block, DropPath, LayerScale
from vitkit.layers.mlp import Mlp, QuickGELU, SwiGLU
from vitkit.layers.patch_embed import PatchEmbed
from vitkit.layers.pool import AttentionPool
from vitkit.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "AttentionPool",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "QuickGELU",
    "SwiGLU",
    "resample_pos_embed",
    "sincos_2d_pos_embed",
]
