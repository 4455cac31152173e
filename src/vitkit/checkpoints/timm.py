"""timm VisionTransformer / VisionTransformerDistilled state dicts <-> vitkit.

vitkit's parameter names follow timm's, so the mapping is mostly the identity. What it does:
unwrap training checkpoints ({"model": ...}, {"state_dict": ...}, "module." prefixes), read the
architecture from the weights where the shapes tell it (width, depth, patch, channels, classes,
image size from the position table, [DIST] token, mean pooling with fc_norm, LayerScale, a
pre-encoder norm, a patch bias, a SwiGLU MLP, attention pooling, positions on the patches only),
and refuse what vitkit does not build (q/k norm, ...) by name.

The number of attention heads and the activation are not in the weights: they come from a model
name (a vitkit preset, or a timm name such as `vit_base_patch16_224`, `deit3_small_patch16_224`,
`vit_small_patch14_reg4_dinov2`, `vit_base_patch32_clip_quickgelu_224`,
`vit_base_patch16_siglip_256`, with or without a tag like `.augreg_in21k`) or a `ViTConfig`.

timm keeps CLIP's projection to the joint space as `head` with a zero bias; a checkpoint with
`norm_pre` and an all-zero head bias is read as vitkit's bias-free `projection`
(`image_embeds`) and written back the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vitkit._io import atomic_path
from vitkit.checkpoints._common import check_state_dict
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError
from vitkit.presets import FAMILIES, GIANT, SIZES, get_config

# timm parameters of variants vitkit does not build (identities in the models it does build)
_UNSUPPORTED = (
    (r"\.[qk]_norm\.", "q/k normalisation"),
    (r"^patch_embed\.norm\.", "a norm after the patch embedding"),
    (r"\.(attn|mlp)\.norm\.", "a norm inside attention or MLP"),
)


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a checkpoint saved as a bare state dict or a training checkpoint.

    Accepts {"model": sd}, {"state_dict": sd}, {"model_ema": sd} (in that order of preference)
    and strips a "module." (DataParallel) or "_orig_mod." (torch.compile) prefix.
    """
    if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_ema", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} does not hold a state dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"{source} holds no tensors; keys: {sorted(obj)[:10]}")
    for wrapper in ("module.", "_orig_mod."):
        if all(k.startswith(wrapper) for k in sd):
            sd = {k[len(wrapper) :]: v for k, v in sd.items()}
    return sd


def base_name(model_name: str) -> str:
    """`vit_base_patch16_224.augreg_in21k` -> `vit_base_patch16_224` (also strips `timm/`)."""
    return model_name.removeprefix("timm/").split(".")[0]


_FAMILY_NAME = re.compile(r"(vit|deit3)_(tiny|small|base|large|huge|giant)_patch(\d+)_(\w+)")


def _family_config(name: str) -> ViTConfig | None:
    """The config a timm family name stands for (`deit3_*`, `vit_*_dinov2`, `vit_*_clip_*`,
    `vit_*_siglip_*`), or None for other names. Width, depth, patch and image size are then read
    from the weights; heads and activation come from here."""
    m = _FAMILY_NAME.fullmatch(name)
    if m is None:
        return None
    kind, size, patch, rest = m.groups()
    fields: dict[str, Any] = {}
    if kind == "deit3":
        family = "deit3"
    elif rest in ("dinov2", "reg4_dinov2"):
        family = "dinov2"
        fields["use_mask_token"] = False  # timm's DINOv2 has none
    elif rest.startswith("clip_"):
        family = "clip"
        fields["act"] = "quick_gelu" if "quickgelu" in rest else "gelu"
    elif rest.startswith("siglip_"):
        family = "siglip"
        fields["act"] = "gelu"  # timm's SigLIP uses exact GELU (transformers: the tanh one)
    else:
        return None
    dim, depth, heads = GIANT if size == "giant" else SIZES[size]
    fields.update(embed_dim=dim, depth=depth, num_heads=heads, patch_size=int(patch))
    return ViTConfig(**{**FAMILIES[family], **fields})


