"""The batched, pipelined predictor behind `vitkit predict` (and `vitkit serve`).

    predictor = Predictor(model, processor, precision="auto", batch_size=16)
    for p in predictor.predict(["a.jpg", "b.png"]):       # results in input order
        print(p.source, p.error or p.top_k)
    probs = predictor.predict_tensors(pixels)             # (B, K) from preprocessed pixels

Worker threads decode and resize the next batches while the model runs on the current one.
Each image is decoded to a uint8 tensor (torchvision's libjpeg-turbo for plain JPEGs, PIL for
everything else: transparency, palettes, CMYK, 16-bit, EXIF rotation all as
`vitkit.data.images.load_image` does) and resized on that tensor with torchvision, as
transformers' default (torchvision) image-processor backend does. A processor with
`backend="pil"` (timm checkpoints, or `--processor-backend pil`) resizes with PIL instead.
A file that cannot be read becomes a `Prediction` with `error` set; it never stops the run.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from vitkit.data.images import (  # expand_inputs: its home, re-exported for the callers here
    expand_inputs,
    load_image,
    quiet_bomb_warning,
    reason_of,
    size_problem,
)
from vitkit.data.labels import id2label_for
from vitkit.data.processor import ImageProcessor
from vitkit.errors import ImageError, VitkitError
from vitkit.infer.precision import prepare
from vitkit.infer.warm import answered, probabilities, top_rows
from vitkit.limits import at_least


@dataclasses.dataclass
class Prediction:
    """One input's result: `top_k` [(class index, label, probability)], or `error` (a reason)."""

    source: Any
    top_k: list[tuple[int, str, float]] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        name = os.fspath(self.source) if isinstance(self.source, (str, os.PathLike)) else None
        if self.error is not None:
            return {"path": name, "error": self.error}
        top = [{"index": c, "label": n, "probability": p} for c, n, p in self.top_k or []]
        return {"path": name, "top_k": top}


