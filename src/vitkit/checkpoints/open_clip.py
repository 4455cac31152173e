"""open_clip checkpoints -> vitkit: the image tower of a CLIP ViT.

open_clip (and OpenAI's CLIP, whose weights it saves in the same layout) keeps the image tower
under `visual.`; the text tower, `text_projection` and `logit_scale` are left aside:

    conv1.weight (D, C, P, P), no bias      class_embedding (D,)     positional_embedding (T, D)
    ln_pre, transformer.resblocks.{i}.{ln_1, attn.in_proj_{weight,bias}, attn.out_proj, ln_2,
    mlp.c_fc, mlp.c_proj}, ln_post           proj (D, E): image_embeds = pooled @ proj

The names are turned into timm's (as timm's own `_convert_openai_clip` does: `proj` becomes a
head with a zero bias, which `checkpoints.timm` reads as the bias-free projection), so one
mapping serves both. The weights do not say how many heads the attention has nor which GELU
the MLP uses: `open_clip_config.json` does (`vision_cfg.width / head_width`, `quick_gelu`),
beside the weights or in a hub snapshot. Without it vitkit takes open_clip's own defaults,
heads of 64 channels and exact GELU; OpenAI's weights need `act="quick_gelu"` then.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from vitkit.checkpoints import timm
from vitkit.checkpoints._common import find_prefix, integer
from vitkit.config import ViTConfig, read_json
from vitkit.data.processor import ImageProcessor
from vitkit.errors import CheckpointError, ConfigError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_ANCHOR = "transformer.resblocks.0.attn.in_proj_weight"
_RENAMES = (  # in this order, as timm's _convert_openai_clip
    ("conv1", "patch_embed.proj"),
    ("positional_embedding", "pos_embed"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_", "norm"),
    ("in_proj_", "qkv."),
    ("out_proj", "proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def is_open_clip(sd: Mapping[str, Any]) -> bool:
    """True for an open_clip / OpenAI CLIP state dict (the whole model or its image tower)."""
    return any(k.endswith("class_embedding") for k in sd) and any(k.endswith(_ANCHOR) for k in sd)


def to_timm(sd: Mapping[str, Tensor], *, source: str) -> dict[str, Tensor]:
    """The image tower's tensors under timm's names."""
    prefix = find_prefix(sd, "class_embedding", source=source, what="open_clip")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix) or (prefix == "" and not _image_tower_key(key)):
            continue
        name = key[len(prefix) :]
        for old, new in _RENAMES:
            name = name.replace(old, new)
        if name == "proj":
            out["head.weight"] = value.transpose(0, 1)
            out["head.bias"] = value.new_zeros(value.shape[1])
        elif name == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif name == "pos_embed":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            out[name] = value
    return out


def _image_tower_key(key: str) -> bool:
    """Without a `visual.` prefix only the image tower's keys are taken (an exported tower)."""
    return key.split(".")[0] in (
        "conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post",
        "proj",
    )  # fmt: skip


def read_config(path: Path | None) -> dict[str, Any]:
    """(act, head_width, processor dict) from an open_clip_config.json, or open_clip's defaults."""
    if path is None:
        return {"act": "gelu", "head_width": 64, "preprocess": None}
    try:
        data = read_json(path, "open_clip config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    model = data.get("model_cfg", data) if isinstance(data, dict) else None
    vision = model.get("vision_cfg") if isinstance(model, dict) else None
    if not isinstance(vision, dict):
        raise CheckpointError(f"{path}: no model_cfg.vision_cfg; is it an open_clip config?")
    if vision.get("timm_model_name"):
        raise CheckpointError(f"{path}: a timm image tower ({vision['timm_model_name']}); "
                              "load the timm weights instead")  # fmt: skip
    quick = model.get("quick_gelu", False)
    if not isinstance(quick, bool):
        raise CheckpointError(f"{path}: quick_gelu={quick!r} must be true or false")
    preprocess = data.get("preprocess_cfg") if isinstance(data, dict) else None
    head_width = integer(vision, "head_width", 64, source=str(path))
    return {
        "act": "quick_gelu" if quick else "gelu",
        "head_width": head_width,
        "image_size": vision.get("image_size"),
        "preprocess": preprocess if isinstance(preprocess, dict) else None,
    }


def load(
    raw: Mapping[str, Tensor],
    *,
    config_file: Path | None,
    config: ViTConfig | None,
    source: str,
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """(config, vitkit state dict) of an open_clip state dict, its config file if there is one."""
    sd = to_timm(raw, source=source)
    if config is None:
        found = read_config(config_file)
        if "patch_embed.proj.weight" not in sd:
            raise CheckpointError(f"{source}: no visual.conv1.weight (the patch projection)")
        width = sd["patch_embed.proj.weight"].shape[0]
        if width % found["head_width"]:
            raise CheckpointError(
                f"{source}: width {width} is not a whole number of heads of "
                f"{found['head_width']} channels; pass config=ViTConfig(...)"
            )
        base = ViTConfig(
            embed_dim=width, num_heads=width // found["head_width"], act=found["act"],
            layer_norm_eps=1e-5, num_classes=0,
        )  # fmt: skip
        config = timm.config_from_timm(sd, config=base, source=source)
    return config, timm.state_dict_from_timm(sd, config, source=source)


def processor(config_file: Path) -> Any:
    """The preprocessing an open_clip config states at its image size (open_clip's default
    resize_mode "shortest": shorter side to the size, centre crop, bicubic), or None."""
    found = read_config(config_file)
    pre, image_size = found["preprocess"], found["image_size"]
    if pre is None or image_size is None:
        return None
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise CheckpointError(f"{config_file}: resize_mode {mode!r} is not supported")
    try:
        return ImageProcessor.timm_eval(
            image_size, crop_pct=1.0, interpolation=pre.get("interpolation", "bicubic"),
            mean=tuple(pre["mean"]), std=tuple(pre["std"]),
            crop_mode="center" if mode == "shortest" else "squash", backend="pil",
        )  # fmt: skip
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: preprocess_cfg: {exc}") from None
