"""`ViTConfig`: the single description of a Vision Transformer (and beside it `TextConfig`, a
CLIP / SigLIP text tower, and `ImageTextConfig`, both towers).

Every model vitkit builds comes from one of these. Each field declares its choices and bounds
(`vitkit._fields`); the config checks them on creation, with the rules between fields and the
limits of `vitkit.limits`, and names every problem in one `ConfigError`. It round-trips through
JSON (`to_dict` / `from_dict`, `save` / `load`). Translation to foreign config formats
(Hugging Face `config.json`, timm model names) lives in `vitkit.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from vitkit import limits
from vitkit._fields import AT_LEAST_0, POSITIVE, RATE, In, known, over_limit, problems
from vitkit._io import atomic_write_text
from vitkit.errors import ConfigError
from vitkit.limits import is_int

GlobalPool = Literal["token", "avg", "map", "token_avg"]
PosEmbed = Literal["learned", "sincos2d", "none"]
Head = Literal["linear", "mlp"]
AttnImpl = Literal["sdpa", "eager"]
Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]
MlpLayer = Literal["mlp", "swiglu"]


def pair(value: Any, name: str = "size") -> tuple[int, int]:
    """(height, width) of an int or a pair of positive ints; floats, bools and strings are
    refused (`ConfigError` naming `name`)."""
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(map(is_int, value))):
        raise ConfigError(f"{name}={value!r} must be an int or (height, width) of ints")
    h, w = int(value[0]), int(value[1])
    if h <= 0 or w <= 0:
        raise ConfigError(f"{name}={value!r} must be positive")
    return (h, w)


def read_capped(path: Path, what: str = "") -> bytes:
    """The bytes of `path`, a regular file no larger than `vitkit.limits` JSON_BYTES (read no
    further than that, should it grow meanwhile); `ConfigError` naming it otherwise. Opened
    without blocking, so a FIFO is refused rather than waited on."""
    cap, what = limits.limit("JSON_BYTES"), f"{what} " if what else ""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{what}{path}: not a regular file")
            limits.check(st.st_size, "JSON_BYTES", "file size in bytes", str(path))
            data = f.read(cap + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what}{path}: {exc}") from None
    limits.check(len(data), "JSON_BYTES", "file size in bytes", str(path))
    return data


def read_json(path: Path, what: str, *, obj: bool = False) -> Any:
    """Parse a JSON file no larger than JSON_BYTES (`read_capped`), an object if `obj`;
    `ConfigError` naming it."""
    data = read_capped(path, what)
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    if obj and not isinstance(value, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return value


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


def _limit_problems(c: ViTConfig) -> list[str]:
    """Every size against `vitkit.limits` (`VITKIT_MAX_<NAME>` raises one), the parameter count
    last: all before any model is built, so a hostile config cannot ask for a huge allocation."""
    h, w = c.image_hw
    sizes = (
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
        (c.mlp_hidden_dim, "MLP_DIM", f"MLP size (embed_dim x mlp_ratio {c.mlp_ratio})"),
        (c.num_patches, "PATCHES", f"patches per image ({h}x{w} / patch {c.patch_size})"),
    )
    found = [m for value, name, what in sizes for m in over_limit(value, name, what)]
    return found or over_limit(c.estimated_params(), "PARAMS", "parameters")  # sizes first


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

    image_size: Annotated[int | tuple[int, int], POSITIVE] = 224
    patch_size: Annotated[int, POSITIVE] = 16
    in_chans: Annotated[int, POSITIVE] = 3
    num_classes: Annotated[int, In("[0, inf)", "0 means no head")] = 1000
    embed_dim: Annotated[int, POSITIVE] = 768
    depth: Annotated[int, POSITIVE] = 12
    num_heads: Annotated[int, POSITIVE] = 12
    mlp_ratio: Annotated[float, POSITIVE] = 4.0
    qkv_bias: bool = True
    layer_norm_eps: Annotated[float, In("(0, inf)", "e.g. 1e-6")] = 1e-6
    act: Activation = "gelu"
    mlp_layer: MlpLayer = "mlp"
    layer_scale_init: Annotated[float | None, POSITIVE] = None
    pre_norm: bool = False
    patch_bias: bool = True
    stem_channels: Annotated[tuple[int, ...], POSITIVE] = ()
    stem_strides: tuple[Literal[1, 2], ...] = ()  # () = all 1
    drop_rate: Annotated[float, RATE] = 0.0
    attn_drop_rate: Annotated[float, RATE] = 0.0
    drop_path_rate: Annotated[float, RATE] = 0.0
    global_pool: GlobalPool = "token"
    fc_norm: bool | None = None
    class_token: bool = True
    distilled: bool = False
    num_register_tokens: Annotated[int, AT_LEAST_0] = 0
    pos_embed: PosEmbed = "learned"
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    pos_embed_antialias: bool = False
    no_embed_class: bool = False
    dynamic_img_pad: bool = False
    use_mask_token: bool = False
    head: Head = "linear"
    head_hidden_dim: Annotated[int | None, POSITIVE] = None
    head_init_zero: bool = False
    projection_dim: Annotated[int | None, POSITIVE] = None
    attn_implementation: AttnImpl = "sdpa"
    id2label: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if self.id2label is not None:
            self.id2label = _id2label(self.id2label)
        self.validate()

    # ----------------------------------------------------------------------------- derived
    @property
    def image_hw(self) -> tuple[int, int]:
        return pair(self.image_size, "image_size")

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
        """Raise one `ConfigError` naming every bad field and the fix: each field against its
        declaration (never cast: 2.7 is no depth), then the rules between fields and the limits."""
        errors = problems(self)
        if not errors:
            h, w, p, d, heads = *self.image_hw, self.patch_size, self.embed_dim, self.num_heads
            pool, mlp, labels = self.global_pool, self.mlp_hidden_dim, self.id2label
            strides, stem = list(self.stem_strides), len(self.stem_channels)
            rules = [
                (len(strides) not in (0, stem),
                 f"stem_strides {strides} needs one stride per stem_channels entry ({stem})"),
                (p % self.stem_stride, f"stem_strides={strides} downsample by "
                 f"{self.stem_stride}, which does not divide patch_size={p}"),
                (d % heads, f"embed_dim={d} is not divisible by num_heads={heads}; pick "
                 f"num_heads from {[n for n in range(1, 33) if d % n == 0]}"),
                ((h % p or w % p) and not self.dynamic_img_pad, f"image_size={(h, w)} is not a "
                 f"multiple of patch_size={p}; use {(h // p * p or p, w // p * p or p)} or set "
                 "dynamic_img_pad=True"),
                (mlp <= 0, f"mlp_ratio={self.mlp_ratio} gives {mlp} MLP units; make it larger"),
                (pool in ("token", "token_avg") and not self.class_token, f"global_pool={pool!r} "
                 "needs class_token=True; use global_pool='avg' for a model without [CLS]"),
                (pool == "token_avg" and self.fc_norm, "global_pool='token_avg' joins tokens the "
                 "final norm has normalised; leave fc_norm unset (True would normalise the pair)"),
                (pool == "token_avg" and self.distilled,
                 "distilled=True (DeiT) reads [CLS] and [DIST] apart; use global_pool='token'"),
                (self.mlp_layer == "swiglu" and mlp % 2, f"mlp_layer='swiglu' packs two halves "
                 f"into mlp_ratio * embed_dim = {mlp}, which must be even"),
                (pool == "map" and self.head == "mlp",
                 "global_pool='map' has its own MLP; use head='linear'"),
                (self.distilled and not self.class_token,
                 "distilled=True (DeiT) needs class_token=True"),
                (labels is not None and self.num_classes and len(labels) != self.num_classes,
                 f"id2label has {len(labels or ())} entries but num_classes={self.num_classes}; "
                 "give one label per class"),
            ]  # fmt: skip
            errors = [message for broken, message in rules if broken] + _limit_problems(self)
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
        known(ViTConfig, changes, "ViTConfig")
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
        return cls(**known(cls, data, "ViTConfig", ignore=("model_type", "vitkit_version")))

    def to_json(self) -> str:
        return json.dumps({"model_type": "vitkit", **self.to_dict()}, indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as JSON atomically."""
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ViTConfig:
        path = Path(path)
        data = read_json(path, "config", obj=True)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------------ text towers
