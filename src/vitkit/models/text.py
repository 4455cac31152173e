"""The text towers of CLIP and SigLIP, built from the same blocks as the image tower.

    x0 = token_embed(ids) + pos_embed                      (B, T, D)
    x  = blocks(x0), causal (CLIP) or not (SigLIP)         pre-norm blocks of `layers.Block`
    y  = norm(x) at one position, then projection          (B, E)

CLIP (Radford et al. 2021) masks attention to the left and reads the end-of-text token: the
largest id of each row (`pool="argmax"`, OpenAI's and open_clip's rule, and transformers' for
configs with the legacy `eos_token_id=2`) or the first `eos_token_id` (`pool="eos"`); its
projection has no bias. SigLIP (Zhai et al. 2023) attends both ways, pads every text to its
context and reads the last position (`pool="last"`) through a projection with a bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitkit.config import TextConfig
from vitkit.layers.block import Block

__all__ = ["TextConfig", "TextTransformer"]


class TextTransformer(nn.Module):
    """Token ids (B, T) -> text embeddings (B, E), CLIP's or SigLIP's (see the module doc)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        c = self.config = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context_length, c.width))
        self.blocks = nn.ModuleList(
            Block(
                dim=c.width,
                num_heads=c.num_heads,
                mlp_hidden_dim=c.mlp_hidden_dim,
                eps=c.layer_norm_eps,
                act=c.act,
                attn_drop=c.attn_drop_rate,
                attn_implementation=c.attn_implementation,
            )
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.width, eps=c.layer_norm_eps)
        self.projection = (
            nn.Linear(c.width, c.projection_dim, bias=c.projection_bias)
            if c.projection_dim is not None
            else None
        )
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's initialisation: tokens N(0, 0.02), positions N(0, 0.01), linear layers
        N(0, 0.02) with zero biases, the projection N(0, width^-0.5)."""
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        if self.projection is not None:
            nn.init.normal_(self.projection.weight, std=self.config.width**-0.5)
            if self.projection.bias is not None:
                nn.init.zeros_(self.projection.bias)

    def attention_mask(self, attention_mask: Tensor | None, length: int) -> Tensor | None:
        """The boolean (B or 1, 1, T, T) mask the blocks take: causal for CLIP, and padding
        keys hidden when `attention_mask` (B, T) marks them with 0."""
        device = self.pos_embed.device
        mask = None
        if self.config.causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        if attention_mask is not None:
            keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
            mask = keys if mask is None else mask & keys
        return mask

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, D) tokens after the final norm."""
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} tokens; this text tower reads at most "
                             f"{self.config.context_length}")  # fmt: skip
        x = self.token_embed(input_ids) + self.pos_embed[:, :length]
        mask = self.attention_mask(attention_mask, length)
        for block in self.blocks:
            x, _ = block(x, attn_mask=mask)
        return self.norm(x)

    def pool(self, tokens: Tensor, input_ids: Tensor) -> Tensor:
        """(B, T, D) -> (B, D): the end-of-text token's features (see `TextConfig.pool`)."""
        if self.config.pool == "last":
            return tokens[:, -1]
        ids = input_ids.to(torch.int32)  # argmax of int64 is not in every ONNX opset
        where = ids.argmax(-1) if self.config.pool == "argmax" else (
            ids == self.config.eos_token_id).int().argmax(-1)  # fmt: skip
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), where]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token ids (B, T) -> text embeddings (B, E), not normalised."""
        pooled = self.pool(self.forward_features(input_ids, attention_mask), input_ids)
        return self.projection(pooled) if self.projection is not None else pooled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
