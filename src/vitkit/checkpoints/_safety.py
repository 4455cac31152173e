"""Checks every checkpoint reader applies to what a stranger's files say.

- `confine`: a file name read from a file (a shard of `*.index.json`) must stay inside the folder
  the index came from; `..`, absolute paths and symlinks that leave it are refused before the
  outside file is opened.
- `check_finite`: NaN or inf weights give NaN logits and a silent `nan%`; refuse them at load,
  naming the first bad key.
- `check_float_dtypes`: an integer or bool tensor where a float weight is due would be cast
  silently; refuse it, naming the key. Every reader applies it to the tensors as the file holds
  them, before any rename or merge (q, k and v into one qkv would cast them).
- `check_zip_sizes`, `check_torch_archive`: what a zip archive (an `.npz`, or PyTorch's format
  for `.pth`/`.bin`) says it holds, checked against the limits before anything is decompressed
  or allocated; a PyTorch archive's pickle may not declare storages larger than its records.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

import torch

from vitkit import limits
from vitkit.errors import CheckpointError

INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")
"""Integer buffers that real checkpoints hold (transformers' position ids, BatchNorm's step
count); every other tensor of a checkpoint must be floating point."""


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
    state_dict: Mapping[str, Any], source: str, *, allow: Iterable[str] = ()
) -> None:
    """Raise `CheckpointError` naming the first tensor (or NumPy array) that is not floating
    point; keys in `allow` and those ending in an `INTEGER_BUFFERS` name are exempt. Weights are
    never cast from ints silently."""
    exempt = set(allow)
    for key, t in state_dict.items():
        if key in exempt or key.rsplit(".", 1)[-1] in INTEGER_BUFFERS:
            continue
        if not isinstance(t, torch.Tensor):
            kind = getattr(getattr(t, "dtype", None), "kind", "f")  # NumPy: 'f' float, 'V' bf16
            if kind not in "fV":
                raise CheckpointError(
                    f"{source}: weight {key!r} is {t.dtype}, not a floating-point array; vitkit "
                    f"does not cast integer weights (the file is not a ViT checkpoint or is "
                    f"corrupt)"
                )
            continue
        if not (t.is_floating_point() or t.is_complex()):
            raise CheckpointError(
                f"{source}: weight {key!r} is {t.dtype}, not a floating-point tensor; vitkit "
                f"does not cast integer weights (the file is not a ViT checkpoint or is corrupt)"
            )
        if t.is_complex():
            raise CheckpointError(f"{source}: weight {key!r} is complex ({t.dtype})")


# ------------------------------------------------------------------------------ zip archives
def check_zip_sizes(members: list[zipfile.ZipInfo], path: Path | str) -> None:
    """Refuse an archive whose directory claims more than CHECKPOINT_BYTES uncompressed, or, past
    64 MiB, more than ZIP_RATIO times its compressed size (a zip bomb), before decompressing."""
    cap = limits.limit("CHECKPOINT_BYTES")
    total = sum(i.file_size for i in members)
    packed = sum(i.compress_size for i in members)
    if total > cap:
        raise CheckpointError(
            f"{path}: its members would take {total:,d} bytes uncompressed, over vitkit's limit "
            f"of {cap:,d} (VITKIT_MAX_CHECKPOINT_BYTES); refused before decompressing"
        )
    ratio = limits.limit("ZIP_RATIO")
    if total > 64 << 20 and total > ratio * max(packed, 1):
        raise CheckpointError(
            f"{path}: {packed:,d} compressed bytes claim {total:,d} uncompressed (more than "
            f"{ratio}x; VITKIT_MAX_ZIP_RATIO): refused as a zip bomb"
        )


def check_torch_archive(path: Path | IO[bytes], source: str | None = None) -> None:
    """Check a PyTorch checkpoint before `torch.load` reads it.

    torch.load allocates each storage record at the size the zip directory gives, and builds a
    storage of the element count its pickle declares over it; neither is bounded by the file's
    size. So: the archive must be PyTorch's zip format (the pre-1.6 format streams sizes it
    declares inline), its members pass `check_zip_sizes`, its pickle fits PICKLE_BYTES, and each
    storage the pickle declares (read from its opcodes, nothing executed) fits its record.
    `path` may be an open binary file (a slice of a sharded checkpoint); `source` then names it.
    """
    where = source or path
    try:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{where}: not PyTorch's zip format (torch.save before PyTorch 1.6, or not a "
                f"checkpoint); vitkit reads only the zip format, whose sizes can be checked "
                f"before loading: re-save it with a current torch, or convert it to safetensors"
            )
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if not i.is_dir()]
            check_zip_sizes(members, where)
            sizes = {i.filename: i.file_size for i in members}
            pickles = [i for i in members if i.filename.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{where}: expected one data.pkl, found {len(pickles)}")
            (pkl,) = pickles
            cap = limits.limit("PICKLE_BYTES")
            if pkl.file_size > cap:
                raise CheckpointError(
                    f"{where}: its pickle {pkl.filename} is {pkl.file_size:,d} bytes, over "
                    f"vitkit's limit of {cap:,d} (VITKIT_MAX_PICKLE_BYTES)"
                )
            data = z.read(pkl)
    except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(f"{where} is not a readable PyTorch checkpoint ({exc})") from exc
    root = pkl.filename.removesuffix("data.pkl")
    total = 0
    for storage, key, numel in _declared_storages(data, where):
        member = f"{root}data/{key}"
        nbytes = numel * _STORAGE_ITEMSIZE[storage]
        total += nbytes
        if member not in sizes:
            raise CheckpointError(f"{where}: its pickle names storage {key!r}, which it lacks")
        if nbytes > sizes[member]:
            raise CheckpointError(
                f"{where}: storage {key!r} declares {numel:,d} x {storage} ({nbytes:,d} bytes) "
                f"over a record of {sizes[member]:,d}; the file is corrupt or hostile"
            )
    limits_total = limits.limit("CHECKPOINT_BYTES")
    if total > limits_total:
        raise CheckpointError(
            f"{where}: its storages declare {total:,d} bytes, over vitkit's limit of "
            f"{limits_total:,d} (VITKIT_MAX_CHECKPOINT_BYTES)"
        )


_STORAGE_ITEMSIZE = {  # the typed-storage names torch.save writes, and their element sizes
    "FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}  # fmt: skip


def _declared_storages(data: bytes, path: Path | str) -> Iterator[tuple[str, str, int]]:
    """(storage type, key, element count) of each persistent id `('storage', torch.<Type>,
    key, location, numel)` in a pickle, found by following its opcodes' stack effects without
    executing any of them."""
    mark = pickletools.markobject
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            elif name == "GLOBAL":
                stack.append(("global", arg.replace(" ", ".")))
            elif name == "STACK_GLOBAL":
                module, qualname = stack.pop(-2), stack.pop()
                stack.append(("global", f"{module}.{qualname}"))
            elif name in ("BINPERSID", "PERSID"):
                pid = stack.pop() if name == "BINPERSID" else tuple(str(arg).split())
                yield _storage(pid, path)
                stack.append(None)
            elif name.startswith("TUPLE") and name != "TUPLE":
                n = int(name[-1])
                items = tuple(stack[len(stack) - n :])
                del stack[len(stack) - n :]
                stack.append(items)
            elif name == "TUPLE":
                start = marks.pop()
                items = tuple(stack[start:])
                del stack[start:]
                stack.append(items)
            elif mark in op.stack_before:  # pops down to the mark and what lies under it
                start = marks.pop() - op.stack_before.index(mark)
                del stack[start:]
                stack.extend([None] * len(op.stack_after))
            else:
                del stack[len(stack) - len(op.stack_before) :]
                pushed = arg if op.stack_after and arg is not None and not op.stack_before else None
                stack.extend([pushed] * len(op.stack_after))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: its pickle is malformed ({exc})") from None


def _storage(pid: Any, path: Path | str) -> tuple[str, str, int]:
    if (
        isinstance(pid, tuple)
        and len(pid) == 5
        and pid[0] == "storage"
        and isinstance(pid[1], tuple)
        and isinstance(pid[2], str)
        and limits.is_int(pid[4])
    ):
        storage = str(pid[1][1]).removeprefix("torch.")
        if storage in _STORAGE_ITEMSIZE and pid[4] >= 0:
            return storage, pid[2], pid[4]
    raise CheckpointError(
        f"{path}: its pickle declares a storage vitkit cannot check: {pid!r:.200}"
    )
