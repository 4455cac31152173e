"""Atomic file writes: a reader never sees a half-written file, and a crash leaves none behind.

Each write goes to `NAME` inside a private folder `.NAME.<pid>.<random>.tmp/` beside the target,
is fsynced and renamed over the target. The folder holds whatever the writer makes on the way
(safetensors, onnx and others write their own `.tmpXXXXXX` files before renaming), so the sweep
below, which knows only this one naming, removes every trace of a killed save.
- The new file gets the mode a plain `open()` would give it: the existing file's mode when
  replacing one, else 0666 minus the umask (a writer's own temporary file may be 0600).
- An exception (or SIGTERM, which the CLI turns into SystemExit) removes the temporary file.
- kill -9 cannot be caught: the next save into the same folder removes temporary folders (and
  files, from older versions) of this naming whose writer process is gone, or that are older than `STALE_SECONDS` (24 hours when
  the writer's pid is still in use, since pids are reused); so crashed saves never pile up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

STALE_SECONDS = 10 * 60
"""A temporary file without a recorded pid is stale after this long without a write."""

_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # .NAME[.PID].RANDOM.tmp (mkdtemp: 8 chars)
_TEMP_PID = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path for writers that take a file name; rename it over `path` on
    success. It lies in a private folder beside `path`, removed whatever happens (see above)."""
    path = Path(path)
    folder = temp_folder(path)
    tmp = folder / path.name
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), _new_mode(path))  # the writer may have replaced the file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty private folder beside `path` to write into. When the block ends without
    an error, its files are synced and it replaces `path` (a folder there is removed first)
    in one rename; on an error, or a kill (`clean_stale_temps`), nothing is left."""
    tmp = temp_folder(path)
    try:
        yield tmp
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def temp_folder(path: Path) -> Path:
    """Create the target's folder, sweep stale temporary files, and make a private one for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    return Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    )


def _new_mode(path: Path) -> int:
    """The mode of the file being replaced, else what `open()` would create: 0666 & ~umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (threads may be writing)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove our temporary folders (and files) in `folder` left by a killed writer; return
    those removed."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if not _TEMP.match(entry.name) or entry.is_symlink():
                continue
            with contextlib.suppress(OSError):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                m = _TEMP_PID.match(entry.name)
                pid = int(m.group(1)) if m else None
                if pid == os.getpid():
                    continue  # ours, maybe being written by another thread
                if pid is not None:
                    stale = not pid_alive(pid) or age > 24 * 3600
                else:
                    stale = age > STALE_SECONDS
                if stale:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (for stale temporary files and locks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or an absurd number): leave its file alone
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
