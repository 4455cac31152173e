"""Classification evaluation: top-k accuracy, mean cross-entropy, per-class accuracy, confusion.

    result = evaluate(model, loader, device="cpu")
    print(result.top1, result.top5)            # fractions in [0, 1]
    json.dumps(result.to_dict())

Works with any model returning a `ViTOutput` (a distilled DeiT model is scored on `logits`, the
mean of its two heads) or plain logits. The loader yields `(images, labels)` or dicts with
`pixel_values` and `labels`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.errors import VitkitError

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Metrics over a whole dataset. Accuracies are fractions; `loss` is the mean cross-entropy.

    `topk` holds every requested k (k larger than the number of classes counts as K).
    `per_class_accuracy[c]` is the recall of class c (NaN when class c has no samples).
    `confusion[t, p]` counts samples of true class t predicted as p.
    """

    top1: float
    top5: float | None
    loss: float
    per_class_accuracy: list[float]
    confusion: np.ndarray
    num_samples: int
    topk: dict[int, float] = field(default_factory=dict)
    class_names: list[str] | None = None

    @property
    def mean_class_accuracy(self) -> float:
        """Balanced accuracy: the mean of the per-class recalls over classes that have samples."""
        values = [v for v in self.per_class_accuracy if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None, the matrix a list of lists."""

        def clean(v: float | None) -> float | None:
            return None if v is None or math.isnan(v) else float(v)

        out: dict[str, Any] = {
            "num_samples": self.num_samples,
            "top1": clean(self.top1),
            "top5": clean(self.top5),
            "loss": clean(self.loss),
            "mean_class_accuracy": clean(self.mean_class_accuracy),
            "topk": {str(k): clean(v) for k, v in self.topk.items()},
            "per_class_accuracy": [clean(v) for v in self.per_class_accuracy],
            "confusion": self.confusion.astype(int).tolist(),
        }
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        images = batch.get("pixel_values", batch.get("images"))
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, list | tuple) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        raise VitkitError(
            "the loader must yield (images, labels) or dicts with 'pixel_values' "
            f"and 'labels', got {type(batch).__name__}"
        )
    if images is None or labels is None:
        raise VitkitError("a batch is missing images or labels")
    return images, torch.as_tensor(labels)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise VitkitError(
            "the model returned no logits: it has no classification head "
            "(num_classes=0); give it one with model.reset_classifier(K)"
        )
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
    topk: Sequence[int] = (1, 5),
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Run `model` over `loader` in eval mode and return the metrics.

    `amp_dtype` (e.g. torch.bfloat16) runs the forward under autocast; metrics are computed in
    float32. `num_classes` defaults to the width of the logits. The model's train/eval mode is
    restored afterwards.
    """
    device = torch.device(device)
    ks = sorted({int(k) for k in topk} | {1})
    was_training = model.training
    model.eval()
    confusion: Tensor | None = None
    correct = dict.fromkeys(ks, 0)
    loss_sum, n = 0.0, 0
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for batch in loader:
            images, labels = _split_batch(batch)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device).long().view(-1)
            with autocast:
                logits = _logits(model(images))
            logits = logits.float()
            if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
                raise VitkitError(
                    f"logits of shape {tuple(logits.shape)} for {labels.shape[0]} labels"
                )
            k_classes = num_classes or logits.shape[1]
            if k_classes < logits.shape[1]:
                raise VitkitError(
                    f"num_classes={k_classes} but the model gives {logits.shape[1]} logits"
                )
            if confusion is None:
                confusion = torch.zeros(k_classes, k_classes, dtype=torch.long, device=device)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k_classes):
                raise VitkitError(
                    f"label {int(labels.max())} is outside the model's "
                    f"{k_classes} classes: does the dataset match the model?"
                )
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
            hit = top == labels[:, None]
            for k in ks:
                correct[k] += int(hit[:, :k].any(dim=1).sum())
            preds = top[:, 0]
            confusion.view(-1).index_add_(0, labels * k_classes + preds, torch.ones_like(labels))
            n += labels.shape[0]
    finally:
        model.train(was_training)
    if confusion is None or n == 0:
        raise VitkitError("the loader yielded no samples: nothing to evaluate")
    conf = confusion.cpu().numpy()
    per_class_total = conf.sum(axis=1)
    per_class = [
        float(conf[c, c] / per_class_total[c]) if per_class_total[c] else float("nan")
        for c in range(conf.shape[0])
    ]
    acc = {k: correct[k] / n for k in ks}
    names = list(class_names) if class_names is not None else None
    return EvalResult(
        top1=acc[1],
        top5=acc.get(5),
        loss=loss_sum / n,
        per_class_accuracy=per_class,
        confusion=conf,
        num_samples=n,
        topk=acc,
        class_names=names,
    )
