"""open_clip checkpoints <-> vitkit: the image tower of a CLIP ViT, and its text tower.

open_clip (and OpenAI's CLIP, whose weights it saves in the same layout) keeps the image tower
under `visual.`; loaded as an image model, the text tower, `text_projection` and `logit_scale`
are left aside. Each tower is one table of rules read both ways (`_common.Rule`): `rules` and
`text_rules`, whose blocks share one layout (`LAYER`):

    visual.conv1.weight (D, C, P, P), no bias        -> patch_embed.proj.weight
    visual.class_embedding (D,)                      -> cls_token (1, 1, D)
    visual.positional_embedding (1 + N, D)           -> pos_embed (1, 1 + N, D)
    visual.ln_pre, visual.ln_post                    -> norm_pre, norm
    transformer.resblocks.{i}.{ln_1, attn.in_proj_{weight,bias}, attn.out_proj, ln_2, mlp.c_fc,
    mlp.c_proj}                                      -> blocks.{i}.{norm1, attn.qkv, attn.proj,
                                                        norm2, mlp.fc1, mlp.fc2}
    visual.proj (D, E): image_embeds = pooled @ proj -> projection.weight (E, D), no bias

The weights do not say how many heads the attention has nor which GELU the MLP uses:
`open_clip_config.json` does (`vision_cfg.width / head_width`, `quick_gelu`), beside the
weights or in a hub snapshot. Without it vitkit takes open_clip's own defaults, heads of 64
channels and exact GELU; OpenAI's weights need `act="quick_gelu"` then. The other sizes come
from the weights' shapes (a square position grid).

The text tower (`load_image_text`) sits at the top level (under `text.` for open_clip's
CustomTextCLIP):

    token_embedding.weight (V, D)       positional_embedding (T, D) -> pos_embed (1, T, D)
    transformer.resblocks.{i}           as the image tower's blocks, causal
    ln_final                            text_projection (D, E): x @ W -> projection.weight W.T

with `logit_scale` (and `logit_bias` for sigmoid models) beside. Its architecture comes from
`model_cfg.text_cfg` and `embed_dim` of open_clip_config.json, open_clip's `CLIPTextCfg`
defaults filling what it leaves out; without the file, from the weights' shapes, with heads of
64 channels (open_clip's `build_model_from_openai_state_dict`). Text towers vitkit does not
build (Hugging Face towers, other tokenizers, pooling other than the largest id, bias in the
projection, no causal mask, LayerScale, custom blocks...) are refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from vitkit.checkpoints._common import (
    Hook,
    Rule,
    block_rules,
    build_config,
    expected_shapes,
    find_prefix,
    integer,
    number,
    rename_from,
    rename_to,
    same,
    under,
    weight_and_bias,
)
from vitkit.checkpoints._local import OPEN_CLIP_CONFIG
from vitkit.config import ViTConfig, read_json
from vitkit.data.processor import ImageProcessor
from vitkit.errors import CheckpointError, ConfigError
from vitkit.models.image_text import ImageTextConfig
from vitkit.models.text import TextConfig

CONFIG_FILE = OPEN_CLIP_CONFIG
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_ANCHOR = "transformer.resblocks.0.attn.in_proj_weight"
LAYER = dict(ln1="ln_1", qkv="attn.in_proj_", o="attn.out_proj", ln2="ln_2", fc1="mlp.c_fc",
             fc2="mlp.c_proj")  # fmt: skip
_TRANSPOSE: Hook = (lambda t: t.T, lambda t, s: t.reshape(s[1], s[0]).T)  # x @ W <-> Linear


def is_open_clip(sd: Mapping[str, Any]) -> bool:
    """True for an open_clip / OpenAI CLIP state dict (the whole model or its image tower)."""
    return any(k.endswith("class_embedding") for k in sd) and any(k.endswith(_ANCHOR) for k in sd)


def rules(config: ViTConfig, prefix: str = "visual.") -> list[Rule]:
    """vitkit <-> open_clip image tower names, the tower under `prefix`."""
    D = config.embed_dim
    out = [
        same("cls_token", "class_embedding", (D,)),
        same("patch_embed.proj.weight", "conv1.weight"),
        same("pos_embed", "positional_embedding", (1 + config.num_patches, D)),
        *weight_and_bias("norm_pre", "ln_pre"),
    ]
    for i in range(config.depth):
        out += block_rules(f"blocks.{i}.", f"transformer.resblocks.{i}.", LAYER, D)
    out += weight_and_bias("norm", "ln_post")
    if config.projection_dim is not None:
        out.append(same("projection.weight", "proj", (D, config.projection_dim), _TRANSPOSE))
    return under(out, prefix)


def _image_tower_key(key: str) -> bool:
    """Without a `visual.` prefix only the image tower's keys are taken (an exported tower)."""
    return key.split(".")[0] in (
        "conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post",
        "proj",
    )  # fmt: skip


