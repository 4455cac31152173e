"""Flags that several commands share, defined once."""

from __future__ import annotations

import argparse


def model_help(*, presets: bool, what: str = "the pipeline") -> str:
    """What `vitkit.checkpoints.resolve` accepts as SOURCE, said the same way by every command."""
    text = "a checkpoint folder or file (transformers, timm, JAX .npz), a hub id or a `vitkit train` run"
    if presets:
        text += f", or a preset name from `vitkit models` (random weights: for trying {what} only)"
    return text


def add_model(p: argparse.ArgumentParser, *, presets: bool, what: str = "the pipeline") -> None:
    """`--model/-m SOURCE`, resolved by `vitkit.checkpoints.resolve`; `presets` when the command
    passes allow_preset=True."""
    p.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="SOURCE",
        help=model_help(presets=presets, what=what),
    )


RESAMPLED = (
    "run the model at this input size: one number (square) or height width; the learned "
    "positions are resampled (bicubic) and the preprocessing follows (default: the checkpoint's)"
)


def add_image_size(p: argparse.ArgumentParser, *, help: str = RESAMPLED) -> None:
    """`--image-size PX [PX]`; read it back with `image_size(args)`."""
    p.add_argument("--image-size", type=int, nargs="+", metavar="PX", help=help)


def image_size(args: argparse.Namespace) -> int | tuple[int, int] | None:
    """`--image-size` as `vitkit.resolve` takes it: None, one side, or (height, width)."""
    from vitkit import limits
    from vitkit.errors import ConfigError

    sizes = args.image_size
    if sizes is None:
        return None
    if len(sizes) > 2 or min(sizes) <= 0:
        raise ConfigError(
            "--image-size takes one size or a height and a width in pixels, got "
            + " ".join(map(str, sizes))
        )
    cap = limits.limit("IMAGE_SIDE")
    if max(sizes) > cap:  # the user's flag, not the checkpoint: say so before loading it
        raise ConfigError(
            f"--image-size {max(sizes):,d} is over vitkit's limit of {cap:,d} pixels a side "
            f"(VITKIT_MAX_IMAGE_SIDE={max(sizes)} raises it)"
        )
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def add_precision(p: argparse.ArgumentParser, *, what: str = "the model") -> None:
    """`--precision` and `--backend`: the precision path `vitkit.infer.prepare` runs `what` on."""
    from vitkit.infer.precision import BACKENDS, PRECISIONS

    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help=f"run {what} in fp32 (exact), bf16, fp16 (GPU), int8 (CPU; calibrated on the first "
        "batch), or auto: the fastest path this machine offers that keeps fp32's results on the "
        "first batch (docs/inference.md)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="runtime for --precision (default: the fastest installed)",
    )
