"""FSDP2 (train/sharding.py) on two CPU processes (torchrun, gloo): the same weights as DDP and
as one process for every objective, sharded checkpoints that survive kill -9 in the middle of a
save, and resume across world sizes and strategies."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from conftest import SRC, free_port
from test_train_distributed import DINO, MAE, PRETRAIN, RECIPE
from vitkit import distributed as D
from vitkit.errors import CheckpointError, ConfigError
from vitkit.train import Recipe, build_objective, sharding, train

# Train the recipe in argv[1] (JSON); with argv[2] = N, die after optimizer step N (os._exit,
# as a crash); with argv[3] = "kill-in-save", SIGKILL rank 0 in the middle of the sharded save of
# step N instead: after its shards are complete and renamed, before `last` points at them.
_DRIVER = """
import json, os, signal, sys
from vitkit.train import Recipe, train, sharding
spec = json.loads(sys.argv[1])
stop = int(sys.argv[2]) if len(sys.argv) > 2 else 0
resume = spec.pop("resume", None)
if len(sys.argv) > 3:
    swap = sharding._swap_in
    def dying_swap(run_dir, tmp, step):
        if step == kill_step:
            os.rename(tmp, run_dir / f".last-{step:08d}")
            os.kill(os.getpid(), signal.SIGKILL)
        swap(run_dir, tmp, step)
    sharding._swap_in = dying_swap
    stop, kill_step = 0, stop
on_step = (lambda s: s == stop and os._exit(3)) if stop else None
if resume:
    train(None, resume=resume, strategy=spec.get("strategy"), on_step=on_step)
else:
    train(Recipe.from_dict(spec), on_step=on_step)
"""


def _launch(tmp_path: Path, nproc: int, spec: dict, *args: str, check: bool = True) -> int:
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "PYTHONPATH": SRC}
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    cmd = [sys.executable, *(torchrun if nproc > 1 else []), str(driver), json.dumps(spec), *args]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _here(spec: dict) -> None:
    """One process, in this one (no launch)."""
    train(Recipe.from_dict(spec))


def _weights(run: Path, folder: str = "last") -> dict[str, torch.Tensor]:
    return vitkit.from_pretrained(run / folder).state_dict()


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=atol, msg=key)


def _loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["train_loss"]


def test_classify_fsdp_matches_ddp_and_one_process(tmp_path):
    """40 SGD steps (1 epoch, EMA on): last/ and best/ (gathered from the shards) equal DDP's
    and one process's weights, and so do FSDP's with activation checkpointing; the sharded
    last/ is a link to a complete DCP checkpoint."""
    spec = {**RECIPE, "accum_steps": 2}
    _here({**spec, "output": str(tmp_path / "one")})
    for name in ("ddp", "fsdp"):
        _launch(tmp_path, 2, {**spec, "strategy": name, "output": str(tmp_path / name)})
    _launch(tmp_path, 2, {**spec, "strategy": "fsdp", "grad_checkpointing": True,
                          "output": str(tmp_path / "fsdp-checkpointed")})  # fmt: skip
    one, ddp, fsdp = (tmp_path / n for n in ("one", "ddp", "fsdp"))
    for folder in ("last", "best"):
        _assert_same(_weights(ddp, folder), _weights(fsdp, folder), atol=1e-6)
        _assert_same(_weights(one, folder), _weights(fsdp, folder), atol=1e-6)
    _assert_same(_weights(fsdp), _weights(tmp_path / "fsdp-checkpointed"), atol=1e-6)
    assert abs(_loss(ddp) - _loss(fsdp)) < 1e-6
    assert (fsdp / "last").is_symlink() and (fsdp / "last" / ".metadata").is_file()
    assert sharding.find(fsdp)[0] == "dcp" and sharding.find(ddp)[0] == "state"
    assert sorted(p.name for p in fsdp.iterdir() if p.name.startswith(".")) == [".last-00000040"]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "recipe"), [("simmim", PRETRAIN), ("mae", MAE), ("dino", DINO)])
def test_pretraining_fsdp_matches_one_process(tmp_path, method, recipe):
    """SimMIM's and MAE's decoders and DINO's student and EMA teacher (updated on the shards)
    train under FSDP to one process's weights."""
    from vitkit.train.recipe import pretrain_defaults

    spec = {**Recipe().to_dict(), **pretrain_defaults(method, small_images=True), **recipe,
            "objective": method, "model": "vit_digits_patch2_8"}  # fmt: skip
    _here({**spec, "output": str(tmp_path / "one")})
    _launch(tmp_path, 2, {**spec, "strategy": "fsdp", "output": str(tmp_path / "fsdp")})
    _assert_same(_weights(tmp_path / "one"), _weights(tmp_path / "fsdp"), atol=1e-6)
    assert abs(_loss(tmp_path / "one") - _loss(tmp_path / "fsdp")) < 1e-6