TextPool = Literal["argmax", "eos", "last"]


@dataclass
class TextConfig:
    """Architecture of a CLIP / SigLIP text tower. The defaults are CLIP ViT-B's."""

    vocab_size: Annotated[int, POSITIVE] = 49_408
    context_length: Annotated[int, POSITIVE] = 77
    width: Annotated[int, POSITIVE] = 512
    depth: Annotated[int, POSITIVE] = 12
    num_heads: Annotated[int, POSITIVE] = 8
    mlp_ratio: Annotated[float, POSITIVE] = 4.0
    act: Activation = "quick_gelu"
    layer_norm_eps: Annotated[float, In("(0, inf)", "e.g. 1e-5")] = 1e-5
    causal: bool = True
    pool: TextPool = "argmax"
    eos_token_id: Annotated[int, In("[0, inf)")] = 49_407
    projection_dim: Annotated[int | None, POSITIVE] = 512
    projection_bias: bool = False
    attn_drop_rate: Annotated[float, RATE] = 0.0
    attn_implementation: AttnImpl = "sdpa"

    def __post_init__(self) -> None:
        errors = problems(self)
        if not errors:
            d, heads, mlp = self.width, self.num_heads, self.mlp_hidden_dim
            errors = [m for broken, m in (
                (d % heads, f"width={d} is not divisible by num_heads={heads}"),
                (mlp <= 0, f"mlp_ratio={self.mlp_ratio} gives {mlp} MLP units"),
                (self.pool == "eos" and self.eos_token_id >= self.vocab_size,
                 f"eos_token_id={self.eos_token_id} is outside the vocabulary ({self.vocab_size})"),
            ) if broken]  # fmt: skip
            errors += [message for value, name, what in (
                (self.vocab_size, "VOCAB", "vocab_size"),
                (self.context_length, "TEXT_TOKENS", "context_length"),
                (self.width, "WIDTH", "width"),
                (self.depth, "DEPTH", "depth"),
                (self.num_heads, "HEADS", "num_heads"),
                (max(mlp, self.projection_dim or 0), "MLP_DIM", "MLP size or projection_dim"),
            ) for message in over_limit(value, name, what)]  # fmt: skip
            errors = errors or over_limit(self.estimated_params(), "PARAMS", "parameters")
        if errors:
            raise ConfigError("invalid TextConfig: " + "; ".join(errors))

    @property
    def mlp_hidden_dim(self) -> int:
        return int(round(self.width * self.mlp_ratio, 6))

    @property
    def embed_dim(self) -> int:
        """Width of the text embedding: the projection's, or the tower's without one."""
        return self.projection_dim or self.width

    def estimated_params(self) -> int:
        d, m, p = self.width, self.mlp_hidden_dim, self.projection_dim or 0
        block = 4 * d * d + 2 * d * m + m + 9 * d
        tables = (self.vocab_size + self.context_length) * d
        return tables + self.depth * block + 2 * d + p * d + (p if self.projection_bias else 0)

    def replace(self, **changes: Any) -> TextConfig:
        return dataclasses.replace(self, **known(TextConfig, changes, "TextConfig"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TextConfig:
        return cls(**known(cls, data, "TextConfig"))


# ------------------------------------------------------------------------------ both towers
Scores = Literal["softmax", "sigmoid"]
MODEL_TYPE = "vitkit_image_text"  # config.json of a vitkit folder with both towers


@dataclass
class ImageTextConfig:
    """The two towers and how their similarities become scores ("softmax": CLIP, "sigmoid":
    SigLIP, which adds `logit_bias`)."""

    vision: ViTConfig
    text: TextConfig
    scores: Scores = "softmax"

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = ViTConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig.from_dict(self.text)
        if not isinstance(self.vision, ViTConfig) or not isinstance(self.text, TextConfig):
            raise ConfigError("an image-text config needs a 'vision' and a 'text' mapping of "
                              "fields")  # fmt: skip
        if self.scores not in ("softmax", "sigmoid"):
            raise ConfigError(f"scores={self.scores!r} must be 'softmax' or 'sigmoid'")
        image = self.vision.projection_dim or self.vision.pooled_dim
        if self.vision.num_classes or image != self.text.embed_dim:
            raise ConfigError(
                f"the image tower gives {image}-d embeddings and the text tower "
                f"{self.text.embed_dim}-d ones (and the image tower must have no head, "
                f"num_classes={self.vision.num_classes}); they must meet in one space"
            )

    def replace(self, **changes: Any) -> ImageTextConfig:
        """A copy with `changes` applied (and validated): `scores`, and fields of either tower;
        a field both towers have (depth, act, attn_implementation, ...) changes both."""
        scores = changes.pop("scores", self.scores)
        vision_fields = {f.name for f in dataclasses.fields(ViTConfig)}
        text_fields = {f.name for f in dataclasses.fields(TextConfig)}
        unknown = set(changes) - vision_fields - text_fields
        if unknown:
            raise ConfigError(f"unknown ViTConfig / TextConfig field(s) {sorted(unknown)}")
        vision = {k: v for k, v in changes.items() if k in vision_fields}
        text = {k: v for k, v in changes.items() if k in text_fields}
        return ImageTextConfig(
            vision=self.vision.replace(**vision) if vision else self.vision,
            text=self.text.replace(**text) if text else self.text,
            scores=scores,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "vision": self.vision.to_dict(),
                "text": self.text.to_dict(), "scores": self.scores}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Any) -> ImageTextConfig:
        if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
            raise ConfigError(f"not a vitkit image-text config (model_type {MODEL_TYPE!r})")
        unknown = set(data) - {"model_type", "vision", "text", "scores"}
        if unknown:
            raise ConfigError(f"unknown image-text config field(s) {sorted(unknown)}")
        return cls(vision=data.get("vision"), text=data.get("text"),
                   scores=data.get("scores", "softmax"))  # fmt: skip
