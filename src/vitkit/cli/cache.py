"""`vitkit cache`: list or clear the precision paths kept by earlier runs (`vitkit.infer.cache`)."""

from __future__ import annotations

import argparse
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="list or clear the prepared precision paths (int8, bf16, ONNX, OpenVINO)",
        description="List the precision paths earlier runs prepared and kept (converted, "
        "quantized, auto's picks), most recently used first, or delete them. The cache is "
        "$VITKIT_CACHE_DIR, else $XDG_CACHE_HOME/vitkit, else ~/.cache/vitkit; it holds at most "
        "$VITKIT_CACHE_MB megabytes (4096), the entries used longest ago going first.",
    )
    p.add_argument("--clear", action="store_true", help="delete every entry")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitkit.infer.cache import Cache, limit_bytes

    cache = Cache()
    if args.clear:
        n = cache.clear()
        print(f"deleted {n} entr{'y' if n == 1 else 'ies'} from {cache.prepared}")
        return 0
    entries = cache.entries()
    total = sum(e["size"] for e in entries)
    print(f"{cache.prepared}: {len(entries)} entries, {total / 2**20:.1f} MB of "
          f"{limit_bytes() / 2**20:.0f} MB")  # fmt: skip
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["used"])) if e["used"] else "?"
        print(f"  {e['path'].name[:12]}  {e['size'] / 2**20:9.1f} MB  used {used}  {e['what']}")
    return 0
