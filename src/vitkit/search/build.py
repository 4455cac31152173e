"""Build or update an index folder: embed only new or changed files, commit atomically.

    report = update_index("idx/", ["photos/"], resolved, pool="model")
    print(report.added, report.changed, report.unchanged, report.removed, report.failures)

A run lists the files under its inputs (`expand_inputs`), keeps the rows of files whose size and
mtime are unchanged, and embeds the rest with `embed_paths` in chunks; each chunk's rows are
written to idx/staging/ atomically as soon as they exist, so a killed run loses at most one
chunk and the next run reuses the rest. The new rows go into a new generation folder, and the
manifest, renamed into place last, switches to it: until then the previous index is what every
reader sees. The index holds exactly the files under the run's inputs (a file no longer there is
dropped). Above `exact_below` rows an HNSW graph (FAISS) is built; below, search is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitkit._io import atomic_folder, atomic_path, atomic_write_text, clean_stale_temps
from vitkit._version import __version__
from vitkit.errors import ConfigError
from vitkit.search.index import (
    EMBEDDINGS,
    FAISS_FILE,
    FORMAT,
    GENERATION,
    MANIFEST,
    MAX_PATH_BYTES,
    PATHS,
    STAGING,
    STATS,
    VERSION,
    SearchIndexError,
    check_identity,
    encode_path,
    open_index,
)

EXACT_BELOW = 10_000  # rows; from here on an HNSW graph (benchmarks/search.py, docs/search.md)
CHUNK = 1024  # images embedded between two commits to the staging area
HNSW = {"M": 32, "ef_construction": 200, "ef_search": 256}  # docs/search.md: why 200
LOCK = ".lock"


@dataclasses.dataclass
class UpdateReport:
    """What a run did: counts of files, and [(path, reason)] for those that could not be read."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    reused: int = 0  # rows of an interrupted run taken from the staging area
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    count: int = 0
    kind: str = "exact"
    note: str = ""


def update_index(
    folder: str | os.PathLike[str],
    inputs: Sequence[str],
    resolved: Any,
    *,
    pool: str = "model",
    batch_size: int = 32,
    workers: int | None = None,
    device: Any = "cpu",
    precision: str = "fp32",
    backend: str | None = None,
    info: Any = None,
    log: Callable[[str], None] | None = None,
    cache: bool = True,
    chunk_size: int = CHUNK,
    exact_below: int = EXACT_BELOW,
    on_chunk: Callable[[int], None] | None = None,
    image_size: Any = None,
) -> UpdateReport | None:
    """Make `folder` the index of the image files under `inputs`, embedded by `resolved` (a
    `vitkit.resolve` result). Returns the report on rank 0 (None on other torchrun ranks).
    `image_size`: the size `resolved` was loaded at, if not the checkpoint's (recorded, so
    that queries load the model alike). `on_chunk(n)` runs after each committed chunk."""
    from vitkit import distributed as D
    from vitkit.features import Embedder
    from vitkit.infer.embed import embed_paths
    from vitkit.infer.precision import prepare
    from vitkit.search.query import model_identity

    if chunk_size < 1 or exact_below < 0:
        raise ConfigError("chunk_size must be at least 1 and exact_below at least 0")
    folder = Path(folder)
    info = info or D.setup(str(device))
    identity = model_identity(resolved, pool, image_size)
    say = log or (lambda s: None)
    with _locked(folder, info.is_main) as old:
        plan: dict[str, Any] = {}
        if info.is_main:
            if old is not None:
                check_identity(old.identity, identity, folder)
            plan = _plan(folder, inputs, old, identity)
        if info.enabled:  # every rank embeds its share of the same list
            plan = json.loads(D.broadcast_str(json.dumps(plan), info))
        todo = plan["todo"]
        runner = prepare(Embedder(resolved.model, pool), precision, backend=backend,
                         device=device, log=log, cache=cache) if todo else None  # fmt: skip
        failures: list[tuple[str, str]] = []
        for n, start in enumerate(range(0, len(todo), chunk_size)):
            chunk = todo[start : start + chunk_size]
            rows, paths, bad = embed_paths(
                resolved.model, resolved.processor, [p for p, _ in chunk], pool=pool,
                batch_size=batch_size, workers=workers, device=device, precision=precision,
                backend=backend, info=info, log=log, cache=cache, runner=runner,
            )  # fmt: skip
            if info.is_main:
                failures += bad
                stats = dict((p, s) for p, s in chunk)
                _stage(folder, identity, rows, paths, [stats[p] for p in paths], failures)
                say(f"embedded {min(start + chunk_size, len(todo))} of {len(todo)} images")
                if on_chunk is not None:
                    on_chunk(n)
        if not info.is_main:
            return None
        return _commit(folder, plan, old, identity, failures, precision, inputs, exact_below)


