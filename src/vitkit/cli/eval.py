"""`vitkit eval --model SOURCE --data SPEC`: accuracy, per-class accuracy and a confusion matrix.

SOURCE: anything `vitkit.from_pretrained` reads (a vitkit / transformers / timm folder, a hub id in
the local cache), or a `vitkit train` run directory (its best/, else last/).

SPEC: a folder (ImageFolder tree `root/<class>/<img>`, or one with `train/`, `val/`, `test/`
sub-trees chosen by --split, or a CIFAR-10/100 python batches folder), a .csv / .json / .jsonl
image list, or a built-in dataset name ("digits", "mnist").

Preprocessing: the checkpoint's own (`vitkit.resolve`: its preprocessor_config.json, else
transformers' defaults at the model's size). --mean / --std override the statistics. Built-in
datasets are [0, 1] tensors already: they are resized (bilinear) and normalised.

--zero-shot scores a CLIP or SigLIP checkpoint with no classifier: the data's class names
(underscores read as spaces) become the labels its text tower embeds.

Splits are the ones training uses (`vitkit.data.datasets.open_splits`): for a built-in set,
"test" is its held-out 20%, "val" the validation part carved from the training 80%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitkit.cli._args import (
    add_image_size,
    add_model,
    add_precision,
    add_zero_shot,
    check_output,
    image_size,
    zero_shot,
)

SPLITS = ("train", "val", "test")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a classifier on a labelled dataset",
        description="Top-1/top-5 accuracy, loss, per-class accuracy and a confusion matrix of a "
        "checkpoint on an image folder, CIFAR batches, an image list or a built-in dataset.",
    )
    add_model(p, presets=False)
    add_image_size(p)
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
        "--output",
        "--out",
        dest="out",
        type=Path,
        metavar="DIR",
        help="write metrics.json and confusion.png here",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="autocast dtype for the forward pass (default: none, fp32)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    add_precision(p, what="the classifier as `vitkit predict --precision` does")
    g = p.add_argument_group("frozen encoders (no classifier needed)")
    g.add_argument("--knn", type=int, metavar="K", help="weighted k-NN top-1 (DINO's), e.g. 20")
    g.add_argument("--linear-probe", action="store_true",
                   help="logistic regression on frozen features (L2 chosen on validation)")  # fmt: skip
    g.add_argument("--pool", choices=("model", "cls", "mean"), default="model",
                   help="features: the model's pooled output (default), [CLS], or patch mean")  # fmt: skip
    p.add_argument("--zero-shot", action="store_true",
                   help="classify by the data's class names with a CLIP / SigLIP text tower")  # fmt: skip
    add_zero_shot(p, labels=False)
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: 0.5)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std (default: 0.5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from vitkit.checkpoints.resolve import resolve
    from vitkit.errors import VitkitError
    from vitkit.eval import evaluate_on, write_report

    if args.batch_size < 1:
        raise VitkitError("--batch-size must be at least 1")
    if args.out is not None:
        check_output(args.out, kind="folder")
    from vitkit.distributed import pick_device

    _, templates = zero_shot(args)
    if args.zero_shot and (args.knn is not None or args.linear_probe):
        raise VitkitError("--zero-shot scores by class names; --knn / --linear-probe by "
                          "features: choose one")  # fmt: skip
    device = pick_device(args.device)
    resolved = resolve(args.model, device=device, image_size=image_size(args), text=args.zero_shot)
    model, processor = resolved.model, resolved.processor
    if args.knn is not None or args.linear_probe:
        return _frozen(args, model, processor, device)
    if args.zero_shot:
        from vitkit.eval import open_eval_data
        from vitkit.infer.zero_shot import classifier_for

        _, names = open_eval_data(args.data, args.split)
        labels = [name.replace("_", " ") for name in names]
        model = classifier_for(resolved, labels, templates, precision=args.precision, names=names)
    if not model.config.num_classes:
        raise VitkitError(
            f"{args.model} has no classification head (num_classes=0): nothing to evaluate "
            "(--knn or --linear-probe judge its features; --zero-shot a CLIP / SigLIP)"
        )
    if args.mean or args.std:
        processor = dataclasses.replace(
            processor, mean=_per_channel(args.mean or [0.5], model.config.in_chans, "--mean"),
            std=_per_channel(args.std or [0.5], model.config.in_chans, "--std"),
        )  # fmt: skip
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    from vitkit.infer.precision import is_plain, prepare

    # the same runner as predict and serve (static int8 and auto calibrate on the first batch)
    if not is_plain(args.precision, args.backend):
        model = prepare(model, args.precision, backend=args.backend, device=device,
                        log=lambda s: print(f"vitkit eval: {s}", file=sys.stderr),
                        cache=not args.no_cache)  # fmt: skip
    result, skipped = evaluate_on(model, processor, args.data, args.split,
                                  batch_size=args.batch_size, num_workers=args.num_workers,
                                  device=device, amp_dtype=amp)  # fmt: skip
    _print_summary(result, args, result.class_names or [], len(skipped))
    if args.out is not None:
        write_report(result, args.out, model=str(args.model), data=str(args.data),
                     split=args.split, skipped=skipped)  # fmt: skip
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'confusion.png'}")
    return 0


def _frozen(args: argparse.Namespace, model: Any, processor: Any, device: Any) -> int:
    import json

    from vitkit.eval import evaluate_frozen

    result = evaluate_frozen(model, processor, args.data, args.split, knn=args.knn,
                             linear_probe=args.linear_probe, pool=args.pool,
                             batch_size=args.batch_size, num_workers=args.num_workers,
                             device=device)  # fmt: skip
    print(f"model  {args.model}\ndata   {args.data} ({args.split}, {result['images']} images; "
          f"{result['train_images']} training images as reference)")  # fmt: skip
    if "knn_top1" in result:
        print(f"k-NN (k={args.knn}) top-1  {100 * result['knn_top1']:.2f}%")
    if "linear_test_acc" in result:
        print(f"linear probe top-1  {100 * result['linear_test_acc']:.2f}% "
              f"(validation {100 * result['linear_val_acc']:.2f}%, l2 {result['linear_l2']:g})")  # fmt: skip
    if args.out is not None:
        from vitkit._io import atomic_write_text

        atomic_write_text(args.out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return 0


def _per_channel(values: list[float], channels: int, flag: str) -> tuple[float, ...]:
    from vitkit.errors import VitkitError

    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise VitkitError(f"{flag} needs 1 or {channels} values for a {channels}-channel model")
    return tuple(values)


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
