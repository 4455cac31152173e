"""vitkit: Vision Transformers on PyTorch.

>>> import vitkit
>>> model = vitkit.create_model("vit_base_patch16_224")
>>> out = model(images)            # ViTOutput(logits, last_hidden_state, pooler_output, ...)
>>> clip = vitkit.resolve("openai/clip-vit-base-patch32", text=True)   # both towers
>>> classifier = vitkit.ZeroShotClassifier(clip.image_text, clip.tokenizer, ["cat", "dog"])

The names below load on first use (PEP 562), so `import vitkit` and the `vitkit` command's
help, argument errors and `vitkit models` answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vitkit._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "vitkit.errors",
    "ConfigError": "vitkit.errors",
    "ImageError": "vitkit.errors",
    "VitkitError": "vitkit.errors",
    "ViTConfig": "vitkit.config",
    "TextConfig": "vitkit.config",
    "ImageTextConfig": "vitkit.config",
    # with the checkpoint formats' translators attached (from_pretrained, save_pretrained, ...)
    "ImageProcessor": "vitkit.checkpoints.preprocessing",
    "VisionTransformer": "vitkit.models.vit",
    "ViTOutput": "vitkit.models.vit",
    "TextTransformer": "vitkit.models.text",
    "ImageTextModel": "vitkit.models.image_text",
    "ZeroShotClassifier": "vitkit.infer.zero_shot",
    "Resolved": "vitkit.checkpoints.resolve",
    "from_pretrained": "vitkit.checkpoints.resolve",
    "resolve": "vitkit.checkpoints.resolve",
    "save_pretrained": "vitkit.checkpoints.pretrained",
    "create_model": "vitkit.presets",
    "create_image_text_model": "vitkit.presets",
    "get_config": "vitkit.presets",
    "get_image_text_config": "vitkit.presets",
    "list_models": "vitkit.presets",
    "register_preset": "vitkit.presets",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vitkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from vitkit.checkpoints.pretrained import save_pretrained
    from vitkit.checkpoints.resolve import Resolved, from_pretrained, resolve
    from vitkit.config import ImageTextConfig, TextConfig, ViTConfig
    from vitkit.data.processor import ImageProcessor
    from vitkit.errors import CheckpointError, ConfigError, ImageError, VitkitError
    from vitkit.infer.zero_shot import ZeroShotClassifier
    from vitkit.models.image_text import ImageTextModel
    from vitkit.models.text import TextTransformer
    from vitkit.models.vit import VisionTransformer, ViTOutput
    from vitkit.presets import (
        create_image_text_model,
        create_model,
        get_config,
        get_image_text_config,
        list_models,
        register_preset,
    )
