"""`vitkit pretrain`: self-supervised pre-training (SimMIM, MAE, DINO) of a ViT encoder.

The same trainer as `vitkit train` with another objective: every flag of a recipe works
(`--set key=value`), and so do `--resume` and `torchrun --nproc_per_node N -m vitkit pretrain`.
"""

from __future__ import annotations

import argparse

from vitkit.cli.train import STRATEGY, run_recipe

# flag -> recipe key, type, help (defaults: vitkit.train.recipe.pretrain_defaults)
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--data", "data", str, "digits | mnist | a folder of images (default digits)"),
    ("--model", "model", str, "preset (default: vit_digits_patch2_8 / vit_mnist_patch4_28)"),
    ("--image-size", "image_size", int, "resize folder images to this size"),
    ("--epochs", "epochs", int, "number of epochs (100; DINO 150)"),
    ("--batch-size", "batch_size", int, "global batch size (128; DINO 32)"),
    ("--lr", "lr", float, "peak learning rate (1.5e-3; DINO 5e-4)"),
    ("--min-lr", "min_lr", float, "final learning rate (1e-5)"),
    ("--weight-decay", "weight_decay", float, "decoupled weight decay (0.05)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warmup (5)"),
    ("--clip-grad", "clip_grad", float, "max gradient norm (3.0)"),
    ("--seed", "seed", int, "random seed"),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--mask-ratio", "mask_ratio", float, "SimMIM 0.6, MAE 0.75"),
    ("--mask-patch-size", "mask_patch_size", int, "SimMIM mask block in pixels"),
    ("--decoder-dim", "decoder_dim", int, "MAE decoder width (64)"),
    ("--decoder-depth", "decoder_depth", int, "MAE decoder depth (2)"),
    ("--decoder-heads", "decoder_heads", int, "MAE decoder heads (4)"),
    ("--out-dim", "out_dim", int, "DINO prototypes (1024)"),
    ("--local-crops", "local_crops", int, "DINO local crops (6)"),
    ("--momentum-teacher", "momentum_teacher", float, "DINO teacher EMA start (0.996)"),
    ("--teacher-temp", "teacher_temp", float, "DINO teacher temperature (0.04)"),
    ("--warmup-teacher-temp", "warmup_teacher_temp", float, "DINO initial temperature (0.04)"),
    STRATEGY,
)
DEFAULT_MODELS = {"digits": "vit_digits_patch2_8", "mnist": "vit_mnist_patch4_28"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train a ViT encoder without labels (SimMIM, MAE, DINO)",
        description="Pre-train a ViT encoder on images without labels with the same trainer as "
        "`vitkit train`. The run directory holds last/ (the encoder as a model folder, no head) "
        "that `vitkit train --init DIR` fine-tunes. Built-in data sets use their training part "
        "(never the test part) unless --all-data.",
    )
    p.add_argument("--method", choices=("simmim", "mae", "dino"), default="mae")
    p.add_argument("--output", "--out", dest="output", help="run directory")
    for flag, _key, typ, text in _FLAGS:
        p.add_argument(flag, type=typ, help=text)
    p.add_argument("--all-data", action="store_true", help="also use the validation/test images")
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false")
    p.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip images (default: off for digits/mnist, on for folders)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe field, value parsed as YAML (repeatable)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="write into --output even if used")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace):
    from vitkit.train import Recipe
    from vitkit.train.recipe import pretrain_defaults

    changes = {k: getattr(args, k) for _f, k, _t, _h in _FLAGS if getattr(args, k) is not None}
    data = changes.get("data", "digits")
    changes.setdefault("model", DEFAULT_MODELS.get(data))
    if changes["model"] is None:
        from vitkit.errors import ConfigError

        raise ConfigError("pass --model PRESET for a folder of images (see `vitkit models`)")
    builtin = data in DEFAULT_MODELS
    changes.update(
        objective=args.method,
        output=args.output,
        all_data=args.all_data,
        norm_pix_loss=args.norm_pix_loss,
        hflip=args.hflip if args.hflip is not None else not builtin,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    defaults = pretrain_defaults(args.method, small_images=builtin)
    recipe = Recipe.from_dict({**Recipe().to_dict(), **defaults, **changes})
    return recipe.with_overrides(args.overrides) if args.overrides else recipe


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, build_recipe)
