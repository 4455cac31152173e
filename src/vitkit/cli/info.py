"""`vitkit info SOURCE`: parameters, FLOPs and tensor shapes of a preset or a checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from vitkit.cli._args import add_image_size, image_size, model_help

_POOLING = {
    "token": "[CLS] token",
    "avg": "mean of patch tokens",
    "map": "attention pool",
    "token_avg": "[CLS] token beside the mean of patch tokens",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's size, FLOPs and shapes",
        description="Show the configuration, parameter count, multiply-accumulates "
        "and tensor shapes of a preset (built on the meta device: nothing is allocated) or of "
        "a checkpoint, with its classes and preprocessing.",
    )
    p.add_argument(
        "name",
        metavar="SOURCE",
        help=model_help(presets=False) + ", or a preset name from `vitkit models`",
    )
    add_image_size(p, help="input size, one number (square) or height width (default: the model's)")
    p.add_argument("--num-classes", type=int, help="override the number of classes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from vitkit.checkpoints.resolve import resolve
    from vitkit.models.vit import count_macs
    from vitkit.presets import create_model, get_config, list_models

    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    loaded = None
    if Path(args.name).exists() or (args.name not in list_models() and "/" in args.name):
        loaded = resolve(args.name)  # a checkpoint: the config its weights came with
        config = loaded.model.config.replace(**overrides)
    else:
        config = get_config(args.name, **overrides)
    size = image_size(args)
    h, w = config.image_hw if size is None else (size, size) if isinstance(size, int) else size
    with torch.device("meta"):
        model = create_model(config)
    grid = model.patch_embed.grid_size(h, w)
    tokens = grid[0] * grid[1] + config.num_prefix_tokens
    macs = count_macs(config, (h, w))
    c = config
    rows = [
        ("model", args.name),
        ("input", f"(B, {c.in_chans}, {h}, {w})"),
        ("patch grid", f"{grid[0]} x {grid[1]} patches of {c.patch_size}x{c.patch_size}"),
        (
            "tokens",
            f"(B, {tokens}, {c.embed_dim})  = {c.num_prefix_tokens} prefix + "
            f"{grid[0] * grid[1]} patches",
        ),
        (
            "encoder",
            f"{c.depth} blocks, {c.num_heads} heads of {c.head_dim}, MLP "
            f"{c.embed_dim}->{c.mlp_hidden_dim}->{c.embed_dim}",
        ),
        ("attention map", f"(B, {c.num_heads}, {tokens}, {tokens}) per layer"),
        ("pooling", _POOLING[c.global_pool]),
        (
            "output",
            f"(B, {c.num_classes}) logits"
            if c.num_classes
            else f"(B, {model.num_features}) features",
        ),
        ("parameters", f"{model.num_params():,d}"),
        ("MACs / image", f"{macs / 1e9:.2f} G  ({2 * macs / 1e9:.2f} GFLOPs)"),
    ]
    if loaded is not None:
        rows += _checkpoint_rows(loaded, config)
    if (h, w) != config.image_hw:
        rows.append(
            (
                "positions",
                f"learned {config.grid_size} table resampled to {grid} "
                f"({config.pos_embed_interpolation})",
            )
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _checkpoint_rows(loaded: Any, config: Any) -> list[tuple[str, str]]:
    """What a checkpoint adds to its architecture: where it came from, its classes, and the
    preprocessing `predict`, `eval` and `serve` will apply."""
    p = loaded.processor
    rows = [("weights", str(loaded.folder or loaded.source))]
    if config.num_classes:
        names = list((config.id2label or {}).values())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        rows.append(
            ("classes", f"{config.num_classes}" + (f" ({shown})" if names else " (unnamed)"))
        )
    resize = f"shorter side to {p.resize}" if isinstance(p.resize, int) else f"to {p.resize}"
    steps = [f"resize {resize} ({p.interpolation})" if p.resize else "no resize"]
    if p.crop_size:
        steps.append(f"centre crop {p.crop_size}")
    if p.mean is not None:
        steps.append(
            f"mean {tuple(round(m, 3) for m in p.mean)} std {tuple(round(v, 3) for v in p.std)}"
        )
    rows.append(("preprocessing", ", ".join(steps)))
    return rows
