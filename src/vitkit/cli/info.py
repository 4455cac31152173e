"""`vitkit info NAME`: parameters, FLOPs and tensor shapes of a preset."""

from __future__ import annotations

import argparse

_POOLING = {"token": "[CLS] token", "avg": "mean of patch tokens", "map": "attention pool"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show a model's size, FLOPs and shapes",
        description="Show the configuration, parameter count, multiply-accumulates "
        "and tensor shapes of a preset (no weights are downloaded).",
    )
    p.add_argument("name", help="preset name (see `vitkit models`)")
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="PX",
        help="input size, one number (square) or height width (default: the preset's)",
    )
    p.add_argument("--num-classes", type=int, help="override the number of classes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitkit.models.vit import count_macs
    from vitkit.presets import create_model, get_config

    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    config = get_config(args.name, **overrides)
    h, w = config.image_hw
    if args.image_size:
        h, w = (args.image_size * 2)[:2]
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
