"""Memory and speed of one AdamW step per training strategy (train/sharding.py, train/lora.py).

    python benchmarks/memory.py                                  # ViT-B/16, every row
    python benchmarks/memory.py --model vit_large_patch16_224 --steps 2

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
    from vitkit.presets import create_model
    from vitkit.train import Recipe, build_objective, sharding
    from vitkit.train.lora import apply_finetune
    from vitkit.train.optim import build_optimizer

    recipe = Recipe(model=spec["model"], **spec["changes"])
    info = D.setup("cpu" if spec["device"] == "cpu" else None)
    torch.manual_seed(0)
    model = apply_finetune(create_model(recipe.model, num_classes=1000), recipe)
    objective = build_objective(recipe, model).to(info.device)
    strategy = sharding.choose(recipe, info, objective, spec["batch"])
    if recipe.grad_checkpointing:
        sharding.checkpoint_blocks(objective)
    if strategy == "fsdp":
        sharding.shard(objective, recipe)
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
        net(x, y, None).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between steps
        sharding_sync(info)
        times.append(time.perf_counter() - t0)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

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
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", default="", help="comma-separated row numbers (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine_info, machine_line

    print(machine_line(machine_info(args.device)))
    print(f"{args.model}, 224 px, batch {args.batch} per process, AdamW, fp32, "
          f"{args.steps} steps (median after the first)")  # fmt: skip
    print("| row | peak RSS / process | params + grads + AdamW / process | AdamW state | s/step |")
    print("|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}  # fmt: skip
    wanted = {int(i) for i in args.rows.split(",") if i} or set(range(len(ROWS)))
    for i, (name, nproc, changes) in enumerate(ROWS):
        if i not in wanted:
            continue
        spec = dict(model=args.model, changes=changes, steps=args.steps, batch=args.batch,
                    device=args.device)  # fmt: skip
        launch = [sys.executable]
        if nproc > 1:
            launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                       "--master_addr", "127.0.0.1", "--master_port", str(_port())]  # fmt: skip
        cmd = [*launch, __file__, "--worker", json.dumps(spec)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((s for s in out.stdout.splitlines() if s.startswith("ROW ")), None)
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


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
