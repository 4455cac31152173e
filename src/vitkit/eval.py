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
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit import features
from vitkit._io import atomic_write_text
from vitkit.data import folders
from vitkit.data.datasets import open_splits
from vitkit.errors import VitkitError
from vitkit.infer.predictor import preprocess
from vitkit.models.vit import logits_of
from vitkit.viz import plot_confusion_matrix

__all__ = [
    "EvalResult",
    "evaluate",
    "evaluate_frozen",
    "evaluate_on",
    "match_classes",
    "open_eval_data",
    "write_report",
]


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
            if labels.numel() == 0:
                continue
            images = images.to(device, non_blocking=True)
            labels = labels.to(device).long().view(-1)
            with autocast:
                logits = logits_of(model(images))
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


# ---------------------------------------------------------------------------------- data
def open_eval_data(spec: str, split: str = "test", *, mode: str = "RGB") -> tuple[Any, list[str]]:
    """(dataset, class names) to score: one split of a data source (`open_splits`, the same
    splits training uses), or all of a plain class-folder tree or list file. Items are
    (PIL image or [0, 1] tensor, label)."""
    path = Path(spec).expanduser()
    if path.is_file():
        ds = folders.ImageListDataset(path, mode=mode, on_error="none")
        return ds, list(ds.classes)
    if path.is_dir() and not (path / "train").is_dir() and not folders.is_cifar_dir(path):
        names = {"test": ("test",), "val": ("val", "validation", "valid"), "train": ()}[split]
        root = next((path / n for n in names if (path / n).is_dir()), path)
        ds = folders.ImageFolderDataset(root, mode=mode, on_error="none")  # the whole tree
        return ds, list(ds.classes)
    splits = open_splits(spec, mode=mode, on_error="none")  # a broken image counts once
    ds = splits.get(split)
    if ds is None:
        raise VitkitError(f"--data {spec} has no {split} split; pick another --split")
    return ds, splits.classes


def match_classes(
    classes: list[str] | None, config: Any
) -> tuple[list[str], dict[int, int] | None]:
    """Class names for the report, and a dataset-index -> model-index map when names differ.

    When every dataset class name is one of the model's id2label names, labels are translated to
    the model's indices; otherwise dataset index i is model class i.
    """
    k = config.num_classes
    id2label = config.id2label or {}
    model_names = [id2label.get(i, str(i)) for i in range(k)]
    if classes is None:
        return model_names, None
    label2id = {name: i for i, name in id2label.items()}
    if id2label and all(name in label2id for name in classes):
        remap = {i: label2id[name] for i, name in enumerate(classes)}
        return model_names, (None if all(i == j for i, j in remap.items()) else remap)
    if len(classes) > k:
        raise VitkitError(
            f"the data has {len(classes)} classes but the model only {k}, and the data's "
            f"class names are not all in the model's id2label"
        )
    generic = [str(i) for i in range(k)]
    if id2label and model_names != generic and list(classes) != model_names[: len(classes)]:
        print(
            "note: the data's class names do not match the model's id2label; dataset class i "
            "is scored as model class i",
            file=sys.stderr,
        )
    return list(classes) + model_names[len(classes) :], None


