"""Whole-process wall times of the `vitkit` command: what a user who runs it once per photo
waits for. Each contender is a fresh process; the rounds alternate them.

    PYTHONPATH=src python benchmarks/coldstart.py --rounds 3

Rows: `vitkit --help` beside `python -c "import torch"` for scale; `vitkit predict` of one
JPEG and of 16 with a ViT-B/16 folder (random weights, saved by `vitkit.save_pretrained`) at
fp32 and int8, int8 both cold (an empty cache: convert, calibrate, quantize) and warm (the path
prepared by an earlier run, `vitkit.infer.cache`). Peak memory is the child's max RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common
from e2e import make_folder


def run(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one child process; raises if it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-500:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="vit_base_patch16_224")
    args = p.parse_args(argv)
    print(common.machine_line(common.machine_info()), flush=True)
    with tempfile.TemporaryDirectory(prefix="vitkit-coldstart-") as tmp:
        return _bench(args, Path(tmp))


def _bench(args: argparse.Namespace, tmp: Path) -> int:
    import vitkit

    vitkit.save_pretrained(vitkit.create_model(args.model), tmp / "model")
    (tmp / "images").mkdir()
    images = make_folder(tmp / "images", 16)
    vitkit_cmd = [sys.executable, "-m", "vitkit"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    warm_env = {**env, "VITKIT_CACHE_DIR": str(tmp / "warm-cache")}
    cold_env = {**env, "VITKIT_CACHE_DIR": str(tmp / "cold-cache")}

    def predict(paths: list[str], precision: str) -> list[str]:
        return [*vitkit_cmd, "predict", *paths, "--model", str(tmp / "model"), "--precision",
                precision, "--workers", "2"]  # fmt: skip

    run(predict(images[:1], "int8"), warm_env)  # prepares the warm cache once
    rows = {
        'python -c "import torch"': ([sys.executable, "-c", "import torch"], env),
        "vitkit --help": ([*vitkit_cmd, "--help"], env),
    }
    for n in (1, 16):
        rows[f"predict {n} image(s) fp32"] = (predict(images[:n], "fp32"), env)
        rows[f"predict {n} image(s) int8, cold"] = (predict(images[:n], "int8"), cold_env)
        rows[f"predict {n} image(s) int8, warm"] = (predict(images[:n], "int8"), warm_env)
    times: dict[str, list[float]] = {k: [] for k in rows}
    peaks: dict[str, float] = {}
    for r in range(args.rounds):
        names = list(rows)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cmd, e = rows[name]
            if "cold" in name:
                shutil.rmtree(tmp / "cold-cache", ignore_errors=True)
            times[name].append(run(cmd, e))
    for name, (cmd, e) in rows.items():  # peak memory, one process each, apart from the rest
        if "cold" in name:
            shutil.rmtree(tmp / "cold-cache", ignore_errors=True)
        peaks[name] = _peak(cmd, e)
    lines = []
    for name, t in times.items():
        base = "predict 1 image(s) fp32" if "1 image" in name else "predict 16 image(s) fp32"
        ratio = (
            "-" if "predict" not in name else f"{common.median(t) / common.median(times[base]):.2f}"
        )
        lines.append([name, f"{common.median(t):.2f}", ratio, f"{peaks[name]:.0f}"])
    print(common.format_table(["command", "wall s (median)", "x fp32", "peak MB"], lines))
    return 0


def _peak(cmd: list[str], env: dict[str, str]) -> float:
    """Peak RSS (MB) of one run of `cmd`, from a wrapper process that has no other child."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(done.stdout.strip()) / 1024


if __name__ == "__main__":
    raise SystemExit(main())
