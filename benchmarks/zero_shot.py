"""Zero-shot classification end to end: `vitkit predict --labels`'s library path on a folder of
JPEGs vs transformers' `pipeline("zero-shot-image-classification")` on the same folder.

    PYTHONPATH=src python benchmarks/zero_shot.py --threads 2 --images 32 --rounds 2

The model is a transformers CLIPModel of CLIP ViT-B/32's sizes (random weights, saved with
save_pretrained beside a CLIPImageProcessor and a CLIPTokenizer of OpenAI's vocabulary, taken
from the installed open_clip), so both sides load the same checkpoint, tokenizer and
preprocessing. Each round runs every contender once over the whole folder with the same labels
(vitkit embeds the labels and prepares its precision path once per run, before the timed passes,
and the table gives those seconds apart; the pipeline embeds the labels again for every batch); the table gives the median images/s, the ratio to the pipeline and the largest score
difference from the pipeline's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common
from e2e import HEADERS, PIPELINE, make_folder, vs_pipeline

LABELS = ["astronaut", "cat", "cup of coffee", "rocket", "galaxy", "eye", "colour wheel",
          "microscope slide", "red car", "dog"]  # fmt: skip


def labels(n: int) -> list[str]:
    """`n` labels: the ten above, or the first name of each of the first n ImageNet classes
    (zero-shot ImageNet names its 1000 classes so)."""
    if n <= len(LABELS):
        return LABELS[:n]
    from vitkit.data.labels import imagenet_labels

    names = list(dict.fromkeys(name.split(",")[0] for name in imagenet_labels()))
    return names[:n]


def save_model(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from vitkit.tokenizer import write_clip_vocab

    torch.manual_seed(0)
    config = CLIPConfig(projection_dim=512, vision_config=dict(patch_size=32))  # ViT-B/32
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPTokenizer.from_pretrained(write_clip_vocab(folder / "vocab")).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--labels",
        type=int,
        default=10,
        help="how many labels (10, or up to 1000 ImageNet class names)",
    )
    p.add_argument("--precisions", default="fp32,auto", help="vitkit paths to time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vitkit.infer.precision import describe_machine

    print(common.machine_line(common.machine_info()))
    print(describe_machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="vitkit-zero-shot-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> int:
    from transformers import pipeline

    from vitkit.checkpoints.resolve import resolve
    from vitkit.infer.predictor import Predictor
    from vitkit.infer.zero_shot import classifier_for

    (tmp / "images").mkdir()
    paths = make_folder(tmp / "images", args.images)
    save_model(tmp / "model")
    names = labels(args.labels)
    pipe = pipeline("zero-shot-image-classification", model=str(tmp / "model"), device="cpu")
    resolved = resolve(tmp / "model", text=True)

    contenders = {PIPELINE: lambda: pipe(paths, candidate_labels=names, batch_size=args.batch_size)}
    setup = {PIPELINE: "-"}
    for precision in args.precisions.split(","):
        start = time.perf_counter()  # once per run: the labels' embeddings, the precision path
        classifier = classifier_for(resolved, names, precision=precision)
        predictor = Predictor(classifier, resolved.processor, precision=precision,
                              batch_size=args.batch_size, top_k=len(names))  # fmt: skip
        predictor.runner.calibrate(torch.stack([predictor.load(q) for q in paths[:16]]))
        name = f"vitkit predict {precision}"
        setup[name] = f"{time.perf_counter() - start:.1f}"
        print(f"{name}: {predictor.runner.describe()}", flush=True)
        contenders[name] = lambda pr=predictor: list(pr.predict(paths))
    outputs = {k: fn() for k, fn in contenders.items()}  # warm-up, and the scores
    times = common.round_robin(contenders, repeats=args.rounds, warmup=0)
    scores = {name: [{label: p for _, label, p in g.top_k} for g in out]
              for name, out in outputs.items() if name != PIPELINE}  # fmt: skip
    scores[PIPELINE] = [{d["label"]: d["score"] for d in row} for row in outputs[PIPELINE]]
    rows = [[*row, setup[row[0]]] for row in vs_pipeline(times, scores, len(paths))]
    print(f"{len(paths)} images, {len(names)} labels, batch {args.batch_size}")
    print(common.format_table([*HEADERS, "set-up s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
