"""Hugging Face transformers checkpoints <-> vitkit: `load_hf` / `save_hf` dispatch to the
module that maps each family (hf_vit for ViT / DeiT, hf_dinov2, hf_clip, hf_siglip); each holds
one table of names read in both directions (see `_common.Rule`). CLIPModel and SiglipModel
load as their image tower, or with `text=True` as an `ImageTextModel` (both towers); their
text towers alone (CLIPTextModel[WithProjection], SiglipTextModel) map through the same
modules (`hf_clip.text_*`, `hf_siglip.text_*`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from vitkit.checkpoints import hf_clip, hf_dinov2, hf_siglip, hf_vit
from vitkit.checkpoints._common import AnyConfig, with_text
from vitkit.checkpoints.hf_vit import config_from_hf, state_dict_from_hf, state_dict_to_hf
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError
from vitkit.models.image_text import ImageTextConfig
from vitkit.models.text import TextConfig

__all__ = ["config_from_hf", "config_to_hf", "load_hf", "save_hf", "state_dict_from_hf",
           "state_dict_to_hf"]  # fmt: skip

# model_type -> the module that maps that family
_FAMILIES: dict[str, Any] = {
    "vit": hf_vit,
    "deit": hf_vit,
    "dinov2": hf_dinov2,
    "dinov2_with_registers": hf_dinov2,
    "clip_vision_model": hf_clip,
    "clip": hf_clip,
    "siglip_vision_model": hf_siglip,
    "siglip": hf_siglip,
}
MODEL_TYPES = tuple(_FAMILIES)
IMAGE_TEXT_TYPES = ("clip", "siglip")  # the model_types with both towers
TEXT_ONLY = {"clip_text_model": "CLIPTextModel", "siglip_text_model": "SiglipTextModel"}


def load_hf(
    data: dict[str, Any],
    raw: Mapping[str, Tensor],
    source: str,
    *,
    config: ViTConfig | ImageTextConfig | None = None,
    text: bool | str = False,
) -> tuple[ViTConfig | ImageTextConfig, dict[str, Tensor]]:
    """(config, vitkit state dict) of a transformers folder's config.json and weights.

    Dispatches on `model_type`: vit, deit, dinov2, dinov2_with_registers, clip_vision_model,
    clip (the vision tower of CLIPModel), siglip_vision_model, siglip (SiglipModel's vision
    tower). With `text=True` ("auto": when there is one) clip and siglip load both towers as
    an `ImageTextConfig`, and the others are refused (`_common.no_text_tower`). `config`
    replaces what config.json implies.
    """
    model_type = data.get("model_type")
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        if isinstance(model_type, str) and model_type in TEXT_ONLY:
            raise CheckpointError(
                f"{source}: a transformers {TEXT_ONLY[model_type]} is a text tower alone; "
                f"vitkit loads image models, and CLIPModel / SiglipModel with both towers"
            )
        raise CheckpointError(
            f"{source}: transformers model_type {model_type!r} is not one vitkit "
            f"reads ({', '.join(MODEL_TYPES)})"
        )
    where = str(Path(source).with_name("config.json"))
    if with_text(text, model_type in IMAGE_TEXT_TYPES, source=where, what=_what(data)):
        cfg = config or family.image_text_config_from_hf(data, source=where)
        return cfg, family.image_text_state_dict_from_hf(raw, cfg, source=source)
    cfg = config or family.config_from_hf(data, source=where)
    if config is None and cfg.head == "mlp" and not any("pooler." in k for k in raw):
        cfg = cfg.replace(head="linear", head_hidden_dim=None)  # a ViTModel without its pooler
    return cfg, family.state_dict_from_hf(raw, cfg, source=source)


def _what(data: Mapping[str, Any]) -> str:
    """What a transformers config.json describes, for messages ("a transformers ViTModel")."""
    archs = data.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs else data.get("model_type")
    return f"a transformers {str(name)[:80]} (an image model)"


def _family_for(config: AnyConfig) -> Any:
    """The mapping module whose classes hold `config`: the one its switches point to (for two
    towers, the scores: softmax CLIP, sigmoid SigLIP; for a text tower, its attention)."""
    if isinstance(config, ImageTextConfig):
        return hf_siglip if config.scores == "sigmoid" else hf_clip
    if isinstance(config, TextConfig):
        return hf_clip if config.causal else hf_siglip
    if config.pre_norm or config.projection_dim is not None:
        return hf_clip
    if config.global_pool == "map":
        return hf_siglip
    if config.layer_scale_init is not None:
        return hf_dinov2
    return hf_vit


def save_hf(config: AnyConfig, sd: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict]:
    """(config.json dict, weights) in transformers' format for the class that fits `config`
    (an image model; CLIPModel / SiglipModel for both towers; CLIPTextModel[WithProjection] /
    SiglipTextModel for a text tower), or `CheckpointError` saying what no class can express."""
    hf_architecture(config)  # raises, naming what no class can express
    family = _family_for(config)
    if isinstance(config, ImageTextConfig):
        meta = family.image_text_config_to_hf(config, sd)
        return meta, family.image_text_state_dict_to_hf(sd, config)
    if isinstance(config, TextConfig):
        return family.text_config_to_hf(config), family.text_state_dict_to_hf(sd, config)
    return family.config_to_hf(config), family.state_dict_to_hf(sd, config)


def hf_architecture(config: AnyConfig) -> str:
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
    if isinstance(config, ImageTextConfig):
        return family.image_text_config_to_hf(config)["architectures"][0]
    if isinstance(config, TextConfig):
        return family.text_config_to_hf(config)["architectures"][0]
    return family.config_to_hf(config)["architectures"][0]


def hf_unsupported(config: AnyConfig) -> list[str]:
    """Reasons no transformers class vitkit writes can reproduce this config (empty if one can):
    ViT/DeiT, or the DINOv2 / CLIP / SigLIP class its switches point to."""
    family = _family_for(config)
    if isinstance(config, ImageTextConfig):
        stem = ["a convolutional stem (stem_channels)"] if config.vision.stem_channels else []
        return stem + family.image_text_unsupported(config)
    if isinstance(config, TextConfig):
        return family.text_unsupported(config)
    stem = ["a convolutional stem (stem_channels)"] if config.stem_channels else []
    return stem + family.unsupported(config)


def config_to_hf(config: ViTConfig, architecture: str | None = None) -> dict[str, Any]:
    """A transformers ViT / DeiT `config.json` dict for `config`, for the class that fits it
    (`hf_architecture`, which refuses what none holds) unless `architecture` names one."""
    return hf_vit.config_to_hf(config, architecture or hf_architecture(config))
