"""vitkit: Vision Transformers on PyTorch.

>>> import vitkit
>>> model = vitkit.create_model("vit_base_patch16_224")
>>> out = model(images)            # ViTOutput(logits, last_hidden_state, pooler_output, ...)
>>> clip = vitkit.resolve("openai/clip-vit-base-patch32", text=True)   # both towers
>>> classifier = vitkit.ZeroShotClassifier(clip.image_text, clip.tokenizer, ["cat", "dog"])
"""

from vitkit.checkpoints.pretrained import save_pretrained
from vitkit.checkpoints.resolve import Resolved, from_pretrained, resolve
from vitkit.config import ViTConfig
from vitkit.data.processor import ImageProcessor
from vitkit.errors import CheckpointError, ConfigError, ImageError, VitkitError
from vitkit.infer.zero_shot import ZeroShotClassifier
from vitkit.models.image_text import ImageTextConfig, ImageTextModel
from vitkit.models.text import TextConfig, TextTransformer
from vitkit.models.vit import VisionTransformer, ViTOutput
from vitkit.presets import (
    create_image_text_model,
    create_model,
    get_config,
    get_image_text_config,
    list_models,
    register_preset,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "ImageProcessor",
    "ImageTextConfig",
    "ImageTextModel",
    "Resolved",
    "TextConfig",
    "TextTransformer",
    "ViTConfig",
    "ViTOutput",
    "VisionTransformer",
    "VitkitError",
    "ZeroShotClassifier",
    "__version__",
    "create_image_text_model",
    "create_model",
    "from_pretrained",
    "get_config",
    "get_image_text_config",
    "list_models",
    "register_preset",
    "resolve",
    "save_pretrained",
]
