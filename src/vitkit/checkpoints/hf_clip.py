"""transformers CLIP <-> vitkit: image towers, text towers and both together.

    CLIPVisionModel                 pre_norm, patch_bias=False, [CLS] after post_layernorm
    CLIPVisionModelWithProjection   the same + `visual_projection` (no bias) -> `projection`
    CLIPModel (model_type "clip")   as an image model: the vision tower and `visual_projection`
                                    (the rest is left aside); with its text tower: an
                                    `ImageTextModel` (`vision.*`, `text.*`, `logit_scale`)
    CLIPTextModel                   a `TextTransformer` without projection: causal attention,
                                    positions (T, D) -> pos_embed (1, T, D), final_layer_norm
    CLIPTextModelWithProjection     the same + `text_projection` (no bias) -> `projection`

The text tower pools the end-of-text token as transformers does: the largest id of each row
when `eos_token_id` is 2 (the legacy configs, e.g. openai/clip-vit-base-patch32:
`pool="argmax"`, written back as 2), else the first `eos_token_id` (`pool="eos"`).

transformers' CLIP returns `last_hidden_state` *before* `post_layernorm` (only the pooled [CLS]
is normalised); vitkit's `last_hidden_state` is after its final norm, as timm's
`forward_features`. `pooler_output` and `image_embeds` are the same in both.
Files written by transformers 5 keep `vision_model.` on CLIPVisionModelWithProjection and drop it
on CLIPVisionModel (and `text_model.` on CLIPTextModel); both are read, and vitkit writes the
prefixes (the layout on the Hub).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vitkit.checkpoints._common import (
    HF_ACT_TO,
    HF_BASE,
    AnyConfig,
    Rule,
    block_rules,
    build_config,
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
from vitkit.errors import CheckpointError
from vitkit.models.image_text import ImageTextConfig
from vitkit.models.text import TextConfig

ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")
TEXT_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_PREFIX = "vision_model."
TEXT_PREFIX = "text_model."
_VISION_ANCHOR = "embeddings.patch_embedding.weight"  # the key that finds a tower's prefix
_TEXT_ANCHOR = "embeddings.token_embedding.weight"
LEGACY_EOS = 2  # transformers pools the largest id for this eos_token_id (configs before #24773)
LAYER = dict(ln1="layer_norm1", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
             o="self_attn.out_proj", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip


def layer_rules(i: int, dim: int, qkv_bias: bool = True) -> list[Rule]:
    """One encoder layer in the CLIP / SigLIP layout (`encoder.layers.{i}.self_attn.q_proj`),
    of either tower."""
    return block_rules(f"blocks.{i}.", f"encoder.layers.{i}.", LAYER, dim, qkv_bias)


def vision_config(data: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The vision part of a CLIP/SigLIP config.json (the whole dict for a vision model)."""
    return _part(data, "vision_config", source)


