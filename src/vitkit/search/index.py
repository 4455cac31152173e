"""A search index on disk: read it, check it, search it (the writer is `vitkit.search.build`).

    index = open_index("idx/")
    index.check_model(identity)                  # refuses another model, saying which
    scores, rows = index.search(queries, k=10)   # (Q, k) cosine similarities, row numbers
    paths = [index.paths[r] for r in rows[0] if r >= 0]

The folder (docs/search.md):

    idx/manifest.json          format, version, model identity, counts, index kind, file sizes
    idx/g000003/embeddings.npy (N, D) float32, L2-normalised: one row per image
    idx/g000003/paths.txt      N absolute paths, one per line, in row order
    idx/g000003/stats.npy      (N, 2) int64: each file's size in bytes and mtime in ns
    idx/g000003/index.faiss    the HNSW graph (FAISS), only above the exact-search size
    idx/staging/               rows of an unfinished run, reused by the next one

Everything in the folder is untrusted: the manifest's numbers are checked before anything is
allocated, file names are fixed (never read from the manifest), and a file whose size differs
from the manifest's is refused as truncated, in one line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vitkit import limits
from vitkit.config import read_json
from vitkit.errors import ConfigError, VitkitError

FORMAT = "vitkit-search-index"
VERSION = 1  # the layout above; a newer one is refused, never guessed at
MANIFEST = "manifest.json"
STAGING = "staging"
EMBEDDINGS, PATHS, STATS, FAISS_FILE = "embeddings.npy", "paths.txt", "stats.npy", "index.faiss"
GENERATION = re.compile(r"^g\d{6,12}$")
MAX_PATH_BYTES = 4096  # one line of paths.txt
DEFAULT_EF = 256  # HNSW search breadth of an index that does not state one


class SearchIndexError(VitkitError):
    """An index folder that cannot be read: missing, truncated, another format or version."""


class ModelMismatchError(SearchIndexError):
    """A query or an update with another model than the one the index was built with."""


class Index:
    """An opened index: `paths`, `embeddings` (memory-mapped), `identity`, and `search`.

    Open with `open_index`; nothing here writes to the folder."""

    def __init__(self, folder: Path, manifest: dict[str, Any], embeddings: np.ndarray,
                 paths: list[str], stats: np.ndarray) -> None:  # fmt: skip
        self.folder = folder
        self.manifest = manifest
        self.embeddings = embeddings  # (N, D) float32, read-only
        self.paths = paths
        self.stats = stats  # (N, 2) int64: size, mtime_ns
        self._rows = {p: i for i, p in enumerate(paths)}
        self._faiss: Any = None
        self.note = ""  # a one-line remark for the user (e.g. exact search without faiss)

    # ---- what it is ----------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        """The model the rows came from: source, fingerprint, pool, processor, dim."""
        return self.manifest["model"]

    @property
    def kind(self) -> str:
        """ "exact" (brute force over all rows) or "hnsw" (FAISS graph)."""
        return self.manifest["index"]["kind"]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def row(self, path: str | os.PathLike[str]) -> int | None:
        """The row of an indexed file (absolute path as stored), else None: the server's rule
        for which files it may show."""
        return self._rows.get(os.fspath(path))

    def check_model(self, identity: dict[str, Any]) -> None:
        """Refuse rows of another model or preprocessing (an `identity` of `model_identity`)."""
        check_identity(self.identity, identity, self.folder)

    # ---- search --------------------------------------------------------------------------
    def search(
        self, vectors: np.ndarray, k: int = 10, *, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the `k` nearest rows of each query (Q, D), best first: cosine
        similarities (float32) and row numbers (int64, -1 past the end of a small index).
        Queries are L2-normalised here. `ef`: the HNSW search breadth (default the index's
        `ef_search`; larger finds more of the true neighbours, slower). Safe from threads."""
        q = _queries(vectors, self.dim)
        k = int(k)
        if k < 1:
            raise SearchIndexError(f"k must be at least 1, got {k}")
        n = len(self)
        kk = min(k, n)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        if kk == 0 or len(q) == 0:
            return scores, rows
        graph = self._graph()
        if graph is not None:
            import faiss

            ef = int(ef or self.manifest["index"].get("ef_search", DEFAULT_EF))
            params = faiss.SearchParametersHNSW(efSearch=max(ef, kk))
            s, r = graph.search(q, kk, params=params)
            scores[:, :kk], rows[:, :kk] = s, r
        else:
            scores[:, :kk], rows[:, :kk] = exact_search(self.embeddings, q, kk)
        return scores, rows

    def duplicates(self, threshold: float = 0.95, *, neighbours: int = 32) -> list[list[int]]:
        """Groups of rows whose cosine similarity is at least `threshold` (linked through
        near neighbours: each row looks at its `neighbours` nearest), largest group first,
        each in row order; rows without a near-duplicate are left out."""
        if not -1.0 <= threshold <= 1.0:
            raise SearchIndexError(f"threshold {threshold} is not a cosine similarity in [-1, 1]")
        n = len(self)
        parent = list(range(n))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        k = min(neighbours + 1, n)
        for start in range(0, n, 4096):
            block = np.asarray(self.embeddings[start : start + 4096])
            scores, rows = self.search(block, k)
            for i, (ss, rr) in enumerate(zip(scores, rows), start):
                for s, r in zip(ss, rr):
                    if r >= 0 and r != i and s >= threshold:
                        a, b = find(i), find(int(r))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(find(i), []).append(i)
        return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))

    def _graph(self) -> Any:
        """The FAISS index of an "hnsw" folder (read once), or None: exact search."""
        if self.kind == "exact":
            return None
        if self._faiss is None:
            try:
                import faiss
            except ImportError:
                self.note = ("faiss is not installed: searching all rows exactly "
                             "(pip install 'vitkit[search]' for the HNSW index)")  # fmt: skip
                return None
            path = self.folder / self.manifest["generation"] / FAISS_FILE
            try:
                graph = faiss.read_index(str(path))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
                raise SearchIndexError(f"{path}: not a readable FAISS index ({first}); "
                                       "run vitkit index again to rebuild it") from None  # fmt: skip
            if graph.ntotal != len(self) or graph.d != self.dim:
                raise SearchIndexError(f"{path} holds {graph.ntotal} vectors of {graph.d} "
                                       f"dimensions, the manifest {len(self)} of {self.dim}")  # fmt: skip
            self._faiss = graph
        return self._faiss


