"""`ViTConfig`: the single description of a Vision Transformer.

Every model vitkit builds comes from one of these. It validates itself on creation and round-trips
through JSON (`to_dict` / `from_dict`, `save` / `load`). Translation to foreign config formats
(Hugging Face `config.json`, timm model names) lives in `vitkit.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vitkit import limits
from vitkit._fields import checked, field_kinds
from vitkit.errors import ConfigError
from vitkit.limits import is_int

GlobalPool = Literal["token", "avg", "map", "token_avg"]
PosEmbed = Literal["learned", "sincos2d", "none"]
Head = Literal["linear", "mlp"]
AttnImpl = Literal["sdpa", "eager"]
Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]
MlpLayer = Literal["mlp", "swiglu"]


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if is_int(value):
        return (int(value), int(value))  # type: ignore[arg-type]
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(is_int, value)):
        raise ConfigError(f"image_size must be an int or a pair (height, width), got {value!r}")
    return (int(value[0]), int(value[1]))


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file no larger than `vitkit.limits` JSON_BYTES; `ConfigError` naming it."""
    try:
        size = path.stat().st_size
        if size > limits.limit("JSON_BYTES"):
            limits.check(size, "JSON_BYTES", "file size in bytes", str(path))
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


def _id2label(value: Any) -> dict[int, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"id2label must map class index to name, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if is_int(k) or (isinstance(k, str) and re.fullmatch(r"\s*-?[0-9]+\s*", k)):
            index = int(k)
        else:
            raise ConfigError(f"id2label key {k!r} is not a class index")
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ConfigError(f"id2label[{k!r}] must be a class name, got {v!r}")
        out[index] = str(v)
    if out and (min(out) < 0 or max(out) >= len(out)):
        raise ConfigError(f"id2label keys must be 0..{len(out) - 1}, got {sorted(out)[:5]}...")
    return out


_SPECIAL = ("image_size", "stem_channels", "stem_strides", "id2label")  # checked below


def _check_types(c: ViTConfig) -> None:
    """Refuse a value of the wrong type instead of casting it (2.7 layers is not 2 layers)."""
    errors = []
    for name, kind in _KINDS.items():
        if name in _SPECIAL:
            continue
        value = getattr(c, name)
        try:
            setattr(c, name, checked(value, kind))
        except ValueError as exc:
            errors.append(f"{name}={value!r} {exc}")
    try:
        hw = _pair(c.image_size)
        c.image_size = int(c.image_size) if is_int(c.image_size) else hw  # type: ignore
    except ConfigError as exc:
        errors.append(str(exc))
    stem = c.stem_channels
    if not isinstance(stem, tuple) or not all(is_int(v) and v > 0 for v in stem):
        errors.append(f"stem_channels must be a list of positive integers, got {stem!r}")
    else:
        c.stem_channels = tuple(int(v) for v in stem)
    strides = c.stem_strides
    if not isinstance(strides, tuple) or not all(is_int(v) and v in (1, 2) for v in strides):
        errors.append(f"stem_strides must be a list of 1s and 2s, got {strides!r}")
    elif strides and len(strides) != len(c.stem_channels):
        errors.append(
            f"stem_strides {list(strides)} needs one stride per stem_channels entry "
            f"({len(c.stem_channels)})"
        )
    else:
        c.stem_strides = tuple(int(v) for v in strides)
    if c.id2label is not None and not isinstance(c.id2label, dict):
        errors.append("id2label must be a mapping")
    if errors:
        raise ConfigError("invalid ViTConfig: " + "; ".join(errors))


def _check_limits(c: ViTConfig) -> None:
    """Every size against `vitkit.limits`, cheapest first, the parameter count last."""

    h, w = c.image_hw
    for value, name, what in (
        (c.depth, "DEPTH", "depth"),
        (c.embed_dim, "WIDTH", "embed_dim"),
        (c.num_heads, "HEADS", "num_heads"),
        (c.patch_size, "PATCH_SIZE", "patch_size"),
        (c.in_chans, "CHANNELS", "in_chans"),
        (max(h, w), "IMAGE_SIDE", "image_size"),
        (c.num_register_tokens, "REGISTER_TOKENS", "num_register_tokens"),
        (len(c.stem_channels), "STEM_LAYERS", "stem_channels (layers)"),
        (max(c.stem_channels, default=0), "WIDTH", "stem_channels (width)"),
        (c.num_classes, "CLASSES", "num_classes"),
        (c.head_hidden_dim or 0, "MLP_DIM", "head_hidden_dim"),
        (c.projection_dim or 0, "MLP_DIM", "projection_dim"),
    ):
        limits.check(value, name, what)
    limits.check(c.mlp_hidden_dim, "MLP_DIM", f"MLP size (embed_dim x mlp_ratio {c.mlp_ratio})")
    limits.check(c.num_patches, "PATCHES", f"patches per image ({h}x{w} / patch {c.patch_size})")
    limits.check(c.estimated_params(), "PARAMS", "parameters")


@dataclass
class ViTConfig:
    """Architecture of a Vision Transformer (Dosovitskiy et al. 2020) and its variants.

    The defaults are ViT-B/16 at 224x224 with 1000 classes. Variants are switches here, not
    separate model classes: DeiT's distillation token (`distilled`), mean pooling
    (`global_pool="avg"`), register tokens, fixed 2D sin-cos positions, the paper's
    pre-training head with a tanh hidden layer (`head="mlp"`).

    The encoders people start from today are switches too (docs/families.md):
    LayerScale (`layer_scale_init`, DINOv2 and DeiT III), positions on the patches only
    (`no_embed_class`, DeiT III), a LayerNorm before the encoder and no patch bias
    (`pre_norm`, `patch_bias=False`, CLIP), quick-GELU / tanh-GELU (`act`), a SwiGLU MLP
    (`mlp_layer="swiglu"`, DINOv2 giant; `mlp_ratio` then counts both packed halves, as timm's
    SwiGLUPacked), no [CLS] with an attention-pooling head (`class_token=False`,
    `global_pool="map"`, SigLIP), a bias-free projection to a joint image-text space
    (`projection_dim`, CLIP), the DINOv2 mask token (`use_mask_token`), and DINOv2's linear
    classifier input, [CLS] beside the mean of the patch tokens (`global_pool="token_avg"`,
    2 x embed_dim features).

    For small images, `stem_channels` puts 3x3 convolutions before the patch projection (the
    paper's hybrid input, the stem of Xiao et al. 2021); `stem_strides` (1 or 2 each) lets them
    downsample, and the projection then covers the rest of the patch (patch_size / the strides'
    product pixels of their map), so the token grid stays the patch grid. vitkit's own format
    holds such a model, transformers, timm and the JAX layout do not.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    act: Activation = "gelu"
    mlp_layer: MlpLayer = "mlp"
    layer_scale_init: float | None = None
    pre_norm: bool = False
    patch_bias: bool = True
    stem_channels: tuple[int, ...] = ()
    stem_strides: tuple[int, ...] = ()  # () = all 1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: GlobalPool = "token"
    fc_norm: bool | None = None
    class_token: bool = True
    distilled: bool = False
    num_register_tokens: int = 0
    pos_embed: PosEmbed = "learned"
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    pos_embed_antialias: bool = False
    no_embed_class: bool = False
    dynamic_img_pad: bool = False
    use_mask_token: bool = False
    head: Head = "linear"
    head_hidden_dim: int | None = None
    head_init_zero: bool = False
    projection_dim: int | None = None
    attn_implementation: AttnImpl = "sdpa"
    id2label: dict[int, str] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)  # type: ignore[assignment]
        if isinstance(self.stem_channels, list):
            self.stem_channels = tuple(self.stem_channels)
        if isinstance(self.stem_strides, list):
            self.stem_strides = tuple(self.stem_strides)
        if self.id2label is not None:
            self.id2label = _id2label(self.id2label)
        self.validate()

    # ----------------------------------------------------------------------------- derived
    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width at the configured image size."""
        h, w = self.image_hw
        p = self.patch_size
        if self.dynamic_img_pad:
            return (-(-h // p), -(-w // p))
        return (h // p, w // p)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [CLS], the distillation token, then register tokens."""
        return int(self.class_token) + int(self.distilled) + self.num_register_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Prefix tokens that carry a position embedding ([CLS] and [DIST]; registers do not,
        and none do with `no_embed_class`)."""
        if self.no_embed_class:
            return 0
        return int(self.class_token) + int(self.distilled)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Width of the MLP's first layer (both packed halves for SwiGLU). Rounded to 6 places
        first so that a ratio like 4096 / 1536 gives 4096, not 4095."""
        return int(round(self.embed_dim * self.mlp_ratio, 6))

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled features the head (or pre-logits layer, or projection) reads:
        twice `embed_dim` for "token_avg", which concatenates [CLS] and the patch mean."""
        return 2 * self.embed_dim if self.global_pool == "token_avg" else self.embed_dim

    @property
    def use_fc_norm(self) -> bool:
        """Norm after pooling instead of before it (timm's default for mean pooling)."""
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    # ----------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise `ConfigError` naming the field and the fix for any inconsistent setting.

        Types come first (a string, a bool or 2.7 where an int is due is refused, never cast),
        then each size against `vitkit.limits`, then the parameter count: all before any model
        is built, so a hostile config cannot ask for a huge allocation.
        """
        _check_types(self)
        errors: list[str] = []
        h, w = self.image_hw
        p = self.patch_size
        positive = {
            "patch_size": p,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "image height": h,
            "image width": w,
        }
        for name, value in positive.items():
            if value <= 0:
                errors.append(f"{name} must be positive, got {value}")
        if self.num_classes < 0:
            errors.append(f"num_classes must be >= 0 (0 means no head), got {self.num_classes}")
        if self.num_register_tokens < 0:
            errors.append(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if not self.mlp_ratio > 0:
            errors.append(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not self.layer_norm_eps > 0:
            errors.append(f"layer_norm_eps must be positive (e.g. 1e-6), got {self.layer_norm_eps}")
        if self.head_hidden_dim is not None and self.head_hidden_dim <= 0:
            errors.append(f"head_hidden_dim must be positive, got {self.head_hidden_dim}")
        if p > 0 and p % self.stem_stride:
            errors.append(
                f"stem_strides={list(self.stem_strides)} downsample by {self.stem_stride}, which "
                f"does not divide patch_size={p}"
            )
        if errors:
            raise ConfigError("invalid ViTConfig: " + "; ".join(errors))
        _check_limits(self)
        if self.embed_dim % self.num_heads:
            errors.append(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                f"pick num_heads from {[d for d in range(1, 33) if self.embed_dim % d == 0]}"
            )
        if (h % p or w % p) and not self.dynamic_img_pad:
            errors.append(
                f"image_size={self.image_hw} is not a multiple of patch_size={p}; use "
                f"{(h // p * p or p, w // p * p or p)} or set dynamic_img_pad=True"
            )
        if self.mlp_hidden_dim <= 0:
            errors.append(
                f"mlp_ratio={self.mlp_ratio} gives an MLP of {self.mlp_hidden_dim} units; "
                f"use a larger mlp_ratio"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                errors.append(f"{name} must be in [0, 1), got {value}")
        choices = {
            "global_pool": ("token", "avg", "map", "token_avg"),
            "mlp_layer": ("mlp", "swiglu"),
            "pos_embed": ("learned", "sincos2d", "none"),
            "head": ("linear", "mlp"),
            "attn_implementation": ("sdpa", "eager"),
            "act": ("gelu", "gelu_tanh", "quick_gelu"),
            "pos_embed_interpolation": ("bicubic", "bilinear"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            errors.append(
                f"global_pool={self.global_pool!r} needs class_token=True; use "
                "global_pool='avg' for a model without a [CLS] token"
            )
        if self.global_pool == "token_avg" and self.fc_norm:
            errors.append(
                "global_pool='token_avg' concatenates tokens the final norm has normalised; "
                "fc_norm=True would normalise the pair as one vector (leave fc_norm unset)"
            )
        if self.global_pool == "token_avg" and self.distilled:
            errors.append(
                "distilled=True (DeiT) reads [CLS] and [DIST] apart; use global_pool='token'"
            )
        if self.mlp_layer == "swiglu" and self.mlp_hidden_dim % 2:
            errors.append(
                f"mlp_layer='swiglu' packs two halves into mlp_ratio * embed_dim = "
                f"{self.mlp_hidden_dim}, which must be even"
            )
        if self.layer_scale_init is not None and self.layer_scale_init <= 0:
            errors.append(f"layer_scale_init must be positive or None, got {self.layer_scale_init}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            errors.append(f"projection_dim must be positive or None, got {self.projection_dim}")
        if self.global_pool == "map" and self.head == "mlp":
            errors.append("global_pool='map' has its own MLP; use head='linear'")
        if self.distilled and not self.class_token:
            errors.append("distilled=True (DeiT) needs class_token=True")
        if (
            self.id2label is not None
            and self.num_classes
            and len(self.id2label) != self.num_classes
        ):
            errors.append(
                f"id2label has {len(self.id2label)} entries but num_classes="
                f"{self.num_classes}; give one label per class"
            )
        if errors:
            raise ConfigError("invalid ViTConfig: " + "; ".join(errors))

    def estimated_params(self) -> int:
        """Parameters of the model this config describes, within 3 per cent, without
        building it (what the limit on parameters is checked against)."""
        d, m, k, f = self.embed_dim, self.mlp_hidden_dim, self.num_classes, self.pooled_dim
        c, p = self.in_chans, self.patch_size
        mlp = d * m + m + (m // 2 if self.mlp_layer == "swiglu" else m) * d  # SwiGLU: halves
        block = 4 * d * d + mlp + 9 * d  # qkv + proj, the MLP, two norms
        tokens = self.num_patches + self.num_prefix_tokens
        head = k * (self.head_hidden_dim or f) + k + (self.head_hidden_dim or 0) * (f + 1)
        head += k * (d + 1) if self.distilled else 0  # DeiT's second head
        head += block + d if self.global_pool == "map" else 0  # attention pool: about a block
        head += (self.projection_dim or 0) * f
        stem = 0
        for width in self.stem_channels:  # 3x3 conv, then the BatchNorm's 4 vectors
            stem, c = stem + 9 * c * width + 4 * width, width
        k = p // self.stem_stride  # the projection's kernel
        return self.depth * block + stem + d * c * k * k + d + tokens * d + 2 * d + head

    @property
    def stem_stride(self) -> int:
        """How much the convolutional stem downsamples (the product of `stem_strides`)."""
        return math.prod(self.stem_strides)

    # ----------------------------------------------------------------------------- io
    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with `changes` applied (and validated). Unknown names raise `ConfigError`."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(
                f"unknown ViTConfig field(s) {sorted(unknown)}; known fields: "
                f"{sorted(f.name for f in dataclasses.fields(self))}"
            )
        if "num_classes" in changes and "id2label" not in changes:
            changes["id2label"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["image_size"], tuple):
            d["image_size"] = list(d["image_size"])
        if d["id2label"] is not None:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a ViTConfig needs a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"model_type", "vitkit_version"}
        if unknown:
            raise ConfigError(f"unknown ViTConfig field(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps({"model_type": "vitkit", **self.to_dict()}, indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON atomically."""
        from vitkit._io import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ViTConfig:
        path = Path(path)
        data = read_json(path, "config")
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


# field -> declared type, for `_check_types` (the Literal aliases are names to choose among)
_KINDS = field_kinds(
    ViTConfig, strings=("GlobalPool", "PosEmbed", "Head", "AttnImpl", "Activation", "MlpLayer")
)
