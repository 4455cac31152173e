"""vitkit: Vision Transformers on PyTorch.

>>> import vitkit
>>> model = vitkit.create_model("vit_base_patch16_224")
>>> out = model(images)            # ViTOutput(logits, last_hidden_state, pooler_output, ...)
"""

from vitkit.checkpoints.pretrained import save_pretrained
from vitkit.checkpoints.resolve import Resolved, from_pretrained, resolve
from vitkit.config import ViTConfig
from vitkit.data.processor import ImageProcessor
from vitkit.errors import CheckpointError, ConfigError, ImageError, VitkitError
from vitkit.models.vit import VisionTransformer, ViTOutput
from vitkit.presets import create_model, get_config, list_models, register_preset

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "ImageProcessor",
    "Resolved",
    "ViTConfig",
    "ViTOutput",
    "VisionTransformer",
    "VitkitError",
    "__version__",
    "create_model",
    "from_pretrained",
    "get_config",
    "list_models",
    "register_preset",
    "resolve",
    "save_pretrained",
]