def config_from_timm(
    sd: Mapping[str, Tensor],
    *,
    model_name: str | None = None,
    config: ViTConfig | None = None,
    source: str = "checkpoint",
) -> ViTConfig:
    """The `ViTConfig` of a timm ViT state dict.

    Starts from `config` or the vitkit preset `model_name` and takes from the weights what they
    determine (classes, image size, distillation, pooling, width/depth/patch as a check). Without
    either, raises `CheckpointError` naming what is missing.
    """
    _refuse_unsupported(sd, source)
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(
            f"{source} has no 'patch_embed.proj.weight'; is it a timm ViT? "
            f"first keys: {sorted(sd)[:6]}"
        )
    D, C, P, P2 = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(
        (int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    if config is None:
        if model_name is None:
            raise CheckpointError(
                f"{source}: the number of attention heads is not stored in a timm state dict "
                f"(width {D}, depth {depth}, patch {P}); pass model_name='vit_..._patch{P}_...' "
                f"(see `vitkit models`) or config=ViTConfig(...)"
            )
        config = _family_config(base_name(model_name))
        if config is None:
            try:
                config = get_config(base_name(model_name))
            except ConfigError as exc:
                raise CheckpointError(f"{source}: {exc}") from exc
    found: dict[str, Any] = {"embed_dim": D, "in_chans": C, "patch_size": P, "depth": depth}
    if "blocks.0.mlp.fc1.weight" in sd:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        found["mlp_ratio"] = hidden / D
        swiglu = sd["blocks.0.mlp.fc2.weight"].shape[1] * 2 == hidden
        found["mlp_layer"] = "swiglu" if swiglu else "mlp"
    found["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    found["patch_bias"] = "patch_embed.proj.bias" in sd
    found["pre_norm"] = "norm_pre.weight" in sd
    if "blocks.0.ls1.gamma" in sd:
        found["layer_scale_init"] = config.layer_scale_init or 1e-5
    else:
        found["layer_scale_init"] = None
    found["use_mask_token"] = "mask_token" in sd
    if "attn_pool.latent" in sd:
        found.update(global_pool="map", fc_norm=None)
    elif config.global_pool == "map":
        found["global_pool"] = "token" if "cls_token" in sd else "avg"
    found["class_token"] = "cls_token" in sd
    found["distilled"] = "dist_token" in sd
    found["num_register_tokens"] = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    if "fc_norm.weight" in sd:
        found.update(global_pool="avg", fc_norm=True)
    elif config.use_fc_norm:
        found["fc_norm"] = False
    if not found["class_token"] and found.get("global_pool", config.global_pool) == "token":
        found["global_pool"] = "avg"
    found["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    found["projection_dim"] = None
    if _is_projection(sd):
        found.update(projection_dim=found["num_classes"], num_classes=0)
    if found["num_classes"] != config.num_classes:
        found["id2label"] = None
    found["no_embed_class"] = False
    if "pos_embed" in sd:
        rows = sd["pos_embed"].shape[1]
        prefix = int(found["class_token"]) + int(found["distilled"])
        for n in (rows - prefix, rows):  # with or without [CLS]/[DIST] rows (no_embed_class)
            side = round(max(n, 0) ** 0.5)
            if side * side == n:
                h, w = config.image_hw
                if n != (h // P) * (w // P):
                    found["image_size"] = side * P  # square; a non-square table needs `config`
                # DeiT III: positions on the patches only (with registers, vitkit instead
                # gives [CLS] a zero position row, the layout transformers' DINOv2 uses)
                found["no_embed_class"] = bool(
                    n == rows and prefix and not found["num_register_tokens"]
                )
                break
    elif config.pos_embed == "learned":
        found["pos_embed"] = "none"
    if any(found[k] for k in ("pre_norm", "layer_scale_init", "no_embed_class")) or (
        found.get("global_pool") == "map"
    ):
        found["pos_embed_antialias"] = True  # timm's dynamic_img_size rule, kept for its families
    if P != P2:
        raise CheckpointError(f"{source}: non-square patch kernel {P}x{P2} is not supported")
    if D % config.num_heads:
        raise CheckpointError(
            f"{source}: width {D} is not divisible by num_heads="
            f"{config.num_heads}; pass a config with the right num_heads"
        )
    try:
        return config.replace(**found)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the weights do not fit a vitkit ViT: {exc}") from exc


def _is_projection(sd: Mapping[str, Tensor]) -> bool:
    """timm's CLIP image towers hold the bias-free projection as a zero-bias `head`."""
    bias = sd.get("head.bias")
    return "norm_pre.weight" in sd and bias is not None and not bool(bias.any())


def _refuse_unsupported(sd: Mapping[str, Tensor], source: str) -> None:
    for pattern, what in _UNSUPPORTED:
        hits = sorted(k for k in sd if re.search(pattern, k))
        if hits:
            raise CheckpointError(
                f"{source} uses {what} ({hits[0]}, ...), which vitkit's "
                f"VisionTransformer does not implement"
            )


def state_dict_from_timm(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """vitkit state dict from a timm one. A position table without [CLS]/[DIST] rows (timm's
    `no_embed_class`) gets zero rows there, which is the same model. Raises one
    `CheckpointError` for missing/unexpected keys and shape conflicts."""
    out = dict(sd)
    if config.projection_dim is not None and _is_projection(out):
        out["projection.weight"] = out.pop("head.weight")
        del out["head.bias"]
    pos = out.get("pos_embed")
    if pos is not None and config.pos_embed == "learned":
        prefix = config.num_pos_prefix_tokens
        if pos.shape[1] == config.num_patches and prefix:
            out["pos_embed"] = torch.cat([pos.new_zeros(1, prefix, pos.shape[-1]), pos], dim=1)
    check_state_dict(out, config, source=source)
    return out


def state_dict_to_timm(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """timm state dict from a vitkit one (timm's `VisionTransformer(**timm_kwargs(config))` or
    `VisionTransformerDistilled` loads it with `strict=True`)."""
    check_state_dict(sd, config, source="model state dict")
    _timm_unsupported(config)
    # the mask token only serves masked pre-training (DINOv2, SimMIM); timm's ViT has none
    out = {k: v.contiguous() for k, v in sd.items() if k != "mask_token"}
    if "projection.weight" in out:  # timm's CLIP: the projection is a head with zero bias
        weight = out.pop("projection.weight")
        out["head.weight"] = weight
        out["head.bias"] = weight.new_zeros(weight.shape[0])
    if _no_embed_class(config):  # fold the prefix positions into the tokens, as timm's loader
        pos = out["pos_embed"]
        n = config.num_pos_prefix_tokens
        for i, name in enumerate(t for t in ("cls_token", "dist_token") if t in out):
            out[name] = out[name] + pos[:, i : i + 1]
        out["pos_embed"] = pos[:, n:].contiguous()
    return out


def _no_embed_class(config: ViTConfig) -> bool:
    """timm gives register tokens positions unless `no_embed_class`; vitkit never does."""
    return config.num_register_tokens > 0 and config.pos_embed == "learned"


def _timm_unsupported(config: ViTConfig) -> None:
    c = config
    reasons = []
    if c.projection_dim is not None and c.num_classes:
        reasons.append("timm holds a projection or a classifier in `head`, not both")
    if c.head == "mlp":
        reasons.append("timm's ViT has no tanh pre-logits layer")
    if c.pos_embed == "sincos2d":
        reasons.append("sin-cos positions are computed, timm stores a learned table")
    if c.stem_channels:
        reasons.append("timm's ViT projects the pixels, it has no convolutional stem")
    if c.global_pool == "token_avg":
        reasons.append("timm's ViT pools [CLS] or the patch mean, not both side by side")
    if reasons:
        raise CheckpointError("timm cannot hold this model: " + "; ".join(reasons))


def timm_kwargs(config: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for timm's `VisionTransformer` (or `VisionTransformerDistilled` when
    `config.distilled`) that build the same architecture as `config`."""
    _timm_unsupported(config)
    c = config
    kwargs: dict[str, Any] = dict(
        img_size=c.image_hw,
        patch_size=c.patch_size,
        in_chans=c.in_chans,
        num_classes=c.num_classes,
        global_pool=c.global_pool,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
        qkv_bias=c.qkv_bias,
        class_token=c.class_token,
        reg_tokens=c.num_register_tokens,
        fc_norm=c.use_fc_norm,
        dynamic_img_pad=c.dynamic_img_pad,
        norm_layer=partial(nn.LayerNorm, eps=c.layer_norm_eps),
    )
    if c.projection_dim is not None:
        kwargs["num_classes"] = c.projection_dim
    if c.layer_scale_init:
        kwargs["init_values"] = c.layer_scale_init
    if c.pre_norm:
        kwargs["pre_norm"] = True  # timm then drops the patch bias, as CLIP has none
    if c.pre_norm == c.patch_bias:
        raise CheckpointError(
            "timm ties the patch bias to the pre-encoder norm (pre_norm drops it); this model "
            f"has pre_norm={c.pre_norm} and patch_bias={c.patch_bias}"
        )
    if c.no_embed_class or _no_embed_class(c):
        kwargs["no_embed_class"] = True
    if c.mlp_layer == "swiglu":
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    if c.pos_embed == "none":
        kwargs["pos_embed"] = "none"
    if c.act == "gelu_tanh" and c.mlp_layer == "mlp":
        kwargs["act_layer"] = partial(nn.GELU, approximate="tanh")
    if c.act == "quick_gelu" and c.mlp_layer == "mlp":
        kwargs["act_layer"] = "quick_gelu"
    return kwargs


def export_timm(model: torch.nn.Module) -> dict[str, Tensor]:
    """A timm-loadable state dict of a vitkit `VisionTransformer` (detached CPU tensors)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state_dict_to_timm(sd, model.config)


def save_timm(model: torch.nn.Module, path: str) -> None:
    """Write `export_timm(model)` to a `.safetensors` file atomically (timm's
    `load_checkpoint(model, path)` and `pretrained_cfg_overlay=dict(file=path)` read it)."""
    sd = export_timm(model)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
