"""End to end: `vitkit predict`'s library path on a folder of JPEGs vs transformers'
`pipeline("image-classification")` on the same folder, in alternating rounds.

    PYTHONPATH=src python benchmarks/e2e.py --threads 2 --images 64 --rounds 2

The model is a transformers ViT-B/16 folder (random weights, saved with save_pretrained and a
ViTImageProcessor), so both sides load the same checkpoint and preprocessing. Each round runs
every contender once over the whole folder (decode, resize, batch, model, top-5); the table
gives the median images/s and the ratio to the pipeline, and the max score difference of each
vitkit path from the pipeline's scores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common


def make_folder(root: Path, n: int) -> list[str]:
    """`n` JPEGs of 640-1150 px cut and scaled from scikit-image's photos."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
             "hubble_deep_field", "retina", "colorwheel"]  # fmt: skip
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = getattr(skimage.data, names[i % len(names)])()[..., :3]
        side = int(rng.integers(640, 1151))
        h = int(side * rng.uniform(0.6, 1.0))
        image = Image.fromarray(a).resize((side, h), Image.BICUBIC)
        path = root / f"{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def save_model(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(num_labels=1000)).eval().save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precisions", default="fp32,auto", help="vitkit paths to time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vitkit.infer.precision import describe_machine

    print(common.machine_line(common.machine_info()))
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="vitkit-e2e-") as tmp:  # gone on return or failure
        return run(args, Path(tmp))


PIPELINE = "transformers pipeline"
HEADERS = ["contender", "img/s", "x pipeline", "top-1 = pipeline", "max |score diff|"]


def vs_pipeline(
    times: dict[str, list[float]], scores: dict[str, list[dict]], images: int
) -> list[list[str]]:
    """A table row per contender: median images/s, the median paired speed-up over the
    pipeline, how often its top-1 is the pipeline's, and its largest score difference from the
    pipeline's (over the classes both report; `scores`: per image, class -> score)."""
    want, rows = scores[PIPELINE], []
    for name, t in times.items():
        diff = same = "-"
        if name != PIPELINE:
            got = scores[name]
            shared = [(w[k], g[k]) for w, g in zip(want, got) for k in w.keys() & g.keys()]
            diff = f"{max(abs(a - b) for a, b in shared):.1e}"
            same = f"{np.mean([max(w, key=w.get) == max(g, key=g.get) for w, g in zip(want, got)]):.0%}"  # fmt: skip
        ratio = common.median([b / s for b, s in zip(times[PIPELINE], t)])
        rows.append([name, f"{images / common.median(t):.2f}", f"{ratio:.2f}", same, diff])
    return rows


def run(args: argparse.Namespace, tmp: Path) -> int:
    """Write the folder and the model under `tmp`, time every contender, print the table."""
    from transformers import pipeline

    from vitkit.checkpoints.resolve import resolve
    from vitkit.infer.predictor import Predictor

    (tmp / "images").mkdir()
    paths = make_folder(tmp / "images", args.images)
    save_model(tmp / "model")

    classify = pipeline("image-classification", model=str(tmp / "model"), device="cpu")
    resolved = resolve(tmp / "model")
    contenders = {PIPELINE: lambda: classify(paths, top_k=5, batch_size=args.batch_size)}
    for precision in args.precisions.split(","):
        predictor = Predictor(resolved.model, resolved.processor, precision=precision,
                              batch_size=args.batch_size, top_k=5)  # fmt: skip
        predictor.runner.calibrate(torch.stack([predictor.load(q) for q in paths[:16]]))
        print(f"vitkit {precision}: {predictor.runner.describe()}", flush=True)
        contenders[f"vitkit predict {precision}"] = (
            lambda pr=predictor: list(pr.predict(paths))
        )  # fmt: skip
    outputs = {k: fn() for k, fn in contenders.items()}  # warm-up, and the scores
    times = common.round_robin(contenders, repeats=args.rounds, warmup=0)
    label2id = classify.model.config.label2id  # compare by class index: vitkit names an
    scores = {  # unlabelled 1000-class model's classes with ImageNet's names, transformers not
        name: [{c: p for c, _, p in g.top_k} for g in out]
        for name, out in outputs.items()
        if name != PIPELINE
    }
    scores[PIPELINE] = [
        {label2id[d["label"]]: d["score"] for d in row} for row in outputs[PIPELINE]
    ]
    print(common.format_table(HEADERS, vs_pipeline(times, scores, len(paths))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
