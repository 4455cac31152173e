"""`vitkit eval --model CKPT --data SPEC`: accuracy, per-class accuracy and a confusion matrix.

CKPT: anything `vitkit.from_pretrained` reads (a vitkit / transformers / timm folder, a hub id in
the local cache), or a `vitkit train` run directory (its best/, else last/).

SPEC: a folder (ImageFolder tree `root/<class>/<img>`, optionally with `train/`, `val/`, `test/`
sub-trees chosen by --split, or a CIFAR-10/100 python batches folder), a .csv / .json / .jsonl
image list, or a built-in dataset name ("digits", "mnist": the held-out 20% for --split val/test,
the 80% training part for --split train).

Preprocessing: the checkpoint folder's preprocessor_config.json when there is one; otherwise
resize straight to the model's image size (bilinear), scale to [0, 1] and normalise with
mean = std = 0.5 (grayscale for 1-channel models). --mean / --std override the statistics.
Built-in datasets are [0, 1] tensors already: they are resized and normalised the simple way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a classifier on a labelled dataset",
        description="Top-1/top-5 accuracy, loss, per-class accuracy and a confusion matrix of a "
        "checkpoint on an image folder, CIFAR batches, an image list or a built-in dataset.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="CKPT",
        help="checkpoint folder, weights file or hub id (see from_pretrained)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="image folder, CIFAR folder, .csv/.json list, or digits / mnist",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=SPLITS,
        help="which split of the data to score (default: test)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="write metrics.json and confusion.png here"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="autocast dtype for the forward pass (default: none, fp32)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: 0.5)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std (default: 0.5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitkit.errors import VitkitError
    from vitkit.eval import evaluate

    if args.batch_size < 1:
        raise VitkitError("--batch-size must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt_dir = load_model(args.model)
    model.to(device)
    config = model.config
    if not config.num_classes:
        raise VitkitError(
            f"{args.model} has no classification head (num_classes=0): nothing to evaluate"
        )
    transform = eval_transform(config, ckpt_dir, mean=args.mean, std=args.std)
    tensor_transform = simple_transform(config, mean=args.mean, std=args.std)
    dataset, classes = build_eval_dataset(args.data, args.split, gray=config.in_chans == 1)
    names, remap = _match_classes(classes, config)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=_Collate(transform, tensor_transform, remap),
        pin_memory=device.type == "cuda",
    )
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    result = evaluate(
        model,
        loader,
        device=device,
        amp_dtype=amp,
        num_classes=config.num_classes,
        class_names=names,
    )

    skipped = list(getattr(dataset, "skipped", []))
    _print_summary(result, args, names, len(skipped))
    if args.out is not None:
        write_report(
            result,
            args.out,
            model=str(args.model),
            data=str(args.data),
            split=args.split,
            skipped=skipped,
        )
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'confusion.png'}")
    return 0


# ------------------------------------------------------------------------------ the model
def load_model(source: str) -> tuple[Any, Path | None]:
    """(model in eval mode, its folder or None), read with `vitkit.from_pretrained`.

    A `vitkit train` run directory is accepted too: its best/ (else last/) weights are used.
    """
    from vitkit.checkpoints.pretrained import from_pretrained

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        for sub in ("best", "last"):
            if (path / sub / "config.json").is_file():
                path = path / sub
                source = str(path)
                break
    model = from_pretrained(source)
    return model.eval(), (path if path.is_dir() else None)


# ------------------------------------------------------------------------------ the data
def eval_transform(
    config: Any,
    ckpt_dir: Path | None,
    *,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Any:
    """PIL image -> (C, H, W) float tensor for this model (see the module docstring)."""
    if (
        ckpt_dir is not None
        and (ckpt_dir / "preprocessor_config.json").is_file()
        and mean is None
        and std is None
    ):
        from vitkit.data.processor import ImageProcessor

        processor = ImageProcessor.from_pretrained(ckpt_dir)
        if processor.num_channels != config.in_chans:
            processor = ImageProcessor.from_pretrained(ckpt_dir, num_channels=config.in_chans)
        return processor.preprocess_pil
    return simple_transform(config, mean=mean, std=std)


def simple_transform(
    config: Any, *, mean: list[float] | None = None, std: list[float] | None = None
) -> Any:
    """Resize to the model's size, [0, 1], normalise with `mean`/`std` (default 0.5)."""
    from vitkit.errors import VitkitError

    c = config.in_chans
    mean = mean or [0.5]
    std = std or [0.5]
    if len(mean) == 1:
        mean = mean * c
    if len(std) == 1:
        std = std * c
    if len(mean) != c or len(std) != c:
        raise VitkitError(f"--mean/--std need 1 or {c} values for a {c}-channel model")
    return _ResizeNormalize(config.image_hw, mean, std)


class _ResizeNormalize:
    """PIL image (or a [0, 1] tensor) -> (C, H, W) float: scale to [0, 1], bilinear resize
    (antialiased), normalise."""

    def __init__(self, size: tuple[int, int], mean: list[float], std: list[float]):
        self.size = tuple(size)
        self.mean = mean
        self.std = std

    def __call__(self, image: Any) -> Any:
        import numpy as np
        import torch
        from torch.nn.functional import interpolate

        if isinstance(image, torch.Tensor):  # (C, h, w) already in [0, 1]
            x = image.float()
        else:
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, h, w)
        if tuple(x.shape[-2:]) != self.size:
            x = interpolate(
                x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
            )[0]
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std