def _image_tower(sd: Mapping[str, Tensor], *, source: str) -> tuple[dict[str, Tensor], str]:
    """(the image tower's tensors under their file names, its prefix)."""
    prefix = find_prefix(sd, "class_embedding", source=source, what="open_clip")
    tower = {
        k: v for k, v in sd.items() if k.startswith(prefix) and (prefix or _image_tower_key(k))
    }
    return tower, prefix


def vision_config(
    sd: Mapping[str, Tensor], found: Mapping[str, Any], prefix: str, *, source: str
) -> ViTConfig:
    """The image tower's `ViTConfig`: sizes from the weights' shapes, heads and GELU from
    `found` (`read_config`)."""

    def shape(name: str, ndim: int) -> tuple[int, ...]:
        t = sd.get(prefix + name)
        if t is None or t.ndim != ndim:
            raise CheckpointError(f"{source}: no {ndim}-d {prefix}{name} (the image tower's "
                                  f"{name.split('.')[0]})")  # fmt: skip
        return tuple(t.shape)

    D, C, P, P2 = shape("conv1.weight", 4)
    rows = shape("positional_embedding", 2)[0] - 1
    grid = math.isqrt(max(rows, 0))
    if P != P2 or grid * grid != rows:
        raise CheckpointError(f"{source}: a {P}x{P2} patch with {rows} positions is not a square "
                              f"grid of square patches; pass config=ViTConfig(...)")  # fmt: skip
    blocks = f"{prefix}transformer.resblocks."
    depth = len({k[len(blocks) :].split(".")[0] for k in sd if k.startswith(blocks)})
    hidden = shape("transformer.resblocks.0.mlp.c_fc.weight", 2)[0]
    projection = shape("proj", 2)[1] if prefix + "proj" in sd else None
    if D % found["head_width"]:
        raise CheckpointError(
            f"{source}: width {D} is not a whole number of heads of "
            f"{found['head_width']} channels; pass config=ViTConfig(...)"
        )
    return build_config(
        ViTConfig, source, image_size=grid * P, patch_size=P, in_chans=C, embed_dim=D,
        depth=depth, num_heads=D // found["head_width"], mlp_ratio=hidden / D, act=found["act"],
        layer_norm_eps=1e-5, pre_norm=True, patch_bias=False, projection_dim=projection,
        num_classes=0,
    )  # fmt: skip


def read_config(path: Path | None) -> dict[str, Any]:
    """(act, head_width, processor dict, the model_cfg) from an open_clip_config.json, or
    open_clip's defaults (and no model_cfg)."""
    if path is None:
        return {"act": "gelu", "head_width": 64, "preprocess": None, "model": None}
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
        "model": model,
    }


def load(
    raw: Mapping[str, Tensor],
    *,
    config_file: Path | None,
    config: ViTConfig | None,
    source: str,
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """(config, vitkit state dict) of an open_clip state dict's image tower, its config file if
    there is one."""
    tower, prefix = _image_tower(raw, source=source)
    if config is None:
        config = vision_config(tower, read_config(config_file), prefix, source=source)
    return config, rename_from(tower, rules(config, prefix), config, source=source)


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


# ------------------------------------------------------------------------------ text tower
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49_408, width=512, heads=8, layers=12)
# CLIPTextCfg fields that change the tower, and the values vitkit builds (open_clip's defaults)
_TEXT_BUILT: dict[str, tuple[Any, ...]] = {
    "hf_model_name": (None,),  # a Hugging Face text tower
    "hf_tokenizer_name": (None,),  # another vocabulary than CLIP's BPE
    "tokenizer_mode": (None,),
    "pool_type": ("argmax",),
    "proj_type": ("linear",),
    "proj_bias": (False,),
    "no_causal_mask": (False,),
    "embed_cls": (False,),
    "ls_init_value": (None,),
    "block_type": (None, "default"),
    "qk_norm": (False,),
    "scaled_cosine_attn": (False,),
    "scale_heads": (False,),
    "scale_attn_inner": (False,),
    "scale_attn": (False,),
    "scale_fc": (False,),
}
# fields without effect on what vitkit builds (the final norm commutes with picking a token)
_TEXT_IGNORED = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                 "norm_kwargs", "act_kwargs", "pad_id", "eos_id", "final_ln_after_pool",
                 "output_tokens", "tokenizer_kwargs", "hf_model_pretrained", "hf_proj_type",
                 "hf_pooler_type")  # fmt: skip


