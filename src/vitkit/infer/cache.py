"""Precision paths prepared once, kept on disk, reused by every later process.

Converting a model to OpenVINO or ONNX, calibrating static int8 with NNCF and quantizing take
tens of seconds; a `vitkit predict --precision int8` that pays them in every process is the
slowest path for a few images. `vitkit.infer.precision.prepare` keeps what it builds here:

    <cache>/prepared/<key>/entry.json       what the entry is, its files' sizes and SHA-256
    <cache>/prepared/<key>/model.xml, .bin  an OpenVINO path (converted, int8: quantized)
    <cache>/prepared/<key>/model.onnx       an onnxruntime path
    <cache>/prepared/<key>/compiled/        OpenVINO's compiled models of the entry, one per
                                            input size (its CACHE_DIR; not in entry.json:
                                            OpenVINO checks and rebuilds them itself)
    <cache>/prepared/<key>/entry.json       for `auto`: only its pick (precision, backend)

The key is a SHA-256 of the model's content (every tensor's bytes, its config), the precision,
the backend, the input's channels and size, the calibration (the images' bytes when they were
given; "first batch" otherwise: the first run calibrates on its first images and later runs
reuse that), the machine's instruction sets and the versions of vitkit, torch and the runtime.
New weights at the same path give a new key; nothing is found by path.

`<cache>` is $VITKIT_CACHE_DIR, else $XDG_CACHE_HOME/vitkit, else ~/.cache/vitkit. An entry
is written in a private folder and renamed into place when complete, so a killed writer leaves
no entry (its folder is swept later). The cache holds at most $VITKIT_CACHE_MB megabytes
(default 4096): the entries used longest ago go first. An entry is untrusted input: one whose
description or files do not check out (corrupt, truncated, another version) is deleted and
rebuilt with a one-line note, never used. `vitkit cache` lists the entries and clears them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitkit._io import atomic_folder
from vitkit._version import __version__
from vitkit.config import read_json
from vitkit.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

FORMAT = 1  # the layout of an entry; another value is rebuilt
DEFAULT_MB = 4096
ENTRY = "entry.json"
_HASH_CHUNK = 1 << 24


def cache_dir() -> Path:
    """$VITKIT_CACHE_DIR, else $XDG_CACHE_HOME/vitkit, else ~/.cache/vitkit."""
    if os.environ.get("VITKIT_CACHE_DIR"):
        return Path(os.environ["VITKIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitkit"


def limit_bytes() -> int:
    """$VITKIT_CACHE_MB megabytes (default 4096); 0 or less keeps nothing."""
    text = os.environ.get("VITKIT_CACHE_MB", "").strip()
    try:
        return int(float(text) * (1 << 20)) if text else DEFAULT_MB << 20
    except ValueError:
        return DEFAULT_MB << 20


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's content: its class, config and every tensor's name, dtype, shape
    and bytes (what the path is built from; the file it came from does not matter)."""
    import torch  # lazy: the rest of the module serves a warm run that never imports torch

    h = hashlib.sha256(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    h.update(
        json.dumps(to_dict() if to_dict else repr(config), sort_keys=True, default=str).encode()
    )
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def files_id(paths: list[Path]) -> str:
    """SHA-256 of files' names, sizes and bytes: a checkpoint's content, read without loading
    it (new weights at the same path give a new id)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}|{path.stat().st_size}|{_sha256(path)}\n".encode())
    return h.hexdigest()


def tensor_id(x: Tensor) -> str:
    """SHA-256 of a tensor's shape and bytes (the calibration images)."""
    t = x.detach().float().cpu().contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class Key:
    """What a prepared path depends on (see the module docstring)."""

    model: str  # `fingerprint`
    precision: str
    backend: str
    shape: tuple[int, ...]  # (C, H, W) of the example the path was built for
    calibration: str  # `tensor_id` of the images, or "first batch"
    machine: str
    versions: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:32]

    def fields(self) -> dict[str, Any]:
        return {"model": self.model, "precision": self.precision, "backend": self.backend,
                "shape": list(self.shape), "calibration": self.calibration,
                "machine": self.machine, "versions": self.versions}  # fmt: skip


