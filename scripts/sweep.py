"""Per-seed results of `vitkit train` recipes, one real training process per variant and seed.

Each run is a fresh `vitkit train` command, timed from start to exit (evaluation included), a few
at a time. The table gives test accuracy per seed, its mean and standard deviation over seeds,
the mean test loss, the mean validation accuracy of `best/` and the mean wall time.

    # the default digits recipe, seeds 0-2 (the README's per-seed table)
    python scripts/sweep.py --seeds 0,1,2
    # variants: NAME=KEY=VALUE[,KEY=VALUE...] on top of --config (values parsed as YAML)
    python scripts/sweep.py --jobs 2 --variant base= --variant long=epochs=150 \\
        --variant p1=model_overrides.patch_size=1
    python scripts/sweep.py --config configs/mnist.yaml --seeds 0 --out runs/sweep-mnist

Wall times are only comparable between runs made with the same --jobs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    """ "NAME=K=V,K=V" -> (NAME, ["K=V", "K=V"]); commas inside [...] and {...} stay."""
    name, _, sets = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    parts, depth, current = [], 0, ""
    for ch in sets + ",":
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if current:
                parts.append(current)
            current = ""
        else:
            current += ch
    return name, parts


def run_one(cmd: list[str], out: Path, log: Path) -> dict:
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    results = out / "results.json"
    if rc != 0 or not results.is_file():
        return {"seconds": seconds, "error": f"exit {rc}, see {log}"}
    return {"seconds": seconds, **json.loads(results.read_text())}


def table(variants, seeds, results) -> list[str]:
    """Markdown rows: test accuracy per seed, then its mean and standard deviation over seeds
    (one image of a small test split moves a run by a tenth of a point or more, so the spread
    says how far to trust a difference), the mean test loss (less noisy than the accuracy), the
    mean validation accuracy of `best/` and the mean wall time."""
    head = ("| variant | settings | " + " | ".join(f"seed {s}" for s in seeds)
            + " | mean test | sd | test loss | mean val | mean s |")  # fmt: skip
    lines = [head, "|---|---|" + "---:|" * (len(seeds) + 5)]
    for name, sets in variants:
        rows = [r for n, _, r in results if n == name]
        ok = [r for r in rows if "test_acc" in r]
        cells = [f"{r['test_acc']:.2%}" if "test_acc" in r else "failed" for r in rows]
        acc = [r["test_acc"] for r in ok]
        stats = [
            f"{statistics.mean(acc):.2%}" if ok else "-",
            f"{statistics.stdev(acc):.2%}" if len(ok) > 1 else "-",
            f"{statistics.mean(r['test_loss'] for r in ok):.3f}" if ok else "-",
            f"{statistics.mean(r['best_val_acc'] for r in ok):.2%}" if ok else "-",
            f"{statistics.mean(r['seconds'] for r in rows):.0f}",  # every seed ran, even a failed one
        ]
        lines.append(
            f"| {name} | {','.join(sets) or 'as is'} | " + " | ".join(cells + stats) + " |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="recipe YAML (default: the built-in digits recipe)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V,...")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--out", default="runs/sweep")
    args = ap.parse_args(argv)

    variants = [parse_variant(v) for v in args.variant] or [("recipe", [])]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in seeds:  # seed-major: a sweep cut short still has every variant's first seeds
        for name, sets in variants:
            run_dir = out / f"{name}-s{seed}"
            cmd = [sys.executable, "-m", "vitkit", "train", "--seed", str(seed),
                   "--output", str(run_dir), "--overwrite", "--no-progress"]  # fmt: skip
            if args.config:
                cmd += ["--config", args.config]
            for s in [*sets, "plot=false"]:
                cmd += ["--set", s]
            jobs.append((name, seed, cmd, run_dir))

    def work(job):
        name, seed, cmd, run_dir = job
        result = run_one(cmd, run_dir, out / f"{name}-s{seed}.log")
        print(f"{name} seed {seed}: {json.dumps(result)}", flush=True)
        return name, seed, result

    env_jobs = max(1, args.jobs)
    with ThreadPoolExecutor(env_jobs) as pool:
        results = list(pool.map(work, jobs))
    (out / "sweep.json").write_text(json.dumps(
        [{"variant": n, "seed": s, **r} for n, s, r in results], indent=1))  # fmt: skip

    print(f"\n{os.cpu_count()} CPUs, {env_jobs} runs at a time; test accuracy per seed")
    print("\n".join(table(variants, seeds, results)))
    return 0 if all("test_acc" in r for _, _, r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
