"""transformers SigLIP <-> vitkit: image towers, text towers and both together.

    SiglipVisionModel             no [CLS], positions for the patches only, tanh-GELU, then the
                                  attention-pooling head `head` (`global_pool="map"`; its fused
                                  `in_proj` becomes `attn_pool.q` + `attn_pool.kv`)
    SiglipModel ("siglip")        as an image model: the vision tower (the rest is left aside);
                                  with its text tower: an `ImageTextModel` with sigmoid scores,
                                  `logit_scale` and `logit_bias` (shape (1,) in the file)
    SiglipTextModel               a `TextTransformer` attending both ways (`causal=False`) that
                                  reads the last position (`pool="last"`) through `head` (a
                                  Linear with bias, `projection_size` wide) -> `projection`

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
    build_config,
    differences,
    integer,
    rename_to,
    same,
    under,
    weight_and_bias,
)
from vitkit.checkpoints.hf_clip import (
    TEXT_PREFIX,
    VISION_DEFAULTS,
    common_fields,
    layer_rules,
    text_fields,
    text_part,
    text_tower_fields,
    text_tower_rules,
    tower_fields,
    towers_from_hf,
    vision_config,
)
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError
from vitkit.models.image_text import ImageTextConfig
from vitkit.models.text import TextConfig

_PREFIX = "vision_model."
_DEFAULTS = dict(  # transformers' SiglipVisionConfig: CLIP's but for these
    VISION_DEFAULTS, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6
)


def config_from_hf(data: Mapping[str, Any], *, source: str = "config.json") -> ViTConfig:
    v = vision_config(data, source)
    if not v.get("vision_use_head", True):
        raise CheckpointError(
            f"{source}: vision_use_head=false (no pooled output) is not supported"
        )
    fields = common_fields(v, _DEFAULTS, source)
    return build_config(ViTConfig, source, **fields, class_token=False, global_pool="map")


def rules(config: ViTConfig, prefix: str = _PREFIX) -> list[Rule]:
    """vitkit <-> SigLIP vision tower names, the tower's under `prefix`."""
    c, D = config, config.embed_dim
    out = [
        *weight_and_bias("patch_embed.proj", "embeddings.patch_embedding"),
        same("pos_embed", "embeddings.position_embedding.weight", (c.num_patches, D)),
    ]
    for i in range(c.depth):
        out += layer_rules(i, D, c.qkv_bias)
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
    ignore = (TEXT_PREFIX, "logit_scale", "logit_bias")
    return towers_from_hf(sd, config, rules, *ignore, source=source, what="SigLIP")


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


# ------------------------------------------------------------------------------ text towers
# transformers' SiglipTextConfig: the vision tower's sizes, 32k tokens, 64 positions
_TEXT_DEFAULTS = dict(_DEFAULTS, vocab_size=32_000, max_position_embeddings=64)
SIGLIP_EOS = 1  # the end-of-text id of SigLIP's SentencePiece vocabulary ("</s>")


def text_config_from_hf(data: Mapping[str, Any], *, source: str = "config.json") -> TextConfig:
    """The `TextConfig` of a SiglipModel's `text_config` or a SiglipTextModel config.json.
    The last position is pooled whatever the end-of-text id; `eos_token_id` keeps the file's
    when it lies in the vocabulary (transformers' default, 49407, does not), else SigLIP's."""
    t = text_part(data, source)
    fields = text_fields(t, _TEXT_DEFAULTS, source)
    eos = t.get("eos_token_id")
    if isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < fields["vocab_size"]:
        fields["eos_token_id"] = eos
    else:
        fields["eos_token_id"] = SIGLIP_EOS
    width = fields["width"]
    projection = integer({"projection_size": t.get("projection_size") or width},
                         "projection_size", source=source)  # fmt: skip
    return build_config(TextConfig, source, "text tower", **fields, causal=False, pool="last",
                        projection_dim=projection, projection_bias=True)  # fmt: skip


def text_rules(config: TextConfig, prefix: str = TEXT_PREFIX) -> list[Rule]:
    """vitkit <-> SigLIP text tower names, the tower (and its `head`) under `prefix`."""
    return under([*text_tower_rules(config), *weight_and_bias("projection", "head")], prefix)


def text_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: TextConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit `TextTransformer` weights from a SigLIP text (or full SigLIP) state dict."""
    ignore = (_PREFIX, "logit_scale", "logit_bias")
    return towers_from_hf(sd, config, text_rules, *ignore, source=source, what="SigLIP text")


def text_unsupported(config: TextConfig) -> list[str]:
    """Reasons SiglipTextModel cannot hold `config` (empty if it can)."""
    required = dict(causal=False, pool="last", projection_bias=True)
    reasons = differences(config, "SigLIP", required)
    if config.projection_dim is None:
        reasons.append("a text tower without projection (SigLIP's has a head)")
    return reasons


def text_config_to_hf(config: TextConfig) -> dict[str, Any]:
    return _text_config(config, architectures=["SiglipTextModel"])


def _text_config(config: TextConfig, **extra: Any) -> dict[str, Any]:
    return text_tower_fields(
        config,
        model_type="siglip_text_model",
        projection_size=config.projection_dim,
        eos_token_id=config.eos_token_id,
        **extra,
    )


def text_state_dict_to_hf(sd: Mapping[str, Tensor], config: TextConfig) -> dict[str, Tensor]:
    return rename_to(sd, text_rules(config))


# ------------------------------------------------------------------------------ both towers
def image_text_config_from_hf(
    data: Mapping[str, Any], *, source: str = "config.json"
) -> ImageTextConfig:
    """The `ImageTextConfig` of a SiglipModel config.json (sigmoid scores)."""
    vision, text = config_from_hf(data, source=source), text_config_from_hf(data, source=source)
    return build_config(ImageTextConfig, source, vision=vision, text=text, scores="sigmoid")


def image_text_rules(
    config: ImageTextConfig, vision_prefix: str = _PREFIX, text_prefix: str = TEXT_PREFIX
) -> list[Rule]:
    """vitkit's `ImageTextModel` <-> SiglipModel names (its scale and bias are (1,) there)."""
    return [
        *under(rules(config.vision, vision_prefix), ours="vision."),
        *under(text_rules(config.text, text_prefix), ours="text."),
        same("logit_scale", "logit_scale", (1,)),
        same("logit_bias", "logit_bias", (1,)),
    ]


def image_text_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ImageTextConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit `ImageTextModel` weights from a SiglipModel state dict."""
    return towers_from_hf(sd, config, image_text_rules, source=source, what="SigLIP")


def image_text_unsupported(config: ImageTextConfig) -> list[str]:
    """Reasons SiglipModel cannot hold `config` (empty if it can)."""
    reasons = [] if config.scores == "sigmoid" else [
        f"scores={config.scores!r} (SigLIP has 'sigmoid')"]  # fmt: skip
    return reasons + unsupported(config.vision) + text_unsupported(config.text)


def image_text_config_to_hf(
    config: ImageTextConfig, sd: Mapping[str, Tensor] | None = None
) -> dict[str, Any]:
    """SiglipModel's config.json (the scale and bias live in the weights only)."""
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": _text_config(config.text),
        "vision_config": tower_fields(config.vision, model_type="siglip_vision_model"),
    }


def image_text_state_dict_to_hf(
    sd: Mapping[str, Tensor], config: ImageTextConfig
) -> dict[str, Tensor]:
    return rename_to(sd, image_text_rules(config))