def exact_search(
    rows: np.ndarray, q: np.ndarray, k: int, block: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` inner products of queries `q` (Q, D) against `rows` (N, D), in blocks of rows
    (a memory map is read once): what IndexFlatIP computes, in numpy."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(rows), block):
        s = np.asarray(rows[start : start + block]) @ q.T  # (B, Q)
        s = s.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else (
            np.broadcast_to(np.arange(s.shape[1]), s.shape))  # fmt: skip
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cand_r = np.concatenate([best_r, part + start], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, order, 1)
        best_r = np.take_along_axis(cand_r, order, 1)
    return best_s.astype(np.float32), best_r


def _queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(vectors, dtype=np.float32)
    q = q[None] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise SearchIndexError(f"queries of shape {tuple(q.shape)}; the index holds rows of "
                               f"{dim} dimensions")  # fmt: skip
    if not np.isfinite(q).all():
        raise SearchIndexError("a query vector is not finite (NaN or infinity)")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return np.ascontiguousarray(q / np.maximum(norms, 1e-12), dtype=np.float32)


# ------------------------------------------------------------------------------ identity
def check_identity(have: dict[str, Any], want: dict[str, Any], folder: Path | str) -> None:
    """Raise `ModelMismatchError` naming both models when `want` differs from `have`."""
    keys = ("fingerprint", "pool", "processor", "dim")
    differ = [k for k in keys if have.get(k) != want.get(k)]
    if not differ:
        return
    what = "weights" if "fingerprint" in differ else ", ".join(differ)
    raise ModelMismatchError(
        f"{folder} was built with {describe(have)}; {describe(want)} is another model "
        f"({what} differ): search and update it with the model it was built with, or index "
        "into a new folder"
    )


def describe(identity: dict[str, Any]) -> str:
    fp = str(identity.get("fingerprint", "?"))[:12]
    return f"{identity.get('source', '?')} (pool {identity.get('pool')}, weights {fp})"


# ------------------------------------------------------------------------------ reading
def open_index(folder: str | os.PathLike[str], *, verify: bool = True) -> Index:
    """Open the index in `folder`; one-line `SearchIndexError` for anything wrong with it.
    `verify` also checks that every row is finite (reads all of embeddings.npy once)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    gen = folder / manifest["generation"]
    n, dim = manifest["count"], manifest["dim"]
    sizes = manifest["files"]
    names = [EMBEDDINGS, PATHS, STATS] + (
        [FAISS_FILE] if manifest["index"]["kind"] == "hnsw" else []
    )
    for name in names:
        _check_file(gen / name, sizes.get(name))
    embeddings = _read_npy(gen / EMBEDDINGS, (n, dim), np.float32)
    stats = np.asarray(_read_npy(gen / STATS, (n, 2), np.int64))
    paths = _read_paths(gen / PATHS, n)
    if verify:
        for start in range(0, n, 65536):
            if not np.isfinite(embeddings[start : start + 65536]).all():
                raise SearchIndexError(f"{gen / EMBEDDINGS}: a row is not finite (NaN or "
                                       "infinity); run vitkit index again to rebuild it")  # fmt: skip
    return Index(folder, manifest, embeddings, paths, stats)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The checked manifest of `folder` (see the module docstring)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SearchIndexError(f"{folder}: no such index folder (make one with vitkit index)")
    if not path.is_file() or path.is_symlink():
        raise SearchIndexError(f"{folder} is not a vitkit search index (no {MANIFEST})")
    try:
        m = read_json(path, "index manifest", obj=True)
    except ConfigError as exc:
        raise SearchIndexError(f"{exc} (truncated or corrupt? run vitkit index again)") from None
    if m.get("format") != FORMAT:
        raise SearchIndexError(f"{path} is not a vitkit search index manifest")
    version = m.get("version")
    if not limits.is_int(version) or version < 1:
        raise SearchIndexError(f"{path}: unknown format version {version!r}")
    if version > VERSION:
        raise SearchIndexError(f"{path}: format version {version} is newer than this vitkit "
                               f"reads ({VERSION}); upgrade vitkit to open it")  # fmt: skip
    problems = []
    if not isinstance(m.get("generation"), str) or not GENERATION.match(m["generation"]):
        problems.append("generation")
    for key in ("count", "dim"):
        if not limits.is_int(m.get(key)) or m[key] < 0:
            problems.append(key)
    if not isinstance(m.get("model"), dict) or not isinstance(m.get("files"), dict):
        problems.append("model/files")
    index = m.get("index")
    if not isinstance(index, dict) or index.get("kind") not in ("exact", "hnsw"):
        problems.append("index")
    if problems:
        raise SearchIndexError(f"{path}: bad or missing {', '.join(problems)}")
    limits.check(m["dim"], "WIDTH", "dim", str(path))
    return m


def _check_file(path: Path, expected: Any) -> None:
    if path.is_symlink() or not path.is_file():
        raise SearchIndexError(f"{path} is missing; run vitkit index again to rebuild the index")
    size = path.stat().st_size
    if not limits.is_int(expected) or size != expected:
        raise SearchIndexError(f"{path} is truncated or changed ({size:,d} bytes, the manifest "
                               f"says {expected}); run vitkit index again")  # fmt: skip


def _read_npy(path: Path, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """A memory map of a plain .npy of exactly `shape` and `dtype` (little-endian, C order),
    its size checked against the header before mapping."""
    try:
        with open(path, "rb") as f:
            major, minor = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get((major, minor))  # fmt: skip
            if read is None:
                raise ValueError(f"npy version {major}.{minor}")
            got_shape, fortran, got_dtype = read(f, max_header_size=10_000)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise SearchIndexError(f"{path}: not a readable .npy file ({exc})") from None
    want = np.dtype(dtype).newbyteorder("<")
    if tuple(got_shape) != shape or fortran or got_dtype != want:
        raise SearchIndexError(f"{path} holds {got_dtype} {tuple(got_shape)}, the manifest says "
                               f"{want} {shape}")  # fmt: skip
    need = offset + math.prod(shape) * want.itemsize
    if path.stat().st_size != need:
        raise SearchIndexError(f"{path} is truncated ({path.stat().st_size:,d} bytes of {need:,d})")
    if math.prod(shape) == 0:
        return np.zeros(shape, want)
    return np.memmap(path, dtype=want, mode="r", offset=offset, shape=shape)


def _read_paths(path: Path, n: int) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise SearchIndexError(f"{path}: {exc.strerror}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != n:
        raise SearchIndexError(f"{path} lists {len(lines)} paths for {n} rows")
    for line in lines:
        if not os.path.isabs(line) or len(line) > MAX_PATH_BYTES:
            raise SearchIndexError(f"{path}: {line[:80]!r} is not an absolute file path")
    return lines


def encode_path(path: str) -> bytes:
    """One line of paths.txt (the inverse of `_read_paths`)."""
    return path.encode("utf-8", "surrogateescape") + b"\n"
