"""`vitkit pretrain`: self-supervised pre-training (SimMIM, MAE, DINO) of a ViT encoder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train a ViT encoder without labels (SimMIM, MAE, DINO)",
        description="Pre-train a ViT encoder on images without labels and save it as a vitkit "
        "folder (config.json + model.safetensors, no head) that `vitkit train --init OUT` "
        "fine-tunes. Built-in data sets use their stratified 80%% train split (seed 0) "
        "unless --all-data.",
    )
    p.add_argument("--method", choices=("simmim", "mae", "dino"), default="mae")
    p.add_argument("--data", default="digits", help="digits | mnist | a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", help="preset (default: vit_digits_patch2_8 / vit_mnist_patch4_28)")
    p.add_argument("--image-size", type=int, help="resize folder images to this size")
    p.add_argument("--all-data", action="store_true", help="also use the test split")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--clip-grad", type=float, default=3.0, help="0 disables clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue from OUT/pretrain_state.pt")
    g = p.add_argument_group("masking (SimMIM, MAE)")
    g.add_argument("--mask-ratio", type=float, help="default 0.6 (SimMIM), 0.75 (MAE)")
    g.add_argument("--mask-patch-size", type=int, help="SimMIM mask block in pixels")
    g.add_argument("--decoder-dim", type=int, default=64, help="MAE decoder width")
    g.add_argument("--decoder-depth", type=int, default=2)
    g.add_argument("--decoder-heads", type=int, default=4)
    g.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false")
    g = p.add_argument_group("DINO")
    g.add_argument("--out-dim", type=int, default=1024, help="prototypes of the DINO head")
    g.add_argument("--local-crops", type=int, default=4)
    g.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip crops (default: off for digits/mnist, on for folders)",
    )
    g.add_argument("--momentum-teacher", type=float, default=0.996)
    g.add_argument("--teacher-temp", type=float, default=0.07)
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from vitkit.train.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        method=args.method,
        data=args.data,
        out=args.out,
        model=args.model,
        image_size=args.image_size,
        all_data=args.all_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad,
        seed=args.seed,
        device=args.device,
        mask_ratio=args.mask_ratio,
        mask_patch_size=args.mask_patch_size,
        decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads,
        norm_pix_loss=args.norm_pix_loss,
        out_dim=args.out_dim,
        local_crops=args.local_crops,
        momentum_teacher=args.momentum_teacher,
        teacher_temp=args.teacher_temp,
        warmup_teacher_temp=args.warmup_teacher_temp,
    )
    metrics = pretrain(cfg, resume=args.resume)
    print(json.dumps(metrics))
    print(f"encoder saved to {cfg.out} (fine-tune: vitkit train --init {cfg.out})")
    return 0
