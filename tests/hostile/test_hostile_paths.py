"""Class 2: paths a file names that leave the folder it came from. The outside file is a FIFO
where the test can make one: opening it would block, so a regression times out instead of
passing quietly."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from _hostile import assert_user_error, run_cli, write_image, write_model_folder

from vitkit.checkpoints._safety import check_relative_name, confine
from vitkit.errors import CheckpointError


def _sharded(folder, shard_name):
    """Turn a model folder into a sharded one whose index names `shard_name`."""
    from safetensors.torch import load_file

    keys = list(load_file(str(folder / "model.safetensors")))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, shard_name)})
    )
    return keys


@pytest.mark.parametrize("repo_id", ["org/..", "org/../../etc", "a--b/c", "org/name."])
def test_hub_id_with_dots_is_refused(tmp_path, repo_id):
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", repo_id], cwd=tmp_path)
    assert_user_error(r, "hub id")


def test_hub_cache_index_naming_a_file_outside_is_refused(tmp_path):
    """A hub-cache snapshot whose shard index points four folders up, at a FIFO."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--name" / "snapshots" / ("a" * 40)
    model = write_model_folder(snapshot)
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text("a" * 40)
    _sharded(model, "../../../../secret.safetensors")
    (model / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "secret.safetensors")
    image = write_image(tmp_path / "a.png")
    r = run_cli(
        ["predict", str(image), "--model", "org/name"],
        cwd=tmp_path,
        env={"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")},
    )
    assert_user_error(r, "refusing", "../../../../secret.safetensors")


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_local_index_naming_a_file_outside_is_refused(tmp_path, where):
    model = write_model_folder(tmp_path / "m")
    outside = tmp_path / "secret.safetensors"
    _sharded(model, "../secret.safetensors" if where == "relative" else str(outside))
    shutil.move(model / "model.safetensors", outside)
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(model)])
    assert_user_error(r, "secret.safetensors")


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/etc/passwd", "C:\\x", "..\\x", "~/x", "", "a\0b"],
)
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError):
        check_relative_name(name, "index.json")
    with pytest.raises(CheckpointError):
        confine(name, tmp_path)


def test_confine_follows_symlinks_and_accepts_a_plain_name(tmp_path):
    inner = tmp_path / "folder"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"x")
    (inner / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(CheckpointError, match="outside"):
        confine("link.bin", inner)
    assert confine("sub/model.bin", inner) == inner / "sub" / "model.bin"
    # a hub snapshot links to ../../blobs: allowed inside the repository's cache folder
    assert confine("link.bin", inner, root=tmp_path) == inner / "link.bin"


@pytest.mark.parametrize("repo_id", ["google/vit-base-patch16-224", "bert-base-uncased"])
def test_real_hub_ids_pass(repo_id):
    from vitkit.checkpoints.hub import check_hub_id

    assert check_hub_id(repo_id) == repo_id
