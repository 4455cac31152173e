"""Class 6: an output that cannot be written is refused before the work (issue 27, item 4).

Every command that writes checks its output first (`vitkit.cli._args.check_output`): a file on
the path's parent chain, a folder where a file goes (or the reverse), a folder this user may not
write into. Each case also passes a model or data set that would fail to load: the error must
still be the output's, which proves the output was checked first. The CLI runs in-process
(fast); one case runs it as a child process, as a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _hostile import Result, assert_user_error, run_cli, write_image, write_model_folder

from vitkit.cli import main

# command -> argv, given (a model that fails to load, an image, the output)
COMMANDS = {
    "eval": lambda m, img, out: ["eval", "--model", m, "--data", str(img.parent / "nodata"),
                                 "--output", out],
    "embed": lambda m, img, out: ["embed", str(img), "--model", m, "--output", out],
    "export": lambda m, img, out: ["export", m, "--output", out],
    "explain": lambda m, img, out: ["explain", str(img), "--model", m, "--output", out],
    "train": lambda m, img, out: ["train", "--init", m, "--data", str(img.parent / "nodata"),
                                  "--output", out],
    "pretrain": lambda m, img, out: ["pretrain", "--data", str(img.parent / "nodata"),
                                     "--model", "vit_digits_patch2_8", "--output", out],
}  # fmt: skip
FILE_OUTPUT = {"embed": "e.npy", "export": "m.onnx"}  # the others write a folder


def _cli(capsys, argv: list[str]) -> Result:
    code = main(argv)
    out, err = capsys.readouterr()
    return Result(code, out, err)


@pytest.fixture
def broken(tmp_path) -> tuple[str, Path]:
    """A model folder that cannot load (no config.json) and an image."""
    model = tmp_path / "broken-model"
    model.mkdir()
    return str(model), write_image(tmp_path / "a.png")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_file_is_refused_before_the_model(tmp_path, capsys, broken, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub" / FILE_OUTPUT.get(command, "out")
    line = assert_user_error(_cli(capsys, COMMANDS[command](*broken, str(out))), str(out))
    assert f"{blocker} is a file" in line, line
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("command", ["eval", "explain", "train", "pretrain"])
def test_folder_output_that_is_a_file_is_refused(tmp_path, capsys, broken, command):
    out = tmp_path / "results"
    out.write_text("keep me")
    line = assert_user_error(_cli(capsys, COMMANDS[command](*broken, str(out))), str(out))
    assert "is a file, not a folder" in line, line
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("command", ["embed", "export"])
def test_file_output_that_is_a_folder_is_refused(tmp_path, capsys, broken, command):
    out = tmp_path / FILE_OUTPUT[command]
    out.mkdir()
    args = COMMANDS[command](*broken, str(out)) + (["--overwrite"] if command == "embed" else [])
    line = assert_user_error(_cli(capsys, args), str(out))
    assert "is a folder, not a file" in line, line


@pytest.mark.parametrize(
    ("args", "blocked"),
    [(["embed", "--output", "e.npy"], "e.npy.paths.txt"),
     (["export", "--output", "m.xml"], "m.bin")],
)  # fmt: skip
def test_a_second_file_beside_the_output_is_checked_too(tmp_path, capsys, broken, args, blocked):
    (tmp_path / blocked).mkdir()
    model, image = broken
    command, flag, name = args
    argv = [command, str(image), "--model", model] if command == "embed" else [command, model]
    line = assert_user_error(_cli(capsys, [*argv, flag, str(tmp_path / name)]), blocked)
    assert "is a folder" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_output_in_a_read_only_folder_is_refused(tmp_path, capsys, monkeypatch, broken, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the system's answer for `locked` be no
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
            Path(p) != locked and real(p, mode, **kw)))  # fmt: skip
    try:
        out = locked / "new" / FILE_OUTPUT.get(command, "out")
        line = assert_user_error(_cli(capsys, COMMANDS[command](*broken, str(out))), str(out))
        assert f"cannot write into {locked}" in line, line
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("command", ["eval", "embed", "export", "explain"])  # train locks its run
def test_the_check_creates_nothing(tmp_path, capsys, broken, command):
    """A missing output folder is fine, and a command that then fails leaves none behind."""
    out = tmp_path / "new" / "deeper" / FILE_OUTPUT.get(command, "out")
    r = _cli(capsys, COMMANDS[command](*broken, str(out)))
    assert r.returncode == 1
    assert str(out) not in r.stderr, r.stderr  # the error is the model's or the data's
    assert not (tmp_path / "new").exists()


def test_eval_output_under_a_file_is_refused_before_evaluating(tmp_path):
    """The issue's case, as a user runs it: a model and data that work, an output that cannot
    be made; the evaluation must not run (it printed its summary, then failed, before)."""
    model = write_model_folder(tmp_path / "model")
    for c in range(3):
        write_image(tmp_path / "data" / f"class{c}" / "a.png")
    (tmp_path / "results.txt").write_text("")
    out = tmp_path / "results.txt" / "eval"
    r = run_cli(["eval", "--model", str(model), "--data", str(tmp_path / "data"),
                 "--output", str(out)])  # fmt: skip
    assert r.stdout == "", r.stdout  # no summary: nothing was evaluated
    assert_user_error(r, str(out), "is a file")
