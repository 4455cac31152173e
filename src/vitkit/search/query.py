"""Queries in an index's space: images (paths, bytes, PIL images) and, for CLIP / SigLIP
models, texts, embedded by the model the index was built with.

    resolved = vitkit.resolve("openai/clip-vit-base-patch32", text="auto")
    encoder = QueryEncoder(resolved, pool=index.identity["pool"])
    index.check_model(encoder.identity)
    rows, failures = encoder.images(["query.jpg"])     # (Q, D) float32, L2-normalised
    rows = encoder.texts(["a red bicycle"])            # the text tower, same joint space
    scores, hits = index.search(rows, k=10)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitkit.config import pair
from vitkit.errors import ConfigError
from vitkit.features import Embedder
from vitkit.infer.cache import fingerprint
from vitkit.infer.predictor import load_or_reason


def model_identity(resolved: Any, pool: str = "model", image_size: Any = None) -> dict[str, Any]:
    """What an index's rows depend on: the weights (`vitkit.infer.cache.fingerprint`), the
    pooling, the preprocessing and the row width; `source` and `image_size` (the size it was
    resolved at, None for the checkpoint's) say how to load the model again."""
    processor = {k: v for k, v in resolved.processor.to_fields().items() if k != "max_pixels"}
    model = resolved.model
    with torch.inference_mode():  # the width from a blank image two patches a side (cheap)
        c, (h, w) = model.config.in_chans, pair(model.config.patch_size)
        param = next(model.parameters())
        dim = Embedder(model, pool)(torch.zeros(1, c, 2 * h, 2 * w, dtype=param.dtype,
                                                device=param.device)).shape[-1]  # fmt: skip
    source = str(resolved.source)
    if os.path.exists(source):  # a local folder or file: found again from any working folder
        source = os.path.abspath(source)
    return {"source": source, "fingerprint": fingerprint(model), "pool": pool,
            "processor": processor, "dim": int(dim),
            "image_size": _size(image_size)}  # fmt: skip


def _size(size: Any) -> list[int] | None:
    if size is None:
        return None
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


class QueryEncoder:
    """Embeds query images and texts as the index's rows were (fp32, L2-normalised).

    resolved: a `vitkit.resolve` result; texts need `text=True` or "auto" on a CLIP / SigLIP
        source (its tokenizer too). pool: the index's (`index.identity["pool"]`)."""

    def __init__(self, resolved: Any, pool: str = "model") -> None:
        self.resolved = resolved
        self.pool = pool
        self.embedder = Embedder(resolved.model.eval(), pool)
        self.identity = model_identity(resolved, pool)
        self._tower: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.resolved.model.parameters()).device

    @torch.inference_mode()
    def images(self, sources: Sequence[Any]) -> tuple[np.ndarray, list[tuple[Any, str]]]:
        """(rows (Q, D) of the readable images, [(source, reason)] for the others)."""
        good, failures = [], []
        for source in sources:
            x = load_or_reason(source, self.resolved.processor)
            if isinstance(x, str):
                failures.append((source, x))
            else:
                good.append(x)
        if not good:
            return np.zeros((0, self.identity["dim"]), np.float32), failures
        return self.pixels(torch.stack(good)), failures

    @torch.inference_mode()
    def pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed (B, C, H, W) pixels -> their rows (B, D), as the index's were made."""
        out = self.embedder(pixels.to(self.device)).float()
        return F.normalize(out, dim=-1).cpu().numpy()

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) text embeddings in the joint space of a CLIP / SigLIP index."""
        from vitkit.infer.zero_shot import encode_texts, text_tower

        r = self.resolved
        if r.image_text is None:
            raise ConfigError(f"{r.source} has no text tower: text search needs a CLIP or "
                              "SigLIP model (loaded with text=True)")  # fmt: skip
        if r.tokenizer is None:
            raise ConfigError(f"{r.source} has no tokenizer files: texts cannot be read")
        if self.pool != "model":
            raise ConfigError(f"this index holds --pool {self.pool} rows; texts live in the "
                              "space of the model's own image embedding (--pool model)")  # fmt: skip
        if not texts or any(not t.strip() for t in texts):
            raise ConfigError("give a non-empty text to search for")
        if self._tower is None:
            self._tower = text_tower(r.image_text)
        return encode_texts(self._tower, r.tokenizer, list(texts)).numpy()
