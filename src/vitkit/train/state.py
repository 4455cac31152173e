"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

Layout of a run directory:

    last/state.pt        model, optimizer, scaler, EMA, RNG states, epoch/step, recipe, metrics
    best/state.pt        the same, at the best validation accuracy
    best/model.safetensors + best/config.json   the best weights in vitkit's native format

`state.pt` holds only tensors and plain containers, so it loads with
`torch.load(weights_only=True)` (no pickled code runs when reading it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit._io import atomic_open
from vitkit.errors import CheckpointError

STATE_FILE = "state.pt"


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training state with torch.save through a temp file, fsync and rename."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a `state.pt` (a run directory, its last/ or best/ folder, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / STATE_FILE, path / "last" / STATE_FILE):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise CheckpointError(
                f"{path}: no {STATE_FILE} here or in {path}/last; pass a run "
                "directory written by `vitkit train`"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read training state {path}: {exc}") from exc
    missing = {"model", "optimizer", "epoch", "step", "recipe"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: not a vitkit training state (missing {sorted(missing)})")
    return state


def export_model(directory: str | Path, model: nn.Module) -> None:
    """Write the model with `save_pretrained` (transformers' format when it can express the model,
    vitkit's native one otherwise): config.json + model.safetensors, each atomically."""
    model.save_pretrained(directory)


def load_native_weights(directory: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(ViTConfig, state dict) of a model folder (either format `export_model` writes) or a run
    directory (its best/, else last/)."""
    from vitkit.checkpoints.pretrained import from_pretrained
    from vitkit.config import ViTConfig

    directory = Path(directory)
    for d in (directory, directory / "best", directory / "last"):
        if (d / "model.safetensors").is_file() and (d / "config.json").is_file():
            model = from_pretrained(d)
            return model.config, model.state_dict()
    if (directory / "last" / STATE_FILE).is_file() or (directory / STATE_FILE).is_file():
        state = load_state(directory)
        return ViTConfig.from_dict(state["model_config"]), state["model"]
    raise CheckpointError(f"{directory}: no model.safetensors + config.json (or {STATE_FILE})")
