"""transformers ViT / DeiT <-> vitkit (`vitkit.checkpoints.hf` dispatches here and to the
families).

Files on disk keep the transformers v4 key names (transformers 5 renames them at load and back
at save), e.g. `vit.encoder.layer.3.attention.attention.query.weight`; the transformers 5
in-memory names (`vit.layers.3.attention.q_proj.weight`) are accepted on input too.

Model classes and what they become in vitkit:

    ViTForImageClassification            head="linear", num_classes=K   (prefix "vit.")
    ViTModel (with pooler)               head="mlp", num_classes=0      (no prefix; pooler.dense
                                                                          -> pre_logits.fc)
    ViTForMaskedImageModeling            use_mask_token, num_classes=0  (decoder.* is SimMIM's:
                                                                          see hf_mim)
    DeiTForImageClassificationWithTeacher  distilled, head + head_dist  (prefix "deit.")
    DeiTModel                            distilled, head="mlp", num_classes=0

Separate q, k, v projections become vitkit's fused `attn.qkv` (q, k, v stacked in that order).
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
    check_state_dict,
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
    weight_and_bias,
)
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError

# architecture -> (distilled, head, has classes, mask token)
_ARCHITECTURES: dict[str, tuple[bool, str, bool, bool]] = {
    "ViTForImageClassification": (False, "linear", True, False),
    "ViTModel": (False, "mlp", False, False),
    "ViTForMaskedImageModeling": (False, "linear", False, True),
    "DeiTForImageClassificationWithTeacher": (True, "linear", True, False),
    "DeiTModel": (True, "mlp", False, False),
    "DeiTForMaskedImageModeling": (True, "linear", False, True),
}


# ------------------------------------------------------------------------------------- config
def config_from_hf(hf_config: Mapping[str, Any], *, source: str = "config.json") -> ViTConfig:
    """Translate a transformers `config.json` (model_type "vit" or "deit") into a `ViTConfig`.

    The first entry of `architectures` decides the head (see the module docstring); without it,
    a file with `id2label` is read as a classifier and one without as a bare `ViTModel`.
    `layer_norm_eps` is kept as the file says (transformers' default is 1e-12).
    """
    c = hf_config
    model_type = c.get("model_type")
    if model_type not in ("vit", "deit"):
        raise CheckpointError(
            f"{source} has model_type={model_type!r}; vitkit reads "
            f"transformers ViT ('vit') and DeiT ('deit') configs"
        )
    base = "DeiT" if model_type == "deit" else "ViT"
    classifier = f"{base}ForImageClassification" + ("WithTeacher" if base == "DeiT" else "")
    arch = (c.get("architectures") or [classifier if c.get("id2label") else f"{base}Model"])[0]
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

    hidden = integer(c, "hidden_size", 768, source=source)
    heads = integer(c, "num_attention_heads", 12, source=source)
    if c.get("head_dim") not in (None, hidden // heads):
        raise CheckpointError(f"head_dim={c['head_dim']} != hidden_size / num_attention_heads")
    if head == "mlp" and c.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"pooler_act={c['pooler_act']!r}: vitkit's pooler uses tanh")
    pooler = hidden
    if c.get("pooler_output_size"):  # transformers: hidden_size when unset (null)
        pooler = integer(c, "pooler_output_size", source=source)

    num_classes, labels = hf_labels(c, source=source) if has_classes else (0, None)
    size = c.get("image_size", 224)  # [h, w] for a non-square model
    size = tuple(size) if isinstance(size, list) else integer(c, "image_size", 224, source=source)
    return build_config(
        ViTConfig,
        source,
        image_size=size,
        patch_size=_single(c, "patch_size", 16, source),
        in_chans=integer(c, "num_channels", 3, source=source),
        num_classes=num_classes,
        embed_dim=hidden,
        depth=integer(c, "num_hidden_layers", 12, source=source),
        num_heads=heads,
        mlp_ratio=integer(c, "intermediate_size", 4 * hidden, source=source) / hidden,
        qkv_bias=bool(c.get("qkv_bias", True)),
        layer_norm_eps=number(c, "layer_norm_eps", 1e-12, source=source),
        act=hf_act(c.get("hidden_act", "gelu"), source=source),
        drop_rate=number(c, "hidden_dropout_prob", 0.0, source=source),
        attn_drop_rate=number(c, "attention_probs_dropout_prob", 0.0, source=source),
        distilled=distilled,
        use_mask_token=mask,
        head=head,
        head_hidden_dim=pooler if head == "mlp" and pooler != hidden else None,
        id2label=labels,
    )


def _single(c: Mapping[str, Any], key: str, default: int, source: str) -> int:
    """A square size given as one number or a pair (transformers writes both)."""
    value = c.get(key, default)
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    elif isinstance(value, list | tuple):
        raise CheckpointError(f"{source}: non-square {key}={value} is not supported")
    return integer({key: value}, key, source=source)


def fitting_class(config: ViTConfig) -> str:
    """The transformers ViT / DeiT class for `config` (`unsupported` says where none fits)."""
    c = config
    found = (c.distilled, c.head, bool(c.num_classes), c.use_mask_token)
    model = "DeiTModel" if c.distilled else "ViTModel"
    return next((arch for arch, v in _ARCHITECTURES.items() if v == found), model)


def unsupported(config: ViTConfig) -> list[str]:
    """Reasons no transformers ViT / DeiT class can hold `config` (empty if one can)."""
    c = config
    required = dict(HF_BASE, distilled=(False, True), head=("linear", "mlp"),
                    qkv_bias=(True, False), num_classes=c.num_classes,
                    use_mask_token=(False, True))  # fmt: skip
    reasons = differences(c, "transformers ViT", required, square=False)
    if c.head == "mlp" and c.num_classes:
        reasons.append("transformers' classifiers have no tanh pre-logits layer")
    if c.head == "linear" and c.num_classes == 0 and not c.use_mask_token:
        reasons.append("a headless model without pooler (ViTModel always builds its pooler)")
    if c.use_mask_token and (c.num_classes or c.head == "mlp"):
        reasons.append("a mask token together with a head")
    return reasons


def config_to_hf(config: ViTConfig, architecture: str | None = None) -> dict[str, Any]:
    """A transformers `config.json` dict for `config`. `architecture` defaults to the class that
    fits (`fitting_class`); pass it to override (e.g. "ViTForImageClassification")."""
    c = config
    arch = architecture or fitting_class(c)
    h, w = c.image_hw
    return hf_fields(
        c,
        architectures=[arch],
        model_type="deit" if c.distilled else "vit",
        intermediate_size=c.mlp_hidden_dim,
        hidden_dropout_prob=c.drop_rate,
        attention_probs_dropout_prob=c.attn_drop_rate,
        initializer_range=0.02,
        image_size=h if h == w else [h, w],
        qkv_bias=c.qkv_bias,
        encoder_stride=c.patch_size,
        pooler_output_size=c.head_hidden_dim or c.embed_dim,
        pooler_act="tanh",
        **hf_label_fields(c),
    )


# ------------------------------------------------------------------------------- state dict
# per-layer names: transformers v4 (on disk, also under transformers 5) and 5 (in memory)
_LAYER = dict(ln1="layernorm_before", ln2="layernorm_after")
V4 = dict(_LAYER, layer="encoder.layer.", q="attention.attention.query",
          k="attention.attention.key", v="attention.attention.value", o="attention.output.dense",
          fc1="intermediate.dense", fc2="output.dense")  # fmt: skip
V5 = dict(_LAYER, layer="layers.", q="attention.q_proj", k="attention.k_proj",
          v="attention.v_proj", o="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2")  # fmt: skip


def rules(config: ViTConfig, prefix: str = "", names: dict = V4) -> list[Rule]:
    """vitkit <-> transformers ViT / DeiT; `prefix` is the encoder's ("vit.", "deit.", "")."""
    c, emb = config, f"{prefix}embeddings."
    out = [same("cls_token", f"{emb}cls_token")]
    out += weight_and_bias("patch_embed.proj", f"{emb}patch_embeddings.projection")
    if c.pos_embed == "learned":  # MAE's fixed sin-cos table is computed (hf_mim)
        out.append(same("pos_embed", f"{emb}position_embeddings"))
    if c.distilled:
        out.append(same("dist_token", f"{emb}distillation_token"))
    if c.use_mask_token:
        out.append(same("mask_token", f"{emb}mask_token"))
    for i in range(c.depth):
        theirs = f"{prefix}{names['layer']}{i}."
        out += block_rules(f"blocks.{i}.", theirs, names, c.embed_dim, c.qkv_bias)
    out += weight_and_bias("norm", f"{prefix}layernorm")
    if c.head == "mlp":
        out += weight_and_bias("pre_logits.fc", f"{prefix}pooler.dense")
    if c.num_classes:
        out += weight_and_bias("head", "cls_classifier" if c.distilled else "classifier")
    if c.num_classes and c.distilled:
        out += weight_and_bias("head_dist", "distillation_classifier")
    return out


def names_of(sd: Mapping[str, Tensor]) -> dict:
    """The layer names `sd` uses: transformers 5's in-memory ones, or the v4 file names."""
    return V5 if any(".attention.q_proj." in k for k in sd) else V4


def _default_prefix(config: ViTConfig) -> str:
    if config.num_classes == 0 and not config.use_mask_token:
        return ""  # ViTModel / DeiTModel files have no prefix
    return "deit." if config.distilled else "vit."


def state_dict_from_hf(
    sd: Mapping[str, Tensor],
    config: ViTConfig,
    *,
    prefix: str | None = None,
    source: str = "state dict",
) -> dict[str, Tensor]:
    """Translate a transformers ViT/DeiT state dict into vitkit names for `config`.

    `prefix` is the encoder's prefix ("vit.", "deit." or "" for ViTModel files); None detects
    it. SimMIM's decoder beside a mask token is skipped (hf_mim reads it); any other key that
    does not map, a missing key or a wrong shape raises one `CheckpointError`.
    """
    if prefix is None:
        anchor = "embeddings.patch_embeddings.projection.weight"
        prefix = find_prefix(sd, anchor, source=source, what="transformers ViT/DeiT")
    ignore = ("decoder.",) if config.use_mask_token else ()
    return rename_from(
        sd, rules(config, prefix, names_of(sd)), config, ignore=ignore, source=source
    )


def state_dict_to_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, prefix: str | None = None
) -> dict[str, Tensor]:
    """Translate a vitkit state dict into transformers v4 file names (the inverse of
    `state_dict_from_hf`). `prefix` defaults to what the fitting class uses: "vit.", "deit.",
    or "" for a headless ViTModel/DeiTModel."""
    check_state_dict(sd, config, source="model state dict")
    return rename_to(sd, rules(config, _default_prefix(config) if prefix is None else prefix))
