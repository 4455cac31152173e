"""`vitkit models [PATTERN]`: list the named presets."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list model presets",
        description="List model presets, optionally filtered by a shell pattern.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="e.g. 'vit_base_*' (default: all)")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print parameters and GMACs at the preset's resolution",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitkit.models.vit import count_macs
    from vitkit.presets import create_model, get_config, list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no preset matches {args.pattern!r}")
        return 1
    if not args.verbose:
        print("\n".join(names))
        return 0
    print(f"{'name':40s} {'res':>9s} {'params':>14s} {'GMACs':>9s}")
    for name in names:
        config = get_config(name)
        with torch.device("meta"):
            params = create_model(config).num_params()
        h, w = config.image_hw
        print(f"{name:40s} {f'{h}x{w}':>9s} {params:>14,d} {count_macs(config) / 1e9:>9.2f}")
    return 0
