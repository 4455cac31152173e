"""Whole-process wall times of the `vitkit` command: what a user who runs it once per photo
waits for. Each contender is a fresh process; the rounds alternate them.

    PYTHONPATH=src python benchmarks/coldstart.py --rounds 3 --images 1,16,256

Rows: `vitkit --help` beside `python -c "import torch"` for scale; for each number of JPEGs,
`vitkit predict` of a ViT-B/16 folder (random weights, a transformers folder with its
ViTImageProcessor, as benchmarks/e2e.py saves it) at fp32 and int8, int8 both cold (an empty
cache: convert, calibrate, quantize) and warm (the path prepared by an earlier run,
`vitkit.infer.cache`; a warm OpenVINO path runs without importing torch, `vitkit.infer.warm`),
and bf16 on OpenVINO warm, beside transformers' `pipeline("image-classification")` on the same
folder and timm's way (`create_model` + the transform its data config gives, the loop of
timm's inference.py), each doing the whole job in a fresh process: import, load, decode,
classify, print the top 5. Peak memory is the child's max RSS.
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
from e2e import make_folder, save_model


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
    p.add_argument("--images", default="1,16", help="comma-separated numbers of JPEGs (1,16)")
    args = p.parse_args(argv)
    print(common.machine_line(common.machine_info()), flush=True)
    with tempfile.TemporaryDirectory(prefix="vitkit-coldstart-") as tmp:
        return _bench(args, Path(tmp))


# the same job in a fresh process with the other libraries: classify, print the top 5
PIPELINE_SCRIPT = """
import sys
from transformers import pipeline
classify = pipeline("image-classification", model=sys.argv[1], device="cpu")
for path, top in zip(sys.argv[2:], classify(sys.argv[2:], top_k=5, batch_size=16)):
    print(path, top)
"""
TIMM_SCRIPT = """
import sys, timm, torch
from PIL import Image
model = timm.create_model("vit_base_patch16_224", checkpoint_path=sys.argv[1]).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
paths = sys.argv[2:]
with torch.inference_mode():
    for i in range(0, len(paths), 16):
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + 16]])
        top = model(batch).softmax(-1).topk(5)
        for path, v, c in zip(paths[i:i + 16], top.values, top.indices):
            print(path, v.tolist(), c.tolist())
"""


def _bench(args: argparse.Namespace, tmp: Path) -> int:
    import vitkit
    from vitkit.checkpoints.timm import save_timm

    sizes = [int(n) for n in args.images.split(",")]
    save_model(tmp / "model")
    save_timm(vitkit.from_pretrained(tmp / "model"), str(tmp / "timm.safetensors"))
    (tmp / "images").mkdir()
    images = make_folder(tmp / "images", max(sizes))
    vitkit_cmd = [sys.executable, "-m", "vitkit"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    warm_env = {**env, "VITKIT_CACHE_DIR": str(tmp / "warm-cache")}
    cold_env = {**env, "VITKIT_CACHE_DIR": str(tmp / "cold-cache")}

    def predict(paths: list[str], precision: str, *extra: str) -> list[str]:
        return [*vitkit_cmd, "predict", *paths, "--model", str(tmp / "model"), "--precision",
                precision, "--workers", "2", *extra]  # fmt: skip

    bf16 = ("--backend", "openvino")  # the OpenVINO bf16 path also where bf16 is not native
    run(predict(images[:1], "int8"), warm_env)  # prepares the warm cache once
    run(predict(images[:1], "bf16", *bf16), warm_env)
    rows = {
        'python -c "import torch"': ([sys.executable, "-c", "import torch"], env),
        "vitkit --help": ([*vitkit_cmd, "--help"], env),
    }
    for n in sizes:
        rows[f"{n} image(s): vitkit fp32"] = (predict(images[:n], "fp32"), env)
        rows[f"{n} image(s): vitkit int8, cold"] = (predict(images[:n], "int8"), cold_env)
        rows[f"{n} image(s): vitkit int8, warm"] = (predict(images[:n], "int8"), warm_env)
        rows[f"{n} image(s): vitkit bf16 openvino, warm"] = (
            predict(images[:n], "bf16", *bf16),
            warm_env,
        )
        rows[f"{n} image(s): transformers pipeline"] = (
            [sys.executable, "-c", PIPELINE_SCRIPT, str(tmp / "model"), *images[:n]],
            env,
        )
        rows[f"{n} image(s): timm"] = (
            [sys.executable, "-c", TIMM_SCRIPT, str(tmp / "timm.safetensors"), *images[:n]],
            env,
        )
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
        base = f"{name.split(':')[0]}: vitkit fp32"
        ratio = f"{common.median(t) / common.median(times[base]):.2f}" if base in times else "-"
        lines.append([name, f"{common.median(t):.2f}", ratio, f"{peaks[name]:.0f}"])
    print(common.format_table(["command", "wall s (median)", "x vitkit fp32", "peak MB"], lines))
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
