"""`vitkit predict IMAGES... --model SOURCE`: top-k classes for image files and folders.

With `--labels` (or `--labels-file`) a CLIP or SigLIP checkpoint classifies zero-shot: the
labels are embedded once by its text tower (`vitkit.infer.zero_shot`).

Bad files never stop the run: each is reported on stderr as `path: reason` (and as an
{"path", "error"} line with --json), and the exit code is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vitkit.cli._args import (
    add_image_size,
    add_model,
    add_precision,
    add_zero_shot,
    image_size,
    open_exported,
    warn_random,
    zero_shot,
)

_PROGRESS_MIN_IMAGES = 32  # fewer than this finish too fast for a progress bar to help


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a model",
        description="Print the top-k classes of each image. Folders expand to the images inside "
        "them (recursively). Unreadable files are reported on stderr and skipped; the exit code "
        "is 1 if any image failed. --model may also be a file `vitkit export` wrote (.onnx, "
        ".xml), which runs as it was exported, with its labels and preprocessing.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    add_model(p, presets=True)
    add_image_size(p)
    p.add_argument("--top-k", "-k", type=int, default=5, help="classes to show per image (5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--batch-size", "-b", type=int, default=16, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--processor",
        choices=("auto", "hf", "timm"),
        default="auto",
        help="preprocessing: auto = the model folder's preprocessor_config.json (or timm "
        "pretrained_cfg), else transformers' defaults at the model's image size; hf = "
        "resize to the model size, bilinear; timm = shorter side to size/crop_pct, centre crop, "
        "bicubic",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse images with more pixels than this (decompression bombs; default ~89M)",
    )
    p.add_argument(
        "--processor-backend",
        choices=("pil", "tensor"),
        default=None,
        help="resize with PIL or with torchvision on uint8 tensors; default: what the "
        "checkpoint's library does (transformers: tensor, timm: pil)",
    )
    add_precision(p, what="the classifier")
    add_zero_shot(p)
    p.add_argument(
        "--workers", type=int, default=None, help="decoding threads (default: CPU count, <= 8)"
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.data.images import expand_inputs
    from vitkit.errors import VitkitError
    from vitkit.limits import at_least

    at_least(args.top_k, 1, "--top-k", VitkitError)
    at_least(args.batch_size, 1, "--batch-size", VitkitError)

    flags = (args.labels, args.labels_file, args.template, args.templates_file)
    labels, templates = zero_shot(args) if any(f is not None for f in flags) else (None, None)
    paths, failures = expand_inputs(args.images)
    for path, reason in failures:
        _report_failure(path, reason, as_json=args.json)
    if not paths:
        if not failures:
            raise VitkitError("no images to classify")
        return 1

    def say(text: str) -> None:
        print(f"vitkit predict: {text}", file=sys.stderr, flush=True)

    options = dict(processor=args.processor, allow_preset=True, image_size=image_size(args))
    answers = None
    if labels is None and not args.no_cache and not os.environ.get("VITKIT_NO_WARM"):
        from vitkit.infer.warm import start  # a prepared OpenVINO path runs without torch

        answers = start(
            args.model, paths, precision=args.precision, backend=args.backend,
            device=args.device, options=options, processor_backend=args.processor_backend,
            max_pixels=args.max_pixels, batch_size=args.batch_size, top_k=args.top_k,
            workers=args.workers, say=say,
        )  # fmt: skip
    if answers is None:
        answers = _predictions(args, paths, labels, templates, options, say)
    failed = len(failures)
    show_bar = not args.no_progress and len(paths) >= _PROGRESS_MIN_IMAGES
    with _progress(len(paths), enabled=show_bar) as bar:
        for result in answers:
            if result.error is not None:
                failed += 1
                _report_failure(result.source, result.error, as_json=args.json, bar=bar)
            else:
                _print_result(result.source, result.top_k, as_json=args.json, bar=bar)
            bar.update(1)
    return 1 if failed else 0


def _predictions(args, paths, labels, templates, options, say):
    """The predictions of the full path: resolve (or a `Deferred` model when the cache holds
    its prepared path), prepare, and the pipelined predictor."""
    from vitkit.checkpoints.resolve import resolve
    from vitkit.distributed import pick_device
    from vitkit.errors import VitkitError
    from vitkit.infer.exported import is_exported
    from vitkit.infer.precision import resolve_for
    from vitkit.infer.predictor import Predictor
    from vitkit.infer.zero_shot import classifier_for

    device = pick_device(args.device)
    precision = args.precision
    if is_exported(args.model):  # a `vitkit export` file: runs as it was prepared
        model, processor = _exported(args, labels)
        device, precision = "cpu", "fp32"  # the file at its own precision, as it is
    else:
        options = dict(device=device, **options)
        if labels is None:  # a prepared path in the cache needs no weights loaded
            resolved = resolve_for(args.model, precision, backend=args.backend,
                                   cache=not args.no_cache, log=say, **options)  # fmt: skip
        else:
            resolved = resolve(args.model, text=True, **options)
        warn_random(resolved, "predict", args.model)
        model, processor = resolved.model, resolved.processor
        if labels is not None:
            model = classifier_for(resolved, labels, templates, precision=args.precision)
    config = model.config
    if not config.num_classes:
        raise VitkitError(
            f"{args.model} has no classification head (num_classes=0); use a classifier "
            "checkpoint, or --labels with a CLIP or SigLIP checkpoint"
        )
    if args.processor_backend:
        processor.backend = args.processor_backend
    if args.max_pixels is not None:
        processor.max_pixels = args.max_pixels
    predictor = Predictor(
        model, processor, precision=precision, backend=args.backend, device=device,
        batch_size=args.batch_size, workers=args.workers, top_k=args.top_k,
        cache=not args.no_cache, log=say,
    )  # fmt: skip
    return predictor.predict(paths)


def _exported(args: argparse.Namespace, labels: list[str] | None) -> tuple:
    """(model, processor) of a file `vitkit export` wrote, after refusing what it cannot do."""
    return open_exported("predict", args.model, {
        "--labels": labels is not None, "--image-size": args.image_size is not None,
        "--precision": args.precision not in ("fp32", "auto"), "--backend": bool(args.backend),
        "--processor": args.processor != "auto",
    })  # fmt: skip


def _print_result(path: str, top: list[tuple[int, str, float]], *, as_json: bool, bar) -> None:
    if as_json:
        record = {
            "path": path,
            "top_k": [{"index": c, "label": name, "probability": p} for c, name, p in top],
        }
        _out(json.dumps(record, ensure_ascii=False), bar, sys.stdout)
        return
    lines = [path] + [f"  {100 * p:6.2f}%  {name}  ({c})" for c, name, p in top]
    _out("\n".join(lines), bar, sys.stdout)


def _report_failure(path: str, reason: str, *, as_json: bool, bar=None) -> None:
    _out(f"{path}: {reason}", bar, sys.stderr)
    if as_json:
        _out(json.dumps({"path": path, "error": reason}, ensure_ascii=False), bar, sys.stdout)


def _out(text: str, bar, stream) -> None:
    on_screen = getattr(stream, "isatty", lambda: False)()
    if bar is not None and not getattr(bar, "disable", True) and on_screen:
        bar.write(text, file=stream)  # clears the bar, prints, redraws it
    else:
        print(text, file=stream, flush=stream is sys.stderr)


class _NoBar:
    disable = True

    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int, *, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # disable=None: shown only when stderr is a terminal, never mixed into redirected logs
    return tqdm(total=total, unit="img", file=sys.stderr, disable=None, dynamic_ncols=True)
