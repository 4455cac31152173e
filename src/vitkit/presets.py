"""Named model presets, `create_model` and `list_models`.

Names follow timm: `vit_{size}_patch{P}_{resolution}` for the paper's sizes, `deit_*` for DeiT,
and small-image presets for 8x8 digits, 28x28 MNIST and 32x32 CIFAR used by the shipped recipes.
The encoders people start from today have their public sizes under their family's name:
`dinov2_{size}[_reg4]_patch14_518`, `clip_vit_{size}_patch{P}_224`, `siglip_base_patch16_{res}`,
`deit3_{size}_patch16_{res}` (docs/families.md). The CLIP and SigLIP presets also have their
text tower (`get_image_text_config`, `create_image_text_model`, `list_models(text=True)`).
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

from vitkit.config import ImageTextConfig, Scores, TextConfig, ViTConfig
from vitkit.errors import ConfigError

if TYPE_CHECKING:
    from vitkit.models.image_text import ImageTextModel
    from vitkit.models.vit import VisionTransformer

# width, depth, heads (paper table 1; Ti and S from DeiT)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
GIANT = (1536, 40, 24)  # DINOv2's ViT-g/14

# What each family switches on (docs/families.md); sizes and resolutions are added below.
FAMILIES: dict[str, dict[str, Any]] = {
    # DINOv2 (Oquab et al. 2023): LayerScale, a mask token, a 37x37 position grid (518 px).
    "dinov2": dict(
        image_size=518, patch_size=14, num_classes=0, layer_scale_init=1e-5, use_mask_token=True
    ),
    # CLIP (Radford et al. 2021), OpenAI weights: pre-norm, no patch bias, quick-GELU, eps 1e-5.
    "clip": dict(
        num_classes=0, pre_norm=True, patch_bias=False, act="quick_gelu", layer_norm_eps=1e-5
    ),
    # SigLIP (Zhai et al. 2023): no [CLS], attention-pool head, tanh-GELU.
    "siglip": dict(num_classes=0, class_token=False, global_pool="map", act="gelu_tanh"),
    # DeiT III (Touvron et al. 2022): LayerScale, positions on the patches only.
    "deit3": dict(layer_scale_init=1e-6, no_embed_class=True),
}

# The text towers of the image-text families (sizes are added below). CLIP (Radford et al.
# 2021, table 20; openai/clip-vit-*): causal, the end-of-text token is the largest id (its
# transformers configs say eos_token_id=2, the legacy rule), quick-GELU, no projection bias.
# SigLIP (Zhai et al. 2023; google/siglip-base-patch16-*): both ways, the last position of
# texts padded to 64 tokens, tanh-GELU, a projection with bias, SentencePiece's "</s>" = 1.
TEXT_FAMILIES: dict[str, dict[str, Any]] = {
    "clip": dict(vocab_size=49_408, context_length=77, depth=12, act="quick_gelu",
                 layer_norm_eps=1e-5, causal=True, pool="argmax", eos_token_id=49_407),
    "siglip": dict(vocab_size=32_000, context_length=64, width=768, depth=12, num_heads=12,
                   act="gelu_tanh", layer_norm_eps=1e-6, causal=False, pool="last",
                   eos_token_id=1, projection_dim=768, projection_bias=True),
}  # fmt: skip

_PRESETS: dict[str, dict[str, Any]] = {}
_TEXT_TOWERS: dict[str, tuple[dict[str, Any], Scores]] = {}  # preset -> text tower, scores


def register_preset(name: str, **fields: Any) -> None:
    """Add a named preset; `fields` are `ViTConfig` fields."""
    ViTConfig(**fields)  # validate now, not when a user asks for it
    _PRESETS[name] = fields


def register_text_tower(name: str, scores: Scores = "softmax", **fields: Any) -> None:
    """Give preset `name` a text tower (`TextConfig` fields) and the `scores` of the pair."""
    ImageTextConfig(ViTConfig(**_PRESETS[name]), TextConfig(**fields), scores)  # validate now
    _TEXT_TOWERS[name] = (fields, scores)


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
    _register_families()
    # Small images. 8x8 digits (scikit-learn), 28x28 MNIST, 32x32 CIFAR (Lee et al. 2021 use a
    # depth-9, width-192 ViT with patch 4 on CIFAR; "lite" follows Compact Transformers' ViT-Lite).
    # Mean pooling and fixed 2D sin-cos positions learn faster than [CLS] + a learned table on
    # small data (Beyer et al. 2022, "Better plain ViT baselines"; measured on digits here).
    small = dict(mlp_ratio=2.0, global_pool="avg", pos_embed="sincos2d")
    digits = dict(image_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                  num_heads=4, **small)  # fmt: skip
    register_preset("vit_digits_patch2_8", **digits)
    # The same ViT with two 3x3 convolutions (32 channels) before the patch projection: the
    # paper's hybrid input, as in Xiao et al. 2021. The default `vitkit train` model: on digits
    # it removes most of the plain model's test errors (benchmarks/RESULTS.md, "Digits").
    register_preset("vit_digits_convstem_patch2_8", stem_channels=(32, 32), **digits)
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


def _register_families() -> None:
    def sized(size: str) -> dict[str, int]:
        dim, depth, heads = GIANT if size == "giant" else SIZES[size]
        return dict(embed_dim=dim, depth=depth, num_heads=heads)

    for size in ("small", "base", "large", "giant"):
        # giant: SwiGLU with 2 x 4096 packed hidden units (transformers' rounding of 4 x 2/3)
        mlp = dict(mlp_layer="swiglu", mlp_ratio=8192 / 1536) if size == "giant" else {}
        for reg in (0, 4):
            name = f"dinov2_{size}{'_reg4' if reg else ''}_patch14_518"
            # the models with registers resample positions with antialias (their transformers
            # class and the original code do), the first ones without
            register_preset(
                name,
                **FAMILIES["dinov2"],
                **sized(size),
                **mlp,
                num_register_tokens=reg,
                pos_embed_antialias=bool(reg),
            )
    # CLIP's text towers: width 512 with 8 heads for B, 768 with 12 for L; 12 layers each
    for size, patch, proj, (width, heads) in (
        ("base", 32, 512, (512, 8)), ("base", 16, 512, (512, 8)), ("large", 14, 768, (768, 12))
    ):  # fmt: skip
        name = f"clip_vit_{size}_patch{patch}_224"
        register_preset(
            name, **FAMILIES["clip"], **sized(size), patch_size=patch, projection_dim=proj
        )
        register_text_tower(
            name, **TEXT_FAMILIES["clip"], width=width, num_heads=heads, projection_dim=proj
        )
    for res in (224, 256, 384, 512):
        name = f"siglip_base_patch16_{res}"
        register_preset(name, **FAMILIES["siglip"], **sized("base"), image_size=res)
        register_text_tower(name, "sigmoid", **TEXT_FAMILIES["siglip"])
    for size in ("small", "base", "large"):
        for res in (224, 384):
            register_preset(
                f"deit3_{size}_patch16_{res}", **FAMILIES["deit3"], **sized(size), image_size=res
            )


_register_defaults()


def list_models(pattern: str = "*", *, text: bool = False) -> list[str]:
    """Preset names matching a shell-style `pattern` (e.g. `"vit_base_*"`), sorted; with
    `text=True` only those with a text tower (CLIP, SigLIP)."""
    names = _TEXT_TOWERS if text else _PRESETS
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The `ViTConfig` of preset `name` with `overrides` applied."""
    if name not in _PRESETS:
        close = [n for n in _PRESETS if name.split("_")[0] in n][:8]
        raise ConfigError(
            f"unknown model {name!r}; `vitkit models` lists them"
            + (f" (similar: {', '.join(close)})" if close else "")
        )
    return ViTConfig(**{**_PRESETS[name], **overrides})