def text_part(data: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The text part of a CLIP/SigLIP config.json (the whole dict for a text model)."""
    return _part(data, "text_config", source)


def _part(data: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    if data.get("model_type") not in ("clip", "siglip"):
        return dict(data)
    # early CLIP configs state the towers in `text_config_dict` / `vision_config_dict`, which
    # transformers builds in full (defaults included) and puts over `text_config`
    part = data.get(f"{key}_dict") or data.get(key) or {}
    if not isinstance(part, dict):
        raise CheckpointError(f"{source}: {key} must be a JSON object")
    return dict(part)


def common_fields(v: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> dict:
    """`ViTConfig` fields that CLIP and SigLIP vision configs spell the same way."""
    c = {**defaults, **{k: val for k, val in v.items() if val is not None}}
    hidden = integer(c, "hidden_size", source=source)
    return dict(
        image_size=integer(c, "image_size", source=source),
        patch_size=integer(c, "patch_size", source=source),
        in_chans=integer(c, "num_channels", source=source),
        embed_dim=hidden,
        depth=integer(c, "num_hidden_layers", source=source),
        num_heads=integer(c, "num_attention_heads", source=source),
        mlp_ratio=integer(c, "intermediate_size", source=source) / hidden,
        layer_norm_eps=number(c, "layer_norm_eps", 1e-5, source=source),
        act=hf_act(c["hidden_act"], source=source),
        attn_drop_rate=number(c, "attention_dropout", 0.0, source=source),
        num_classes=0,
    )


VISION_DEFAULTS = dict(  # transformers' CLIPVisionConfig
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
    v = vision_config(data, source)
    projection = None
    if arch != "CLIPVisionModel":
        # CLIPModel's visual_projection is the top-level projection_dim's (transformers' default
        # 512); CLIPVisionModelWithProjection's its own
        stated = data if arch == "CLIPModel" else v
        projection = integer(stated, "projection_dim", 512, source=source)
    return build_config(ViTConfig, source, **common_fields(v, VISION_DEFAULTS, source),
                        pre_norm=True, patch_bias=False, projection_dim=projection)  # fmt: skip


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
        out += layer_rules(i, D, config.qkv_bias)
    out = under([*out, *weight_and_bias("norm", "post_layernorm")], prefix)
    if config.projection_dim is not None:
        out.append(same("projection.weight", "visual_projection.weight"))
    return out


def state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit weights from a CLIP vision (or full CLIP) state dict; the text tower is ignored."""
    ignore = [TEXT_PREFIX, "text_projection.", "logit_scale"]
    ignore += ["visual_projection."] if config.projection_dim is None else []
    return towers_from_hf(sd, config, rules, *ignore, source=source, what="CLIP")


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


# ------------------------------------------------------------------------------ text towers
_TEXT_DEFAULTS = dict(  # transformers' CLIPTextConfig
    vocab_size=49_408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49_407,
)


def text_fields(t: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> dict:
    """`TextConfig` fields that CLIP and SigLIP text configs spell the same way."""
    c = {**defaults, **{k: val for k, val in t.items() if val is not None}}
    hidden = integer(c, "hidden_size", source=source)
    return dict(
        vocab_size=integer(c, "vocab_size", source=source),
        context_length=integer(c, "max_position_embeddings", source=source),
        width=hidden,
        depth=integer(c, "num_hidden_layers", source=source),
        num_heads=integer(c, "num_attention_heads", source=source),
        mlp_ratio=integer(c, "intermediate_size", source=source) / hidden,
        act=hf_act(c["hidden_act"], source=source),
        layer_norm_eps=number(c, "layer_norm_eps", 1e-5, source=source),
        attn_drop_rate=number(c, "attention_dropout", 0.0, source=source),
    )


def text_tower_fields(config: TextConfig, **extra: Any) -> dict[str, Any]:
    """config.json of a CLIP / SigLIP text tower (`text_fields` reads it back)."""
    c = config
    return {
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "hidden_size": c.width,
        "intermediate_size": c.mlp_hidden_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "hidden_act": HF_ACT_TO[c.act],
        "layer_norm_eps": c.layer_norm_eps,
        "attention_dropout": c.attn_drop_rate,
        **extra,
    }


def text_architecture(data: Mapping[str, Any]) -> str:
    """CLIPTextModel[WithProjection], or CLIPModel for a whole model's config."""
    if data.get("model_type") == "clip":
        return "CLIPModel"
    archs = data.get("architectures") or ["CLIPTextModel"]
    if not isinstance(archs, list) or archs[0] not in TEXT_ARCHITECTURES:
        raise CheckpointError(f"unsupported CLIP text architecture {archs!r}; vitkit reads "
                              f"{TEXT_ARCHITECTURES} and CLIPModel")  # fmt: skip
    return archs[0]


def text_config_from_hf(data: Mapping[str, Any], *, source: str = "config.json") -> TextConfig:
    """The `TextConfig` of a CLIPModel's `text_config` (its projection is the top-level
    `projection_dim`) or of a CLIPTextModel[WithProjection] config.json."""
    arch = text_architecture(data)
    t = text_part(data, source)
    projection = None
    if arch != "CLIPTextModel":
        projection = integer(data if arch == "CLIPModel" else t, "projection_dim", 512,
                             source=source)  # fmt: skip
    fields = text_fields(t, _TEXT_DEFAULTS, source)
    eos = {**_TEXT_DEFAULTS, **{k: v for k, v in t.items() if v is not None}}["eos_token_id"]
    if isinstance(eos, list):
        raise CheckpointError(f"{source}: text_config eos_token_id={eos!r}: CLIP pools one "
                              f"end-of-text id")  # fmt: skip
    eos = integer({"eos_token_id": eos}, "eos_token_id", source=source, minimum=0)
    pool = dict(pool="argmax") if eos == LEGACY_EOS else dict(pool="eos", eos_token_id=eos)
    return build_config(TextConfig, source, "text tower", **fields, **pool, causal=True,
                        projection_dim=projection)  # fmt: skip


def text_tower_rules(config: TextConfig) -> list[Rule]:
    """Embeddings, encoder layers and final norm of a CLIP / SigLIP text tower (no prefix)."""
    D, T = config.width, config.context_length
    out = [
        same("token_embed.weight", "embeddings.token_embedding.weight"),
        same("pos_embed", "embeddings.position_embedding.weight", (T, D)),
    ]
    for i in range(config.depth):
        out += layer_rules(i, D)
    return out + weight_and_bias("norm", "final_layer_norm")


def text_rules(config: TextConfig, prefix: str = TEXT_PREFIX) -> list[Rule]:
    """vitkit <-> CLIP text tower names, the tower's under `prefix`, `text_projection` beside."""
    out = under(text_tower_rules(config), prefix)
    if config.projection_dim is not None:
        out.append(same("projection.weight", "text_projection.weight"))
    return out


def text_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: TextConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit `TextTransformer` weights from a CLIP text (or full CLIP) state dict."""
    ignore = [_PREFIX, "visual_projection.", "logit_scale"]
    ignore += ["text_projection."] if config.projection_dim is None else []
    return towers_from_hf(sd, config, text_rules, *ignore, source=source, what="CLIP text")


def text_unsupported(config: TextConfig, *, projection: bool = False) -> list[str]:
    """Reasons CLIPTextModel[WithProjection] (`projection`: CLIPModel's, which has one) cannot
    hold `config` (empty if it can)."""
    c = config
    required = dict(causal=True, pool=("argmax", "eos"), projection_bias=False)
    reasons = differences(c, "CLIP", required)
    if c.pool == "eos" and c.eos_token_id == LEGACY_EOS:
        reasons.append(f"text eos_token_id={LEGACY_EOS} with pool='eos' (transformers reads "
                       f"{LEGACY_EOS} as the legacy largest-id rule)")  # fmt: skip
    if projection and c.projection_dim is None:
        reasons.append("a text tower without projection (CLIPModel has text_projection)")
    return reasons


def text_config_to_hf(config: TextConfig) -> dict[str, Any]:
    """config.json of CLIPTextModelWithProjection (CLIPTextModel without projection)."""
    c = config
    arch = "CLIPTextModelWithProjection" if c.projection_dim is not None else "CLIPTextModel"
    out = _text_config(c, architectures=[arch])
    return {**out, "projection_dim": c.projection_dim} if c.projection_dim is not None else out


def _text_config(config: TextConfig, **extra: Any) -> dict[str, Any]:
    eos = LEGACY_EOS if config.pool == "argmax" else config.eos_token_id
    return text_tower_fields(config, model_type="clip_text_model", eos_token_id=eos, **extra)


def text_state_dict_to_hf(sd: Mapping[str, Tensor], config: TextConfig) -> dict[str, Tensor]:
    return rename_to(sd, text_rules(config))


# ------------------------------------------------------------------------------ both towers
def image_text_config_from_hf(
    data: Mapping[str, Any], *, source: str = "config.json"
) -> ImageTextConfig:
    """The `ImageTextConfig` of a CLIPModel config.json (`logit_scale_init_value` is only an
    initial value; the weights hold the scale)."""
    vision, text = config_from_hf(data, source=source), text_config_from_hf(data, source=source)
    return build_config(ImageTextConfig, source, vision=vision, text=text, scores="softmax")


def image_text_rules(
    config: ImageTextConfig, vision_prefix: str = _PREFIX, text_prefix: str = TEXT_PREFIX
) -> list[Rule]:
    """vitkit's `ImageTextModel` <-> CLIPModel names."""
    return [
        *under(rules(config.vision, vision_prefix), ours="vision."),
        *under(text_rules(config.text, text_prefix), ours="text."),
        same("logit_scale", "logit_scale"),
    ]


def image_text_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ImageTextConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """vitkit `ImageTextModel` weights from a CLIPModel state dict."""
    return towers_from_hf(sd, config, image_text_rules, source=source, what="CLIP")


def towers_from_hf(
    sd: Mapping[str, Tensor], config: AnyConfig, table: Any, *ignore: str, source: str, what: str
) -> dict[str, Tensor]:
    """Weights of an image or a text tower, or of both (`ImageTextModel`), from a CLIP / SigLIP
    state dict by its family's `table(config, *prefixes)`, each tower's prefix (vision first)
    as the file has it; keys starting with an `ignore` entry are left aside."""
    towers = [config.vision, config.text] if isinstance(config, ImageTextConfig) else [config]
    anchors = [_TEXT_ANCHOR if isinstance(t, TextConfig) else _VISION_ANCHOR for t in towers]
    prefixes = [find_prefix(sd, anchor, source=source, what=what) for anchor in anchors]
    ignore += tuple(f"{prefix}embeddings.position_ids" for prefix in prefixes)
    return rename_from(sd, table(config, *prefixes), config, ignore=ignore, source=source)


def image_text_unsupported(config: ImageTextConfig) -> list[str]:
    """Reasons CLIPModel cannot hold `config` (empty if it can)."""
    reasons = [] if config.scores == "softmax" else [
        f"scores={config.scores!r} (CLIP has 'softmax')"]  # fmt: skip
    if config.vision.projection_dim is None:
        reasons.append("an image tower without projection (CLIPModel has visual_projection)")
    return reasons + unsupported(config.vision) + text_unsupported(config.text, projection=True)


def image_text_config_to_hf(
    config: ImageTextConfig, sd: Mapping[str, Tensor] | None = None
) -> dict[str, Any]:
    """CLIPModel's config.json; `logit_scale_init_value` is the weights' scale when `sd` is
    given."""
    projection = config.text.projection_dim
    scale = float(sd["logit_scale"]) if sd is not None else 2.6592
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": projection,
        "logit_scale_init_value": scale,
        "text_config": _text_config(config.text, projection_dim=projection),
        "vision_config": tower_fields(
            config.vision, model_type="clip_vision_model", projection_dim=projection
        ),
    }


def image_text_state_dict_to_hf(
    sd: Mapping[str, Tensor], config: ImageTextConfig
) -> dict[str, Tensor]:
    return rename_to(sd, image_text_rules(config))
