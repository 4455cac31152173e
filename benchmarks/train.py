"""Training throughput: vitkit vs a plain timm VisionTransformer of the same size, same loop.

Same batch, dtype, optimizer (AdamW), loss and data; the two models alternate round by round
after warm-up and the table reports median images/s and the ratio vitkit / timm.

    PYTHONPATH=src python benchmarks/train.py                      # digits + CIFAR-size models
    PYTHONPATH=src python benchmarks/train.py --models vit_digits_patch2_8 --rounds 9
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vitkit


def _timm_twin(config: vitkit.ViTConfig) -> torch.nn.Module:
    import timm

    c = config
    return timm.models.VisionTransformer(
        img_size=c.image_hw,
        patch_size=c.patch_size,
        in_chans=c.in_chans,
        num_classes=c.num_classes,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
        qkv_bias=c.qkv_bias,
        global_pool=c.global_pool,
        drop_path_rate=c.drop_path_rate,
    )


def _step_fn(model, logits_of, x, y, opt, amp):
    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(logits_of(model(x)).float(), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench(name: str, batch: int, steps: int, rounds: int, dtype: str) -> dict:
    config = vitkit.get_config(name, drop_path_rate=0.1)
    torch.manual_seed(0)
    ours = vitkit.create_model(config)
    theirs = _timm_twin(config)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    h, w = config.image_hw
    x = torch.randn(batch, config.in_chans, h, w)
    y = torch.randint(0, config.num_classes, (batch,))
    amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]
    fns = {
        "vitkit": _step_fn(
            ours, lambda o: o.logits, x, y, torch.optim.AdamW(ours.parameters(), lr=1e-3), amp
        ),
        "timm": _step_fn(
            theirs, lambda o: o, x, y, torch.optim.AdamW(theirs.parameters(), lr=1e-3), amp
        ),
    }
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[key].append(batch * steps / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "vitkit": med["vitkit"],
        "timm": med["timm"],
        "ratio": med["vitkit"] / med["timm"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_digits_patch2_8", "vit_tiny_patch4_32"])
    p.add_argument("--batch", type=int, nargs="+", default=[64, 32])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = (args.batch * len(args.models))[: len(args.models)]
    rows = [bench(m, b, args.steps, args.rounds, args.dtype) for m, b in zip(args.models, batches)]
    cpu = platform.processor() or platform.machine()
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch "
        f"{torch.__version__}, {cpu}, {torch.get_num_threads()} threads, "
        f"command: python benchmarks/train.py {' '.join(sys.argv[1:])}"
    )
    print("| model | batch | dtype | vitkit img/s | timm img/s | vitkit / timm |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['vitkit']:.0f} | "
            f"{r['timm']:.0f} | {r['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
