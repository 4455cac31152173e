"""`vitkit search idx/ QUERY...`: the indexed photos most like an image, or a text (CLIP, SigLIP).

vitkit search idx/ query.jpg -k 5
vitkit search idx/ --text "a red bicycle" --json
vitkit search idx/ --duplicates --threshold 0.95
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_THRESHOLD = 0.95


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="find the indexed photos like an image or a text, or near-duplicates",
        description="Search an index made by `vitkit index` with query images, a text (CLIP "
        "and SigLIP models), or list groups of near-duplicate images. Scores are cosine "
        "similarities. The model is the index's own (--model must be the same model).",
    )
    p.add_argument("index", metavar="INDEX", help="the folder `vitkit index` wrote")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query image files")
    p.add_argument("--text", nargs="+", metavar="TEXT", help="search for these texts instead")
    p.add_argument("--duplicates", action="store_true",
                   help="print groups of near-duplicate indexed images instead")  # fmt: skip
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"--duplicates: least cosine similarity (default {DEFAULT_THRESHOLD})")  # fmt: skip
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--ef", type=int, metavar="N",
                   help="HNSW indexes: search breadth (default: the index's, 256); larger finds "
                   "more of the exact neighbours, slower")  # fmt: skip
    p.add_argument("--model", "-m", metavar="SOURCE",
                   help="the model that built the index (default: the source it recorded)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.errors import ConfigError
    from vitkit.limits import at_least

    modes = sum([bool(args.queries), args.text is not None, args.duplicates])
    if modes != 1:
        raise ConfigError("give query images, or --text, or --duplicates (one of them)")
    at_least(args.k, 1, "-k")
    at_least(args.ef, 1, "--ef")
    from vitkit.search.index import open_index

    index = open_index(args.index)
    if args.duplicates:
        return _duplicates(args, index)
    encoder = _encoder(args, index)
    failures: list = []
    if args.text is not None:
        labels, rows = list(args.text), encoder.texts(args.text)
    else:
        rows, failures = encoder.images(args.queries)
        bad = {str(s) for s, _ in failures}
        labels = [q for q in args.queries if q not in bad]
    for source, reason in failures:
        print(f"{source}: {reason}", file=sys.stderr)
    scores, hits = index.search(rows, args.k, ef=args.ef)
    if index.note:
        print(f"vitkit search: {index.note}", file=sys.stderr)
    results = [
        {"query": q, "results": [{"path": index.paths[r], "score": round(float(s), 6)}
                                 for s, r in zip(ss, rr) if r >= 0]}
        for q, ss, rr in zip(labels, scores, hits)
    ]  # fmt: skip
    if args.json:
        import json

        errors = [{"query": str(s), "error": e} for s, e in failures]
        print(json.dumps({"results": results, "errors": errors}, indent=1))
    else:
        for i, result in enumerate(results):
            if i or len(results) > 1:
                print(("\n" if i else "") + f"{result['query']}:")
            for hit in result["results"]:
                print(f"{hit['score']:.4f}  {hit['path']}")
    return 1 if failures else 0


def _encoder(args: argparse.Namespace, index):
    from vitkit.checkpoints.resolve import resolve
    from vitkit.distributed import pick_device
    from vitkit.search.query import QueryEncoder

    source = args.model or index.identity.get("source")
    size = index.identity.get("image_size")  # --image-size of vitkit index, if it was given
    size = tuple(size) if isinstance(size, list) and len(size) == 2 else None
    resolved = resolve(source, device=pick_device(args.device), image_size=size,
                       text=args.text is not None)  # fmt: skip
    encoder = QueryEncoder(resolved, pool=index.identity["pool"])
    index.check_model(encoder.identity)
    return encoder


def _duplicates(args: argparse.Namespace, index) -> int:
    groups = index.duplicates(args.threshold)
    if args.json:
        import json

        print(json.dumps({"threshold": args.threshold,
                          "groups": [[index.paths[r] for r in g] for g in groups]}, indent=1))  # fmt: skip
        return 0
    for i, group in enumerate(groups):
        print(("\n" if i else "") + "\n".join(index.paths[r] for r in group))
    n = sum(len(g) for g in groups)
    print(f"{len(groups)} groups of near-duplicates ({n} of {len(index)} images) at cosine "
          f">= {args.threshold}", file=sys.stderr)  # fmt: skip
    return 0
