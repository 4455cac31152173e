"""`vitkit train --resume` from a sharded (torch.distributed.checkpoint) run someone handed you:
its `.metadata` pickle, the shard files it names and the values in them are untrusted input.
torch's own reader unpickles `.metadata` with `pickle.load` and non-tensor values with
`weights_only=False`; vitkit's (`vitkit.train._dcp`) runs nothing, reads no file outside the
checkpoint and no slice past a file's end, and answers each with one line."""

from __future__ import annotations

import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _files import pickle_code_execution, pth_lying_storage, pth_zip_bomb
from _hostile import assert_user_error, run_cli, run_code

# One process writes what FSDP writes at a checkpoint (every rank's shards, trainer.pt, the
# `last` link), from a tiny run that has not stepped yet.
_WRITE = """
import json, sys
from vitkit.train import Recipe, trainer
recipe = Recipe.from_dict({**json.loads(sys.argv[1]), "output": sys.argv[2]})
run = trainer.setup(recipe)
run.strategy = "fsdp"
trainer.checkpoint(run, next_step=0)
run.lock.release()
"""
RECIPE = (
    '{"model": "vit_digits_patch2_8", "model_overrides": {"embed_dim": 16, "depth": 1, '
    '"num_heads": 2}, "batch_size": 64, "epochs": 1, "progress": false, "plot": false, '
    '"threads": 1, "optimizer": "adamw"}'
)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sharded") / "run"
    r = run_code(_WRITE, args=[RECIPE, str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "last" / ".metadata").is_file(), sorted(p.name for p in run.rglob("*"))
    return run


def _copy(sharded: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(sharded, run, symlinks=True)
    return run, run / "last"


def _metadata(last: Path):
    return pickle.loads((last / ".metadata").read_bytes())  # the test's own, trusted, copy


def _resume(run: Path):
    return run_cli(["train", "--resume", str(run)])


def test_an_honest_sharded_checkpoint_resumes(sharded, tmp_path):
    run, _ = _copy(sharded, tmp_path)
    r = _resume(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished" in r.stdout + r.stderr


def test_metadata_that_runs_code_is_refused(sharded, tmp_path):
    run, last = _copy(sharded, tmp_path)
    marker = tmp_path / "pwned"
    (last / ".metadata").write_bytes(pickle_code_execution(marker))
    assert_user_error(_resume(run), ".metadata", "os.system", "not allowed")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["../outside.distcp", "/etc/hostname", "missing.distcp"])
def test_metadata_naming_a_file_outside_or_absent_is_refused(sharded, tmp_path, where):
    run, last = _copy(sharded, tmp_path)
    meta = _metadata(last)
    info = next(iter(meta.storage_data.values()))
    shutil.copy(last / info.relative_path, last.parent / "outside.distcp")  # a real shard
    info.relative_path = where
    (last / ".metadata").write_bytes(pickle.dumps(meta))
    line = assert_user_error(_resume(run), ".metadata")
    assert any(w in line for w in ("leaves the folder", "absolute path", "not a shard file"))


def test_a_slice_past_the_end_of_its_shard_is_refused(sharded, tmp_path):
    run, last = _copy(sharded, tmp_path)
    meta = _metadata(last)
    info = next(iter(meta.storage_data.values()))
    info.length = (last / info.relative_path).stat().st_size + 1
    (last / ".metadata").write_bytes(pickle.dumps(meta))
    assert_user_error(_resume(run), ".metadata", "claims bytes")


def _point_at(last: Path, fqn_part: str, data: bytes) -> None:
    """Append `data` to a new shard and point the first entry whose name has `fqn_part` at it."""
    meta = _metadata(last)
    (last / "__9_0.distcp").write_bytes(data)
    index = next(i for i in meta.storage_data if fqn_part in i.fqn)
    info = meta.storage_data[index]
    info.relative_path, info.offset, info.length = "__9_0.distcp", 0, len(data)
    (last / ".metadata").write_bytes(pickle.dumps(meta))


def test_a_value_that_runs_code_is_refused(sharded, tmp_path):
    """The optimizer's hyper-parameters are pickled values (torch.load weights_only=False in
    torch's planner): one that runs code is refused before it runs."""
    run, last = _copy(sharded, tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    pth_lying_storage(evil)  # a valid torch archive, its data.pkl then replaced
    with zipfile.ZipFile(evil) as z:
        names = z.namelist()
        parts = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("data.pkl"))
    parts[pkl] = pickle_code_execution(marker)
    with zipfile.ZipFile(evil, "w") as z:
        for n in names:
            z.writestr(n, parts[n])
    _point_at(last, "param_groups.0.lr", evil.read_bytes())
    line = assert_user_error(_resume(run), "param_groups.0.lr")
    assert "plain data" in line or "not allowed" in line.lower() or "refus" in line.lower()
    assert not marker.exists()


@pytest.mark.parametrize("make", [pth_zip_bomb, pth_lying_storage], ids=["zip-bomb", "lying"])
def test_a_tensor_slice_that_would_allocate_more_than_it_holds_is_refused(sharded, tmp_path, make):
    run, last = _copy(sharded, tmp_path)
    _point_at(last, "exp_avg_sq", make(tmp_path / "t.pth").read_bytes())
    assert_user_error(_resume(run), "__9_0.distcp")
