"""Class 5: a user's mistake gives one line on stderr and a non-zero exit, never a traceback;
`--debug` / VITKIT_DEBUG=1 show the traceback; a bug keeps its traceback. Also the attacks
that already fail safely (code in pickles and YAML) stay refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _files import pickle_code_execution, write_cifar
from _hostile import _env, assert_user_error, run_cli, write_image, write_model_folder

from vitkit.errors import CheckpointError


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"num_heads": 0}, "num_heads"), ({"embed_dim": "big"}, "embed_dim"),
     ({"id2label": {"zero": "a", "1": "b", "2": "c"}}, "id2label"),
     ({"image_size": [16]}, "image_size"), ({"global_pool": ["token"]}, "global_pool")],
)  # fmt: skip
def test_bad_config_value_is_one_line(tmp_path, changes, key):
    model = write_model_folder(tmp_path / "m", changes)
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), key)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "\xff\xfe"])
def test_unreadable_preprocessor_config_is_one_line(tmp_path, text):
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_bytes(text.encode("latin-1"))
    image = write_image(tmp_path / "a.png")
    assert_user_error(
        run_cli(["predict", str(image), "--model", str(model)]), "preprocessor_config.json"
    )


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_unreadable_config_json_is_one_line(tmp_path, text):
    model = write_model_folder(tmp_path / "m")
    (model / "config.json").write_bytes(text.encode("latin-1"))
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), "config.json")


@pytest.mark.parametrize(
    "size", ['"big"', '{"height": "224", "width": 224}', "[224]", '{"longest_edge": 5}', "null"]
)
def test_bad_preprocessor_size_is_one_line(tmp_path, size):
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_text(f'{{"size": {size}, "do_resize": true}}')
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(model)])
    if size == "null":  # null means transformers' default size: fine
        assert r.returncode == 0, r.stderr
    else:
        assert_user_error(r, "size")


def test_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path):
    image = write_image(tmp_path / "a.png")
    r = run_cli(
        ["predict", str(image), "--model", "org/not-cached"],
        cwd=tmp_path,
        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")},
    )
    assert_user_error(r, "org/not-cached")


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    model = write_model_folder(tmp_path / "m")
    data = tmp_path / "data"
    for cls in ("0", "1", "2"):
        write_image(data / cls / "x.png")
    (tmp_path / "file.txt").write_text("I am a file")
    out = tmp_path / "file.txt" / "report"
    r = run_cli(["eval", "--model", str(model), "--data", str(data), "--out", str(out)])
    assert_user_error(r, "file.txt")


def test_npz_that_is_not_a_zip_is_one_line(tmp_path):
    bad = tmp_path / "w.npz"
    bad.write_bytes(b"not a zip at all")
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(bad)]), "w.npz")


def test_missing_image_and_folder_without_images_are_one_line_each(tmp_path):
    model = write_model_folder(tmp_path / "m")
    (tmp_path / "empty.png").mkdir()
    r = run_cli(["predict", str(tmp_path / "nope.png"), "--model", str(model)])
    assert_user_error(r, "nope.png")
    r = run_cli(["predict", str(tmp_path / "empty.png"), "--model", str(model)])
    assert_user_error(r, "empty.png")


def test_unknown_preset_is_one_line():
    assert_user_error(run_cli(["info", "vit_nonexistent"]), "vit_nonexistent")


def test_bad_cli_number_is_one_line(tmp_path):
    model = write_model_folder(tmp_path / "m")
    image = write_image(tmp_path / "a.png")
    assert_user_error(
        run_cli(["predict", str(image), "--model", str(model), "--top-k", "0"]), "top-k"
    )


def test_broken_pipe_exits_quietly():
    """`vitkit models | head -1`: the reader is gone before vitkit writes."""
    p = subprocess.Popen(
        [sys.executable, "-m", "vitkit", "models"],
        env=_env(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141
    assert err == ""


@pytest.mark.parametrize("how", ["flag", "flag after command", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    model = write_model_folder(tmp_path / "m", {"num_heads": 0})
    image = write_image(tmp_path / "a.png")
    args = ["predict", str(image), "--model", str(model)]
    env = None
    if how == "flag":
        args = ["--debug", *args]
    elif how == "flag after command":
        args = [*args, "--debug"]
    else:
        env = {"VITKIT_DEBUG": "1"}
    r = run_cli(args, env=env)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ConfigError" in r.stderr and "num_heads" in r.stderr


def test_bugs_keep_their_traceback_and_user_errors_become_one_line():
    from vitkit.cli import _user_error

    assert _user_error(TypeError("bug")) is None
    assert _user_error(OSError("no errno")) is None
    assert _user_error(KeyError("x")) is None
    assert _user_error(CheckpointError("a\nb")) == "a; b"
    err = NotADirectoryError(20, "Not a directory", "/x/file.txt/out")
    assert _user_error(err) == "'/x/file.txt/out': Not a directory; a file stands where a " \
        "folder is needed"  # fmt: skip


# ------------------------------------------------------------------ what holds today: no code runs
def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = write_cifar(tmp_path / "cifar", batch_1=pickle_code_execution(marker))
    model = write_model_folder(tmp_path / "m")
    r = run_cli(["eval", "--model", str(model), "--data", str(data), "--split", "train"])
    assert_user_error(r, "not allowed")
    assert not marker.exists()


def test_torch_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(tmp_path / "evil.pth")])
    assert_user_error(r, "evil.pth", "refusing")
    assert not marker.exists()


def test_yaml_recipe_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    r = run_cli(["train", "--config", str(recipe), "--print-recipe"], cwd=tmp_path)
    assert_user_error(r, "r.yaml")
    assert not marker.exists()


def test_recipe_with_a_string_in_betas_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"betas": ["a", 0.9]}))
    r = run_cli(["train", "--config", str(recipe), "--print-recipe"], cwd=tmp_path)
    assert_user_error(r, "betas")


@pytest.mark.parametrize(
    "arrays",
    [
        {"embedding/kernel": (8, 8, 3, 16)},
        {"embedding/kernel": (8, 8, 3)},
        {"embedding/kernel": (8, 8, 3, 16), "Transformer/encoderblock_7/LayerNorm_0/scale": (16,)},
    ],
    ids=["no blocks", "3-d kernel", "block 7 only"],
)
def test_npz_with_the_wrong_arrays_is_one_line(tmp_path, arrays):
    import numpy as np

    np.savez(tmp_path / "w.npz", **{k: np.zeros(v, np.float32) for k, v in arrays.items()})
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(tmp_path / "w.npz")]), "w.npz")


@pytest.mark.parametrize(
    ("name", "content"),
    [("l.csv", b"path,label\na.png,0\n\xff\xfe"), ("l.json", b"[" * 100_000),
     ("l.json", b'{"path": "a.png", "label": 0}\n[1]'), ("l.csv", b"path,label\n\"a.png,0\n")],
    ids=["not utf-8", "nested", "not an object", "open quote"],
)  # fmt: skip
def test_bad_image_list_is_one_line(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    write_image(tmp_path / "a.png")
    model = write_model_folder(tmp_path / "m")
    assert_user_error(
        run_cli(["eval", "--model", str(model), "--data", str(tmp_path / name)]), name
    )


def test_zero_attention_heads_in_a_transformers_config_is_one_line(tmp_path):
    import vitkit

    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2,
                                image_size=32, num_classes=3)  # fmt: skip
    folder = vitkit.save_pretrained(model, tmp_path / "m", format="hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(folder)])
    assert_user_error(r, "num_attention_heads=0", "at least 1")


COUNTS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
          "patch_size", "image_size", "num_channels"]  # fmt: skip


@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip"])
def test_every_count_of_a_foreign_config_is_checked_before_use(tmp_path, family):
    from test_hostile_wrong_answers import _tiny_family

    import vitkit

    folder = vitkit.save_pretrained(_tiny_family(family), tmp_path / "m", format="hf")
    good = (folder / "config.json").read_text()
    stated = json.loads(good).get("vision_config", json.loads(good))
    for field in [f for f in COUNTS if f in stated]:  # DINOv2 states mlp_ratio, not a size
        for value in (0, -2, 2**70):
            config = json.loads(good)
            holder = config.get("vision_config", config)
            holder[field] = value
            (folder / "config.json").write_text(json.dumps(config))
            with pytest.raises(CheckpointError, match=f"{field}={value}"):
                vitkit.from_pretrained(folder)
