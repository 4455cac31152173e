"""SOURCE -> model + preprocessing.

STOPGAP on the `serve` branch: the lead's resolver (issue 13) replaces this file with the same
call and fields (`resolve(source, ...) -> Resolved(model, processor, source, folder,
random_weights)`). On a merge conflict, keep main's version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitkit.data.processor import CONFIG_NAME, ImageProcessor
from vitkit.errors import CheckpointError

if TYPE_CHECKING:
    from vitkit.models.vit import VisionTransformer


@dataclass
class Resolved:
    """A model (eval mode) and the preprocessing that goes with it."""

    model: VisionTransformer
    processor: ImageProcessor
    source: str
    folder: Path | None = None
    random_weights: bool = False


def resolve(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    processor: str = "auto",
    allow_preset: bool = False,
    **kwargs: Any,
) -> Resolved:
    """Load `source` (folder, file, hub id; a preset name with `allow_preset`)."""
    from vitkit.presets import create_model, list_models

    text = os.fspath(source)
    path = Path(text)
    if not path.exists() and text in list_models():
        if not allow_preset:
            raise CheckpointError(f"{text!r} is a preset name, not a checkpoint")
        model = create_model(text).to(device=device, dtype=dtype).eval()
        return Resolved(model, ImageProcessor.for_model(model.config), text, None, True)
    from vitkit.checkpoints.pretrained import from_pretrained

    model = from_pretrained(text, **kwargs).to(device=device, dtype=dtype).eval()
    folder = path if path.is_dir() else None
    if folder is not None and (folder / CONFIG_NAME).is_file():
        proc = ImageProcessor.from_pretrained(folder)
    else:
        proc = ImageProcessor.for_model(model.config)
    return Resolved(model, proc, text, folder)
