"""An image tower and a text tower in one embedding space: CLIP and SigLIP.

    image_embeds = normalize(vision(pixels))       the ViT's projection (CLIP) or pooled output
    text_embeds  = normalize(text(ids))            `models.text.TextTransformer`
    logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T (+ logit_bias)

CLIP (Radford et al. 2021) was trained with a softmax over the texts of a batch, so its zero-shot
scores are a softmax over the labels; SigLIP (Zhai et al. 2023) with a sigmoid per pair and a
learned bias, so each label gets its own probability (`scores`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.errors import ConfigError
from vitkit.models.text import TextConfig, TextTransformer
from vitkit.models.vit import VisionTransformer

Scores = Literal["softmax", "sigmoid"]
MODEL_TYPE = "vitkit_image_text"


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


@dataclass
class ImageTextOutput:
    logits_per_image: Tensor  # (B_images, B_texts)
    image_embeds: Tensor  # (B_images, E), normalised
    text_embeds: Tensor  # (B_texts, E), normalised

    @property
    def logits_per_text(self) -> Tensor:
        return self.logits_per_image.t()


class ImageTextModel(nn.Module):
    """CLIP / SigLIP: `vision` (a `VisionTransformer`) and `text` (a `TextTransformer`)."""

    def __init__(self, config: ImageTextConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.text = TextTransformer(config.text)
        sigmoid = config.scores == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None

    def encode_image(self, pixel_values: Tensor, *, normalize: bool = True) -> Tensor:
        """Images (B, C, H, W) -> (B, E) embeddings in the joint space."""
        out = self.vision.forward_features(pixel_values)
        embeds = out.image_embeds if out.image_embeds is not None else out.pooler_output
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        """Token ids (B, T) -> (B, E) embeddings in the joint space."""
        embeds = self.text(input_ids, attention_mask)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(B_images, B_texts) similarities of normalised embeddings, scaled (and biased)."""
        scale = self.logit_scale.exp().to(image_embeds.dtype)
        logits = image_embeds @ text_embeds.to(image_embeds.dtype).t() * scale
        return logits + self.logit_bias.to(logits.dtype) if self.logit_bias is not None else logits

    def scores(self, logits: Tensor) -> Tensor:
        """Zero-shot probabilities: a softmax over the labels (CLIP) or a sigmoid each (SigLIP)."""
        return logits.sigmoid() if self.config.scores == "sigmoid" else logits.softmax(-1)

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> ImageTextOutput:
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, attention_mask)
        return ImageTextOutput(self.logits(image, text), image, text)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
