"""transformers SigLIP image towers <-> vitkit.

    SiglipVisionModel             no [CLS], positions for the patches only, tanh-GELU, then the
                                  attention-pooling head (`global_pool="map"`):
                                  head.probe -> attn_pool.latent,
                                  head.attention.in_proj_{weight,bias} -> attn_pool.q + .kv,
                                  head.attention.out_proj -> attn_pool.proj,
                                  head.layernorm -> attn_pool.norm, head.mlp -> attn_pool.mlp
    SiglipModel ("siglip")        the vision tower; the text tower and logit scale/bias are left

The encoder layers are named as CLIP's (`hf_clip.layer_rules`). transformers' SigLIP pools every
token of `last_hidden_state` (after `post_layernorm`), which is vitkit's with no prefix tokens.
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
    linear,
    norm,
    rename_from,
    rename_to,
    same,
)
from vitkit.checkpoints.hf_clip import common_fields, layer_rules, vision_config
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

_PREFIX = "vision_model."
_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)


def config_from_hf(data: Mapping[str, Any], *, source: str = "config.json") -> ViTConfig:
    v = vision_config(data)
    if not v.get("vision_use_head", True):
        raise CheckpointError(
            f"{source}: vision_use_head=false (no pooled output) is not supported"
        )
    try:
        return ViTConfig(
            **common_fields(v, _DEFAULTS, source), class_token=False, global_pool="map"
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source} describes an invalid model: {exc}") from exc


def rules(config: ViTConfig) -> list[Rule]:
    c = config
    D, N, H = c.embed_dim, c.num_patches, c.mlp_hidden_dim
    P, C = c.patch_size, c.in_chans
    out: list[Rule] = [
        same("patch_embed.proj.weight", "embeddings.patch_embedding.weight", (D, C, P, P)),
        same("patch_embed.proj.bias", "embeddings.patch_embedding.bias", (D,)),
        same("pos_embed", "embeddings.position_embedding.weight", (N, D)),
    ]
    for i in range(c.depth):
        out += layer_rules(c, i)
    out += [
        *norm("norm", "post_layernorm", D),
        same("attn_pool.latent", "head.probe", (1, 1, D)),
        (
            ("attn_pool.q.weight", "attn_pool.kv.weight"),
            (("head.attention.in_proj_weight", (3 * D, D)),),
        ),
        (("attn_pool.q.bias", "attn_pool.kv.bias"), (("head.attention.in_proj_bias", (3 * D,)),)),
        *linear("attn_pool.proj", "head.attention.out_proj", D, D),
        *norm("attn_pool.norm", "head.layernorm", D),
        *linear("attn_pool.mlp.fc1", "head.mlp.fc1", H, D),
        *linear("attn_pool.mlp.fc2", "head.mlp.fc2", D, H),
    ]
    return out


def state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit weights from a SigLIP vision (or full SigLIP) state dict."""
    prefix = find_prefix(sd, "embeddings.patch_embedding.weight", source=source, what="SigLIP")
    ignore = ("text_model.", "logit_scale", "logit_bias", f"{prefix}embeddings.position_ids")
    return rename_from(sd, rules(config), config, prefix=prefix, ignore=ignore, source=source)


def unsupported(config: ViTConfig) -> list[str]:
    """Reasons SiglipVisionModel cannot hold `config` (empty if it can)."""
    required = dict(HF_BASE, class_token=False, global_pool="map")
    return differences(config, "SigLIP", required)


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    c = config
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
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


def state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    return rename_to(sd, rules(config), prefix=_PREFIX)
