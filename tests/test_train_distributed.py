"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the same
global batch: the data is sharded, gradients are averaged, augmentation is rank-independent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import free_port
from vitkit.train.state import load_state

RECIPE = dict(
    # the plain ViT: a BatchNorm (the default model's convolutional stem) normalises each
    # process's micro-batch, so with it no split of the batch can equal one process
    model="vit_digits_patch2_8",
    model_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
    batch_size=32,
    epochs=1,
    warmup_epochs=0.5,
    progress=False,
    plot=False,
    threads=1,
    drop_path=0.0,
    random_shift=1,
    ema_decay=0.9,
    optimizer="sgd",
    lr=0.05,
    weight_decay=1e-4,
)  # SGD: AdamW would amplify float-order noise on flat losses


def _run(out: Path, nproc: int, **changes) -> None:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**RECIPE, **changes}.items()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    if nproc == 1:
        cmd = [sys.executable, "-m", "vitkit", "train"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "vitkit",
            "train",
        ]
    subprocess.run([*cmd, "--output", str(out), *sets], env=env, check=True, timeout=300)


def test_two_processes_match_one(tmp_path):
    _run(tmp_path / "one", 1)
    _run(tmp_path / "two", 2, accum_steps=2)  # 2 procs x 2 micro-batches x 8 = 32 per step
    a, b = load_state(tmp_path / "one"), load_state(tmp_path / "two")
    assert (
        a["global_step"] == b["global_step"] == 1295 // 32
    )  # the training part less the carved validation
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert abs(a["metrics"][-1]["val_loss"] - b["metrics"][-1]["val_loss"]) < 1e-4
    assert not (tmp_path / "two" / "rank1").exists()
