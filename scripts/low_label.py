"""Does self-supervised pre-training pay off with few labels? One command, the table for digits.

Every run is the `vitkit` command a user would type (in this process, through `vitkit.cli`):

1. `vitkit pretrain --method M` for each method, on the digits training part without labels
   (the validation part included, the test part never), with that method's default recipe.
2. `vitkit train --set label_fraction=0.1 --seed S`: from random weights ("scratch"), and with
   `--init` each pre-trained encoder (plus layer-wise lr decay 0.75), the same budget for every
   arm: 100 epochs, batch 32, the digits recipe otherwise. 10% of the
   training and of the validation labels (stratified, seed 0) are all the labels any run sees;
   best/ is chosen on that validation tenth, and the 360 test images are measured once.

    PYTHONPATH=src python scripts/low_label.py                        # simmim, mae, dino; seeds 0-2
    PYTHONPATH=src python scripts/low_label.py --methods mae --seeds 0 --reuse
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vitkit.cli import main as vitkit

# every arm is this ViT: masked pre-training (SimMIM, MAE) needs patches projected from the
# pixels, so not the convolutional stem of the default `vitkit train` model
ENCODER = ["--model", "vit_digits_patch2_8"]
FINETUNE = ["--epochs", "100", "--batch-size", "32"]  # the same budget for every arm
# pre-trained encoders fine-tune with layer-wise lr decay, as BEiT, MAE and SimMIM do (measured
# here: SimMIM 74.1% without, 82.2% with; from scratch it costs 3.6 points, so scratch has none)
PRETRAINED = ["--set", "layer_decay=0.75"]


def run(args: list[str], out: Path, reuse: bool) -> dict:
    """`vitkit ARGS --output OUT` -> its results.json, unless `reuse` and OUT holds a run this
    script finished (its wall_seconds.txt, written last)."""
    done = out / "wall_seconds.txt"
    if not (reuse and done.is_file()):
        done.unlink(missing_ok=True)
        start = time.perf_counter()
        rc = vitkit([*args, "--output", str(out), "--overwrite", "--no-progress"])
        if rc != 0:
            raise SystemExit(f"vitkit {' '.join(args)} failed ({rc})")
        done.write_text(f"{time.perf_counter() - start:.1f}\n")
    results = out / "results.json"  # pre-training writes none
    return json.loads(results.read_text()) if results.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="simmim,mae,dino")
    ap.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds per arm")
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--out", default="runs/low_label")
    ap.add_argument("--reuse", action="store_true", help="keep runs already in --out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every run (e.g. epochs=1 for a smoke run)")  # fmt: skip
    args = ap.parse_args(argv)
    extra = [a for kv in args.set for a in ("--set", kv)]
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]

    for method in methods:
        run(["pretrain", "--method", method, "--data", "digits", *ENCODER, *extra],
            out / f"pretrain-{method}", args.reuse)  # fmt: skip
    common = ["train", "--data", "digits", *ENCODER, *FINETUNE,
              "--set", f"label_fraction={args.label_fraction}", *extra]  # fmt: skip
    table: dict[str, list[float]] = {}
    for arm in ["scratch", *methods]:
        init = [] if arm == "scratch" else ["--init", str(out / f"pretrain-{arm}"), *PRETRAINED]
        for seed in seeds:
            result = run([*common, *init, "--seed", str(seed)], out / f"{arm}-s{seed}", args.reuse)
            table.setdefault(arm, []).append(result["test_acc"])

    base = statistics.mean(table["scratch"])
    print(f"\ndigits, {args.label_fraction:.0%} of the labels; test accuracy (360 images) per "
          f"fine-tuning seed")  # fmt: skip
    print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs scratch |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for arm, accs in table.items():
        mean = statistics.mean(accs)
        gain = "" if arm == "scratch" else f"{100 * (mean - base):+.1f} points"
        name = arm if arm == "scratch" else f"{arm} pre-trained"
        print(f"| {name} | " + " | ".join(f"{a:.2%}" for a in accs) + f" | {mean:.2%} | {gain} |")
    (out / "table.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