# ------------------------------------------------------------------------------ the plan
def _plan(folder: Path, inputs: Sequence[str], old: Any, identity: dict) -> dict[str, Any]:
    """Which files to keep, reuse from staging, or embed: {"files": [[path, [size, mtime]]],
    "todo": [[path, stat]], "reused": {path: staged file}, counts, failures}."""
    from vitkit.infer.predictor import expand_inputs

    listed, failures = expand_inputs([os.path.abspath(p) for p in inputs])
    files: list[tuple[str, list[int]]] = []
    seen: set[str] = set()
    for path in listed:
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            failures.append((path, exc.strerror or "cannot be read"))
            continue
        if (
            "\n" in path
            or "\r" in path
            or len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES
        ):
            failures.append((path, "the path has a line break or is too long for paths.txt"))
            continue
        files.append((path, [st.st_size, st.st_mtime_ns]))
    before = {}
    if old is not None:
        before = {p: (i, [int(v) for v in old.stats[i]]) for i, p in enumerate(old.paths)}
    staged = _staged_rows(folder, identity)
    todo, reused, counts = [], {}, {"added": 0, "changed": 0, "unchanged": 0}
    for path, stat in files:
        if path in before and before[path][1] == stat:
            counts["unchanged"] += 1
            continue
        counts["changed" if path in before else "added"] += 1
        if (path, tuple(stat)) in staged:
            reused[path] = staged[(path, tuple(stat))]
        else:
            todo.append([path, stat])
    counts["removed"] = len(set(before) - {p for p, _ in files})
    return {"files": files, "todo": todo, "reused": reused, "counts": counts,
            "failures": failures}  # fmt: skip


# ------------------------------------------------------------------------------ staging
def _stage(folder: Path, identity: dict, rows: np.ndarray, paths: list[str],
           stats: list[list[int]], failures: list[tuple[str, str]]) -> None:  # fmt: skip
    """Commit one chunk's rows (normalised, finite only) to the staging area, atomically."""
    if not paths:
        return
    rows = np.asarray(rows, np.float32).reshape(len(paths), -1)
    finite = np.isfinite(rows).all(axis=1)
    for p in np.asarray(paths, dtype=object)[~finite]:
        failures.append((str(p), "the model gave a non-finite embedding (NaN or infinity)"))
    rows, paths = rows[finite], [p for p, ok in zip(paths, finite) if ok]
    stats = [s for s, ok in zip(stats, finite) if ok]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    meta = json.dumps({"fingerprint": identity["fingerprint"], "pool": identity["pool"],
                       "paths": paths, "stats": stats})  # fmt: skip
    name = f"chunk-{time.time_ns():020d}-{os.getpid()}.npz"
    with atomic_path(folder / STAGING / name) as tmp, open(tmp, "wb") as f:
        np.savez(f, rows=rows.astype(np.float32), meta=np.frombuffer(meta.encode(), np.uint8))


