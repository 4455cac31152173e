"""Does self-supervised pre-training pay off with few labels? (digits, CPU, a few minutes)

1. Split scikit-learn's digits 80/20 (stratified, seed 0); keep 10% of the training labels
   (stratified, seed 0): 144 labelled images.
2. Pre-train an encoder on all 1437 training images without labels (`vitkit pretrain`'s recipe).
3. Fine-tune it on the 144 labelled images, and train the same architecture from random
   weights on the same 144 images with the same budget (identical `finetune` call).
4. Report test accuracy (360 images) of both arms, for a few fine-tuning seeds.

    PYTHONPATH=src python scripts/low_label.py --method mae --pretrain-epochs 100 --out runs/low
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from vitkit import VisionTransformer, from_pretrained
from vitkit.data.builtin import load_builtin
from vitkit.data.datasets import carve
from vitkit.train import PRETRAIN_DEFAULTS, Recipe, train


def finetune(
    model: VisionTransformer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> VisionTransformer:
    """The same supervised recipe for both arms: AdamW, warm-up + cosine, random 1-pixel
    shifts, label smoothing 0.1."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            xb, yb = x[order[i : i + batch_size]], y[order[i : i + batch_size]]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb).logits, yb, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: VisionTransformer, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model.eval()(x).logits.argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="mae", choices=("mae", "simmim", "dino"))
    ap.add_argument("--pretrain-epochs", type=int, default=100)
    ap.add_argument("--finetune-epochs", type=int, default=100)
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm")
    ap.add_argument("--out", default="runs/low_label")
    ap.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/encoder")
    args = ap.parse_args()
    torch.set_num_threads(1)

    train_part, test_part = load_builtin("digits")  # the `vitkit train` split
    _, few = carve(train_part, args.label_fraction)  # stratified, seed 0
    x_train, x_test, y_test = train_part.images, test_part.images, test_part.labels
    x_few, y_few = (few.images - 0.5) / 0.5, few.labels
    x_test = (x_test - 0.5) / 0.5
    enc_dir = f"{args.out}/encoder_{args.method}"
    if not args.skip_pretrain:
        recipe = {**Recipe().to_dict(), **PRETRAIN_DEFAULTS, "objective": args.method,
                  "data": "digits", "output": enc_dir, "epochs": args.pretrain_epochs,
                  "progress": False, "overwrite": True}  # fmt: skip
        train(Recipe.from_dict(recipe))
    results = {"pretrained": [], "scratch": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        pre = from_pretrained(enc_dir, num_classes=10)
        torch.manual_seed(seed)
        scratch = VisionTransformer(pre.config)  # same architecture, random weights
        for name, model in (("pretrained", pre), ("scratch", scratch)):
            finetune(model, x_few, y_few, epochs=args.finetune_epochs, seed=seed)
            results[name].append(accuracy(model, x_test, y_test))
    summary = {k: {"mean": sum(v) / len(v), "runs": v} for k, v in results.items()}
    summary.update(
        method=args.method,
        labelled=len(y_few),
        unlabelled=len(x_train),
        test=len(x_test),
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs,
    )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
