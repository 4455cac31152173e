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
        help="also print parameters and GMACs at the preset's resolution, and the text "
        "tower's parameters (CLIP, SigLIP)",
    )
    p.add_argument("--text", action="store_true",
                   help="only the presets with a text tower (zero-shot: CLIP, SigLIP)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.presets import create_model, get_config, get_image_text_config, list_models

    names = list_models(args.pattern, text=args.text)
    with_text = set(list_models(args.pattern, text=True))
    if not names:
        print(f"no preset matches {args.pattern!r}")
        return 1
    if not args.verbose:
        print("\n".join(names))
        return 0
    import torch  # the counts build each model on the meta device

    from vitkit.models.vit import count_macs

    print(f"{'name':40s} {'res':>9s} {'params':>14s} {'GMACs':>9s} {'text params':>14s}")
    for name in names:
        config = get_config(name)
        with torch.device("meta"):
            params = create_model(config).num_params()
        h, w = config.image_hw
        text = get_image_text_config(name).text.estimated_params() if name in with_text else None
        print(f"{name:40s} {f'{h}x{w}':>9s} {params:>14,d} {count_macs(config) / 1e9:>9.2f} "
              f"{'-' if text is None else f'{text:,d}':>14s}")  # fmt: skip
    return 0