def _staged_rows(folder: Path, identity: dict) -> dict[tuple[str, tuple[int, ...]], str]:
    """(path, (size, mtime)) -> staged chunk file, for chunks of this model that read back."""
    out: dict[tuple[str, tuple[int, ...]], str] = {}
    for name, meta, _ in _read_staging(folder, identity, rows=False):
        for path, stat in zip(meta["paths"], meta["stats"]):
            out[(path, tuple(stat))] = name
    return out


def _read_staging(folder: Path, identity: dict, *, rows: bool, names: set[str] | None = None):
    staging = folder / STAGING
    if not staging.is_dir():
        return
    for entry in sorted(staging.iterdir()):
        if (
            not entry.name.endswith(".npz")
            or entry.is_symlink()
            or (names and entry.name not in names)
        ):
            continue
        try:  # a chunk is ours only; anything odd is skipped (and removed at the next commit)
            with zipfile.ZipFile(entry) as archive:  # np.savez stores: no zip bomb inside
                if any(i.compress_type != zipfile.ZIP_STORED for i in archive.infolist()):
                    continue
            with np.load(entry, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                ok = (meta["fingerprint"] == identity["fingerprint"]
                      and meta["pool"] == identity["pool"]
                      and len(meta["paths"]) == len(meta["stats"]))  # fmt: skip
                data = z["rows"] if rows else None
        except Exception:
            continue
        if ok and (data is None or (data.shape == (len(meta["paths"]), identity["dim"])
                                    and np.isfinite(data).all())):  # fmt: skip
            yield entry.name, meta, data


# ------------------------------------------------------------------------------ commit
def _commit(folder: Path, plan: dict, old: Any, identity: dict, failures: list,
            precision: str, inputs: Sequence[str], exact_below: int) -> UpdateReport:  # fmt: skip
    """Write the new generation and switch the manifest to it (the one atomic step)."""
    report = UpdateReport(unchanged=plan["counts"]["unchanged"], removed=plan["counts"]["removed"])
    report.failures = [tuple(f) for f in plan["failures"]] + list(failures)
    new_rows: dict[tuple[str, int, int], np.ndarray] = {}
    for _, meta, data in _read_staging(folder, identity, rows=True):
        for i, (path, stat) in enumerate(zip(meta["paths"], meta["stats"])):
            new_rows[(path, *stat)] = data[i]
    current = {path: stat for path, stat in plan["files"]}
    # the old rows that stay keep their order; new and changed files follow in listing order,
    # so an update that only adds files extends the old graph instead of building it anew
    kept = [] if old is None else [
        i for i, p in enumerate(old.paths) if current.get(p) == [int(v) for v in old.stats[i]]
    ]  # fmt: skip
    kept_paths = {old.paths[i] for i in kept}
    fresh = [(p, s) for p, s in plan["files"] if p not in kept_paths and (p, *s) in new_rows]
    before = set(old.paths) if old is not None else set()
    for path, _ in fresh:
        report.reused += path in plan["reused"]
        report.changed += path in before
        report.added += path not in before
    if not kept and not fresh and old is None:
        why = f" ({report.failures[0][0]}: {report.failures[0][1]})" if report.failures else ""
        raise ConfigError(f"no image could be indexed{why}")
    dim = identity["dim"]
    matrix = np.empty((len(kept) + len(fresh), dim), np.float32)
    for j in range(0, len(kept), 65536):
        matrix[j : min(j + 65536, len(kept))] = old.embeddings[kept[j : j + 65536]]
    for j, (path, stat) in enumerate(fresh, len(kept)):
        matrix[j] = new_rows[(path, *stat)]
    paths = [old.paths[i] for i in kept] + [p for p, _ in fresh]
    stats = [[int(v) for v in old.stats[i]] for i in kept] + [s for _, s in fresh]
    extend = None
    if old is not None and old.kind == "hnsw" and len(kept) == len(old):
        extend = folder / old.manifest["generation"] / FAISS_FILE
    number = int(old.manifest["generation"][1:]) + 1 if old is not None else 1
    gen = f"g{number:06d}"
    with atomic_folder(folder / gen) as tmp:
        with open(tmp / EMBEDDINGS, "wb") as f:
            np.save(f, matrix)
        with open(tmp / STATS, "wb") as f:
            np.save(f, np.asarray(stats, np.int64).reshape(len(stats), 2))
        with open(tmp / PATHS, "wb") as f:
            f.write(b"".join(encode_path(p) for p in paths))
        index, report.note = _build_graph(matrix, tmp / FAISS_FILE, exact_below, extend)
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    manifest = {
        "format": FORMAT, "version": VERSION, "generation": gen, "count": len(paths),
        "dim": dim, "model": identity, "precision": precision, "index": index, "files": files,
        "inputs": [os.path.abspath(p) for p in inputs], "vitkit": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # the commit
    _sweep(folder, keep=gen)
    report.count, report.kind = len(paths), index["kind"]
    return report


def _build_graph(
    matrix: np.ndarray, path: Path, exact_below: int, extend: Path | None = None
) -> tuple[dict, str]:
    """The "index" entry of the manifest, writing the HNSW graph to `path` when one is due:
    the graph at `extend` with the rows it lacks added (the old rows lead `matrix`), or a new
    one."""
    n = len(matrix)
    if n < max(exact_below, 1):
        return {"kind": "exact", "exact_below": exact_below}, ""
    try:
        import faiss
    except ImportError:
        return {"kind": "exact", "exact_below": exact_below}, (
            f"faiss is not installed: {n:,d} rows are searched exactly (pip install "
            "'vitkit[search]' for the HNSW index, much faster at this size)"
        )
    graph = None
    if extend is not None:
        with contextlib.suppress(RuntimeError):
            graph = faiss.read_index(str(extend))
        if graph is not None and (graph.d != matrix.shape[1] or graph.ntotal > n):
            graph = None
    if graph is None:
        graph = faiss.IndexHNSWFlat(matrix.shape[1], HNSW["M"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW["ef_construction"]
    graph.add(np.ascontiguousarray(matrix[graph.ntotal :]))
    faiss.write_index(graph, str(path))
    return {"kind": "hnsw", "exact_below": exact_below, **HNSW}, ""


def _sweep(folder: Path, keep: str) -> None:
    """Remove older generations, unfinished ones and the staging area (all committed now)."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            continue
        stale = (GENERATION.match(entry.name) and entry.name != keep) or entry.name == STAGING
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
    clean_stale_temps(folder)


# ------------------------------------------------------------------------------ locking
@contextlib.contextmanager
def _locked(folder: Path, main: bool):
    """Hold the folder's lock (one writer at a time) and yield the current index or None.
    Refuses a folder that holds something other than a vitkit index."""
    if not main:
        yield None
        return
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file, not an index folder")
    if folder.is_dir() and not (folder / MANIFEST).exists():
        ours = {STAGING, LOCK}
        other = [e.name for e in folder.iterdir()
                 if e.name not in ours and not GENERATION.match(e.name)
                 and not e.name.endswith(".tmp")]  # fmt: skip
        if other:
            raise ConfigError(f"--output {folder} is a folder that is not a vitkit index "
                              f"(it holds {other[0]!r}); choose a new or empty folder")  # fmt: skip
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _flock(folder) as old:
            yield old
    finally:  # a first run that failed before staging anything leaves no folder behind
        if created and not (folder / MANIFEST).exists() and not (folder / STAGING).exists():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _flock(folder: Path):
    try:  # never through a symbolic link planted in the folder
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise SearchIndexError(f"{folder / LOCK}: {exc.strerror}") from None
    with os.fdopen(fd, "r+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchIndexError(f"{folder} is being updated by another vitkit index "
                                   "run; wait for it to finish") from None  # fmt: skip
        try:
            yield open_index(folder) if (folder / MANIFEST).exists() else None
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
