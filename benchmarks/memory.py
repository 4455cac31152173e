"""Memory and speed of one AdamW step per training strategy (train/sharding.py, train/lora.py).

    python benchmarks/memory.py                                  # ViT-B/16, every row
    python benchmarks/memory.py --model vit_large_patch16_224 --steps 2
    python benchmarks/memory.py --model dinov2_giant_patch14_518 --rows 3 --steps 2 --no-ema

Each row is a fresh set of processes (torchrun for x 2, gloo on CPU) that builds the classifier
objective as `vitkit train` does (finetune, strategy, activation checkpointing from a recipe),
runs `--steps` AdamW steps on random 224 px images (batch 2 per process) and reports per process:
peak RSS (CPU; `max_memory_allocated` on a GPU), the bytes of parameters + gradients + optimizer
state it holds (local shards under FSDP), and the median seconds per step after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

AUTO_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "dinov2_giant_patch14_518")
ROWS = (  # name, processes, recipe changes
    ("1 process", 1, {}),
    ("DDP x 2", 2, {"strategy": "ddp"}),
    ("FSDP x 2", 2, {"strategy": "fsdp"}),
    ("FSDP x 2 + checkpointing", 2, {"strategy": "fsdp", "grad_checkpointing": True}),
    ("LoRA rank 8, 1 process", 1, {"finetune": "lora", "lora_rank": 8}),
    ("linear, 1 process", 1, {"finetune": "linear"}),
)


def worker(spec: dict) -> None:
    """One process of one row: build, step, report (rank 0 prints every rank's JSON)."""
    import torch

    from vitkit import distributed as D
    from vitkit.errors import ConfigError
    from vitkit.presets import create_model
    from vitkit.train import Recipe, build_objective, sharding
    from vitkit.train.lora import apply_finetune
    from vitkit.train.optim import build_optimizer

    recipe = Recipe(model=spec["model"], **spec["changes"])
    info = D.setup("cpu" if spec["device"] == "cpu" else None)
    torch.manual_seed(0)

    def make():
        model = create_model(recipe.model, num_classes=1000, image_size=spec["image_size"])
        return build_objective(recipe, apply_finetune(model, recipe)), None

    # the trainer's own path: ranks > 0 build on the meta device under FSDP, every row checks
    # its estimate against the memory available before it allocates
    memory = D.broadcast_object(sharding.device_memory(info), info)
    try:
        objective, _, strategy = sharding.build(recipe, info, make, spec["batch"], memory)
    except ConfigError as exc:
        if info.is_main:
            print(f"ERROR {exc}", flush=True)
        D.cleanup(info)
        return
    model = objective.encoder
    optimizer = build_optimizer(objective, recipe)
    net = objective
    if strategy == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(objective)
    size = model.config.image_hw[0]
    x = torch.randn(spec["batch"], 3, size, size, device=info.device)
    y = torch.randint(0, 1000, (spec["batch"],), device=info.device)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        try:
            net(x, y, None).backward()
        except torch.OutOfMemoryError as exc:  # the trainer's one line (train/trainer.py)
            print(f"ERROR out of memory ({str(exc).splitlines()[0][:150]})", flush=True)
            raise SystemExit(1) from None
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between steps
        sharding_sync(info)
        times.append(time.perf_counter() - t0)

    local = sharding.local
    held = sum(local(p).numel() * local(p).element_size() for p in objective.parameters())
    held += sum(
        local(p.grad).numel() * local(p.grad).element_size()
        for p in objective.parameters()
        if p.grad is not None
    )
    opt = sum(
        local(v).numel() * local(v).element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    if info.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(info.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"rank": info.rank, "peak": peak, "state": held + opt, "optimizer": opt,
           "s_per_step": statistics.median(times[1:] or times), "strategy": strategy}  # fmt: skip
    rows = D.gather_to_main(row, info)
    if info.is_main:
        print("ROW " + json.dumps(rows), flush=True)
    D.cleanup(info)


def sharding_sync(info) -> None:
    import torch

    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="images per process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", default="", help="comma-separated row numbers (default: all)")
    p.add_argument("--no-ema", action="store_true",
                   help="no EMA of the weights (the recipe's default keeps one: 4 bytes a "
                        "parameter, sharded alike)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine_info, machine_line

    print(machine_line(machine_info(args.device)))
    auto_choices(args.batch, args.image_size)
    print(f"{args.model}, {args.image_size} px, batch {args.batch} per process, AdamW, fp32, "
          f"{args.steps} steps (median after the first)")  # fmt: skip
    print("| row | peak RSS / process | params + grads + AdamW / process | AdamW state | s/step |")
    print("|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}  # fmt: skip
    wanted = {int(i) for i in args.rows.split(",") if i} or set(range(len(ROWS)))
    for i, (name, nproc, changes) in enumerate(ROWS):
        if i not in wanted:
            continue
        if args.no_ema:
            changes = {**changes, "ema_decay": None}
        spec = dict(model=args.model, changes=changes, steps=args.steps, batch=args.batch,
                    device=args.device, image_size=args.image_size)  # fmt: skip
        launch = [sys.executable]
        if nproc > 1:
            launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                       "--master_addr", "127.0.0.1", "--master_port", str(_port())]  # fmt: skip
        cmd = [*launch, __file__, "--worker", json.dumps(spec)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((s for s in out.stdout.splitlines() if s.startswith("ROW ")), None)
        error = next((s for s in out.stdout.splitlines() if s.startswith("ERROR ")), None)
        if error is not None:  # the run's own one line: too little memory for this row
            print(f"| {name} | {error[6:]} | | | |", flush=True)
            continue
        if line is None:
            err = (out.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {name} | failed: {err[:150]} | | | |", flush=True)
            continue
        ranks = json.loads(line[4:])
        peak = max(r["peak"] for r in ranks)
        state = max(r["state"] for r in ranks)
        opt = max(r["optimizer"] for r in ranks)
        step = max(r["s_per_step"] for r in ranks)
        print(f"| {name} | {_gib(peak)} | {_gib(state)} | {_gib(opt)} | {step:.2f} |", flush=True)


def auto_choices(batch: int, image_size: int, nproc: int = 2) -> None:
    """What `strategy: auto` picks for ViT-B, ViT-L and ViT-g with `nproc` processes here (the
    models built on the meta device: nothing is allocated)."""
    import torch

    from vitkit import distributed as D
    from vitkit.errors import ConfigError
    from vitkit.presets import create_model
    from vitkit.train import Recipe, build_objective, sharding

    memory = sharding._mem_available() // nproc
    for name in AUTO_MODELS:
        recipe = Recipe(model=name, strategy="auto")
        with torch.device("meta"):
            model = create_model(name, num_classes=1000, image_size=image_size)
            objective = build_objective(recipe, model)
        print(f"{name} x {nproc} processes, batch {batch}: ", end="", flush=True)
        try:
            sharding.choose(recipe, D.DistInfo(rank=0, world=nproc), objective, batch, memory)
        except ConfigError as exc:
            print(exc, flush=True)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
