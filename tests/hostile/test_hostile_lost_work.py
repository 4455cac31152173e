"""Class 3: lost work. Saved files get the user's umask; a save killed with -9 leaves a temporary
file that the next save into that folder removes; SIGTERM removes it at once; a run directory is
never overwritten unless asked (the lead implements that part in `vitkit train`)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from _hostile import _env, assert_user_error, run_cli, run_code

from vitkit._io import atomic_path, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_get_the_umask_not_0600(tmp_path, umask):
    r = run_code(
        f"import os; os.umask({umask})\n"
        "from vitkit._io import atomic_write_text, atomic_path\n"
        f"atomic_write_text({str(tmp_path / 'a.json')!r}, '{{}}')\n"
        f"with atomic_path({str(tmp_path / 'b.bin')!r}) as p:\n"
        "    open(p, 'wb').write(b'x')\n"
    )
    assert r.returncode == 0, r.stderr
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_text(path, '{"a": 1}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 1}


def _writer(path, seconds=60):
    """A child process in the middle of an atomic save (it prints once the temp file exists)."""
    src = (
        "import sys, time\n"
        "from vitkit._io import atomic_open\n"
        "from vitkit.cli import _terminate_on_sigterm\n"
        "_terminate_on_sigterm()\n"
        f"with atomic_open({str(path)!r}) as f:\n"
        "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True)\n"
        f"    time.sleep({seconds})\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", src], env=_env(None), stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "writing"
    return p


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_kill_9_during_a_save_is_cleaned_by_the_next_save(tmp_path):
    p = _writer(tmp_path / "model.safetensors")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert len(_temps(tmp_path)) == 1  # kill -9 cannot be caught
    assert not (tmp_path / "model.safetensors").exists()
    atomic_write_text(tmp_path / "config.json", "{}")  # the next save into that folder
    assert _temps(tmp_path) == []


def test_kill_9_inside_a_librarys_own_temp_file_is_cleaned_by_the_next_save(tmp_path):
    # safetensors' save_file (like onnx and others) writes its own `.tmpXXXXXX` beside the name it
    # is given, then renames it; killed there, that file must not outlive the next save
    src = (
        "import sys, tempfile, time\n"
        "from pathlib import Path\n"
        "import vitkit\n"
        "from vitkit.checkpoints import pretrained\n"
        "def save_file(tensors, filename, metadata=None):\n"
        "    with tempfile.NamedTemporaryFile(dir=Path(filename).parent, prefix='.tmp',\n"
        "                                     delete=False) as f:\n"
        "        f.write(b'x' * 1000); f.flush()\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        "pretrained.save_file = save_file\n"
        "m = vitkit.create_model('vit_tiny_patch16_224', num_classes=3)\n"
        f"vitkit.save_pretrained(m, {str(tmp_path / 'model')!r})\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", src], env=_env(None), stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    import vitkit

    vitkit.save_pretrained(vitkit.create_model("vit_tiny_patch16_224", num_classes=3),
                           tmp_path / "model")  # fmt: skip
    left = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert left == ["config.json", "model.safetensors"]


def test_sigterm_during_a_save_leaves_nothing(tmp_path):
    p = _writer(tmp_path / "model.safetensors")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    assert _temps(tmp_path) == [] and not (tmp_path / "model.safetensors").exists()


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    p = _writer(tmp_path / "model.safetensors")
    try:
        atomic_write_text(tmp_path / "config.json", "{}")
        assert len(_temps(tmp_path)) == 1
    finally:
        p.kill()
        p.wait()


def test_old_temp_files_without_a_pid_are_swept_young_ones_kept(tmp_path):
    from vitkit._io import STALE_SECONDS, clean_stale_temps

    old, young = tmp_path / ".model.bin.abcd1234.tmp", tmp_path / ".model.bin.wxyz5678.tmp"
    other = tmp_path / ".notes.tmp"  # not our naming: never touched
    for f in (old, young, other):
        f.write_bytes(b"x")
    past = time.time() - STALE_SECONDS - 60
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    assert clean_stale_temps(tmp_path) == [old]
    assert young.exists() and other.exists()


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "w.bin") as p:
        p.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def _fake_run(folder):
    (folder / "last").mkdir(parents=True)
    (folder / "last" / "model.safetensors").write_bytes(b"precious")
    (folder / "recipe.json").write_text("{}")


TRAIN = ["train", "--set", "epochs=1", "--set", "plot=false", "--no-progress"]


def test_train_into_an_existing_run_refuses(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    r = run_cli([*TRAIN, "--output", str(run)], cwd=tmp_path)
    assert (run / "last" / "model.safetensors").read_bytes() == b"precious"
    assert_user_error(r, "--overwrite")


def test_default_output_twice_keeps_both_runs(tmp_path):
    for _ in range(2):
        r = run_cli(TRAIN, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2


def test_a_run_directory_locked_by_a_live_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(str(os.getpid()))  # this test process stands for a live run
    r = run_cli([*TRAIN, "--output", str(run), "--overwrite"], cwd=tmp_path)
    assert_user_error(r, str(os.getpid()))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