def text_rules(config: TextConfig, prefix: str = "") -> list[Rule]:
    """vitkit <-> open_clip text tower names, under `prefix` ("text." for CustomTextCLIP)."""
    D, T = config.width, config.context_length
    out = [
        same("token_embed.weight", "token_embedding.weight"),
        same("pos_embed", "positional_embedding", (T, D)),
    ]
    for i in range(config.depth):
        out += block_rules(f"blocks.{i}.", f"transformer.resblocks.{i}.", LAYER, D)
    out += weight_and_bias("norm", "ln_final")
    if config.projection_dim is not None:
        out.append(same("projection.weight", "text_projection", (D, config.projection_dim),
                        _TRANSPOSE))  # fmt: skip
    return under(out, prefix)


def logit_rules(shape: tuple[int, ...], bias: bool) -> list[Rule]:
    """`logit_scale` (and `logit_bias`), scalars or (1,) (`nonscalar_logit_scale`)."""
    return [same("logit_scale", "logit_scale", shape)] + (
        [same("logit_bias", "logit_bias", shape)] if bias else [])  # fmt: skip


def text_config(
    found: dict[str, Any], sd: Mapping[str, Tensor], prefix: str, *, source: str
) -> TextConfig:
    """The text tower's `TextConfig`: from `found["model"]` (model_cfg of open_clip_config.json)
    with open_clip's defaults, else from the shapes of `sd` (the tower under `prefix`)."""
    model = found["model"]
    if model is None:
        return _text_config_from_shapes(sd, prefix, act=found["act"], source=source)
    t = model.get("text_cfg") or {}
    if not isinstance(t, dict):
        raise CheckpointError(f"{source}: model_cfg.text_cfg must be a JSON object")
    unknown = sorted(set(t) - set(_TEXT_BUILT) - set(_TEXT_IGNORED))
    if unknown:
        raise CheckpointError(f"{source}: text_cfg field(s) {unknown} are not ones vitkit knows; "
                              f"it builds open_clip's CLIPTextCfg text tower")  # fmt: skip
    for key, allowed in _TEXT_BUILT.items():
        value = t.get(key, allowed[0])
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise CheckpointError(
                f"{source}: text_cfg {key}={value!r}: vitkit builds open_clip's own text "
                f"tower with {key}={allowed[0]!r} only"
            )
    c = {**_TEXT_DEFAULTS, **t}
    width = integer(c, "width", source=source)
    act = found["act"]
    act_kwargs = t.get("act_kwargs") or {}
    if act_kwargs == {"approximate": "tanh"} and act == "gelu":
        act = "gelu_tanh"
    elif act_kwargs:
        raise CheckpointError(f"{source}: text_cfg act_kwargs={act_kwargs!r} is not supported")
    norm_kwargs = t.get("norm_kwargs") or {}
    if not isinstance(norm_kwargs, dict) or set(norm_kwargs) - {"eps"}:
        raise CheckpointError(f"{source}: text_cfg norm_kwargs={norm_kwargs!r} is not supported")
    return _text_config(
        source,
        vocab_size=integer(c, "vocab_size", source=source),
        context_length=integer(c, "context_length", source=source),
        width=width,
        depth=integer(c, "layers", source=source),
        num_heads=integer(c, "heads", source=source),
        mlp_ratio=number(c, "mlp_ratio", 4.0, source=source),
        act=act,
        layer_norm_eps=number(norm_kwargs, "eps", 1e-5, source=source),
        projection_dim=integer(model, "embed_dim", source=source),
    )


