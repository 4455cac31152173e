"""Which files a local checkpoint is read from, found without importing torch (a warm
`vitkit predict` keys its cache by these files' bytes and never loads them)."""

from __future__ import annotations

import os
from pathlib import Path

from vitkit.errors import CheckpointError

STATE_FILE = "state.pt"  # a `vitkit train` checkpoint: {model, model_config, optimizer, ...}
OPEN_CLIP_CONFIG = "open_clip_config.json"  # an open_clip snapshot's config
RUN_SUBFOLDERS = ("best", "last")


def run_folder(path: Path) -> Path | None:
    """The model folder of a directory: itself when it has config.json (or is an open_clip
    snapshot), else a run directory's best/ then last/; None for a run whose last/ holds only
    a training state."""
    if (path / "config.json").is_file() or (path / OPEN_CLIP_CONFIG).is_file():
        return path
    for sub in RUN_SUBFOLDERS:
        if (path / sub / "config.json").is_file():
            return path / sub
    if (path / "last" / STATE_FILE).is_file() or (path / STATE_FILE).is_file():
        return None
    raise CheckpointError(
        f"{path} has no config.json (nor a vitkit run's best/ or last/); pass a checkpoint "
        "folder, or the weights file itself with model_name=... for a timm state dict"
    )


def local_files(source: str | os.PathLike[str], limit: int = 64) -> list[Path] | None:
    """The files `resolve(source)` reads a local checkpoint from: a file itself, or the plain
    files of its model folder (`run_folder`); None for a hub id, a preset, a run holding only a
    training state, a folder with links or more than `limit` files (nothing to key a cache by
    cheaply)."""
    path = Path(source).expanduser()
    if path.is_file() and not path.is_symlink():
        return [path]
    if not path.is_dir():
        return None
    try:
        folder = run_folder(path)
    except CheckpointError:
        return None
    if folder is None:
        return None
    entries = sorted(folder.iterdir())
    if len(entries) > limit or any(p.is_symlink() for p in entries):
        return None
    return [p for p in entries if p.is_file()]
