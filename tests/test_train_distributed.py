"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the same
global batch: the data is sharded, gradients are averaged, augmentation and DINO's crops are
rank-independent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
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


# `vitkit pretrain`: MAE draws its masks, DINO its crops and flips, for the global batch; DINO's
# head BatchNorm (on, the default) normalises by the global batch's statistics
PRETRAIN = dict(model_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2}, batch_size=64,
                epochs=1, progress=False, plot=False, threads=1, optimizer="sgd", lr=0.05,
                weight_decay=0.0)  # fmt: skip
MAE = dict(PRETRAIN, decoder_dim=16, decoder_depth=1, decoder_heads=2)
DINO = dict(PRETRAIN, out_dim=32, local_crops=2, hflip=True)


def _run(out: Path, nproc: int, command=("train",), recipe=RECIPE, **changes) -> None:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**recipe, **changes}.items()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    cmd = [sys.executable, *(torchrun if nproc > 1 else []), "-m", "vitkit", *command]
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


def test_dino_processes_cut_the_crops_of_one():
    from vitkit import ViTConfig
    from vitkit.train.objectives import DINOObjective

    config = ViTConfig(image_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    dino = DINOObjective(config, out_dim=16, local_crops=2, hflip=True)
    images = torch.rand(8, 1, 8, 8)
    one = dino.views(images, torch.Generator().manual_seed(0))
    dino.shard.world = 2
    two = []
    for rank in range(2):
        dino.shard.rank = rank
        two.append(dino.views(images[4 * rank : 4 * rank + 4], torch.Generator().manual_seed(0)))
    for whole, *halves in zip(one, *two, strict=True):
        assert torch.equal(whole, torch.cat(halves))


@pytest.mark.parametrize(("method", "recipe"), [("mae", MAE), ("dino", DINO)])
def test_pretraining_two_processes_match_one(tmp_path, method, recipe):
    """MAE's masks and DINO's crops are drawn for the global batch and each process keeps its
    rows (DINO averages its center over the processes): two processes train to one's weights."""
    for nproc in (1, 2):
        _run(tmp_path / str(nproc), nproc, ("pretrain", "--method", method), recipe)
    a, b = load_state(tmp_path / "1"), load_state(tmp_path / "2")
    assert a["global_step"] == b["global_step"] == 1437 // 64
    for part in ("model", "objective"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert abs(a["metrics"][-1]["train_loss"] - b["metrics"][-1]["train_loss"]) < 1e-4


def test_lora_two_processes_match_one(tmp_path):
    """LoRA under DDP and FSDP: the frozen weights are no parameters DDP reduces; the adapters
    and the head train to one process's values."""
    lora = dict(RECIPE, finetune="lora", lora_rank=4, lora_targets=["qkv", "fc2"])
    _run(tmp_path / "one", 1, recipe=lora)
    _run(tmp_path / "two", 2, recipe=lora, accum_steps=2, strategy="ddp")
    _run(tmp_path / "fsdp", 2, recipe=lora, accum_steps=2, strategy="fsdp")
    a, b = load_state(tmp_path / "one"), load_state(tmp_path / "two")
    assert sum(".lora_" in k for k in a["model"]) == 4  # 2 targets x (A, B) in the one block
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.lora_b"], torch.zeros(96, 4))
    # FSDP: the adapters sharded beside their frozen weights; last/ has them merged
    merged, sharded = (vitkit.from_pretrained(tmp_path / n / "last").state_dict()
                       for n in ("two", "fsdp"))  # fmt: skip
    for key, value in merged.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-6, msg=key)


def test_two_nodes_rendezvous_on_one_machine(tmp_path):
    """2 nodes x 1 process: two torchrun agents meet through a c10d rendezvous on 127.0.0.1 (as
    two machines would on host0) and train to one process's weights."""
    from vitkit.train import Recipe, train

    n = torch.get_num_threads()
    try:
        train(Recipe.from_dict({**RECIPE, "accum_steps": 2, "output": str(tmp_path / "one")}))
    finally:
        torch.set_num_threads(n)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**RECIPE, "accum_steps": 2}.items()]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    port = free_port()

    def node(rank: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                str(rank), "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{port}", "--rdzv-id", "vitkit-test", "-m", "vitkit", "train",
                "--output", str(tmp_path / "nodes"), *sets]  # fmt: skip

    nodes = [subprocess.Popen(node(rank), env=env) for rank in (0, 1)]
    try:
        assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    finally:
        for node in nodes:
            node.kill()
    a, b = load_state(tmp_path / "one"), load_state(tmp_path / "nodes")
    assert a["global_step"] == b["global_step"] == 1295 // 32
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
