"""`vitkit predict IMAGES... --model SOURCE`: top-k classes for image files and folders.

Bad files never stop the run: each is reported on stderr as `path: reason` (and as an
{"path", "error"} line with --json), and the exit code is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

_PROGRESS_MIN_IMAGES = 32  # fewer than this finish too fast for a progress bar to help


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a model",
        description="Print the top-k classes of each image. Folders expand to the images inside "
        "them (recursively). Unreadable files are reported on stderr and skipped; the exit code "
        "is 1 if any image failed.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="SOURCE",
        help="a checkpoint folder or hub id (vitkit.from_pretrained), or a preset name from "
        "`vitkit models` (random weights: for trying the pipeline only)",
    )
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
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitkit.checkpoints.resolve import resolve
    from vitkit.errors import VitkitError

    if args.top_k < 1:
        raise VitkitError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise VitkitError(f"--batch-size must be at least 1, got {args.batch_size}")

    paths, failures = expand_inputs(args.images)
    for path, reason in failures:
        _report_failure(path, reason, as_json=args.json)
    if not paths:
        if not failures:
            raise VitkitError("no images to classify")
        return 1

    device = _resolve_device(args.device)
    resolved = resolve(args.model, device=device, processor=args.processor, allow_preset=True)
    if resolved.random_weights:
        print(
            f"vitkit predict: warning: {args.model!r} is a preset name, not a checkpoint: the "
            "model has RANDOM weights and its predictions are meaningless",
            file=sys.stderr,
        )
    model, processor = resolved.model, resolved.processor
    config = model.config
    if not config.num_classes:
        raise VitkitError(
            f"{args.model} has no classification head (num_classes=0); use a classifier checkpoint"
        )
    if args.max_pixels is not None:
        processor.max_pixels = args.max_pixels

    from vitkit.data.labels import id2label_for

    labels = id2label_for(config)
    top_k = min(args.top_k, config.num_classes)
    failed = len(failures)
    show_bar = not args.no_progress and len(paths) >= _PROGRESS_MIN_IMAGES
    with _progress(len(paths), enabled=show_bar) as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            pixels, errors = _load_batch(chunk, processor)
            probs = None
            if pixels:
                batch = torch.stack(list(pixels.values())).to(device)  # (B, C, H, W)
                with torch.inference_mode():
                    logits = model(batch).logits.float()
                probs = logits.softmax(-1).cpu()
            row = {i: r for r, i in enumerate(pixels)}
            for i, path in enumerate(chunk):
                if i in errors:
                    failed += 1
                    _report_failure(path, errors[i], as_json=args.json, bar=bar)
                    continue
                p, idx = probs[row[i]].topk(top_k)  # type: ignore[index]
                top = [(int(c), labels.get(int(c), str(int(c))), float(q)) for q, c in zip(p, idx)]
                _print_result(path, top, as_json=args.json, bar=bar)
            bar.update(len(chunk))
    return 1 if failed else 0


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Arguments -> (image paths in order, [(argument, reason)] for the ones that failed).

    Folders expand to the image files under them, sorted; a folder with none is a failure.
    Files are kept whatever their extension (the decoder decides); missing paths fail here.
    """
    from vitkit.data.images import is_image_file

    paths: list[str] = []
    failures: list[tuple[str, str]] = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file() and is_image_file(p) and not _hidden(p.relative_to(path))
            )
            if found:
                paths.extend(found)
            else:
                failures.append((arg, "directory contains no image files"))
        elif path.exists():
            paths.append(arg)
        else:
            failures.append((arg, "no such file or directory"))
    return paths, failures


def _resolve_device(name: str):
    import torch

    from vitkit.errors import VitkitError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VitkitError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitkitError("--device cuda was asked for but no CUDA device is available")
    return device


def _load_batch(paths: list[str], processor) -> tuple[dict[int, Any], dict[int, str]]:
    """Decode and preprocess `paths` in threads -> ({index: (C, H, W)}, {index: reason})."""
    from concurrent.futures import ThreadPoolExecutor

    from vitkit.errors import VitkitError

    def one(path: str):
        try:
            return processor.preprocess_pil(path), None
        except VitkitError as exc:
            message = str(exc)
            prefix = f"{path}: "
            return None, message[len(prefix) :] if message.startswith(prefix) else message

    workers = max(1, min(len(paths), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, paths))
    pixels = {i: t for i, (t, _) in enumerate(results) if t is not None}
    errors = {i: e for i, (_, e) in enumerate(results) if e is not None}
    return pixels, errors


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


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


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
