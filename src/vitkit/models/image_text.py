"""An image tower and a text tower in one embedding space: CLIP and SigLIP.

    image_embeds = normalize(vision(pixels))       the ViT's projection (CLIP) or pooled output
    text_embeds  = normalize(text(ids))            `models.text.TextTransformer`
    logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T (+ logit_bias)

CLIP (Radford et al. 2021) was trained with a softmax over the texts of a batch, so its zero-shot
scores are a softmax over the labels; SigLIP (Zhai et al. 2023) with a sigmoid per pair and a
learned bias, so each label gets its own probability (`scores`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import MODEL_TYPE, ImageTextConfig, Scores
from vitkit.features import pool_output
from vitkit.models.text import TextTransformer
from vitkit.models.vit import VisionTransformer

__all__ = ["MODEL_TYPE", "ImageTextConfig", "ImageTextModel", "ImageTextOutput", "Scores",
           "joint_logits", "zero_shot_scores"]  # fmt: skip


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
        embeds = pool_output(self.vision.forward_features(pixel_values), self.vision.config)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        """Token ids (B, T) -> (B, E) embeddings in the joint space."""
        embeds = self.text(input_ids, attention_mask)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(B_images, B_texts) similarities of normalised embeddings, scaled (and biased)."""
        return joint_logits(image_embeds, text_embeds, self.logit_scale, self.logit_bias)

    def scores(self, logits: Tensor) -> Tensor:
        """Zero-shot probabilities: a softmax over the labels (CLIP) or a sigmoid each (SigLIP)."""
        return zero_shot_scores(logits, self.config.scores)

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> ImageTextOutput:
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, attention_mask)
        return ImageTextOutput(self.logits(image, text), image, text)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def joint_logits(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor | None
) -> Tensor:
    """exp(logit_scale) * image_embeds @ text_embeds.T (+ logit_bias): the (B_images, B_texts)
    logits of normalised embeddings, in the images' dtype."""
    dtype = image_embeds.dtype
    logits = image_embeds @ text_embeds.to(dtype).t() * logit_scale.exp().to(dtype)
    return logits + logit_bias.to(dtype) if logit_bias is not None else logits


def zero_shot_scores(logits: Tensor, scores: Scores) -> Tensor:
    """A softmax over the texts (CLIP's "softmax") or a sigmoid for each pair (SigLIP's)."""
    return logits.sigmoid() if scores == "sigmoid" else logits.softmax(-1)
