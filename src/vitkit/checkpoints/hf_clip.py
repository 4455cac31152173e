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
    HF_ACT_TO,
    HF_BASE,
    Rule,
    differences,
    find_prefix,
    fused_qkv,
    hf_act,
    integer,
    linear,
    mlp_ratio,
    norm,
    number,
    rename_from,
    rename_to,
    same,
)
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
_PREFIX = "vision_model."


def layer_rules(config: ViTConfig, i: int) -> list[Rule]:
    """One encoder layer in the CLIP / SigLIP layout (`encoder.layers.{i}.self_attn.q_proj`)."""
    D, H = config.embed_dim, config.mlp_hidden_dim
    ours, theirs = f"blocks.{i}.", f"encoder.layers.{i}."
    attn = f"{theirs}self_attn."
    return [
        *norm(f"{ours}norm1", f"{theirs}layer_norm1", D),
        *fused_qkv(f"{ours}attn.qkv", [f"{attn}{p}_proj" for p in "qkv"], D, config.qkv_bias),
        *linear(f"{ours}attn.proj", f"{attn}out_proj", D, D),
        *norm(f"{ours}norm2", f"{theirs}layer_norm2", D),
        *linear(f"{ours}mlp.fc1", f"{theirs}mlp.fc1", H, D),
        *linear(f"{ours}mlp.fc2", f"{theirs}mlp.fc2", D, H),
    ]


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
        mlp_ratio=mlp_ratio(hidden, integer(c, "intermediate_size")),
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


def rules(config: ViTConfig) -> list[Rule]:
    """vitkit <- CLIP vision tower names, without the `vision_model.` prefix."""
    D, N = config.embed_dim, config.num_patches
    P, C = config.patch_size, config.in_chans
    out: list[Rule] = [
        same("cls_token", "embeddings.class_embedding", (D,)),
        same("patch_embed.proj.weight", "embeddings.patch_embedding.weight", (D, C, P, P)),
        same("pos_embed", "embeddings.position_embedding.weight", (1 + N, D)),
        *norm("norm_pre", "pre_layrnorm", D),
    ]
    for i in range(config.depth):
        out += layer_rules(config, i)
    out += norm("norm", "post_layernorm", D)
    return out


def state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit weights from a CLIP vision (or full CLIP) state dict; the text tower is ignored."""
    prefix = find_prefix(sd, "embeddings.patch_embedding.weight", source=source, what="CLIP")
    out = rename_from(
        sd,
        rules(config),
        config,
        prefix=prefix,
        ignore=(
            "text_model.",
            "text_projection.",
            "logit_scale",
            "visual_projection.",
            f"{prefix}embeddings.position_ids",
        ),
        source=source,
    )
    if config.projection_dim is not None:
        if "visual_projection.weight" not in sd:
            raise CheckpointError(
                f"{source}: the config has a projection but the weights lack "
                f"'visual_projection.weight'"
            )
        out["projection.weight"] = sd["visual_projection.weight"]
    return out


def unsupported(config: ViTConfig) -> list[str]:
    """Reasons CLIPVisionModel[WithProjection] cannot hold `config` (empty if it can)."""
    required = dict(HF_BASE, pre_norm=True, patch_bias=False)
    required["projection_dim"] = (None, config.projection_dim or None)
    return differences(config, "CLIP", required)


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    c = config
    arch = "CLIPVisionModelWithProjection" if c.projection_dim else "CLIPVisionModel"
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "clip_vision_model",
        "hidden_size": c.embed_dim,
        "intermediate_size": c.mlp_hidden_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "num_channels": c.in_chans,
        "image_size": c.image_hw[0],
        "patch_size": c.patch_size,
        "hidden_act": HF_ACT_TO[c.act],
        "layer_norm_eps": c.layer_norm_eps,
        "attention_dropout": c.attn_drop_rate,
    }
    if c.projection_dim:
        out["projection_dim"] = c.projection_dim
    return out


def state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    sd = dict(sd)
    projection = sd.pop("projection.weight", None)
    out = rename_to(sd, rules(config), prefix=_PREFIX)
    if projection is not None:
        out["visual_projection.weight"] = projection.contiguous()
    return out