def versions(backend: str) -> str:
    """vitkit, torch and the backend's libraries, as `name version` pairs (read from the
    installed packages' metadata, so a warm run need not import them)."""
    names = {"openvino": ("openvino", "nncf"), "onnxruntime": ("onnxruntime", "onnx")}
    parts = [f"vitkit {__version__}"]
    for name in ("torch", *names.get(backend, ())):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{name} {version(name)}")
    return "; ".join(parts)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capability(flags: frozenset[str] | None = None) -> str | None:
    """The vector ISA torch dispatches its CPU kernels to ("AVX512", "AVX2", "DEFAULT"),
    read from the CPU's flags with torch's own rule; None where $ATEN_CPU_CAPABILITY
    overrides it or the CPU is not x86 (then only torch itself can say)."""
    flags = cpu_flags() if flags is None else flags
    if os.environ.get("ATEN_CPU_CAPABILITY") or "sse2" not in flags:
        return None
    if {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "AVX512"
    return "AVX2" if {"avx2", "fma"} <= flags else "DEFAULT"


def machine_key(flags: frozenset[str] | None = None) -> str:
    """The instruction sets a prepared path depends on (`Key.machine`): OpenVINO's kernels and
    `auto`'s pick follow them."""
    flags = cpu_flags() if flags is None else flags
    sets = {"avx512_bf16": {"avx512_bf16"}, "vnni": {"avx512_vnni", "avx_vnni"},
            "amx": {"amx_bf16", "amx_int8"}}  # fmt: skip
    return " ".join(
        [cpu_capability(flags) or "unknown", *(k for k, v in sets.items() if v & flags)]
    )


def path_key(fingerprint: str, precision: str, backend: str, shape: tuple[int, ...],
             calibration: str | None) -> Key:  # fmt: skip
    """The key of a prepared path: `calibration` is the images' `tensor_id` when they were
    given, None when the first batch calibrates."""
    static = (precision == "int8" and backend == "openvino") or precision == "auto"
    source = "none" if not static else calibration or "first batch"  # "none": sees no images
    return Key(fingerprint, precision, backend, tuple(shape), source, machine_key(),
               versions(backend))  # fmt: skip


def alias_key(files: list[Path], asked: dict[str, Any]) -> Key:
    """The key of what a local checkpoint resolves to (config, preprocessing, fingerprint),
    by its files' bytes and the options it was resolved with."""
    options = json.dumps({k: asked[k] for k in sorted(asked)}, default=str)
    return Key(files_id(files), "resolved", "-", (), options, "", versions("torch"))


class Cache:
    """The prepared paths under `root` (default `cache_dir()`); `say` prints the one-line notes."""

    def __init__(self, root: Path | None = None, say: Callable[[str], None] | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self.say = say or (lambda s: None)

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    # ---- reading -------------------------------------------------------------------------
    def get(self, key: Key) -> Path | None:
        """The entry folder of `key` once its description and files check out, else None (a
        bad entry is deleted with a note). Marks the entry as used now."""
        folder = self.prepared / key.digest
        if not folder.is_dir():
            return None
        problem = _check(folder, key)
        if problem is not None:
            self.say(f"cache entry {folder} is unusable ({problem}); rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(folder / ENTRY)
        return folder

    def meta(self, folder: Path) -> dict[str, Any]:
        return read_json(folder / ENTRY, "cache entry", obj=True)

    # ---- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def put(self, key: Key, what: str, extra: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield an empty private folder to write an entry's files into; on success describe
        them (`entry.json`), rename the folder into place and evict down to the size limit.
        On failure nothing is left."""
        with atomic_folder(self.prepared / key.digest) as tmp:
            yield tmp
            files = {p.name: _file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            meta = {"format": FORMAT, "what": what, "key": key.fields(), "files": files,
                    "created": time.time(), **(extra or {})}  # fmt: skip
            (tmp / ENTRY).write_text(json.dumps(meta, indent=1), "utf-8")
        self.evict()

    # ---- housekeeping --------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry, most recently used first: {path, what, size, used}."""
        out = []
        with contextlib.suppress(OSError):
            for folder in self.prepared.iterdir():
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                try:
                    meta = self.meta(folder)
                    used = (folder / ENTRY).stat().st_mtime
                except (OSError, ValueError):
                    meta, used = {}, 0.0
                out.append({"path": folder, "what": meta.get("what", "?"), "used": used,
                            "size": _size(folder)})  # fmt: skip
        return sorted(out, key=lambda e: -e["used"])

    def evict(self, limit: int | None = None) -> list[Path]:
        """Delete the entries used longest ago until the cache holds at most `limit` bytes
        (default `limit_bytes()`); returns those deleted."""
        limit = limit_bytes() if limit is None else limit
        entries = self.entries()
        total = sum(e["size"] for e in entries)
        removed = []
        while entries and total > limit:
            oldest = entries.pop()
            shutil.rmtree(oldest["path"], ignore_errors=True)
            total -= oldest["size"]
            removed.append(oldest["path"])
        return removed

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        entries = self.entries()
        for e in entries:
            shutil.rmtree(e["path"], ignore_errors=True)
        return len(entries)


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _check(folder: Path, key: Key) -> str | None:
    """Why the entry in `folder` cannot serve `key` (None: it can)."""
    path = folder / ENTRY
    if path.is_symlink():
        return f"{ENTRY} is a link"
    try:
        meta = read_json(path, "cache entry", obj=True)
    except ConfigError as exc:
        return str(exc)
    if meta.get("format") != FORMAT:
        return "written by another version of vitkit"
    if meta.get("key") != key.fields():
        return "its description does not match the model"
    files = meta.get("files")
    if not isinstance(files, dict):
        return f"{ENTRY} lists no files"
    for name, record in files.items():
        target = folder / str(name)
        if os.sep in str(name) or target.is_symlink() or not target.is_file():
            return f"{name} is missing"
        if not isinstance(record, dict) or target.stat().st_size != record.get("size"):
            return f"{name} is truncated or changed"
        if _sha256(target) != record.get("sha256"):
            return f"{name} does not match its checksum"
    return None
