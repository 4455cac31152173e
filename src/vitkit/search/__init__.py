"""Search a photo collection: an index folder of embeddings (any encoder vitkit loads), exact
or HNSW (FAISS) nearest-neighbour search, near-duplicates, text queries for CLIP / SigLIP.

    from vitkit.search import open_index, update_index, QueryEncoder
    update_index("idx/", ["photos/"], vitkit.resolve("facebook/dinov2-small"))
    index = open_index("idx/")
    encoder = QueryEncoder(vitkit.resolve(index.identity["source"], text="auto"),
                           pool=index.identity["pool"])
    index.check_model(encoder.identity)
    rows, failures = encoder.images(["query.jpg"])
    scores, hits = index.search(rows, k=10)

The folder's format is in docs/search.md. Importing this package loads numpy only: torch with
`update_index` / `QueryEncoder`, faiss with an HNSW index's first search.
"""

from __future__ import annotations

from typing import Any

from vitkit.search.index import (
    VERSION,
    Index,
    ModelMismatchError,
    SearchIndexError,
    exact_search,
    open_index,
)

__all__ = ["VERSION", "Index", "ModelMismatchError", "QueryEncoder", "SearchIndexError",
           "UpdateReport", "exact_search", "model_identity", "open_index", "update_index"]  # fmt: skip

_LAZY = {"QueryEncoder": "vitkit.search.query", "model_identity": "vitkit.search.query",
         "UpdateReport": "vitkit.search.build", "update_index": "vitkit.search.build"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitkit.search' has no attribute {name!r}")