def create_model(name: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """Build a randomly initialised model from a preset name or a `ViTConfig`.

    >>> model = create_model("vit_base_patch16_224", num_classes=10, drop_path_rate=0.1)
    """
    if isinstance(name, ViTConfig):
        config = name.replace(**overrides) if overrides else name
    else:
        config = get_config(name, **overrides)
    from vitkit.models.vit import VisionTransformer  # torch: `vitkit models` lists without it

    return VisionTransformer(config)


def get_image_text_config(name: str, **overrides: Any) -> ImageTextConfig:
    """Both towers of preset `name` (a CLIP or SigLIP one) with `overrides` applied
    (`ImageTextConfig.replace`: a field both towers have changes both)."""
    vision = get_config(name)
    if name not in _TEXT_TOWERS:
        raise ConfigError(
            f"preset {name!r} has no text tower; the presets with one are "
            f"{', '.join(list_models(text=True))}"
        )
    fields, scores = _TEXT_TOWERS[name]
    config = ImageTextConfig(vision, TextConfig(**fields), scores)
    return config.replace(**overrides) if overrides else config


def create_image_text_model(name: str | ImageTextConfig, **overrides: Any) -> ImageTextModel:
    """A randomly initialised CLIP / SigLIP model (both towers) from a preset name or an
    `ImageTextConfig`.

    >>> model = create_image_text_model("clip_vit_base_patch32_224")
    """
    if isinstance(name, ImageTextConfig):
        config = name.replace(**overrides) if overrides else name
    else:
        config = get_image_text_config(name, **overrides)
    from vitkit.models.image_text import ImageTextModel  # torch, as in create_model

    return ImageTextModel(config)
