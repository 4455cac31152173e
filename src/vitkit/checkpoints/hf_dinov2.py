"""transformers DINOv2 <-> vitkit.

    Dinov2Model                 LayerScale (`layer_scale{1,2}.lambda1` -> `ls{1,2}.gamma`), a mask
                                token stored as (1, D), SwiGLU (`mlp.weights_in/out`) when
                                `use_swiglu_ffn`; pooled output = [CLS] after the final norm
    Dinov2WithRegistersModel    the same + `embeddings.register_tokens` (no positions)
    Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification
                                the encoder under `dinov2.` / `dinov2_with_registers.` and a
                                `classifier` on [CLS] beside the mean of the patch tokens
                                (`global_pool="token_avg"`, 2 x hidden_size inputs)

Position interpolation at other sizes follows each class: bicubic without antialias in
Dinov2Model, with antialias in Dinov2WithRegistersModel (`pos_embed_antialias`).
transformers sizes SwiGLU's hidden layer as (int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8
units per half; vitkit's `mlp_ratio` counts both packed halves (timm's SwiGLUPacked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from vitkit.checkpoints._common import (
    HF_BASE,
    Rule,
    block_rules,
    build_config,
    differences,
    find_prefix,
    hf_act,
    hf_fields,
    hf_label_fields,
    hf_labels,
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

ARCHITECTURES = ("Dinov2Model", "Dinov2WithRegistersModel")
CLASSIFIERS = ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
_BASE_PREFIX = ("dinov2.", "dinov2_with_registers.")  # the encoder inside a classifier


def _swiglu_half(dim: int, ratio: float) -> int:
    return (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8


def config_from_hf(data: Mapping[str, Any], *, source: str = "config.json") -> ViTConfig:
    c = data
    registers = c.get("model_type") == "dinov2_with_registers"
    arch = (c.get("architectures") or [ARCHITECTURES[registers]])[0]
    if arch not in (ARCHITECTURES[registers], CLASSIFIERS[registers]):
        raise CheckpointError(
            f"{source}: architecture {arch!r} is not one vitkit reads for model_type "
            f"{c.get('model_type')!r} ({ARCHITECTURES[registers]}, {CLASSIFIERS[registers]})"
        )
    classifier = arch == CLASSIFIERS[registers]
    num_classes, labels = hf_labels(c, source=source) if classifier else (0, None)
    if not c.get("apply_layernorm", True):
        raise CheckpointError(f"{source}: apply_layernorm=false is not supported")
    hidden = integer(c, "hidden_size", 768, source=source)
    ratio = number(c, "mlp_ratio", 4, source=source)
    swiglu = bool(c.get("use_swiglu_ffn", False))
    if swiglu:
        ratio = 2 * _swiglu_half(hidden, ratio) / hidden
    return build_config(
        ViTConfig,
        source,
        image_size=integer(c, "image_size", 224, source=source),
        patch_size=integer(c, "patch_size", 16 if registers else 14, source=source),
        in_chans=integer(c, "num_channels", 3, source=source),
        num_classes=num_classes,
        id2label=labels,
        global_pool="token_avg" if classifier else "token",
        embed_dim=hidden,
        depth=integer(c, "num_hidden_layers", 12, source=source),
        num_heads=integer(c, "num_attention_heads", 12, source=source),
        mlp_ratio=ratio,
        mlp_layer="swiglu" if swiglu else "mlp",
        qkv_bias=bool(c.get("qkv_bias", True)),
        layer_norm_eps=number(c, "layer_norm_eps", 1e-6, source=source),
        act=hf_act(c.get("hidden_act", "gelu"), source=source),
        drop_rate=number(c, "hidden_dropout_prob", 0.0, source=source),
        attn_drop_rate=number(c, "attention_probs_dropout_prob", 0.0, source=source),
        layer_scale_init=number(c, "layerscale_value", 1.0, source=source),
        use_mask_token=registers or bool(c.get("use_mask_token", True)),
        num_register_tokens=(
            integer(c, "num_register_tokens", 4, source=source, minimum=0) if registers else 0
        ),
        pos_embed_antialias=registers,
    )


def rules(config: ViTConfig, prefix: str = "") -> list[Rule]:
    """vitkit <-> transformers names: the encoder's under `prefix`, then a classifier's."""
    c, D = config, config.embed_dim
    out = [
        same("cls_token", "embeddings.cls_token"),
        same("pos_embed", "embeddings.position_embeddings"),
        *weight_and_bias("patch_embed.proj", "embeddings.patch_embeddings.projection"),
    ]
    if c.use_mask_token:
        out.append(same("mask_token", "embeddings.mask_token", (1, D)))
    if c.num_register_tokens:
        out.append(same("reg_token", "embeddings.register_tokens"))
    fc1, fc2 = ("weights_in", "weights_out") if c.mlp_layer == "swiglu" else ("fc1", "fc2")
    names = dict(ln1="norm1", q="attention.attention.query", k="attention.attention.key",
                 v="attention.attention.value", o="attention.output.dense", ln2="norm2",
                 fc1=f"mlp.{fc1}", fc2=f"mlp.{fc2}")  # fmt: skip
    for i in range(c.depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        out += block_rules(ours, theirs, names, D, c.qkv_bias)
        out += [same(f"{ours}ls{j}.gamma", f"{theirs}layer_scale{j}.lambda1") for j in (1, 2)]
    out = under([*out, *weight_and_bias("norm", "layernorm")], prefix)
    return out + weight_and_bias("head", "classifier") if c.num_classes else out


def state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    prefix = find_prefix(sd, "embeddings.cls_token", source=source, what="DINOv2")
    return rename_from(sd, rules(config, prefix), config, source=source)


def unsupported(config: ViTConfig) -> list[str]:
    """Reasons no transformers DINOv2 class can hold `config` (empty if one can)."""
    c = config
    registers = bool(c.num_register_tokens)
    required = dict(
        HF_BASE,
        global_pool=("token", "token_avg"),
        num_classes=c.num_classes,
        layer_scale_init=c.layer_scale_init,
        mlp_layer=("mlp", "swiglu"),
        use_mask_token=(True, False),
        num_register_tokens=c.num_register_tokens,
        pos_embed_antialias=registers,
        qkv_bias=(True, False),
    )
    reasons = differences(c, "DINOv2", required)
    if c.global_pool == "token" and c.num_classes:
        reasons.append(
            f"a head of {c.num_classes} classes on [CLS] alone (transformers' DINOv2 classifiers "
            "read [CLS] beside the patch mean: global_pool='token_avg')"
        )
    if c.global_pool == "token_avg" and not c.num_classes:
        reasons.append(
            "global_pool='token_avg' without classes (transformers pools so only to classify)"
        )
    if c.mlp_layer == "mlp" and c.mlp_ratio != int(c.mlp_ratio):
        reasons.append(f"mlp_ratio={c.mlp_ratio} (transformers' DINOv2 takes an integer)")
    if c.layer_scale_init is None:
        reasons.append("DINOv2 has LayerScale (layer_scale_init)")
    if c.mlp_layer == "swiglu" and _swiglu_half(c.embed_dim, 4) * 2 != c.mlp_hidden_dim:
        reasons.append(
            f"a SwiGLU of {c.mlp_hidden_dim} packed units (transformers derives "
            f"{_swiglu_half(c.embed_dim, 4) * 2} from the width)"
        )
    return reasons


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    c = config
    registers = bool(c.num_register_tokens)
    swiglu = c.mlp_layer == "swiglu"
    classes = ARCHITECTURES if c.global_pool == "token" else CLASSIFIERS
    out = hf_fields(
        c,
        architectures=[classes[registers]],
        model_type="dinov2_with_registers" if registers else "dinov2",
        mlp_ratio=4 if swiglu else int(c.mlp_ratio),
        use_swiglu_ffn=swiglu,
        hidden_dropout_prob=c.drop_rate,
        attention_probs_dropout_prob=c.attn_drop_rate,
        qkv_bias=c.qkv_bias,
        layerscale_value=c.layer_scale_init,
        apply_layernorm=True,
    )
    if registers:
        out["num_register_tokens"] = c.num_register_tokens
    else:
        out["use_mask_token"] = c.use_mask_token
    return {**out, **hf_label_fields(c)}


def state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """transformers names; Dinov2WithRegistersModel always has a mask token, written as zeros
    when the model has none (it only acts on masked inputs)."""
    if config.num_register_tokens and not config.use_mask_token:
        sd = {**sd, "mask_token": sd["cls_token"].new_zeros(1, 1, config.embed_dim)}
        config = config.replace(use_mask_token=True)
    prefix = _BASE_PREFIX[bool(config.num_register_tokens)] if config.num_classes else ""
    return rename_to(sd, rules(config, prefix))
