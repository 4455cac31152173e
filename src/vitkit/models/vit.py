"""The Vision Transformer of Dosovitskiy et al. 2020 ("An Image is Worth 16x16 Words").

Read top to bottom, `VisionTransformer` follows section 3.1 of the paper:

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos        (eq. 1)  embed()
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                    (eq. 2)  blocks
    z_l = MLP(LN(z'_l)) + z'_l                           (eq. 3)  blocks
    y = LN(z_L^0)                                        (eq. 4)  norm, pool
    logits = head(y)                                              forward_head()

Variants are `ViTConfig` switches: a DeiT distillation token with its own head, register tokens,
mean pooling of the patch tokens, fixed sin-cos positions, a mask token for masked image modeling,
and the families built on this encoder (docs/families.md): LayerScale (DINOv2, DeiT III), a norm
before the encoder and a projection to a joint space (CLIP), attention pooling without [CLS]
(SigLIP), a SwiGLU MLP (DINOv2 giant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitkit.config import ViTConfig
from vitkit.errors import ConfigError
from vitkit.layers.block import Block
from vitkit.layers.patch_embed import PatchEmbed
from vitkit.layers.pool import AttentionPool
from vitkit.layers.pos_embed import resample_pos_embed, sincos_2d_pos_embed


@dataclass
class ViTOutput:
    """What a forward pass returns. Optional fields are None unless asked for.

    logits: (B, K) class scores; for a distilled (DeiT) model the mean of both heads.
    last_hidden_state: (B, T, D) every token after the final norm.
    pooler_output: (B, D') the pooled representation the head reads ([CLS], patch mean or
        attention pool, after fc_norm and the optional tanh pre-logits layer).
    image_embeds: (B, P) pooler_output projected to a joint image-text space (CLIP's
        `visual_projection`); None for a model without `projection_dim`.
    hidden_states: input of each block and the output of the last one (depth + 1 tensors).
    attentions: (B, H, T, T) probabilities of the layers in `attention_layers`.
    cls_logits / distillation_logits: the two heads of a distilled model, separately.
    """

    logits: Tensor | None
    last_hidden_state: Tensor
    pooler_output: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    attention_layers: tuple[int, ...] | None = None
    cls_logits: Tensor | None = None
    distillation_logits: Tensor | None = None
    image_embeds: Tensor | None = None


def logits_of(output: Any) -> Tensor:
    """The (B, K) scores of any classifier's forward pass: a `ViTOutput`'s (or any output
    object's) `logits`, the tensor a plain module returns (`vitkit.features.Embedder`, a traced
    graph), or the first tensor of a tuple (a foreign teacher)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError(
        f"the model returned {type(output).__name__} without logits: give it a classification "
        "head with model.reset_classifier(K), or call the model, not forward_features"
    )


