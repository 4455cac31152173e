"""The building blocks of a Vision Transformer, one module each."""

from vitkit.layers.attention import Attention
from vitkit.layers.block import Block, DropPath
from vitkit.layers.mlp import Mlp
from vitkit.layers.patch_embed import PatchEmbed
from vitkit.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "resample_pos_embed",
    "sincos_2d_pos_embed",
]
