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
if os.environ.get("FAKE_MEM_AVAILABLE"):  # bytes /proc/meminfo would say
    sharding._mem_available = lambda: int(os.environ["FAKE_MEM_AVAILABLE"])
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


def _launch(
    tmp_path: Path,
    nproc: int,
    spec: dict,
    *args: str,
    check: bool = True,
    env: dict | None = None,
    driver: str = _DRIVER,
) -> subprocess.CompletedProcess:
    path = tmp_path / "driver.py"
    path.write_text(driver)
    env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    cmd = [sys.executable, *(torchrun if nproc > 1 else []), str(path), json.dumps(spec), *args]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(proc.stderr[-3000:])
    return proc


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
                     check=False).returncode  # fmt: skip
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
                 "kill-in-save", check=False).returncode  # fmt: skip
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
    state, acts = sharding.estimate(objective, 8)
    assert state == 16 * sum(p.numel() for p in objective.parameters())
    # the recipe keeps an EMA of the encoder's weights (ema_decay 0.999): 4 bytes a parameter
    state, acts = sharding.estimate(objective, 8, ema=True)
    assert state == 16 * sum(p.numel() for p in objective.parameters()) + 4 * sum(
        p.numel() for p in objective.encoder.parameters()
    )
    # DDP would not fit in 80%, FSDP's half of the state does, with room for the step: auto
    # shards
    need = int((state // 2 + acts) * sharding.HEADROOM)
    assert need + 1 < (state + acts) / sharding.FIT
    assert sharding.choose(auto, two, objective, 8, memory=need + 1) == "fsdp"
    assert "strategy auto: fsdp (DDP would hold" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"too little memory: fsdp would hold .* per process,"):
        sharding.choose(auto, two, objective, 8, memory=need - 1)
    with pytest.raises(ConfigError, match=r"optimizer state and EMA .* \(ema_decay: null\)$"):
        sharding.choose(auto, two, objective, 8, memory=need - 1)


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


# Set up the run of argv[1] as `vitkit train` does, then write what this process holds.
_SETUP = """
import json, os, sys
from vitkit import distributed as D
from vitkit.train import Recipe, trainer
run = trainer.setup(Recipe.from_dict(json.loads(sys.argv[1])))
local = [p.to_local() if hasattr(p, "to_local") else p for p in run.objective.parameters()]
held = sum(p.numel() * p.element_size() for p in local)
peak = next(int(s.split()[1]) * 1024 for s in open("/proc/self/status") if s.startswith("VmHWM"))
with open(os.environ["OUT"] + os.environ["RANK"], "w") as f:
    json.dump({"held": held, "peak": peak}, f)
if run.lock is not None:
    run.lock.release()
D.cleanup(run.info)
"""


def test_fsdp_processes_never_build_the_whole_model(tmp_path):
    """Under FSDP rank 1 builds on the meta device and receives only its shards: after setup it
    holds half the parameters, and its peak RSS is below DDP's rank 1 (which built the model and
    its EMA) by more than the model's size."""
    spec = {**RECIPE, "model_overrides": {"embed_dim": 768, "depth": 8, "num_heads": 8}}
    seen = {}
    for name in ("ddp", "fsdp"):
        _launch(tmp_path, 2, {**spec, "strategy": name, "output": str(tmp_path / name)},
                driver=_SETUP, env={"OUT": str(tmp_path / f"{name}.")})  # fmt: skip
        seen[name] = [json.loads((tmp_path / f"{name}.{r}").read_text()) for r in (0, 1)]
    model = seen["ddp"][1]["held"]
    assert model > 100 * 2**20
    assert abs(seen["fsdp"][1]["held"] - model / 2) < 2**20
    assert seen["fsdp"][1]["peak"] < seen["ddp"][1]["peak"] - model, seen


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A teacher and a distilled student (random weights), saved as model folders."""
    out = tmp_path_factory.mktemp("checkpoints")
    tiny = dict(embed_dim=32, depth=1, num_heads=2, global_pool="token", pos_embed="learned",
                num_classes=10)  # fmt: skip
    torch.manual_seed(1)
    vitkit.save_pretrained(vitkit.create_model("vit_digits_patch2_8", **tiny), out / "teacher")
    student = vitkit.create_model("vit_digits_patch2_8", distilled=True, **tiny)
    vitkit.save_pretrained(student, out / "student")
    return out


@pytest.mark.parametrize("changes", [{"teacher": "teacher"}, {"finetune": "lora", "lora_rank": 4}],
                         ids=["distill", "lora"])  # fmt: skip
def test_init_weights_under_fsdp_match_one_process(tmp_path, checkpoints, changes):
    """From `--init` weights (rank 0 reads them, the other rank gets its shards): DeiT
    distillation with a teacher, and LoRA's adapters drawn with the recipe's seed, train under
    FSDP x 2 to one process's weights."""
    spec = {**RECIPE, "model_overrides": {}, "init": str(checkpoints / "student"), "lr": 0.02}
    spec.update({k: str(checkpoints / v) if k == "teacher" else v for k, v in changes.items()})
    _here({**spec, "output": str(tmp_path / "one")})
    _launch(tmp_path, 2, {**spec, "strategy": "fsdp", "output": str(tmp_path / "fsdp")})
    _assert_same(_weights(tmp_path / "one"), _weights(tmp_path / "fsdp"), atol=1e-6)
    assert abs(_loss(tmp_path / "one") - _loss(tmp_path / "fsdp")) < 1e-6


def test_resume_one_process_under_fsdp(tmp_path, reference):
    """A one-process run that dies at step 6 resumes under FSDP x 2 (1 -> 2) and ends where the
    uninterrupted run ends."""
    run = tmp_path / "one-crashed"
    assert _launch(tmp_path, 1, {**RESUME, "output": str(run)}, "6", check=False).returncode
    assert sharding.find(run)[0] == "state"
    _launch(tmp_path, 2, {"resume": str(run), "strategy": "fsdp"})
    _assert_same(_weights(reference), _weights(run), atol=1e-6)
    assert abs(_loss(reference) - _loss(run)) < 1e-6
    assert sharding.find(run)[0] == "dcp"


@pytest.mark.slow
def test_resume_two_processes_under_four(tmp_path, reference):
    """FSDP x 2 dies at step 6; its sharded checkpoint resumes under FSDP x 4 (2 -> 4)."""
    run = tmp_path / "two-crashed"
    spec = {**RESUME, "strategy": "fsdp", "output": str(run)}
    assert _launch(tmp_path, 2, spec, "6", check=False).returncode
    _launch(tmp_path, 4, {"resume": str(run), "strategy": "fsdp"})
    _assert_same(_weights(reference), _weights(run), atol=1e-6)
    assert abs(_loss(reference) - _loss(run)) < 1e-6


def test_too_little_memory_is_one_line_before_allocating(tmp_path, monkeypatch):
    """MemAvailable below the training state: one process, and both processes of DDP x 2, stop
    at setup with the numbers and what to change (no hang, no OOM kill); no run is left."""
    monkeypatch.setattr(sharding, "_mem_available", lambda: 2**14)
    expected = (rf"too little memory: one process would hold \d+ KiB of parameters, .* "
                rf"{sharding.HEADROOM:g}x that for the step; 16 KiB is available per process on "
                r"cpu\. To fit: shard it \(strategy: fsdp under torchrun\); use more processes")  # fmt: skip
    with pytest.raises(ConfigError, match=expected):
        _here({**RECIPE, "output": str(tmp_path / "one")})
    assert not (tmp_path / "one").exists()
    proc = _launch(tmp_path, 2, {**RECIPE, "strategy": "ddp", "output": str(tmp_path / "two")},
                   check=False, env={"FAKE_MEM_AVAILABLE": str(2**15)})  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("ConfigError: too little memory: ddp would hold") == 2


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2 GB")],
)  # fmt: skip
def test_out_of_memory_in_training_is_one_line(tmp_path, monkeypatch, error):
    from vitkit.train import trainer

    def step_fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "set_lr", step_fails)
    with pytest.raises(ConfigError, match=r"out of memory at global step 1 on cpu \(.*allocate "
                       r".*\)\. To fit: shard it .*grad_checkpointing: true"):  # fmt: skip
        _here({**RECIPE, "output": str(tmp_path / "run")})