def _text_config_from_shapes(
    sd: Mapping[str, Tensor], prefix: str, *, act: str, source: str
) -> TextConfig:
    """A text tower's config from its weights, as open_clip reads OpenAI's state dicts."""
    names = ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp."
             "c_fc.weight", "text_projection")  # fmt: skip
    shapes = {n: tuple(sd[prefix + n].shape) for n in names if prefix + n in sd}
    if len(shapes) < len(names) or any(len(s) != 2 for s in shapes.values()):
        raise CheckpointError(f"{source}: the text tower needs {[prefix + n for n in names]} "
                              f"(2-d); found {shapes}")  # fmt: skip
    (vocab, width), (length, _) = shapes[names[0]], shapes[names[1]]
    blocks = f"{prefix}transformer.resblocks."
    depth = len({k[len(blocks) :].split(".")[0] for k in sd if k.startswith(blocks)})
    if width % 64:
        raise CheckpointError(f"{source}: text width {width} is not a whole number of heads of "
                              f"64 channels; put open_clip_config.json beside it")  # fmt: skip
    return _text_config(
        source, vocab_size=vocab, context_length=length, width=width, depth=depth,
        num_heads=width // 64, mlp_ratio=shapes[names[2]][0] / width, act=act,
        layer_norm_eps=1e-5, projection_dim=shapes[names[3]][1],
    )  # fmt: skip


def _text_config(source: str, **fields: Any) -> TextConfig:
    return build_config(TextConfig, source, "text tower", **fields, causal=True, pool="argmax",
                        projection_bias=False)  # fmt: skip


def has_text_tower(sd: Mapping[str, Any]) -> bool:
    """True for an open_clip state dict that holds a text tower beside the image tower."""
    return any(k.endswith("token_embedding.weight") for k in sd)


def load_image_text(
    raw: Mapping[str, Tensor],
    *,
    config_file: Path | None,
    config: ImageTextConfig | None,
    source: str,
) -> tuple[ImageTextConfig, dict[str, Tensor]]:
    """(config, vitkit `ImageTextModel` state dict) of an open_clip CLIP state dict: its image
    tower as `load` reads it, its text tower, `logit_scale` and `logit_bias` by `text_rules`."""
    vision, sd = load(raw, config_file=config_file, config=config and config.vision,
                      source=source)  # fmt: skip
    prefix = find_prefix(raw, "token_embedding.weight", source=source, what="open_clip text")
    found = read_config(config_file)
    model = found["model"]
    if model is not None:  # open_clip's CLIP(init_logit_bias=..., nonscalar_logit_scale=...)
        for key in ("multimodal_cfg",):
            if model.get(key):
                raise CheckpointError(f"{config_file}: {key} (a text decoder, CoCa) is not "
                                      f"supported")  # fmt: skip
        bias = model.get("init_logit_bias") is not None
        shape: tuple[int, ...] = (1,) if model.get("nonscalar_logit_scale") else ()
    else:  # from the weights
        bias = "logit_bias" in raw
        shape = tuple(raw["logit_scale"].shape) if "logit_scale" in raw else ()
    if config is None:
        text = text_config(found, raw, prefix, source=str(config_file or source))
        try:
            config = ImageTextConfig(vision=vision, text=text,
                                     scores="sigmoid" if bias else "softmax")  # fmt: skip
        except ConfigError as exc:
            raise CheckpointError(f"{config_file or source}: {exc}") from exc
    table = [*under(text_rules(config.text, prefix), ours="text."),
             *logit_rules(shape, config.scores == "sigmoid")]  # fmt: skip
    expected = {k: v for k, v in expected_shapes(config).items() if not k.startswith("vision.")}
    ignore = ("visual.", "attn_mask", f"{prefix}attn_mask")
    text_sd = rename_from(raw, table, expected, ignore=ignore, source=source)
    return config, {**{f"vision.{k}": v for k, v in sd.items()}, **text_sd}


def text_state_dict_to_open_clip(
    sd: Mapping[str, Tensor], config: TextConfig, prefix: str = ""
) -> dict[str, Tensor]:
    """A vitkit `TextTransformer`'s weights under open_clip's names (the inverse of the text
    part of `load_image_text`)."""
    return rename_to(sd, text_rules(config, prefix))
