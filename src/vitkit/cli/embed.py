"""`vitkit embed IMAGES... --model M --output emb.npy`: one embedding row per image.

vitkit embed photos/ --model facebook/dinov2-small --output emb.npy --normalize
vitkit embed photos/ --model my_vit/ --output maps.npy --layers -4 -1     # feature maps
torchrun --nproc_per_node 2 -m vitkit embed photos/ --model my_vit/ --output emb.npy
vitkit embed photos/ --model dinov2.onnx --output emb.npy   # an encoder `vitkit export` wrote
vitkit embed --text "a cat" "a red car" --model openai/clip-vit-base-patch32 --output text.npy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitkit.cli._args import (
    add_image_size,
    add_model,
    add_precision,
    check_output,
    image_size,
    open_exported,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embeddings of images (one row per image) for retrieval, kNN, clustering",
        description="Write one embedding row per image (.npy or .safetensors) and, beside it, "
        "OUTPUT.paths.txt with the image of each row. Folders expand to the images inside. "
        "Unreadable images are reported on stderr and skipped; the exit code is then 1.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument(
        "--text",
        nargs="+",
        metavar="TEXT",
        help="instead of images: embed these texts with a CLIP / SigLIP text tower, "
        "in the space of its image embeddings (OUTPUT.texts.txt lists them)",
    )
    p.add_argument("--text-file", metavar="FILE", help="the texts, one per line")
    add_model(p, presets=False)
    add_image_size(p)
    p.add_argument("--output", "-o", required=True, help="emb.npy or emb.safetensors")
    p.add_argument("--pool", choices=("model", "cls", "mean"), default="model",
                   help="the model's pooled output / image embedding (default), [CLS], patch mean")  # fmt: skip
    p.add_argument("--normalize", action="store_true", help="L2-normalise each row")
    p.add_argument("--layers", type=int, nargs="+", metavar="I",
                   help="instead: (L, D, Hp, Wp) feature maps of these blocks (-1: the last)")  # fmt: skip
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, help="decoding threads (default: CPU count, <= 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    add_precision(p, what="the pooled rows (auto checks cosine similarity to fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from vitkit import distributed as D
    from vitkit.checkpoints.resolve import resolve
    from vitkit.errors import ConfigError
    from vitkit.infer.embed import FORMATS, embed_paths, paths_file, write_embeddings
    from vitkit.infer.exported import is_exported

    output = Path(args.output)
    if output.suffix not in FORMATS:
        raise ConfigError(f"--output {output}: write {' or '.join(FORMATS)}")
    check_output(output)
    check_output(paths_file(output), flag=f"--output {output}: the list of paths")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it")
    if args.text is not None or args.text_file is not None:
        return _texts(args, output)
    if not args.images:
        raise ConfigError("give images (files or folders) to embed, or --text / --text-file")
    exported = is_exported(args.model)
    info = D.setup("cpu" if exported else args.device)
    try:
        runner = None
        if exported:  # a `vitkit export` file of an encoder: its output is the row, as it is
            model, processor = open_exported("embed", args.model, {
                "--layers": bool(args.layers), "--pool": args.pool != "model",
                "--image-size": args.image_size is not None,
                "--precision": args.precision not in ("fp32", "auto"),
                "--backend": bool(args.backend),
            })  # fmt: skip
            if model.config.num_classes:
                raise ConfigError(
                    f"{args.model} outputs {model.config.num_classes} class scores, not an "
                    "embedding: embed with the checkpoint, or export an encoder without a "
                    "classification head (DINOv2, a CLIP image tower)"
                )
            runner = model
        else:
            resolved = resolve(args.model, device=info.device, image_size=image_size(args))
            model, processor = resolved.model, resolved.processor
        rows, paths, failures = embed_paths(
            model, processor, args.images, pool=args.pool, normalize=args.normalize,
            layers=args.layers, batch_size=args.batch_size, workers=args.workers,
            device=info.device, info=info, precision="fp32" if exported else args.precision,
            backend=args.backend, log=lambda s: print(f"vitkit embed: {s}", file=sys.stderr),
            cache=not args.no_cache, runner=runner,
        )  # fmt: skip
    finally:
        D.cleanup(info)
    if not info.is_main:
        return 0
    for path, reason in failures:
        print(f"{path}: {reason}", file=sys.stderr)
    if len(paths) == 0:
        raise ConfigError("no image could be embedded")
    write_embeddings(output, rows, paths)
    print(f"wrote {len(paths)} rows of shape {tuple(rows.shape[1:])} to {output} "
          f"(paths in {output}.paths.txt)")  # fmt: skip
    return 1 if failures else 0


def _texts(args: argparse.Namespace, output: Path) -> int:
    from vitkit.checkpoints.resolve import resolve
    from vitkit.distributed import pick_device
    from vitkit.errors import ConfigError
    from vitkit.infer.embed import write_embeddings
    from vitkit.infer.zero_shot import encode_texts, read_lines, text_dtype_for, text_tower

    if args.images or (args.text is not None and args.text_file is not None):
        raise ConfigError("embed images or texts (--text or --text-file), one kind per run")
    texts = list(args.text) if args.text is not None else read_lines(args.text_file, "text")
    if not texts:
        raise ConfigError(f"--text-file {args.text_file} has no text")
    if args.layers or args.pool != "model":
        raise ConfigError("--layers and --pool are for images; texts give their embedding")
    dtype = text_dtype_for(args.precision, strict=True)
    resolved = resolve(args.model, device=pick_device(args.device), text=True)
    if resolved.tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer files: texts cannot be read")
    rows = encode_texts(text_tower(resolved.image_text, dtype), resolved.tokenizer, texts,
                        batch_size=args.batch_size, normalize=args.normalize)  # fmt: skip
    write_embeddings(output, rows.numpy(), texts, listing="texts")
    print(f"wrote {len(texts)} rows of shape {tuple(rows.shape[1:])} to {output} "
          f"(texts in {output}.texts.txt)")  # fmt: skip
    return 0
