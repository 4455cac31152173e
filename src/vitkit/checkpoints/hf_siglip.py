"""transformers SigLIP image towers <-> vitkit.

    SiglipVisionModel             no [CLS], positions for the patches only, tanh-GELU, then the
                                  attention-pooling head `head` (`global_pool="map"`; its fused
                                  `in_proj` becomes `attn_pool.q` + `attn_pool.kv`)
    SiglipModel ("siglip")        the vision tower; the text tower and logit scale/bias are left

The encoder layers are named as CLIP's (`hf_clip.layer_rules`). transformers' SigLIP pools every
token of `last_hidden_state` (after `post_layernorm`), which is vitkit's with no prefix tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vitkit.checkpoints._common import (
    HF_BASE,
    Rule,
    differences,
    find_prefix,
    rename_from,
    rename_to,
    same,
    under,
    weight_and_bias,
)
from vitkit.checkpoints.hf_clip import common_fields, layer_rules, tower_fields, vision_config
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


def rules(config: ViTConfig, prefix: str = _PREFIX) -> list[Rule]:
    """vitkit <-> SigLIP vision tower names, the tower's under `prefix`."""
    c, D = config, config.embed_dim
    out = [
        *weight_and_bias("patch_embed.proj", "embeddings.patch_embedding"),
        same("pos_embed", "embeddings.position_embedding.weight", (c.num_patches, D)),
    ]
    for i in range(c.depth):
        out += layer_rules(c, i)
    in_proj = "head.attention.in_proj_"
    out += [
        *weight_and_bias("norm", "post_layernorm"),
        same("attn_pool.latent", "head.probe"),
        Rule(("attn_pool.q.weight", "attn_pool.kv.weight"), ((f"{in_proj}weight", (3 * D, D)),)),
        Rule(("attn_pool.q.bias", "attn_pool.kv.bias"), ((f"{in_proj}bias", (3 * D,)),)),
        *weight_and_bias("attn_pool.proj", "head.attention.out_proj"),
        *weight_and_bias("attn_pool.norm", "head.layernorm"),
        *weight_and_bias("attn_pool.mlp.fc1", "head.mlp.fc1"),
        *weight_and_bias("attn_pool.mlp.fc2", "head.mlp.fc2"),
    ]
    return under(out, prefix)


def state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit weights from a SigLIP vision (or full SigLIP) state dict."""
    prefix = find_prefix(sd, "embeddings.patch_embedding.weight", source=source, what="SigLIP")
    ignore = ("text_model.", "logit_scale", "logit_bias", f"{prefix}embeddings.position_ids")
    return rename_from(sd, rules(config, prefix), config, ignore=ignore, source=source)


def unsupported(config: ViTConfig) -> list[str]:
    """Reasons SiglipVisionModel cannot hold `config` (empty if it can)."""
    required = dict(HF_BASE, class_token=False, global_pool="map")
    return differences(config, "SigLIP", required)


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    return tower_fields(
        config, architectures=["SiglipVisionModel"], model_type="siglip_vision_model"
    )


def state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    return rename_to(sd, rules(config))
