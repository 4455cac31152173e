"""`vitkit explain IMAGES... --model SOURCE --output DIR`: a heat map of what the model used.

Per image, DIR/<name>.<method>.png shows the image and the relevance map over it (for
`attention`, the head mean and then each head); `--save-npy` adds the raw (gh, gw) map as
DIR/<name>.<method>.npy. Bad files are reported on stderr and skipped; the exit code is 1 if
any image failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitkit.cli._args import add_image_size, add_model, check_output, image_size, warn_random


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitkit._names import HEAD_FUSIONS, METHODS

    p = sub.add_parser(
        "explain",
        help="draw what a model looked at (attention, rollout, grad-rollout)",
        description="Write a PNG heat map over each image: the last layer's attention "
        "(attention), attention rollout through every layer (rollout, Abnar & Zuidema 2020), or "
        "class-specific gradient-weighted relevance (grad-rollout, Chefer et al. 2021).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model(p, presets=True)
    add_image_size(p)
    p.add_argument("--method", choices=METHODS, default="rollout", help="(default: rollout)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument(
        "--label",
        metavar="L",
        help="class to explain, an index or a name (grad-rollout; default: the top-1 class)",
    )
    p.add_argument(
        "--head-fusion", choices=HEAD_FUSIONS, default="mean", help="rollout: how heads combine"
    )
    p.add_argument(
        "--discard-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="rollout: zero this fraction of the weakest attention per layer (0.9 is common)",
    )
    p.add_argument("--save-npy", action="store_true", help="also write the raw map as .npy")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from vitkit._io import atomic_open
    from vitkit.checkpoints.resolve import resolve
    from vitkit.data.labels import id2label_for
    from vitkit.distributed import pick_device
    from vitkit.errors import VitkitError
    from vitkit.explain import explain_image, label_index
    from vitkit.viz import save_png

    out_dir = check_output(args.output, kind="folder")
    device = pick_device(args.device)
    resolved = resolve(args.model, device=device, allow_preset=True, image_size=image_size(args))
    warn_random(resolved, "explain", args.model)
    model, processor = resolved.model, resolved.processor
    labels = id2label_for(model.config)
    label = None if args.label is None else label_index(args.label, labels)
    failed = 0
    names: set[str] = set()
    for path in args.images:
        try:
            result, picture = explain_image(
                model,
                processor,
                path,
                args.method,
                label=label,
                head_fusion=args.head_fusion,
                discard_ratio=args.discard_ratio,
            )
        except VitkitError as exc:  # ImageError and friends: report, go on
            failed += 1
            message = str(exc)
            print(message if message.startswith(path) else f"{path}: {message}", file=sys.stderr)
            continue
        stem = _unique(Path(path).stem, names)
        png = save_png(picture, out_dir / f"{stem}.{args.method}.png")
        if args.save_npy:
            with atomic_open(out_dir / f"{stem}.{args.method}.npy", "wb") as f:
                np.save(f, result.maps[0].cpu().numpy())
        note = ""
        if result.labels is not None:
            c = int(result.labels[0])
            note = f"  ({labels.get(c, str(c))}: {100 * float(result.probabilities[0, c]):.2f}%)"
        print(f"{path} -> {png}{note}")
    return 1 if failed else 0


def _unique(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... when two inputs share a file name."""
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name
