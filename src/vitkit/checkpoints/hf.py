"""Hugging Face transformers checkpoints <-> vitkit: ViT / DeiT here, and the entry points
`load_hf` / `save_hf` that dispatch to the families (hf_dinov2, hf_clip, hf_siglip).

Files on disk keep the transformers v4 key names (transformers 5 renames them at load and back
at save), e.g. `vit.encoder.layer.3.attention.attention.query.weight`; the transformers 5
in-memory names (`vit.layers.3.attention.q_proj.weight`) are accepted on input too.

Model classes and what they become in vitkit:

    ViTForImageClassification            head="linear", num_classes=K   (prefix "vit.")
    ViTModel (with pooler)               head="mlp", num_classes=0      (no prefix; pooler.dense
                                                                          -> pre_logits.fc)
    ViTForMaskedImageModeling            use_mask_token, num_classes=0  (decoder.* is not ours:
                                                                          pass ignore=("decoder.",))
    DeiTForImageClassificationWithTeacher  distilled, head + head_dist  (prefix "deit.")
    DeiTModel                            distilled, head="mlp", num_classes=0

Separate q, k, v projections become vitkit's fused `attn.qkv` (q, k, v stacked in that order).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from vitkit.checkpoints import hf_clip, hf_dinov2, hf_siglip
from vitkit.checkpoints._common import HF_ACT_FROM as _ACT_FROM_HF
from vitkit.checkpoints._common import HF_ACT_TO as _ACT_TO_HF
from vitkit.checkpoints._common import (
    check_state_dict,
    hf_label_fields,
    hf_labels,
    integer,
    mismatch_error,
    number,
)
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

# model_type -> the module that maps that family (ViT / DeiT are this module)
_FAMILIES: dict[str, Any] = {
    "dinov2": hf_dinov2,
    "dinov2_with_registers": hf_dinov2,
    "clip_vision_model": hf_clip,
    "clip": hf_clip,
    "siglip_vision_model": hf_siglip,
    "siglip": hf_siglip,
}
MODEL_TYPES = ("vit", "deit", *_FAMILIES)


def load_hf(
    data: dict[str, Any],
    raw: Mapping[str, Tensor],
    source: str,
    *,
    config: ViTConfig | None = None,
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """(config, vitkit state dict) of a transformers folder's config.json and weights.

    Dispatches on `model_type`: vit, deit, dinov2, dinov2_with_registers, clip_vision_model,
    clip (the vision tower of CLIPModel), siglip_vision_model, siglip (SiglipModel's vision
    tower). `config` replaces what config.json implies.
    """
    model_type = data.get("model_type")
    if model_type in ("vit", "deit"):
        cfg = config or config_from_hf(data)
        if config is None and cfg.head == "mlp" and not any("pooler." in k for k in raw):
            cfg = cfg.replace(head="linear", head_hidden_dim=None)  # saved without its pooler
        ignore = ("decoder.",) if cfg.use_mask_token else ()
        return cfg, state_dict_from_hf(raw, cfg, ignore=ignore, source=source)
    if model_type not in _FAMILIES:
        raise CheckpointError(
            f"{source}: transformers model_type {model_type!r} is not one vitkit reads "
            f"({', '.join(MODEL_TYPES)})"
        )
    family = _FAMILIES[model_type]
    cfg = config or family.config_from_hf(data, source=source)
    return cfg, family.state_dict_from_hf(raw, cfg, source=source)


def _family_for(config: ViTConfig) -> Any:
    """The mapping module whose classes hold `config`: the one its switches point to."""
    if config.pre_norm or config.projection_dim is not None:
        return hf_clip
    if config.global_pool == "map":
        return hf_siglip
    if config.layer_scale_init is not None:
        return hf_dinov2
    return None


def save_hf(config: ViTConfig, sd: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict]:
    """(config.json dict, weights) in transformers' format for the class that fits `config`,
    or `CheckpointError` saying what no class can express."""
    hf_architecture(config)  # raises, naming what no class can express
    family = _family_for(config)
    if family is None:
        return config_to_hf(config), state_dict_to_hf(sd, config)
    return family.config_to_hf(config), family.state_dict_to_hf(sd, config)


# architecture -> (distilled, head, has classes, mask token)
_ARCHITECTURES: dict[str, tuple[bool, str, bool, bool]] = {
    "ViTForImageClassification": (False, "linear", True, False),
    "ViTModel": (False, "mlp", False, False),
    "ViTForMaskedImageModeling": (False, "linear", False, True),
    "DeiTForImageClassificationWithTeacher": (True, "linear", True, False),
    "DeiTModel": (True, "mlp", False, False),
    "DeiTForMaskedImageModeling": (True, "linear", False, True),
}

# per-layer names: file (v4) suffix, transformers 5 suffix, vitkit suffix
_LAYER_MAP = (
    ("layernorm_before", "layernorm_before", "norm1"),
    ("attention.output.dense", "attention.o_proj", "attn.proj"),
    ("layernorm_after", "layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1", "mlp.fc1"),
    ("output.dense", "mlp.fc2", "mlp.fc2"),
)
_QKV_V4 = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_QKV_V5 = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


# ------------------------------------------------------------------------------------- config
def config_from_hf(hf_config: dict[str, Any]) -> ViTConfig:
    """Translate a transformers `config.json` (model_type "vit" or "deit") into a `ViTConfig`.

    The first entry of `architectures` decides the head (see the module docstring); without it,
    a file with `id2label` is read as a classifier and one without as a bare `ViTModel`.
    `layer_norm_eps` is kept as the file says (transformers' default is 1e-12).
    """
    c = hf_config
    model_type = c.get("model_type")
    if model_type not in ("vit", "deit"):
        raise CheckpointError(
            f"config.json has model_type={model_type!r}; vitkit reads "
            f"transformers ViT ('vit') and DeiT ('deit') configs"
        )
    archs = c.get("architectures") or []
    if archs:
        arch = archs[0]
    else:
        base = "DeiT" if model_type == "deit" else "ViT"
        arch = (
            (
                f"{base}ForImageClassificationWithTeacher"
                if base == "DeiT"
                else "ViTForImageClassification"
            )
            if c.get("id2label")
            else f"{base}Model"
        )
    if arch == "DeiTForImageClassification":
        raise CheckpointError(
            "DeiTForImageClassification classifies from the [CLS] token alone although the model "
            "has a distillation token; vitkit's distilled models average both heads. Load the "
            "encoder with config.json architectures ['DeiTModel'] and fine-tune a head, or use "
            "a DeiTForImageClassificationWithTeacher checkpoint"
        )
    if arch not in _ARCHITECTURES:
        raise CheckpointError(
            f"unsupported transformers architecture {arch!r}; vitkit reads {sorted(_ARCHITECTURES)}"
        )
    distilled, head, has_classes, mask = _ARCHITECTURES[arch]
    if distilled != (model_type == "deit"):
        raise CheckpointError(f"architecture {arch} does not fit model_type {model_type!r}")

    act = c.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise CheckpointError(
            f"hidden_act={act!r} is not supported; vitkit has exact GELU "
            f"('gelu') and its tanh approximation ('gelu_pytorch_tanh')"
        )
    hidden = integer(c, "hidden_size", 768)
    heads = integer(c, "num_attention_heads", 12)
    if c.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"head_dim={c['head_dim']} != hidden_size / num_attention_heads")
    if head == "mlp" and c.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"pooler_act={c['pooler_act']!r}: vitkit's pooler uses tanh")
    pooler = integer(c, "pooler_output_size", None) if c.get("pooler_output_size") else hidden

    num_classes, labels = hf_labels(c, source="config.json") if has_classes else (0, None)
    image_size = c.get("image_size", 224)
    try:
        return ViTConfig(
            image_size=(
                tuple(image_size) if isinstance(image_size, list) else integer(c, "image_size", 224)
            ),
            patch_size=_single(c, "patch_size", 16),
            in_chans=integer(c, "num_channels", 3),
            num_classes=num_classes,
            embed_dim=hidden,
            depth=integer(c, "num_hidden_layers", 12),
            num_heads=heads,
            mlp_ratio=integer(c, "intermediate_size", 4 * hidden) / hidden,
            qkv_bias=bool(c.get("qkv_bias", True)),
            layer_norm_eps=number(c, "layer_norm_eps", 1e-12),
            act=_ACT_FROM_HF[act],
            drop_rate=number(c, "hidden_dropout_prob", 0.0),
            attn_drop_rate=number(c, "attention_probs_dropout_prob", 0.0),
            distilled=distilled,
            use_mask_token=mask,
            head=head,
            head_hidden_dim=pooler if head == "mlp" and pooler != hidden else None,
            id2label=labels,
        )
    except ConfigError as exc:
        raise CheckpointError(f"config.json describes an invalid model: {exc}") from exc


def _single(c: Mapping[str, Any], key: str, default: int) -> int:
    """A square size given as one number or a pair (transformers writes both)."""
    value = c.get(key, default)
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    elif isinstance(value, list | tuple):
        raise CheckpointError(f"config.json: non-square {key}={value} is not supported")
    return integer({key: value}, key)


def hf_architecture(config: ViTConfig) -> str:
    """The transformers class that holds a model of this config, or raise `CheckpointError`
    saying which setting transformers cannot express (save with format="vitkit" then)."""
    reasons = hf_unsupported(config)
    if reasons:
        raise CheckpointError(
            "this model cannot be written as a transformers checkpoint ("
            + "; ".join(reasons)
            + "); save it with format='vitkit'"
        )
    family = _family_for(config)
    if family is not None:
        return family.config_to_hf(config)["architectures"][0]
    base = "DeiT" if config.distilled else "ViT"
    if config.use_mask_token:
        return f"{base}ForMaskedImageModeling"
    if config.num_classes == 0:
        return f"{base}Model"
    return (
        "DeiTForImageClassificationWithTeacher" if config.distilled else "ViTForImageClassification"
    )


def hf_unsupported(config: ViTConfig) -> list[str]:
    """Reasons no transformers class vitkit writes can reproduce this config (empty if one can):
    ViT/DeiT, or the DINOv2 / CLIP / SigLIP class its switches point to."""
    stem = ["a convolutional stem (stem_channels)"] if config.stem_channels else []
    family = _family_for(config)
    if family is not None:
        return stem + family.unsupported(config)
    c = config
    reasons = stem
    for name, what in (
        ("no_embed_class", "positions on the patches only (DeiT III)"),
        ("pos_embed_antialias", "antialiased position resampling (timm's rule)"),
    ):
        if getattr(c, name):
            reasons.append(f"{what} is not in transformers ViT")
    if c.mlp_layer != "mlp":
        reasons.append("a SwiGLU MLP without LayerScale has no transformers class")
    if not c.patch_bias:
        reasons.append("transformers ViT has a patch bias")
    if not c.class_token or c.global_pool != "token":
        reasons.append("transformers pools the [CLS] token only")
    if c.use_fc_norm:
        reasons.append("no fc_norm after pooling in transformers")
    if c.num_register_tokens:
        reasons.append("no register tokens in transformers ViT")
    if c.pos_embed != "learned":
        reasons.append(f"pos_embed={c.pos_embed!r} (transformers ViT has learned positions)")
    if c.dynamic_img_pad:
        reasons.append("no dynamic image padding in transformers")
    if c.head == "mlp" and c.num_classes:
        reasons.append("transformers' classifiers have no tanh pre-logits layer")
    if c.head == "linear" and c.num_classes == 0 and not c.use_mask_token:
        reasons.append("a headless model without pooler (ViTModel always builds its pooler)")
    if c.use_mask_token and (c.num_classes or c.head == "mlp"):
        reasons.append("a mask token together with a head")
    if c.pos_embed_interpolation != "bicubic":
        reasons.append("transformers interpolates positions bicubically only")
    if c.mlp_hidden_dim != c.embed_dim * c.mlp_ratio:
        reasons.append(f"mlp_ratio={c.mlp_ratio} gives a fractional intermediate size")
    return reasons


def config_to_hf(config: ViTConfig, architecture: str | None = None) -> dict[str, Any]:
    """A transformers `config.json` dict for `config`. `architecture` defaults to the class that
    fits (`hf_architecture`); pass it to override (e.g. "ViTForImageClassification")."""
    c = config
    arch = architecture or hf_architecture(c)
    h, w = c.image_hw
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": "deit" if c.distilled else "vit",
        "hidden_size": c.embed_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.mlp_hidden_dim,
        "hidden_act": _ACT_TO_HF[c.act],
        "hidden_dropout_prob": c.drop_rate,
        "attention_probs_dropout_prob": c.attn_drop_rate,
        "initializer_range": 0.02,
        "layer_norm_eps": c.layer_norm_eps,
        "image_size": h if h == w else [h, w],
        "patch_size": c.patch_size,
        "num_channels": c.in_chans,
        "qkv_bias": c.qkv_bias,
        "encoder_stride": c.patch_size,
        "pooler_output_size": c.head_hidden_dim or c.embed_dim,
        "pooler_act": "tanh",
    }
    return {**out, **hf_label_fields(c)}


# ------------------------------------------------------------------------------- state dict
def _default_prefix(config: ViTConfig) -> str:
    if config.num_classes == 0 and not config.use_mask_token:
        return ""  # ViTModel / DeiTModel files have no prefix
    return "deit." if config.distilled else "vit."


def _detect_prefix(sd: Mapping[str, Tensor]) -> str:
    anchor = "embeddings.patch_embeddings.projection.weight"
    found = [k[: -len(anchor)] for k in sd if k.endswith(anchor)]
    if len(found) != 1:
        raise CheckpointError(
            f"cannot find the transformers patch embedding ('...{anchor}') in "
            f"the state dict; is this a ViT/DeiT checkpoint?"
        )
    return found[0]


def state_dict_from_hf(
    sd: Mapping[str, Tensor],
    config: ViTConfig,
    *,
    prefix: str | None = None,
    ignore: Sequence[str] = (),
    source: str = "state dict",
) -> dict[str, Tensor]:
    """Translate a transformers ViT/DeiT state dict into vitkit names for `config`.

    `prefix` is the encoder's prefix ("vit.", "deit." or "" for ViTModel files); None detects
    it. Keys starting with an entry of `ignore` (e.g. "decoder.") are skipped on purpose; any
    other key that does not map, a missing key or a wrong shape raises one `CheckpointError`.
    """
    if prefix is None:
        prefix = _detect_prefix(sd)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, Tensor]] = {}
    unexpected: list[str] = []
    top = {
        f"{prefix}embeddings.cls_token": "cls_token",
        f"{prefix}embeddings.distillation_token": "dist_token",
        f"{prefix}embeddings.mask_token": "mask_token",
        f"{prefix}embeddings.position_embeddings": "pos_embed",
        f"{prefix}embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        f"{prefix}embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        f"{prefix}layernorm.weight": "norm.weight",
        f"{prefix}layernorm.bias": "norm.bias",
    }
    for heads, ours in (
        (("classifier", "cls_classifier"), "head"),
        (("distillation_classifier",), "head_dist"),
        ((f"{prefix}pooler.dense", "pooler.dense"), "pre_logits.fc"),
    ):
        for theirs in heads:
            top[f"{theirs}.weight"] = f"{ours}.weight"
            top[f"{theirs}.bias"] = f"{ours}.bias"
    for key, value in sd.items():
        if any(key.startswith(p) for p in ignore):
            continue
        if key in top:
            if top[key] in out:
                raise CheckpointError(f"{source}: two keys map to {top[key]} (one is {key})")
            out[top[key]] = value
            continue
        m = _LAYER_RE.match(key[len(prefix) :]) if key.startswith(prefix) else None
        if m is None:
            unexpected.append(key)
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name in _QKV_V4 or name in _QKV_V5:
            which = (_QKV_V4 if name in _QKV_V4 else _QKV_V5).index(name)
            qkv.setdefault((i, kind), {})[which] = value
            continue
        for v4, v5, ours in _LAYER_MAP:
            if name in (v4, v5):
                out[f"blocks.{i}.{ours}.{kind}"] = value
                break
        else:
            unexpected.append(key)
    missing = []
    for (i, kind), parts in sorted(qkv.items()):
        if len(parts) == 3:
            try:
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]])
            except RuntimeError as exc:
                shapes = [list(parts[j].shape) for j in range(3)]
                raise CheckpointError(
                    f"{source}: query/key/value of layer {i} have shapes "
                    f"{shapes} that cannot be stacked"
                ) from exc
        else:
            missing += [
                f"{prefix}encoder.layer.{i}.{_QKV_V4[j]}.{kind}" for j in range(3) if j not in parts
            ]
    if unexpected or missing:
        raise mismatch_error(
            source,
            missing=missing,
            unexpected=unexpected,
            hint="keys that are not part of a ViT/DeiT encoder or head",
        )
    check_state_dict(
        out,
        config,
        source=source,
        hint="the vitkit config derived from config.json does not fit the weights",
    )
    return out


def state_dict_to_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, prefix: str | None = None
) -> dict[str, Tensor]:
    """Translate a vitkit state dict into transformers v4 file names (the inverse of
    `state_dict_from_hf`). `prefix` defaults to what the fitting class uses: "vit.", "deit.",
    or "" for a headless ViTModel/DeiTModel."""
    check_state_dict(sd, config, source="model state dict")
    if prefix is None:
        prefix = _default_prefix(config)
    head = "cls_classifier" if config.distilled else "classifier"
    top = {
        "cls_token": f"{prefix}embeddings.cls_token",
        "dist_token": f"{prefix}embeddings.distillation_token",
        "mask_token": f"{prefix}embeddings.mask_token",
        "pos_embed": f"{prefix}embeddings.position_embeddings",
        "patch_embed.proj.weight": f"{prefix}embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": f"{prefix}embeddings.patch_embeddings.projection.bias",
        "norm.weight": f"{prefix}layernorm.weight",
        "norm.bias": f"{prefix}layernorm.bias",
    }
    for ours, theirs in (
        ("head", head),
        ("head_dist", "distillation_classifier"),
        ("pre_logits.fc", f"{prefix}pooler.dense"),
    ):
        top[f"{ours}.weight"] = f"{theirs}.weight"
        top[f"{ours}.bias"] = f"{theirs}.bias"
    block_re = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
    layer_names = {ours: v4 for v4, _, ours in _LAYER_MAP}
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = block_re.match(key)
        if m is None:
            unmapped.append(key)
            continue
        i, name, kind = m.groups()
        base = f"{prefix}encoder.layer.{i}."
        if name == "attn.qkv":
            for part, theirs in zip(value.chunk(3, dim=0), _QKV_V4, strict=True):
                out[f"{base}{theirs}.{kind}"] = part.clone()  # no shared storage (safetensors)
        elif name in layer_names:
            out[f"{base}{layer_names[name]}.{kind}"] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            "these vitkit parameters have no transformers equivalent: "
            + ", ".join(sorted(unmapped))
            + "; save with format='vitkit'"
        )
    return out