class _Collate:
    """(PIL image | [0, 1] tensor, label) items -> a batch the model expects: PIL images go
    through the checkpoint's processor exactly as `vitkit predict` sends them (its PIL or
    tensor backend); tensors are resized (bilinear, antialiased) and
    normalised with the processor's mean / std."""

    def __init__(self, processor: Any, size: tuple[int, int], remap: dict[int, int] | None):
        self.processor, self.size, self.remap = processor, tuple(size), remap

    def _tensor(self, x: Tensor) -> Tensor:
        x = x.float()
        if tuple(x.shape[-2:]) != self.size:
            x = nn.functional.interpolate(
                x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        p = self.processor
        if p.mean is None:
            return x
        return (x - torch.tensor(p.mean).view(-1, 1, 1)) / torch.tensor(p.std).view(-1, 1, 1)

    def loader(self, data: Any, batch_size: int, num_workers: int) -> Any:
        """`data` in order, in batches of this collation."""
        return torch.utils.data.DataLoader(
            data, batch_size=batch_size, num_workers=num_workers, collate_fn=self
        )

    def __call__(self, items: list[tuple[Any, int] | None]) -> tuple[Tensor, Tensor]:
        items = [it for it in items if it is not None]  # unreadable: skipped and counted
        if not items:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        images = [  # the checkpoint's backend, as predict
            self._tensor(im) if isinstance(im, Tensor) else preprocess(im, self.processor)
            for im, _ in items
        ]
        labels = [int(label) for _, label in items]
        if self.remap is not None:
            labels = [self.remap[label] for label in labels]
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def evaluate_on(
    model: nn.Module,
    processor: Any,
    data: str,
    split: str = "test",
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> tuple[EvalResult, list[tuple[Any, str]]]:
    """Score a classifier on one split of a data source with its own preprocessing; returns
    the metrics and the images skipped as unreadable."""
    config = model.config
    if not config.num_classes:
        raise VitkitError("the model has no classification head (num_classes=0)")
    dataset, classes = open_eval_data(data, split, mode="L" if config.in_chans == 1 else "RGB")
    names, remap = match_classes(classes, config)
    loader = _Collate(processor, config.image_hw, remap).loader(dataset, batch_size, num_workers)
    result = evaluate(model, loader, device=device, amp_dtype=amp_dtype,
                      num_classes=config.num_classes, class_names=names)  # fmt: skip
    return result, list(getattr(dataset, "skipped", []))


def evaluate_frozen(
    model: nn.Module,
    processor: Any,
    data: str,
    split: str = "test",
    *,
    knn: int | None = None,
    linear_probe: bool = False,
    pool: str = "model",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Judge a frozen encoder (a headless one too) on a labelled source with training and
    `split` parts: weighted k-NN top-1 with the training part as memory, and/or a linear probe
    fitted on the training part with its L2 chosen on the validation part."""
    splits = open_splits(data, mode="L" if model.config.in_chans == 1 else "RGB", on_error="none")
    if splits.get(split) is None:
        raise VitkitError(f"--data {data} has no {split} split to score")

    def feats(part: Any) -> tuple[Tensor, Tensor]:
        loader = _Collate(processor, model.config.image_hw, None).loader(
            part, batch_size, num_workers
        )
        return features.extract(model, loader, pool=pool, device=device)

    train, query = feats(splits.train), feats(splits.get(split))  # (features, labels)
    out: dict[str, Any] = {"data": data, "split": split, "pool": pool,
                           "train_images": len(train[0]), "images": len(query[0])}  # fmt: skip
    if knn is not None:
        out["knn_k"] = knn
        out["knn_top1"] = features.knn_accuracy(*train, *query, k=knn)
    if linear_probe:
        if splits.val is None:
            raise VitkitError(f"--data {data} has no validation part to choose the probe's L2")
        probe = features.linear_probe(*train, *feats(splits.val), *query)
        out.update({f"linear_{k}": v for k, v in probe.items()})
    return out


def write_report(result: EvalResult, out: Path, **meta: Any) -> None:
    """metrics.json (every number, the confusion matrix) and confusion.png under `out`."""
    skipped = meta.pop("skipped", [])
    data = {
        **meta,
        **result.to_dict(),
        "num_skipped": len(skipped),
        "skipped": [[str(p), r] for p, r in skipped[:1000]],
    }
    atomic_write_text(Path(out) / "metrics.json", json.dumps(data, indent=2) + "\n")
    try:
        plot_confusion_matrix(result.confusion, result.class_names, Path(out) / "confusion.png")
    except VitkitError as exc:  # matplotlib missing: the numbers are already written
        print(f"note: confusion.png not written ({exc})", file=sys.stderr)
