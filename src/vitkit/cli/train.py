"""`vitkit train`: train or fine-tune a ViT from a YAML recipe plus command-line overrides.

vitkit train                                   # digits (scikit-learn), the default recipe
vitkit train --config configs/cifar10.yaml --data /data/cifar-10-batches-py
vitkit train --data mnist --model vit_mnist_patch4_28 --epochs 30 --set ema_decay=0.999
vitkit train --resume runs/digits-vit_digits_convstem_patch2_8
vitkit train --init runs/mae --finetune lora --set lora_rank=4
torchrun --nproc_per_node 2 -m vitkit train --config configs/digits.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# flag -> recipe key, type, help (STRATEGY: `vitkit pretrain` has it too)
STRATEGY = ("--strategy", "strategy", str, "under torchrun: ddp | fsdp (sharded) | auto (fsdp if "
            "ddp won't fit)")  # fmt: skip
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--model", "model", str, "preset name (`vitkit models`)"),
    ("--data", "data", str, "digits | mnist | a folder with train/ and val/ | a CIFAR-10 dir"),
    ("--val-data", "val_data", str, "validation folder or list (default: val/ or carved)"),
    ("--test-data", "test_data", str, "test folder or list file (default: test/ inside --data)"),
    ("--init", "init", str, "start from pretrained weights (vitkit dir, hub id, .npz, ...)"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("--batch-size", "batch_size", int, "global batch size"),
    ("--accum-steps", "accum_steps", int, "gradient accumulation steps"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--weight-decay", "weight_decay", float, "decoupled weight decay"),
    ("--optimizer", "optimizer", str, "adamw | sgd"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup length in epochs"),
    ("--image-size", "image_size", int, "training resolution (positions are resampled)"),
    ("--dtype", "dtype", str, "fp32 | bf16 | fp16 autocast"),
    ("--seed", "seed", int, "random seed"),
    ("--output", "output", str, "run directory (default: a fresh runs/<data>-<model>[-N])"),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--teacher", "teacher", str, "DeiT distillation from this classifier (vitkit dir, hub id...)"),
    ("--distillation", "distillation", str, "hard | soft | none (with --teacher)"),
    ("--finetune", "finetune", str, "full | linear (head on a frozen backbone) | lora (adapters)"),
    STRATEGY,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a ViT",
        description="Train a ViT from a recipe (configs/*.yaml) with command-line "
        "overrides. With no arguments: scikit-learn digits, "
        "the default recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", help="YAML recipe (see configs/)")
    for flag, _key, typ, text in _FLAGS:
        p.add_argument(flag, type=typ, help=text)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any recipe field, value parsed as YAML (repeatable), e.g. "
        "--set ema_decay=0.999 --set model_overrides.depth=6",
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint (its saved recipe is used)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="write into --output even if it holds a run"
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit"
    )
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace):
    from vitkit.train.recipe import Recipe

    recipe = Recipe.from_yaml(args.config) if args.config else Recipe()
    changes = {
        key: getattr(args, key)
        for _flag, key, _t, _h in _FLAGS
        if getattr(args, key, None) is not None
    }
    if args.tensorboard:
        changes["tensorboard"] = True
    if args.overwrite:
        changes["overwrite"] = True
    if args.no_progress:
        changes["progress"] = False
    if "model" in changes and changes["model"] != recipe.model:
        # the recipe's model_overrides were written for its own model (re-add with --set)
        changes["model_overrides"] = {}
    if changes:
        recipe = recipe.replace(**changes)
    return recipe.with_overrides(args.overrides) if args.overrides else recipe


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, build_recipe)


def run_recipe(args: argparse.Namespace, build: Callable) -> int:
    """`vitkit train` and `pretrain`: resume `--resume DIR`, else train the recipe `build(args)`
    (`--print-recipe`: print it) once its run directory is known to be writable, before any data
    or model is built (a resumed run's is `vitkit.train`'s to check); then `report`."""
    from vitkit.cli._args import check_output
    from vitkit.train import train

    if args.resume:
        result = train(None, resume=args.resume, device=args.device, strategy=args.strategy)
    else:
        recipe = build(args)
        if getattr(args, "print_recipe", False):
            import yaml

            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        flag = "--output" if args.output else "run directory"
        check_output(recipe.run_dir(), kind="folder", flag=flag)
        result = train(recipe, device=args.device)
    report(result)
    return 0


def report(result) -> None:
    """What a finished run prints (rank 0 only): accuracies, the folders to use next."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"finished {result.steps} steps in {result.seconds:.1f} s")
    if result.best_acc is not None:
        line = (
            f"validation accuracy {100 * result.best_acc:.2f}% (best epoch, chosen on validation)"
        )
        if result.test_acc is not None:
            line += (
                f"; test accuracy {100 * result.test_acc:.2f}% "
                f"(top-5 {100 * result.test_top5:.2f}%, measured once)"
            )
        print(line)
    if result.model_dir is not None:
        print(f"model: {result.model_dir} (fine-tune: vitkit train --init {result.run_dir})")
    print(f"last checkpoint: {result.run_dir / 'last'}  (resume: vitkit train --resume "
          f"{result.run_dir})")  # fmt: skip
