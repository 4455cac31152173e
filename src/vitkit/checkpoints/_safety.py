"""Checks every checkpoint reader applies to what a stranger's files say.

- `confine`: a file name read from a file (a shard of `*.index.json`) must stay inside the folder
  the index came from; `..`, absolute paths and symlinks that leave it are refused before the
  outside file is opened.
- `check_finite`: NaN or inf weights give NaN logits and a silent `nan%`; refuse them at load,
  naming the first bad key.
- `check_float_dtypes`: an integer or bool tensor where a float weight is due would be cast
  silently; refuse it, naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from vitkit.errors import CheckpointError


def check_relative_name(name: object, source: str) -> str:
    """`name` as written in `source`, if it is a plain relative path (no `..`, not absolute)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{source}: file name {name!r} is not a usable relative path")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith("~"):
        raise CheckpointError(
            f"{source}: refusing the absolute path {name!r}; files it names must sit beside it"
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"{source}: refusing {name!r}, which leaves the folder; files it names must sit "
            f"beside it"
        )
    return name


def confine(
    name: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    source: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """`folder / name`, refusing a `name` that leaves `folder` (raises `CheckpointError`).

    The check is lexical first (absolute paths, `..`), then on the resolved path, following
    symlinks: the result must lie inside `root` (default: `folder`). A Hugging Face cache
    snapshot links each file to `../../blobs/<hash>`, so for a snapshot pass
    `root=<the repository's cache folder>` (the snapshot's grandparent).
    """
    folder = Path(folder)
    where = source or str(folder)
    check_relative_name(os.fspath(name), where)
    path = folder / name
    inside = Path(root if root is not None else folder).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(inside):
        raise CheckpointError(
            f"{where}: refusing {os.fspath(name)!r}: it resolves to {resolved}, outside {inside}"
        )
    return path


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `CheckpointError` naming the first floating-point tensor holding NaN or inf."""
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise CheckpointError(
                f"{source}: weight {key!r} holds {bad:,d} NaN or infinite value(s) of "
                f"{t.numel():,d}; the file is corrupt (download it again) or was saved from a "
                f"diverged run"
            )


def check_float_dtypes(
    state_dict: Mapping[str, torch.Tensor], source: str, *, allow: Iterable[str] = ()
) -> None:
    """Raise `CheckpointError` naming the first tensor that is not floating point (keys in
    `allow`, e.g. integer buffers, are exempt): weights are never cast from ints silently."""
    exempt = set(allow)
    for key, t in state_dict.items():
        if key in exempt or not isinstance(t, torch.Tensor):
            continue
        if not (t.is_floating_point() or t.is_complex()):
            raise CheckpointError(
                f"{source}: weight {key!r} is {t.dtype}, not a floating-point tensor; vitkit "
                f"does not cast integer weights (the file is not a ViT checkpoint or is corrupt)"
            )
        if t.is_complex():
            raise CheckpointError(f"{source}: weight {key!r} is complex ({t.dtype})")