class VisionTransformer(nn.Module):
    """A ViT built from a `ViTConfig`. Parameter names are vitkit's own; see `vitkit.checkpoints`."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        D = c.embed_dim
        self.patch_embed = PatchEmbed(
            patch_size=c.patch_size,
            in_chans=c.in_chans,
            embed_dim=D,
            pad=c.dynamic_img_pad,
            bias=c.patch_bias,
            stem_channels=c.stem_channels,
            stem_strides=c.stem_strides,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if c.distilled else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, c.num_register_tokens, D))
            if c.num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if c.use_mask_token else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, c.num_pos_prefix_tokens + c.num_patches, D))
            if c.pos_embed == "learned"
            else None
        )
        self.pos_drop = nn.Dropout(c.drop_rate) if c.drop_rate > 0 else nn.Identity()
        self.norm_pre = nn.LayerNorm(D, eps=c.layer_norm_eps) if c.pre_norm else nn.Identity()

        rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear rule
        self.blocks = nn.ModuleList(
            Block(
                dim=D,
                num_heads=c.num_heads,
                mlp_hidden_dim=c.mlp_hidden_dim,
                qkv_bias=c.qkv_bias,
                eps=c.layer_norm_eps,
                act=c.act,
                drop=c.drop_rate,
                attn_drop=c.attn_drop_rate,
                drop_path=rates[i],
                attn_implementation=c.attn_implementation,
                mlp_layer=c.mlp_layer,
                layer_scale_init=c.layer_scale_init,
            )
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(D, eps=c.layer_norm_eps) if not c.use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=c.layer_norm_eps) if c.use_fc_norm else nn.Identity()
        self.attn_pool = (
            AttentionPool(
                dim=D,
                num_heads=c.num_heads,
                mlp_hidden_dim=c.mlp_hidden_dim,
                act=c.act,
                eps=c.layer_norm_eps,
            )
            if c.global_pool == "map"
            else None
        )

        self.num_features = c.pooled_dim
        if c.head == "mlp":  # the paper's pre-training head: one hidden layer with tanh
            hidden = c.head_hidden_dim or c.pooled_dim
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(c.pooled_dim, hidden))
            self.pre_logits.add_module("act", nn.Tanh())
            self.num_features = hidden
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate) if c.drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes else nn.Identity()
        self.head_dist = (
            nn.Linear(self.num_features, c.num_classes) if c.distilled and c.num_classes else None
        )
        self.projection = (
            nn.Linear(c.pooled_dim, c.projection_dim, bias=False)
            if c.projection_dim is not None
            else None
        )
        self.grad_checkpointing = False
        self.init_weights()

    # ------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """The paper's initialisation: truncated normal (std 0.02) for tokens, positions and
        linear layers, Xavier for the patch projection (viewed as a linear map), He for the
        convolutional stem's layers, zero biases;
        a zero head when `config.head_init_zero` (as when fine-tuning)."""
        latent = self.attn_pool.latent if self.attn_pool is not None else None
        tokens = (self.cls_token, self.dist_token, self.reg_token, self.mask_token, self.pos_embed)
        for t in (*tokens, latent):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.patch_embed.stem or ():  # as a ResNet's convolutions (He et al. 2015)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.head_init_zero:
            self.reset_classifier(self.config.num_classes, zero_init=True)

    def reset_classifier(
        self, num_classes: int, *, zero_init: bool = True, id2label: dict[int, str] | None = None
    ) -> None:
        """Replace the head(s) for `num_classes` classes (0 removes them), zero-initialised by
        default as the paper does when fine-tuning."""
        self.config = self.config.replace(num_classes=num_classes, id2label=id2label)
        ref = next(self.parameters())
        make = (
            (lambda: nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype))
            if num_classes
            else nn.Identity
        )
        self.head = make()
        self.head_dist = make() if self.config.distilled and num_classes else None
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                if zero_init:
                    nn.init.zeros_(head.weight)
                else:
                    nn.init.trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that weight decay must skip: tokens, positions, and every norm
        weight and bias (1-D tensors)."""
        tokens = ("cls_token", "dist_token", "reg_token", "mask_token", "pos_embed")
        named = {n for n in tokens if getattr(self, n) is not None}
        return named | {n for n, p in self.named_parameters() if p.ndim <= 1}

    @property
    def num_layers(self) -> int:
        """Layer groups for layer-wise lr decay: embeddings, each block, the final norm + head."""
        return len(self.blocks) + 2

    def layer_id(self, name: str) -> int:
        """The layer group of parameter `name`: 0 for the embeddings (and CLIP's pre-norm),
        i + 1 for `blocks.i.*`, `num_layers - 1` for the final norm, pooling, projection and
        head(s) (BEiT / MAE fine-tuning)."""
        if name.startswith(("patch_embed", "cls_token", "dist_token", "reg_token", "mask_token",
                            "pos_embed", "norm_pre")):  # fmt: skip
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers - 1

    # ------------------------------------------------------------------------------ eq. 1
    def position_table(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> Tensor | None:
        """Position embeddings for a (Hp, Wp) patch grid, (1, prefix + Hp*Wp, D), or None.

        A learned table is resampled bicubically when the grid differs from the one it was
        trained for; a sin-cos table is computed for the grid directly.
        """
        c = self.config
        if self.pos_embed is not None:
            # Under torch.compile / torch.export the table is always resampled (an identity at
            # the trained size), so no shape guard specialises the graph to one resolution.
            if not _is_tracing() and tuple(grid) == c.grid_size:
                return self.pos_embed
            return resample_pos_embed(
                self.pos_embed,
                grid,
                old_grid=c.grid_size,
                num_prefix_tokens=c.num_pos_prefix_tokens,
                mode=c.pos_embed_interpolation,
                antialias=c.pos_embed_antialias,
            )
        if c.pos_embed == "sincos2d":
            table = sincos_2d_pos_embed(grid, c.embed_dim, device=device, dtype=dtype)
            prefix = table.new_zeros(c.num_pos_prefix_tokens, c.embed_dim)
            return torch.cat([prefix, table]).unsqueeze(0)
        return None

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> tokens (B, prefix + N, D) entering the first block: patches,
        masking, prefix, positions (on the patches only with `no_embed_class`), registers,
        then the pre-encoder norm (CLIP)."""
        B, _, H, W = pixel_values.shape
        x = self.patch_embed(pixel_values)  # (B, N, D)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built with use_mask_token=True")
            mask = bool_masked_pos.reshape(B, -1, 1).to(x.dtype)
            x = x * (1.0 - mask) + self.mask_token.to(x.dtype) * mask
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        pos = self.position_table(self.patch_embed.grid_size(H, W), x.device, x.dtype)
        if pos is not None and self.config.no_embed_class:
            x = x + pos
        x = torch.cat([*prefix, x], dim=1)  # (B, 1 + N, D)
        if pos is not None and not self.config.no_embed_class:
            x = x + pos
        if self.reg_token is not None:  # registers carry no position (Darcet et al. 2023)
            n = len(prefix)
            x = torch.cat([x[:, :n], self.reg_token.expand(B, -1, -1), x[:, n:]], dim=1)
        return self.norm_pre(self.pos_drop(x))

    # ------------------------------------------------------------------------------ eq. 2-4
    def forward_features(
        self,
        pixel_values: Tensor,
        *,
        bool_masked_pos: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Sequence[int] = False,
    ) -> ViTOutput:
        """Run the encoder. Returns a `ViTOutput` without logits.

        `output_attentions` is True for every layer or a sequence of layer indices (negative
        ones count from the end, e.g. `[-1]` for the last layer only); only those layers
        materialise their attention probabilities, the others keep the fast SDPA kernel.
        """
        x = self.embed(pixel_values, bool_masked_pos)
        asked = range(len(self.blocks)) if output_attentions is True else output_attentions
        wanted = self._block_indices(asked or ())  # the layers that materialise attention
        hidden: list[Tensor] = []
        attentions: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                hidden.append(x)
            need = i in wanted
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, weights = checkpoint(block, x, need, use_reentrant=False)
            else:
                x, weights = block(x, need_weights=need)
            if weights is not None:
                attentions.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        pooled = self.pool(x)
        return ViTOutput(
            logits=None,
            last_hidden_state=x,
            pooler_output=pooled,
            image_embeds=self.projection(pooled) if self.projection is not None else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if wanted else None,
            attention_layers=tuple(wanted) if wanted else None,
        )

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, T, D) -> (B, D'): [CLS] token, mean of the patch tokens, attention pooling over
        them, or [CLS] and the patch mean side by side (D' = 2D); then fc_norm and pre-logits."""
        c = self.config
        if self.attn_pool is not None:
            x = self.attn_pool(tokens[:, c.num_prefix_tokens :])
        elif c.global_pool == "avg":
            x = tokens[:, c.num_prefix_tokens :].mean(dim=1)
        elif c.global_pool == "token_avg":  # DINOv2's linear classifier input
            x = torch.cat([tokens[:, 0], tokens[:, c.num_prefix_tokens :].mean(dim=1)], dim=-1)
        else:
            x = tokens[:, 0]
        return self.pre_logits(self.fc_norm(x))

    def forward_head(self, features: ViTOutput | Tensor) -> ViTOutput | Tensor:
        """Apply the classification head(s) to `forward_features`' output (or pooled features).

        Given a `ViTOutput`, fills in its logits and returns it; given pooled features (B, D'),
        returns logits. A distilled model's [DIST] token feeds the second head.
        """
        if isinstance(features, Tensor):
            return self.head(self.head_drop(features))
        out = features
        cls_logits = self.head(self.head_drop(out.pooler_output))
        if self.head_dist is not None:
            dist_logits = self.head_dist(self.head_drop(out.last_hidden_state[:, 1]))
            out.cls_logits, out.distillation_logits = cls_logits, dist_logits
            out.logits = (cls_logits + dist_logits) / 2
        else:
            out.logits = cls_logits
        return out

    def forward(
        self,
        pixel_values: Tensor,
        *,
        bool_masked_pos: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Sequence[int] = False,
    ) -> ViTOutput:
        """Images (B, C, H, W) at any size the patch divides -> `ViTOutput` with logits."""
        out = self.forward_features(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return self.forward_head(out)

    # ------------------------------------------------------------------------------ dense
    def forward_intermediates(
        self,
        pixel_values: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[Tensor, list[Any]]:
        """Feature maps of chosen blocks for dense tasks, with timm's signature and outputs.

        indices: an int n takes the last n blocks, a sequence takes those blocks (negative ones
            count from the end), None takes every block.
        Each map is (B, D, Hp, Wp) ("NCHW") or (B, Hp*Wp, D) ("NLC"), with the prefix tokens
        ([CLS], registers) split off; `return_prefix_tokens=True` gives (map, prefix (B, P, D))
        pairs. `norm=True` applies the final norm to each. Returns (final tokens after the
        norm, maps), or only the maps with `intermediates_only`; `stop_early` skips the blocks
        after the last one taken (the final tokens are then those of that block, as in timm).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        if isinstance(indices, int):  # the last n blocks
            if not 0 < indices <= depth:
                raise IndexError(f"cannot take the last {indices} blocks of a {depth}-block model")
            indices = range(depth - indices, depth)
        take = self._block_indices(range(depth) if indices is None else indices)
        B, _, H, W = pixel_values.shape
        gh, gw = self.patch_embed.grid_size(H, W)
        n = self.config.num_prefix_tokens
        x = self.embed(pixel_values)
        blocks = self.blocks[: max(take) + 1] if stop_early and take else self.blocks
        maps: list[Any] = []
        for i, block in enumerate(blocks):
            x, _ = block(x)
            if i in take:
                y = self.norm(x) if norm else x
                patches = y[:, n:]  # (B, Hp*Wp, D)
                if output_fmt == "NCHW":
                    patches = patches.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                maps.append((patches, y[:, :n]) if return_prefix_tokens and n else patches)
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def _block_indices(self, indices: Sequence[int]) -> list[int]:
        """Block (layer) indices, negative ones counting from the end -> sorted, unique."""
        depth = len(self.blocks)
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise IndexError(f"block {bad[0]} out of range for a {depth}-block model")
        return sorted({i % depth for i in indices})

    # ------------------------------------------------------------------------------ misc
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops(self, image_size: tuple[int, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass on one image (matmuls and convs only)."""
        return count_macs(self.config, image_size)


def rebuild(model: VisionTransformer, **changes: Any) -> VisionTransformer:
    """A new model with config `changes` that carries over every weight of `model`.

    For changes that keep the weights' shapes: regularisation, attention implementation, pooling.
    Switching between [CLS] and mean pooling moves the final LayerNorm between `norm` and
    `fc_norm` (timm's convention), as MAE does when it fine-tunes with mean pooling.
    """
    new = VisionTransformer(model.config.replace(**changes))
    state = dict(model.state_dict())
    if model.config.use_fc_norm != new.config.use_fc_norm:
        src, dst = ("norm", "fc_norm") if new.config.use_fc_norm else ("fc_norm", "norm")
        for name in ("weight", "bias"):
            state[f"{dst}.{name}"] = state.pop(f"{src}.{name}")
    try:
        new.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"config changes {changes} change the model's weights; only "
            f"changes that keep every weight's shape can be applied here: {exc}"
        ) from None
    return new.to(next(model.parameters()).device)


def _is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def count_macs(config: ViTConfig, image_size: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image: patch projection, attention
    projections, attention itself (QK^T and AV), MLP (or SwiGLU), attention pooling, head(s)
    and projection. Norms, LayerScale and softmax are ignored."""
    c = config
    h, w = image_size or c.image_hw
    n = math.ceil(h / c.patch_size) * math.ceil(w / c.patch_size)
    t = n + c.num_prefix_tokens
    d = c.embed_dim
    macs = n * c.patch_size**2 * c.in_chans * d
    hidden = c.mlp_hidden_dim
    mlp = t * d * hidden + t * (hidden // 2 if c.mlp_layer == "swiglu" else hidden) * d
    per_block = t * d * 3 * d + 2 * t * t * d + t * d * d + mlp
    macs += c.depth * per_block
    if c.global_pool == "map":  # one query: q, k/v of the patches, attention, proj, MLP
        macs += d * d + n * d * 2 * d + 2 * n * d + d * d + 2 * d * hidden
    feat = c.pooled_dim
    if c.head == "mlp":
        feat = c.head_hidden_dim or c.pooled_dim
        macs += c.pooled_dim * feat
    macs += feat * c.num_classes * (2 if c.distilled else 1)
    macs += c.pooled_dim * (c.projection_dim or 0)
    return macs