class Predictor:
    """A classifier with its preprocessing, at a precision, batched and pipelined.

    model: a VisionTransformer with a head. processor: its `ImageProcessor`.
    precision, backend, calibration: as `vitkit.infer.precision.prepare` (static int8 and
        `auto` calibrate on the first batch when no calibration is given).
    batch_size: images per forward pass. workers: decoding threads (default: CPU count, <= 8).
    top_k: classes per result. labels: {index: name} (default: the model's id2label).
    cache: keep the prepared precision path on disk for later runs (`vitkit.infer.cache`).
    Probabilities are a softmax over the classes, or the model's own `probabilities` (a
    SigLIP zero-shot classifier scores each label with a sigmoid).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: ImageProcessor,
        *,
        precision: str = "fp32",
        backend: str | None = None,
        device: torch.device | str | None = None,
        calibration: Tensor | None = None,
        batch_size: int = 16,
        workers: int | None = None,
        top_k: int = 5,
        labels: dict[int, str] | None = None,
        log: Any = None,
        cache: bool = True,
    ) -> None:
        config = model.config  # type: ignore[attr-defined]
        if not config.num_classes:
            raise VitkitError("the model has no classification head (num_classes=0)")
        at_least(batch_size, 1, "batch_size", VitkitError)
        at_least(top_k, 1, "top_k", VitkitError)
        at_least(workers, 1, "workers", VitkitError)
        self.processor = processor
        self.runner = prepare(model, precision, backend=backend, device=device,
                              calibration=calibration, log=log, cache=cache)  # fmt: skip
        self.batch_size = batch_size
        self.workers = workers or max(1, min(os.cpu_count() or 1, 8))
        self.top_k = min(top_k, config.num_classes)
        self.labels = labels if labels is not None else id2label_for(config)
        self.probabilities = getattr(model, "probabilities", softmax)

    # ---- tensors -------------------------------------------------------------------------
    def predict_tensors(self, pixels: Tensor) -> Tensor:
        """Preprocessed (B, C, H, W) pixels -> (B, K) probabilities (float32)."""
        return self.probabilities(self.runner(pixels).float()).cpu()

    def top(self, probs: Tensor) -> list[list[tuple[int, str, float]]]:
        """(B, K) probabilities -> per row [(index, label, probability)] of the top k (ties:
        the lower index first, as the torch-free warm path)."""
        return top_rows(probs.float().numpy(), self.top_k, self.labels)

    # ---- files and images ----------------------------------------------------------------
    def load(self, source: Any) -> Tensor:
        """Decode and preprocess one image (path, bytes, PIL image, array) -> (C, H, W)."""
        return preprocess(source, self.processor)

    def predict(self, sources: Iterable[Any]) -> Iterator[Prediction]:
        """Predictions for `sources` (paths, bytes, PIL images, arrays), in input order.

        Decoding runs up to a few batches ahead of the model in `workers` threads.
        """
        for batch in pipelined(sources, self._load_or_reason, self.batch_size, self.workers):
            yield from self._run(batch)

    predict_paths = predict

    def _load_or_reason(self, source: Any) -> Tensor | str:
        return load_or_reason(source, self.processor)

    def _run(self, batch: list[tuple[Any, Tensor | str]]) -> Iterator[Prediction]:
        def rows(pixels: list[Tensor]) -> list[list[tuple[int, str, float]]]:
            return self.top(self.predict_tensors(torch.stack(pixels)))

        for source, top, x in answered(batch, lambda x: isinstance(x, Tensor), rows):
            yield Prediction(source, top_k=top) if top is not None else Prediction(source, error=x)


_END = object()


def pipelined(
    sources: Iterable[Any], load: Any, batch_size: int, workers: int
) -> Iterator[list[tuple[Any, Any]]]:
    """Batches of (source, load(source)) in input order, `load` running in `workers` threads up
    to two batches ahead of the consumer (the model)."""
    window = batch_size * 2 + workers
    with ThreadPoolExecutor(workers, thread_name_prefix="vitkit-decode") as pool:
        pending: collections.deque[tuple[Any, Future]] = collections.deque()
        items = iter(sources)
        batch: list[tuple[Any, Any]] = []
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                source = next(items, _END)
                if source is _END:
                    exhausted = True
                else:
                    pending.append((source, pool.submit(load, source)))
            if not pending:
                break
            source, future = pending.popleft()
            batch.append((source, future.result()))
            if len(batch) == batch_size or (exhausted and not pending):
                yield batch
                batch = []
        if batch:
            yield batch


def softmax(logits: Tensor) -> Tensor:
    """The softmax `vitkit predict` and `serve` answer with on every path (float64,
    `warm.probabilities`), on the CPU."""
    return torch.from_numpy(probabilities(logits.detach().cpu().numpy()))


def load_or_reason(source: Any, processor: ImageProcessor) -> Tensor | str:
    """(C, H, W) pixels of one image, or why it could not be read (per image, never raised)."""
    try:
        return preprocess(source, processor)
    except ImageError as exc:
        return reason_of(source, exc)


def preprocess(source: Any, processor: ImageProcessor) -> Tensor:
    """One image (path, bytes, PIL image, array) -> (C, H, W) float32, as the predictor does."""
    if processor.backend == "pil":
        return processor.preprocess_pil(source)
    return processor(decode(source, processor))[0]


def load_folder(folder: str, processor: ImageProcessor, limit: int = 64) -> Tensor:
    """Up to `limit` readable images of a folder -> (B, C, H, W): calibration data."""
    paths, _ = expand_inputs([folder])
    pixels = []
    for path in paths:
        try:
            pixels.append(preprocess(path, processor))
        except ImageError:
            continue
        if len(pixels) == limit:
            break
    if not pixels:
        raise VitkitError(f"{folder}: no readable images")
    return torch.stack(pixels)


def decode(source: Any, processor: ImageProcessor) -> Tensor:
    """One image -> (C, H, W) uint8 tensor, upright, RGB (or what the processor converts).

    Plain JPEG files (RGB or grayscale) decode with torchvision; everything else, and anything
    torchvision refuses, goes through `load_image` (PIL), which names the reason on failure.
    """
    if isinstance(source, (str, os.PathLike)):
        fast = _decode_jpeg(source, processor.max_pixels)
        if fast is not None:
            return fast
    if isinstance(source, (np.ndarray, Tensor)):
        return source  # type: ignore[return-value]  # the processor takes arrays as they are
    image = load_image(source, background=processor.background, max_pixels=processor.max_pixels)
    if not isinstance(image, Image.Image):  # pragma: no cover
        raise ImageError(f"{source}: could not be decoded")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W)


def _decode_jpeg(path: str | os.PathLike[str], max_pixels: int | None) -> Tensor | None:
    # lazy: torchvision loads torch._dynamo (~1.5 s)
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    try:
        with quiet_bomb_warning(), Image.open(path) as im:  # reads the header only
            ok = im.format == "JPEG" and im.mode in ("RGB", "L")
            ok = ok and size_problem(*im.size, max_pixels) is None
        if not ok:
            return None
        data = read_file(os.fspath(path))
        return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # let load_image find and name what is wrong
        return None
