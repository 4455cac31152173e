"""Flags that several commands share, defined once."""

from __future__ import annotations

import argparse


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
