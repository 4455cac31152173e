"""timm VisionTransformer / VisionTransformerDistilled state dicts <-> vitkit.

vitkit's parameter names follow timm's, so the mapping is mostly the identity. What it does:
unwrap training checkpoints ({"model": ...}, {"state_dict": ...}, "module." prefixes), read the
architecture from the weights where the shapes tell it (width, depth, patch, channels, classes,
image size from the position table, [DIST] token, mean pooling with fc_norm), and refuse what
vitkit does not build (layer scale, q/k norm, ...) by name.

The number of attention heads is not in the weights: it comes from a model name
(`vit_base_patch16_224`, with or without a timm tag like `.augreg_in21k`) or a `ViTConfig`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vitkit.checkpoints._common import check_state_dict
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

# timm parameters of variants vitkit does not build (identities in the models it does build)
_UNSUPPORTED = (
    (r"\.ls[12]\.", "layer scale (DeiT III / CaiT style init_values)"),
    (r"\.[qk]_norm\.", "q/k normalisation"),
    (r"^norm_pre\.", "a pre-encoder norm (CLIP style)"),
    (r"^attn_pool\.", "attention pooling (MAP head)"),
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
        from vitkit.presets import get_config

        try:
            config = get_config(base_name(model_name))
        except ConfigError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
    found: dict[str, Any] = {"embed_dim": D, "in_chans": C, "patch_size": P, "depth": depth}
    if "blocks.0.mlp.fc1.weight" in sd:
        found["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / D
    found["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    found["class_token"] = "cls_token" in sd
    found["distilled"] = "dist_token" in sd
    found["num_register_tokens"] = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    if "fc_norm.weight" in sd:
        found.update(global_pool="avg", fc_norm=True)
    elif config.use_fc_norm:
        found["fc_norm"] = False
    if not found["class_token"]:
        found["global_pool"] = "avg"
    found["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    if found["num_classes"] != config.num_classes:
        found["id2label"] = None
    if "pos_embed" in sd:
        rows = sd["pos_embed"].shape[1]
        prefix = int(found["class_token"]) + int(found["distilled"])
        for n in (rows - prefix, rows):  # with or without [CLS]/[DIST] rows (no_embed_class)
            side = round(max(n, 0) ** 0.5)
            if side * side == n:
                if n != config.num_patches:
                    found["image_size"] = side * P  # square; a non-square table needs `config`
                break
    elif config.pos_embed == "learned":
        found["pos_embed"] = "none"
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
    out = {k: v.contiguous() for k, v in sd.items()}
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
    if c.head == "mlp":
        reasons.append("timm's ViT has no tanh pre-logits layer")
    if c.use_mask_token:
        reasons.append("timm's ViT has no mask token")
    if c.pos_embed == "sincos2d":
        reasons.append("sin-cos positions are computed, timm stores a learned table")
    if reasons:
        raise CheckpointError("timm cannot hold this model: " + "; ".join(reasons))


def timm_kwargs(config: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for timm's `VisionTransformer` (or `VisionTransformerDistilled` when
    `config.distilled`) that build the same architecture as `config`."""
    from functools import partial

    from torch import nn

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
    if c.pos_embed == "none":
        kwargs["pos_embed"] = "none"
    if _no_embed_class(c):
        kwargs["no_embed_class"] = True
    if c.act == "gelu_tanh":
        kwargs["act_layer"] = partial(nn.GELU, approximate="tanh")
    return kwargs


def export_timm(model: torch.nn.Module) -> dict[str, Tensor]:
    """A timm-loadable state dict of a vitkit `VisionTransformer` (detached CPU tensors)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state_dict_to_timm(sd, model.config)


def save_timm(model: torch.nn.Module, path: str) -> None:
    """Write `export_timm(model)` to a `.safetensors` file atomically (timm's
    `load_checkpoint(model, path)` and `pretrained_cfg_overlay=dict(file=path)` read it)."""
    from safetensors.torch import save_file

    from vitkit._io import atomic_path

    sd = export_timm(model)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
