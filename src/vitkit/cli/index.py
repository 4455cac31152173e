"""`vitkit index PATHS... --model M --output idx/`: a searchable index of a photo collection.

vitkit index photos/ --model facebook/dinov2-small --output idx/
vitkit index photos/ --model facebook/dinov2-small --output idx/     # again: only what changed
vitkit index --output idx/ --model facebook/dinov2-small              # again, same folders
torchrun --nproc_per_node 2 -m vitkit index photos/ --model my_vit/ --output idx/
"""

from __future__ import annotations

import argparse
import sys

from vitkit.cli._args import add_image_size, add_model, add_precision, check_output, image_size

EXACT_BELOW = 10_000  # vitkit.search.build.EXACT_BELOW (not imported: --help loads no numpy)
CHUNK = 1024  # vitkit.search.build.CHUNK


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="index a photo collection for search and near-duplicates (vitkit search)",
        description="Embed the images under PATHS (as vitkit embed does) into an index folder "
        "that `vitkit search` and `vitkit serve --index` read. Run it again to update: only new "
        "or changed files are embedded, deleted ones are dropped, and a run that is killed "
        "leaves the previous index usable (the next run reuses what it had embedded). "
        f"Below {EXACT_BELOW:,d} images search is exact; from there on an HNSW graph (FAISS, "
        "pip install 'vitkit[search]') answers in about a millisecond. Unreadable images are "
        "reported on stderr and skipped; the exit code is then 1. Format: docs/search.md.",
    )
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="image files or folders (default: those of the index's last run)")  # fmt: skip
    add_model(p, presets=False)
    p.add_argument("--output", "-o", required=True, metavar="FOLDER", help="the index folder")
    add_image_size(p)
    p.add_argument("--pool", choices=("model", "cls", "mean"), default="model",
                   help="the model's pooled output / image embedding (default; text search "
                   "needs it), [CLS], patch mean")  # fmt: skip
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, help="decoding threads (default: CPU count, <= 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    add_precision(p, what="the image embeddings (auto checks cosine similarity to fp32)")
    p.add_argument("--exact-below", type=int, default=EXACT_BELOW, metavar="N",
                   help=f"search exactly below N images, HNSW from N on (default {EXACT_BELOW:,d})")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=CHUNK, metavar="N",
                   help=f"images embedded between two saves of the work done (default {CHUNK})")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkit import distributed as D
    from vitkit.checkpoints.resolve import resolve
    from vitkit.errors import ConfigError
    from vitkit.search.build import update_index
    from vitkit.search.index import MANIFEST, read_manifest

    check_output(args.output, kind="folder")
    for flag, value, least in (("--chunk-size", args.chunk_size, 1), ("--batch-size",
                               args.batch_size, 1), ("--exact-below", args.exact_below, 0)):  # fmt: skip
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    paths = list(args.paths)
    if not paths:
        import pathlib

        if not (pathlib.Path(args.output) / MANIFEST).exists():
            raise ConfigError("give the image files or folders to index")
        paths = list(read_manifest(pathlib.Path(args.output)).get("inputs") or [])
        if not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"{args.output} names no folders to index again; give PATHS")
    say = lambda s: print(f"vitkit index: {s}", file=sys.stderr)  # noqa: E731
    size = image_size(args)
    info = D.setup(args.device)
    try:
        resolved = resolve(args.model, device=info.device, image_size=size)
        report = update_index(
            args.output, paths, resolved, pool=args.pool, batch_size=args.batch_size,
            workers=args.workers, device=info.device, precision=args.precision,
            backend=args.backend, info=info, log=say, cache=not args.no_cache,
            chunk_size=args.chunk_size, exact_below=args.exact_below, image_size=size,
        )  # fmt: skip
    finally:
        D.cleanup(info)
    if report is None:  # another torchrun rank
        return 0
    for path, reason in report.failures:
        print(f"{path}: {reason}", file=sys.stderr)
    if report.note:
        say(report.note)
    reused = f" ({report.reused} from an interrupted run)" if report.reused else ""
    search = "exact search" if report.kind == "exact" else "HNSW graph (FAISS)"
    print(f"{args.output}: {report.count} images, {search}; added {report.added}, changed "
          f"{report.changed}, unchanged {report.unchanged}, removed {report.removed}"
          f"{reused}, unreadable {len(report.failures)}")  # fmt: skip
    return 1 if report.failures else 0
