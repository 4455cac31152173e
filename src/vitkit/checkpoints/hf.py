"""Hugging Face transformers checkpoints <-> vitkit: `load_hf` / `save_hf` dispatch to the
module that maps each family (hf_vit for ViT / DeiT, hf_dinov2, hf_clip, hf_siglip); each holds
one table of names read in both directions (see `_common.Rule`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from vitkit.checkpoints import hf_clip, hf_dinov2, hf_siglip, hf_vit
from vitkit.checkpoints.hf_vit import config_from_hf, state_dict_from_hf, state_dict_to_hf
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError

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
    family = _FAMILIES.get(data.get("model_type"))  # type: ignore[arg-type]
    if family is None:
        raise CheckpointError(
            f"{source}: transformers model_type {data.get('model_type')!r} is not one vitkit "
            f"reads ({', '.join(MODEL_TYPES)})"
        )
    cfg = config or family.config_from_hf(data, source=str(Path(source).with_name("config.json")))
    if config is None and cfg.head == "mlp" and not any("pooler." in k for k in raw):
        cfg = cfg.replace(head="linear", head_hidden_dim=None)  # a ViTModel without its pooler
    return cfg, family.state_dict_from_hf(raw, cfg, source=source)


def _family_for(config: ViTConfig) -> Any:
    """The mapping module whose classes hold `config`: the one its switches point to."""
    if config.pre_norm or config.projection_dim is not None:
        return hf_clip
    if config.global_pool == "map":
        return hf_siglip
    if config.layer_scale_init is not None:
        return hf_dinov2
    return hf_vit


def save_hf(config: ViTConfig, sd: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict]:
    """(config.json dict, weights) in transformers' format for the class that fits `config`,
    or `CheckpointError` saying what no class can express."""
    hf_architecture(config)  # raises, naming what no class can express
    family = _family_for(config)
    return family.config_to_hf(config), family.state_dict_to_hf(sd, config)


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
    return _family_for(config).config_to_hf(config)["architectures"][0]


def hf_unsupported(config: ViTConfig) -> list[str]:
    """Reasons no transformers class vitkit writes can reproduce this config (empty if one can):
    ViT/DeiT, or the DINOv2 / CLIP / SigLIP class its switches point to."""
    stem = ["a convolutional stem (stem_channels)"] if config.stem_channels else []
    return stem + _family_for(config).unsupported(config)


def config_to_hf(config: ViTConfig, architecture: str | None = None) -> dict[str, Any]:
    """A transformers ViT / DeiT `config.json` dict for `config`, for the class that fits it
    (`hf_architecture`, which refuses what none holds) unless `architecture` names one."""
    return hf_vit.config_to_hf(config, architecture or hf_architecture(config))