RESUME = {**RECIPE, "save_every_steps": 4, "accum_steps": 2}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """RESUME without interruption (one process = FSDP x 2 = DDP x 2, the test above)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    n = torch.get_num_threads()
    try:
        _here({**RESUME, "output": str(out)})
    finally:
        torch.set_num_threads(n)
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def test_resume_across_world_sizes_and_strategies(tmp_path, reference):
    """An FSDP x 2 run that dies at step 6 (checkpoint of step 4) resumes in one process and
    under DDP x 2; a DDP x 2 run resumes under FSDP x 2; each ends where the uninterrupted run
    ends (fp32, 1e-6). A checkpoint of another model is one CheckpointError."""
    crashed = {}
    for first in ("fsdp", "ddp"):
        crashed[first] = run = tmp_path / f"{first}-crashed"
        rc = _launch(tmp_path, 2, {**RESUME, "strategy": first, "output": str(run)}, "6",
                     check=False)  # fmt: skip
        assert rc != 0 and sharding.find(run)[0] == ("dcp" if first == "fsdp" else "state")
    bad = _copy(crashed["fsdp"], tmp_path / "bad")
    one = _copy(crashed["fsdp"], tmp_path / "fsdp-to-one")
    train(None, resume=one, strategy="ddp")  # 2 -> 1
    _launch(tmp_path, 2, {"resume": str(crashed["fsdp"]), "strategy": "ddp"})  # FSDP -> DDP
    _launch(tmp_path, 2, {"resume": str(crashed["ddp"]), "strategy": "fsdp"})  # DDP -> FSDP
    for run in (one, crashed["fsdp"], crashed["ddp"]):
        _assert_same(_weights(reference), _weights(run), atol=1e-6)
        assert abs(_loss(reference) - _loss(run)) < 1e-6, run.name
    assert sharding.find(crashed["ddp"])[0] == "dcp" and sharding.find(one)[0] == "state"

    meta = torch.load(bad / "last" / "trainer.pt", weights_only=True)
    meta["recipe"]["model_overrides"] = {**meta["recipe"]["model_overrides"], "embed_dim": 64}
    torch.save(meta, bad / "last" / "trainer.pt")
    with pytest.raises(CheckpointError, match="does not match this run's model"):
        train(None, resume=bad, strategy="ddp")


def test_kill_during_a_sharded_save_keeps_the_previous_one(tmp_path, reference):
    """SIGKILL in the middle of the save of step 8: last/ still is step 4's checkpoint, whole,
    and the resumed run (one process) ends as the uninterrupted one; the orphaned shards of
    step 8 are swept."""
    run = tmp_path / "run"
    rc = _launch(tmp_path, 2, {**RESUME, "strategy": "fsdp", "output": str(run)}, "8",
                 "kill-in-save", check=False)  # fmt: skip
    assert rc != 0
    assert os.readlink(run / "last") == ".last-00000004"
    assert (run / ".last-00000008" / ".metadata").is_file()  # complete, but never linked
    assert torch.load(run / "last" / "trainer.pt", weights_only=True)["global_step"] == 4
    train(None, resume=run, strategy="ddp")
    _assert_same(_weights(reference), _weights(run), atol=1e-6)
    assert sharding.find(run)[0] == "state"  # one process writes state.pt into last/
    assert [p.name for p in run.iterdir() if p.name.startswith(".last-")] == [".last-00000004"]


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    recipe = Recipe(model="vit_digits_patch2_8", strategy="fsdp", progress=False, plot=False,
                    model_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2})  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="strategy=fsdp shards the model over processes: launch"):
        train(recipe.replace(output=str(tmp_path / "x")))
    objective = build_objective(recipe, vitkit.create_model(recipe.model, num_classes=10))
    two = D.DistInfo(rank=0, world=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="fsdp_cpu_offload moves shards off a GPU"):
        sharding.choose(recipe.replace(fsdp_cpu_offload=True), two, objective, 8)
    with pytest.raises(ConfigError, match="use dtype: bf16"):
        sharding.choose(recipe.replace(dtype="fp16"), two, objective, 8)
    auto = recipe.replace(strategy="auto")
    assert sharding.choose(auto, D.DistInfo(), objective, 8) is None  # one process
    assert sharding.choose(auto, two, objective, 8) == "ddp"
    monkeypatch.setattr(sharding, "device_memory", lambda info: 100_000)
    assert sharding.choose(auto, two, objective, 8) == "fsdp"
    assert "strategy auto: fsdp (DDP would hold" in capsys.readouterr().out


def test_activation_checkpointing_changes_no_gradient(tmp_path):
    """bf16 autocast, drop-path and an EMA: the checkpointed run recomputes each block with the
    RNG state of the first pass, so its weights are the plain run's."""
    spec = {**RECIPE, "dtype": "bf16", "drop_path": 0.1, "label_fraction": 0.3,
            "optimizer": "adamw", "lr": 1e-3}  # fmt: skip
    _here({**spec, "output": str(tmp_path / "plain")})
    _here({**spec, "grad_checkpointing": True, "output": str(tmp_path / "checkpointed")})
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "checkpointed"), atol=0)
    model = vitkit.create_model("vit_digits_patch2_8", depth=3)
    assert sharding.checkpoint_blocks(model) == 3
