"""Nearest-neighbour search for `vitkit search`: exact numpy (the baseline a user writes by
hand), FAISS exact (IndexFlatIP), FAISS HNSW (vitkit's index above `EXACT_BELOW` rows) and FAISS
IVF, on synthetic embeddings of dimension 768.

    PYTHONPATH=src python benchmarks/search.py                          # 10k, 100k, 1M
    PYTHONPATH=src python benchmarks/search.py --sizes 10000,100000     # short
    PYTHONPATH=src python benchmarks/search.py --sizes "" --photos 256  # index vs embed only
    PYTHONPATH=src python benchmarks/search.py --sizes 1000000 --keep ~/hnsw  # build once,
        # then re-time the queries on a quieter machine with the same command

The vectors are L2-normalised and structured like image embeddings: 16 broad clusters in a
128-dimensional subspace (spread as wide as the clusters lie apart), plus isotropic noise; a
query's nearest row has cosine about 0.66. Uniform random vectors in 768 dimensions have no
near neighbours at all (no approximate index finds them), and real embeddings have a lower
intrinsic dimension than 128, so these data are on the hard side. Queries are fresh draws
of the same distribution (not in the database). Per size and contender: build seconds, memory
(the index's own bytes: vectors plus graph or lists; numpy: the matrix), queries/s for the
queries 256 at a time at k=10, the median latency of one query at a time (contenders in turn,
rotating order), and recall@10 against the exact answer. At 1M rows the brute-force
contenders answer 256 queries and 20 single ones (each reads 3 GB).

`--photos N` also times `vitkit index` against `vitkit embed` on N real photos (scikit-image's,
each saved as a distinct JPEG crop of 320-640 px) with a ViT-S/16 (random weights: speed does
not depend on them): `embed_paths` vs `update_index` into a fresh folder, round-robin, medians;
and, within each index run, the seconds spent outside `embed_paths` (listing, the model's
fingerprint, staging, the commit) against those inside it: a ratio the machine's load hardly
moves, where two runs of the same work can differ by 2x on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common

K = 10


def synthetic(n: int, dim: int, seed: int, clusters: int = 16, rank: int = 128) -> np.ndarray:
    """(n, dim) float32 unit vectors: cluster centre + spread in a `rank`-dim subspace + noise."""
    basis = np.random.default_rng(0).standard_normal((rank, dim)).astype(np.float32) / rank**0.5
    centres = np.random.default_rng(1).standard_normal((clusters, rank)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        z = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, rank), np.float32)
        x = z @ basis + 0.1 * rng.standard_normal((m, dim), np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_exact(base: np.ndarray):
    """What a user writes: scores = rows @ q, the top k by argpartition."""

    def search(q: np.ndarray, k: int) -> np.ndarray:
        s = q @ base.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)

    return search


def contenders(base: np.ndarray, faiss, efs: list[int], nprobes: list[int], keep: Path | None):
    """name -> (build seconds, memory MiB, search(q, k) -> ids). With `keep`, the HNSW graph
    is written there once built and read back by a later run on the same data (its build
    seconds kept beside it), so the queries can be re-timed on a quieter machine."""
    n, dim = base.shape
    out = {}
    out["numpy exact"] = (0.0, base.nbytes / 2**20, numpy_exact(base))
    kinds = (
        ["faiss HNSW32", "faiss IVF"]
        if n >= 1_000_000
        else ["faiss Flat", "faiss HNSW32", "faiss IVF"]
    )
    for name in kinds:  # at 1M, numpy alone stands for brute force (3 GB less memory)
        t0 = time.perf_counter()
        if name == "faiss Flat":
            index = faiss.IndexFlatIP(dim)
            index.add(base)
        elif name == "faiss HNSW32":
            from vitkit.search.build import HNSW

            stem = f"hnsw-{n}x{dim}-M{HNSW['M']}-efC{HNSW['ef_construction']}"
            saved = keep / f"{stem}.faiss" if keep else None
            if saved and saved.exists():
                index = faiss.read_index(str(saved))
                t0 -= float((keep / f"{stem}.seconds").read_text())
            else:
                index = faiss.IndexHNSWFlat(dim, HNSW["M"], faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = HNSW["ef_construction"]
                index.add(base)
                if saved:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"{stem}.seconds").write_text(f"{time.perf_counter() - t0:.1f}")
                    faiss.write_index(index, str(saved))
                    t0 = time.perf_counter() - float((keep / f"{stem}.seconds").read_text())
        else:
            nlist = int(min(1024, max(16, 4 * n**0.5)))  # k-means beyond 1024 takes long here
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            sample = base[np.random.default_rng(2).choice(n, min(n, 40 * nlist), replace=False)]
            index.train(sample)
            index.add(base)
            name = f"faiss IVF{nlist}"
        seconds = time.perf_counter() - t0
        memory = _file_mib(faiss, index)  # vectors + graph / lists, as index.faiss holds them
        if "HNSW" in name:
            for ef in efs:
                out[f"{name} ef{ef}"] = (seconds, memory, _hnsw(index, ef))
        elif "IVF" in name:
            for p in nprobes:
                out[f"{name} nprobe{p}"] = (seconds, memory, _ivf(index, p))
        else:
            out[name] = (seconds, memory, lambda q, k, index=index: index.search(q, k)[1])
    return out


def _file_mib(faiss, index) -> float:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name) / 2**20


def _hnsw(index, ef):
    def search(q, k):
        index.hnsw.efSearch = ef
        return index.search(q, k)[1]

    return search


def _ivf(index, nprobe):
    def search(q, k):
        index.nprobe = nprobe
        return index.search(q, k)[1]

    return search


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def run_size(
    n: int, dim: int, queries: int, singles: int, faiss, log, efs: list[int], keep: Path | None
) -> list[list[str]]:
    base = synthetic(n, dim, seed=3)
    q = synthetic(queries, dim, seed=4)
    log(f"n={n:,d}: data ready ({base.nbytes / 2**20:,.0f} MiB)")
    exact = numpy_exact(base)
    truth = np.concatenate([exact(q[i : i + 256], K) for i in range(0, queries, 256)])
    found = contenders(base, faiss, efs, [8, 32], keep)
    slow = n >= 1_000_000  # brute force: fewer queries, or the row takes many minutes
    ones = {name: 20 if slow and name.startswith(("numpy", "faiss Flat")) else singles
            for name in found}  # fmt: skip
    lat: dict[str, list[float]] = {name: [] for name in found}
    names = list(found)
    for i in range(singles):  # one query at a time, every contender in turn (rotating order)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            if len(lat[name]) < ones[name]:
                t0 = time.perf_counter()
                found[name][2](q[i : i + 1], K)
                lat[name].append(time.perf_counter() - t0)
    rows = []
    for name, (build_s, size, search) in found.items():
        nq = 256 if slow and name.startswith(("numpy", "faiss Flat")) else queries
        t0 = time.perf_counter()
        ids = np.concatenate([search(q[i : i + 256], K) for i in range(0, nq, 256)])
        qps = nq / (time.perf_counter() - t0)
        rows.append([f"{n:,d}", name, f"{build_s:.2f}", f"{size:.0f}", f"{qps:.0f}",
                     f"{statistics.median(lat[name]) * 1e3:.3f}",
                     f"{recall(ids, truth[:nq]):.4f}"])  # fmt: skip
        log(" | ".join(rows[-1]))
    del base
    gc.collect()
    return rows


def index_vs_embed(photos: int, repeats: int, log) -> list[list[str]]:
    """Seconds of `embed_paths` and of `update_index` (a new folder each time) on one folder."""
    import shutil
    import tempfile

    import skimage.data
    import torch
    from PIL import Image

    import vitkit
    from vitkit.infer.embed import embed_paths
    from vitkit.search import update_index

    root = Path(tempfile.mkdtemp(prefix="vitkit-bench-search-"))
    try:
        names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                 "immunohistochemistry", "retina", "brick", "grass", "gravel")  # fmt: skip
        images = []
        for name in names:
            a = getattr(skimage.data, name)()
            images.append(Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]))
        rng = np.random.default_rng(0)
        (root / "photos").mkdir()
        for i in range(photos):
            im = images[i % len(images)]
            side = int(rng.integers(320, 641))
            x, y = (int(rng.integers(0, max(1, d - side // 2))) for d in im.size)
            im.crop((x, y, x + side, y + side)).save(root / "photos" / f"{i:05d}.jpg", quality=90)
        torch.manual_seed(0)
        vitkit.save_pretrained(vitkit.create_model("vit_small_patch16_224", num_classes=0),
                               root / "model")  # fmt: skip
        resolved = vitkit.resolve(root / "model")
        folder = [str(root / "photos")]
        runs = iter(range(10**6))

        def embed() -> None:
            embed_paths(resolved.model, resolved.processor, folder, batch_size=32)

        inside: list[float] = []  # seconds in embed_paths during each index run
        import vitkit.infer.embed as embed_module

        def timed_embed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return embed_paths(*a, **kw)
            finally:
                inside[-1] += time.perf_counter() - t0

        def index() -> None:
            out = root / f"idx{next(runs)}"
            inside.append(0.0)
            t0 = time.perf_counter()
            embed_module.embed_paths = timed_embed  # update_index imports it at call time
            try:
                update_index(out, folder, resolved, batch_size=32)
            finally:
                embed_module.embed_paths = embed_paths
            outside.append(time.perf_counter() - t0 - inside[-1])
            shutil.rmtree(out)

        outside: list[float] = []

        times = common.round_robin({"vitkit embed": embed, "vitkit index": index},
                                   repeats=repeats, warmup=1)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    e, i = (statistics.median(times[k]) for k in ("vitkit embed", "vitkit index"))
    ratios = [b / a for a, b in zip(times["vitkit embed"], times["vitkit index"])]
    log(f"embed {times['vitkit embed']}, index {times['vitkit index']}")
    own = [o / x for o, x in zip(outside[1:], inside[1:])]  # the index's own work / embedding
    return [[str(photos), f"{e:.2f}", f"{i:.2f}", f"{photos / e:.1f}", f"{photos / i:.1f}",
             f"{(statistics.median(ratios) - 1) * 100:+.1f}%",
             f"{statistics.median(outside[1:]):.2f}", f"{statistics.median(own) * 100:+.1f}%"]]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", default="10000,100000,1000000", help="database sizes, comma-separated"
    )
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and queries/s")
    p.add_argument("--singles", type=int, default=200, help="one-at-a-time queries for latency")
    p.add_argument("--threads", type=int, help="FAISS and BLAS threads (default: all)")
    p.add_argument("--efs", default="64,128,256", help="HNSW efSearch values, comma-separated")
    p.add_argument("--keep", type=Path, help="write each HNSW graph here; read it back next run")
    p.add_argument("--photos", type=int, default=0, help="also time index vs embed on N photos")
    p.add_argument("--repeats", type=int, default=3, help="rounds of index vs embed")
    args = p.parse_args(argv)
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    info = {**common.machine_info(), "faiss": faiss.__version__,
            "faiss simd": faiss.get_compile_options().strip()}  # fmt: skip
    print(common.machine_line(info))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        efs = [int(e) for e in args.efs.split(",")]
        rows += run_size(n, args.dim, args.queries, args.singles, faiss, log, efs, args.keep)
    if rows:
        print(f"dim {args.dim}, k={K}, {args.queries} queries (256 at a time for queries/s), "
              "latency: median of one query at a time")  # fmt: skip
        print(common.format_table(["rows", "index", "build s", "index MiB", "queries/s",
                                   "median ms", "recall@10"], rows))  # fmt: skip
    if args.photos:
        table = index_vs_embed(args.photos, args.repeats, log)
        print(f"\nvitkit index vs vitkit embed, ViT-S/16 fp32, batch 32, {args.repeats} rounds")
        print(common.format_table(["photos", "embed s", "index s", "embed img/s", "index img/s",
                                   "index/embed", "index's own s", "own/embedding"], table))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
