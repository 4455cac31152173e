"""A sharded training checkpoint (torch.distributed.checkpoint, DCP) read as untrusted input.

torch's `FileSystemReader` unpickles `.metadata` with a plain `pickle.load`, and its planner
reads non-tensor values (the optimizer's hyper-parameters) with `torch.load(weights_only=False)`:
either runs code from a checkpoint someone handed you. Here `.metadata` is unpickled with the
project's restricted unpickler (DCP's metadata classes, torch sizes and dtypes, nothing else),
every file it names must be a shard inside the checkpoint's folder with the slice it claims,
each slice passes `check_torch_archive` before torch reads it, and every value is read with
`weights_only=True`. Imported only when a run resumes from shards (DCP takes ~2 s to import).
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.serialization import _get_layout

from vitkit import limits
from vitkit._unpickle import restricted_loads
from vitkit.checkpoints._safety import check_torch_archive, confine
from vitkit.errors import CheckpointError
from vitkit.limits import is_int

_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                     "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "_MEM_FORMAT_ENCODING")  # fmt: skip
_GLOBALS: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, n): getattr(dcp_metadata, n) for n in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # the checkpoint id it was saved under
    **{("torch", n): d for n in dir(torch) if isinstance(d := getattr(torch, n), torch.dtype)},
}
_UNREADABLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
               IndexError, MemoryError, RecursionError, OverflowError, UnicodeError)  # fmt: skip


class Reader(FileSystemReader):
    """`FileSystemReader` that checks what it reads (see the module's docstring)."""

    _checked: dcp_metadata.Metadata | None = None

    def read_metadata(self) -> dcp_metadata.Metadata:
        """The checked `.metadata` (read once: `load_sharded` calls it before DCP does, so a
        refusal is one line, not DCP's wrapped fallbacks). No `rank=`: vitkit writes no
        rank-local metadata, so DCP never falls back to looking for one."""
        if self._checked is None:
            self._checked = self._read_metadata()
            if self._checked.storage_meta is None:
                self._checked.storage_meta = dcp_metadata.StorageMeta()
        self._checked.storage_meta.load_id = self.load_id  # `reset` draws a new one
        return self._checked

    def _read_metadata(self) -> dcp_metadata.Metadata:
        path = Path(self._get_metadata_path())
        try:
            size = path.lstat().st_size
            if not path.is_file() or path.is_symlink():
                raise CheckpointError(f"{path}: not a regular file")
            limits.check(size, "PICKLE_BYTES", "sharded-checkpoint metadata bytes", str(path))
            metadata = restricted_loads(path.read_bytes(), _GLOBALS)
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
        except _UNREADABLE as exc:
            raise CheckpointError(
                f"{path}: refused or unreadable sharded-checkpoint metadata "
                f"({type(exc).__name__}: {exc}); only what torch.distributed.checkpoint writes "
                f"is read, and nothing in it runs"
            ) from None
        _check(metadata, path)
        return metadata

    def _slice_file(self, file: IO[bytes], sinfo: _StorageInfo) -> IO[bytes]:
        where = f"{Path(self.path) / sinfo.relative_path} at byte {sinfo.offset}"
        check_torch_archive(_Slice(file, sinfo.offset, sinfo.length), where)
        return super()._slice_file(file, sinfo)


class _Slice(io.RawIOBase):
    """Bytes [offset, offset + length) of `file` as a seekable file of their own (DCP's view
    seeks wrongly from its end, which is where a zip reader starts)."""

    def __init__(self, file: IO[bytes], offset: int, length: int):
        super().__init__()
        self.file, self.offset, self.length, self.pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, pos + (0, self.pos, self.length)[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        self.file.seek(self.offset + self.pos)
        got = self.file.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class Planner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` whose non-tensor values must pass `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise CheckpointError(
                f"sharded checkpoint: value {read_item.dest_index.fqn!r} is more than plain "
                f"data, refused ({str(exc).splitlines()[0][:200]})"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)  # the same bytes, now known to be plain data


def _check(metadata: Any, path: Path) -> None:
    """Every storage item names a shard file in `path`'s folder and a slice inside it."""
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(
        metadata.storage_data, dict
    ):
        raise CheckpointError(f"{path}: not the metadata of a torch.distributed.checkpoint")
    folder, sizes = path.parent, {}
    for index, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: storage entry {index!r} is not a file slice")
        name = info.relative_path
        if name not in sizes:
            shard = confine(name, folder, source=str(path))
            if not shard.is_file() or shard.is_symlink():
                raise CheckpointError(
                    f"{path}: names {name!r}, which is not a shard file beside it"
                )
            sizes[name] = shard.stat().st_size
        if not (is_int(info.offset) and is_int(info.length) and info.offset >= 0
                and info.length > 0 and info.offset + info.length <= sizes[name]):  # fmt: skip
            raise CheckpointError(
                f"{path}: entry {getattr(index, 'fqn', index)!r} claims bytes {info.offset!r}"
                f"+{info.length!r} of {name}, which holds {sizes[name]:,d}"
            )
        if info.transform_descriptors:
            raise CheckpointError(
                f"{path}: entry {getattr(index, 'fqn', index)!r} asks for transforms "
                f"{info.transform_descriptors!r}; vitkit writes and reads plain shards only"
            )
