"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

Layout of a run directory:

    last/state.pt        model, objective (decoders, heads), optimizer, scaler, EMA, RNG states,
                         epoch/step, recipe, metrics, the processor
    best/                the weights with the best validation accuracy: config.json,
                         model.safetensors, preprocessor_config.json (a model folder)
    last/ (at the end)   the final weights as a model folder too
    .lock                while a run owns the directory

`state.pt` holds only tensors and plain containers, so it loads with
`torch.load(weights_only=True)` (no pickled code runs when reading it).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit._io import atomic_open, pid_alive
from vitkit.checkpoints.pretrained import STATE_FILE, read_training_state, save_pretrained
from vitkit.errors import ConfigError
from vitkit.train.lora import merged

LOCK_FILE = ".lock"
__all__ = ["STATE_FILE", "claim_run_dir", "export_model", "load_state", "save_state"]


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
    """Read a run's `state.pt` (see `vitkit.checkpoints.pretrained.read_training_state`)."""
    return read_training_state(path)


def export_model(directory: str | Path, model: nn.Module, processor: Any = None) -> Path:
    """Write a model folder: config.json + model.safetensors (transformers' format when it can
    express the model, vitkit's otherwise) and the preprocessor_config.json it was trained with;
    each file atomically. LoRA adapters are merged into their layers first (train/lora.py)."""
    save_pretrained(merged(model), directory)
    if processor is not None:
        processor.save_pretrained(directory)
    return Path(directory)


class RunLock:
    """A run directory owned by one run at a time: `.lock` holds the owner's pid. A lock whose
    process is gone (killed) is taken over; a live one is refused."""

    def __init__(self, run_dir: Path):
        self.file = run_dir / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _read_pid(self.file)
                if pid is not None and pid_alive(pid):
                    raise ConfigError(
                        f"{self.file.parent} is in use by another run (pid {pid}); wait for it "
                        "or pass another --output"
                    ) from None
                self.file.unlink(missing_ok=True)  # left by a killed run
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise ConfigError(f"could not lock {self.file.parent}")

    def release(self) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Refuse to write into a finished or running run unless resuming or told to overwrite,
    then lock the directory for this run."""
    used = run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output {run_dir} is a file, not a directory")
    if used and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, replace it "
            "with --overwrite, or pass another --output"
        )
    try:
        return RunLock(run_dir).acquire()
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None


def _read_pid(file: Path) -> int | None:
    try:
        return int(file.read_text().strip())
    except (OSError, ValueError):
        return None
