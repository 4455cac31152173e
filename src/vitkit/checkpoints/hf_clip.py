"""transformers CLIP image towers <-> vitkit.

    CLIPVisionModel                 pre_norm, patch_bias=False, [CLS] after post_layernorm
    CLIPVisionModelWithProjection   the same + `visual_projection` (no bias) -> `projection`
    CLIPModel (model_type "clip")   the vision tower and `visual_projection`; the text tower,
                                    `text_projection` and `logit_scale` are left aside

transformers' CLIP returns `last_hidden_state` *before* `post_layernorm` (only the pooled [CLS]
is normalised); vitkit's `last_hidden_state` is after its final norm, as timm's
`forward_features`. `pooler_output` and `image_embeds` are the same in both.
Files written by transformers 5 keep `vision_model.` on CLIPVisionModelWithProjection and drop it
on CLIPVisionModel; both are read, and vitkit writes `vision_model.` (the layout on the Hub).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vitkit.checkpoints._common import (
    HF_BASE,
    Rule,
    block_rules,
    differences,
    find_prefix,
    hf_act,
    hf_fields,
    integer,
    number,
    rename_from,
    rename_to,
    same,
    under,
    weight_and_bias,
)
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
_PREFIX = "vision_model."
LAYER = dict(ln1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
             o="self_attn.out_proj", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip


def layer_rules(config: ViTConfig, i: int) -> list[Rule]:
    """One encoder layer in the CLIP / SigLIP layout (`encoder.layers.{i}.self_attn.q_proj`)."""
    return block_rules(f"blocks.{i}.", f"encoder.layers.{i}.", LAYER, config.embed_dim,
                       config.qkv_bias)  # fmt: skip


def vision_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """The vision part of a CLIP/SigLIP config.json (the whole dict for a vision model)."""
    if data.get("model_type") in ("clip", "siglip"):
        return dict(data.get("vision_config") or {})
    return dict(data)


def common_fields(v: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> dict:
    """`ViTConfig` fields that CLIP and SigLIP vision configs spell the same way."""
    c = {**defaults, **{k: val for k, val in v.items() if val is not None}}
    hidden = integer(c, "hidden_size")
    return dict(
        image_size=integer(c, "image_size"),
        patch_size=integer(c, "patch_size"),
        in_chans=integer(c, "num_channels"),
        embed_dim=hidden,
        depth=integer(c, "num_hidden_layers"),
        num_heads=integer(c, "num_attention_heads"),
        mlp_ratio=integer(c, "intermediate_size") / hidden,
        layer_norm_eps=number(c, "layer_norm_eps", 1e-5, source=source),
        act=hf_act(c["hidden_act"], source=source),
        attn_drop_rate=number(c, "attention_dropout", 0.0, source=source),
        num_classes=0,
    )


_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def architecture(data: Mapping[str, Any]) -> str:
    if data.get("model_type") == "clip":
        return "CLIPModel"
    archs = data.get("architectures") or ["CLIPVisionModel"]
    if archs[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"unsupported CLIP architecture {archs[0]!r}; vitkit reads {ARCHITECTURES}"
        )
    return archs[0]


def config_from_hf(data: Mapping[str, Any], *, source: str = "config.json") -> ViTConfig:
    arch = architecture(data)
    v = vision_config(data)
    projection = None
    if arch != "CLIPVisionModel":
        stated = next((d for d in (data, v) if d.get("projection_dim")), {})  # CLIPModel's first
        projection = integer(stated, "projection_dim", 512, source=source)
    try:
        return ViTConfig(
            **common_fields(v, _DEFAULTS, source),
            pre_norm=True,
            patch_bias=False,
            projection_dim=projection,
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source} describes an invalid model: {exc}") from exc


def rules(config: ViTConfig, prefix: str = _PREFIX) -> list[Rule]:
    """vitkit <-> CLIP vision tower names, the tower's under `prefix`."""
    D, N = config.embed_dim, config.num_patches
    out = [
        same("cls_token", "embeddings.class_embedding", (D,)),
        same("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
        same("pos_embed", "embeddings.position_embedding.weight", (1 + N, D)),
        *weight_and_bias("norm_pre", "pre_layrnorm"),
    ]
    for i in range(config.depth):
        out += layer_rules(config, i)
    out = under([*out, *weight_and_bias("norm", "post_layernorm")], prefix)
    if config.projection_dim is not None:
        out.append(same("projection.weight", "visual_projection.weight"))
    return out


def state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit weights from a CLIP vision (or full CLIP) state dict; the text tower is ignored."""
    prefix = find_prefix(sd, "embeddings.patch_embedding.weight", source=source, what="CLIP")
    ignore = ["text_model.", "text_projection.", "logit_scale", f"{prefix}embeddings.position_ids"]
    if config.projection_dim is None:
        ignore.append("visual_projection.")
    return rename_from(sd, rules(config, prefix), config, ignore=ignore, source=source)


def unsupported(config: ViTConfig) -> list[str]:
    """Reasons CLIPVisionModel[WithProjection] cannot hold `config` (empty if it can)."""
    required = dict(HF_BASE, pre_norm=True, patch_bias=False)
    required["projection_dim"] = (None, config.projection_dim or None)
    return differences(config, "CLIP", required)


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    c = config
    arch = "CLIPVisionModelWithProjection" if c.projection_dim else "CLIPVisionModel"
    out = tower_fields(c, architectures=[arch], model_type="clip_vision_model")
    return {**out, "projection_dim": c.projection_dim} if c.projection_dim else out


def tower_fields(config: ViTConfig, **extra: Any) -> dict[str, Any]:
    """config.json of a CLIP / SigLIP vision tower (`common_fields` reads it back)."""
    c = config
    return hf_fields(
        c, intermediate_size=c.mlp_hidden_dim, attention_dropout=c.attn_drop_rate, **extra
    )


def state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    return rename_to(sd, rules(config))
