"""Shared checks for the checkpoint mappings: one `CheckpointError` that lists every problem."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError

_MAX_LISTED = 12


def expected_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict a `VisionTransformer(config)` has (built on `meta`)."""
    from vitkit.models.vit import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def mismatch_error(
    source: str,
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    conflicts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    hint: str = "",
) -> CheckpointError:
    """Build one error naming the file, the missing and unexpected keys and the shape conflicts."""
    parts = []
    missing, unexpected = list(missing), list(unexpected)
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if conflicts:
        items = [
            f"{k} (model {list(exp)}, file {list(got)})"
            for k, (exp, got) in sorted(conflicts.items())
        ]
        parts.append(
            f"shape conflicts ({len(items)}): "
            + "; ".join(items[:_MAX_LISTED])
            + (" ..." if len(items) > _MAX_LISTED else "")
        )
    msg = f"checkpoint {source} does not match the model: " + "; ".join(parts)
    return CheckpointError(msg + (f". {hint}" if hint else ""))


def check_state_dict(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str, hint: str = ""
) -> None:
    """Raise one `CheckpointError` unless `sd` has exactly the keys and shapes of the model."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    conflicts = {
        k: (expected[k], tuple(v.shape))
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != expected[k]
    }
    if missing or unexpected or conflicts:
        raise mismatch_error(
            source, missing=missing, unexpected=unexpected, conflicts=conflicts, hint=hint
        )
