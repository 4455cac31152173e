"""Vision Transformer models."""

from vitkit.models.vit import VisionTransformer, ViTOutput

__all__ = ["ViTOutput", "VisionTransformer"]
