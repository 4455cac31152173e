"""Named model presets, `create_model` and `list_models`.

Names follow timm: `vit_{size}_patch{P}_{resolution}` for the paper's sizes, `deit_*` for DeiT,
and small-image presets for 8x8 digits, 28x28 MNIST and 32x32 CIFAR used by the shipped recipes.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from vitkit.config import ViTConfig
from vitkit.errors import ConfigError

# width, depth, heads (paper table 1; Ti and S from DeiT)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

_PRESETS: dict[str, dict[str, Any]] = {}


def register_preset(name: str, **fields: Any) -> None:
    """Add a named preset; `fields` are `ViTConfig` fields."""
    ViTConfig(**fields)  # validate now, not when a user asks for it
    _PRESETS[name] = fields


def _register_defaults() -> None:
    for size, (dim, depth, heads) in SIZES.items():
        for patch in (8, 14, 16, 32):
            for res in (224, 384):
                if res % patch:
                    continue
                register_preset(
                    f"vit_{size}_patch{patch}_{res}",
                    image_size=res,
                    patch_size=patch,
                    embed_dim=dim,
                    depth=depth,
                    num_heads=heads,
                )
    for size in ("tiny", "small", "base"):
        dim, depth, heads = SIZES[size]
        for distilled in (False, True):
            suffix = "_distilled" if distilled else ""
            register_preset(
                f"deit_{size}{suffix}_patch16_224",
                patch_size=16,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                distilled=distilled,
            )
    register_preset("deit_base_patch16_384", image_size=384, embed_dim=768, depth=12, num_heads=12)
    register_preset(
        "deit_base_distilled_patch16_384",
        image_size=384,
        embed_dim=768,
        depth=12,
        num_heads=12,
        distilled=True,
    )
    # Small images. 8x8 digits (scikit-learn), 28x28 MNIST, 32x32 CIFAR (Lee et al. 2021 use a
    # depth-9, width-192 ViT with patch 4 on CIFAR; "lite" follows Compact Transformers' ViT-Lite).
    # Mean pooling and fixed 2D sin-cos positions learn faster than [CLS] + a learned table on
    # small data (Beyer et al. 2022, "Better plain ViT baselines"; measured on digits here).
    small = dict(mlp_ratio=2.0, global_pool="avg", pos_embed="sincos2d")
    register_preset(
        "vit_digits_patch2_8",
        image_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=4,
        num_heads=4,
        **small,
    )
    register_preset(
        "vit_mnist_patch4_28",
        image_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=128,
        depth=6,
        num_heads=4,
        **small,
    )
    register_preset(
        "vit_tiny_patch4_32",
        image_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=192,
        depth=9,
        num_heads=12,
        mlp_ratio=2.0,
    )
    register_preset(
        "vit_small_patch4_32",
        image_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=384,
        depth=7,
        num_heads=12,
        mlp_ratio=1.0,
    )
    register_preset(
        "vit_lite_patch4_32",
        image_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=256,
        depth=7,
        num_heads=4,
        mlp_ratio=2.0,
    )


_register_defaults()


def list_models(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style `pattern` (e.g. `"vit_base_*"`), sorted."""
    return sorted(n for n in _PRESETS if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The `ViTConfig` of preset `name` with `overrides` applied."""
    if name not in _PRESETS:
        close = [n for n in _PRESETS if name.split("_")[0] in n][:8]
        raise ConfigError(
            f"unknown model {name!r}; `vitkit models` lists them"
            + (f" (similar: {', '.join(close)})" if close else "")
        )
    return ViTConfig(**{**_PRESETS[name], **overrides})


def create_model(name: str | ViTConfig, **overrides: Any):
    """Build a randomly initialised model from a preset name or a `ViTConfig`.

    >>> model = create_model("vit_base_patch16_224", num_classes=10, drop_path_rate=0.1)
    """
    from vitkit.models.vit import VisionTransformer

    if isinstance(name, ViTConfig):
        config = name.replace(**overrides) if overrides else name
    else:
        config = get_config(name, **overrides)
    return VisionTransformer(config)
