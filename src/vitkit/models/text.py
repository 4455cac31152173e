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

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from vitkit._fields import POSITIVE, RATE, In, over_limit, problems
from vitkit.config import Activation, AttnImpl
from vitkit.errors import ConfigError
from vitkit.layers.block import Block

TextPool = Literal["argmax", "eos", "last"]


@dataclass
class TextConfig:
    """Architecture of a CLIP / SigLIP text tower. The defaults are CLIP ViT-B's."""

    vocab_size: Annotated[int, POSITIVE] = 49_408
    context_length: Annotated[int, POSITIVE] = 77
    width: Annotated[int, POSITIVE] = 512
    depth: Annotated[int, POSITIVE] = 12
    num_heads: Annotated[int, POSITIVE] = 8
    mlp_ratio: Annotated[float, POSITIVE] = 4.0
    act: Activation = "quick_gelu"
    layer_norm_eps: Annotated[float, In("(0, inf)", "e.g. 1e-5")] = 1e-5
    causal: bool = True
    pool: TextPool = "argmax"
    eos_token_id: Annotated[int, In("[0, inf)")] = 49_407
    projection_dim: Annotated[int | None, POSITIVE] = 512
    projection_bias: bool = False
    attn_drop_rate: Annotated[float, RATE] = 0.0
    attn_implementation: AttnImpl = "sdpa"

    def __post_init__(self) -> None:
        errors = problems(self)
        if not errors:
            d, heads, mlp = self.width, self.num_heads, self.mlp_hidden_dim
            errors = [m for broken, m in (
                (d % heads, f"width={d} is not divisible by num_heads={heads}"),
                (mlp <= 0, f"mlp_ratio={self.mlp_ratio} gives {mlp} MLP units"),
                (self.pool == "eos" and self.eos_token_id >= self.vocab_size,
                 f"eos_token_id={self.eos_token_id} is outside the vocabulary ({self.vocab_size})"),
            ) if broken]  # fmt: skip
            errors += [message for value, name, what in (
                (self.vocab_size, "VOCAB", "vocab_size"),
                (self.context_length, "TEXT_TOKENS", "context_length"),
                (self.width, "WIDTH", "width"),
                (self.depth, "DEPTH", "depth"),
                (self.num_heads, "HEADS", "num_heads"),
                (max(mlp, self.projection_dim or 0), "MLP_DIM", "MLP size or projection_dim"),
            ) for message in over_limit(value, name, what)]  # fmt: skip
            errors = errors or over_limit(self.estimated_params(), "PARAMS", "parameters")
        if errors:
            raise ConfigError("invalid TextConfig: " + "; ".join(errors))

    @property
    def mlp_hidden_dim(self) -> int:
        return int(round(self.width * self.mlp_ratio, 6))

    @property
    def embed_dim(self) -> int:
        """Width of the text embedding: the projection's, or the tower's without one."""
        return self.projection_dim or self.width

    def estimated_params(self) -> int:
        d, m, p = self.width, self.mlp_hidden_dim, self.projection_dim or 0
        block = 4 * d * d + 2 * d * m + m + 9 * d
        tables = (self.vocab_size + self.context_length) * d
        return tables + self.depth * block + 2 * d + p * d + (p if self.projection_bias else 0)

    def replace(self, **changes: Any) -> TextConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TextConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a TextConfig needs a mapping of fields, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown TextConfig field(s) {sorted(unknown)}")
        return cls(**data)


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