def build_eval_dataset(
    spec: str, split: str, *, gray: bool = False
) -> tuple[Any, list[str] | None]:
    """(dataset, class names or None) for a --data SPEC. Items are (PIL image or tensor, label)."""
    from vitkit.data.folders import CIFARDataset, ImageFolderDataset, ImageListDataset
    from vitkit.errors import VitkitError

    mode = "L" if gray else "RGB"
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".json", ".jsonl"):
            raise VitkitError(f"{path}: an image list must be .csv, .json or .jsonl")
        ds = ImageListDataset(path, mode=mode)
        return ds, ds.classes
    if path.is_dir():
        try:
            ds = CIFARDataset(path, train=split == "train", mode=mode)
            return ds, ds.classes
        except VitkitError as exc:
            if "no CIFAR batches" not in str(exc):
                raise
        candidates = {
            "train": ["train"],
            "val": ["val", "validation", "valid"],
            "test": ["test", "val", "validation"],
        }[split]
        root = next((path / c for c in candidates if (path / c).is_dir()), path)
        ds = ImageFolderDataset(root, mode=mode)
        return ds, ds.classes
    from vitkit.data.builtin import load_builtin

    train, test = load_builtin(spec)  # in-memory (N, C, H, W) in [0, 1]; an 80/20 split
    part = train if split == "train" else test
    return _TensorItems(part.images, part.labels), list(part.classes)


class _TensorItems:
    """(image tensor, label) items of an in-memory set (built-in datasets)."""

    def __init__(self, images: Any, labels: Any):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.images[i], int(self.labels[i])


def _match_classes(
    classes: list[str] | None, config: Any
) -> tuple[list[str], dict[int, int] | None]:
    """Class names for the report, and a dataset-index -> model-index map when names differ.

    When every dataset class name is one of the model's id2label names, labels are translated to
    the model's indices; otherwise dataset index i is model class i.
    """
    from vitkit.errors import VitkitError

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
        import sys

        print(
            "note: the data's class names do not match the model's id2label; dataset class i "
            "is scored as model class i",
            file=sys.stderr,
        )
    names = list(classes) + model_names[len(classes) :]
    return names, None


class _Collate:
    """Turns (PIL image | [0, 1] tensor, label) items into a normalised batch."""

    def __init__(self, transform: Any, tensor_transform: Any, remap: dict[int, int] | None):
        self.transform = transform
        self.tensor_transform = tensor_transform
        self.remap = remap

    def __call__(self, items: list[tuple[Any, int]]) -> tuple[Any, Any]:
        import torch

        images = []
        for image, _ in items:
            fn = self.tensor_transform if isinstance(image, torch.Tensor) else self.transform
            images.append(fn(image))
        labels = [int(label) for _, label in items]
        if self.remap is not None:
            labels = [self.remap[label] for label in labels]
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)


# ------------------------------------------------------------------------------ the report
def write_report(result: Any, out: Path, **meta: Any) -> None:
    """metrics.json (every number, the confusion matrix) and confusion.png under `out`."""
    from vitkit._io import atomic_write_text
    from vitkit.errors import VitkitError

    skipped = meta.pop("skipped", [])
    data = {
        **meta,
        **result.to_dict(),
        "num_skipped": len(skipped),
        "skipped": [[str(p), r] for p, r in skipped[:1000]],
    }
    atomic_write_text(out / "metrics.json", json.dumps(data, indent=2) + "\n")
    try:
        from vitkit.viz import plot_confusion_matrix

        plot_confusion_matrix(result.confusion, result.class_names, out / "confusion.png")
    except VitkitError as exc:  # matplotlib missing: the numbers are already written
        print(f"note: confusion.png not written ({exc})")


def _print_summary(result: Any, args: argparse.Namespace, names: list[str], skipped: int) -> None:
    rows = [
        ("model", str(args.model)),
        ("data", f"{args.data} ({args.split})"),
        ("images", f"{result.num_samples:,d}" + (f"  ({skipped} skipped)" if skipped else "")),
        ("top-1", f"{100 * result.top1:.2f}%"),
    ]
    if result.top5 is not None:
        rows.append(("top-5", f"{100 * result.top5:.2f}%"))
    rows += [
        ("mean class acc", f"{100 * result.mean_class_accuracy:.2f}%"),
        ("loss", f"{result.loss:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    counts = result.confusion.sum(axis=1)
    present = [c for c in range(len(names)) if counts[c]]
    shown = sorted(present, key=lambda c: result.per_class_accuracy[c])
    if len(shown) > 20:
        print(f"\nper-class accuracy (20 lowest of {len(shown)}):")
        shown = shown[:20]
    else:
        print("\nper-class accuracy:")
        shown = sorted(shown)
    name_w = max([len(names[c]) for c in shown] + [5])
    print(f"  {'class':<{name_w}}  {'acc':>7}  {'n':>6}")
    for c in shown:
        print(
            f"  {names[c]:<{name_w}}  {100 * result.per_class_accuracy[c]:6.2f}%  "
            f"{int(counts[c]):>6d}"
        )
