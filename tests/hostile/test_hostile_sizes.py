"""Class 1: a small file asks for a huge allocation or endless work. Each case runs the CLI as a
user would, in a child process under an address-space limit: the file must be refused with one
line naming the file or field and the limit, before anything big is allocated."""

from __future__ import annotations

import json

import pytest
from _files import (
    npz_bomb,
    npz_lying_header,
    pickle_giant_bytearray,
    pickle_giant_bytes_length,
    pickle_giant_reconstruct,
    pickle_ndarray_call,
    pth_lying_storage,
    pth_zip_bomb,
    small_npz,
    write_cifar,
)
from _hostile import assert_user_error, run_cli, run_code, write_image, write_model_folder

from vitkit.errors import CheckpointError

CONFIG_BOMBS = [
    ({"depth": 10**6}, "depth"),
    ({"embed_dim": 10**9, "num_heads": 1}, "embed_dim"),
    ({"num_heads": 10**6, "embed_dim": 10**6}, "embed_dim"),
    ({"image_size": 10**6}, "image_size"),
    ({"image_size": [16, 10**7]}, "image_size"),
    ({"num_classes": 10**9}, "num_classes"),
    ({"num_register_tokens": 10**8}, "num_register_tokens"),
    ({"mlp_ratio": 1e7}, "mlp"),
    ({"patch_size": 1, "image_size": 8192}, "patches"),
    ({"patch_size": 4096, "image_size": 4096}, "patch_size"),
    ({"in_chans": 10**7}, "in_chans"),
    ({"head": "mlp", "head_hidden_dim": 10**9}, "head_hidden_dim"),
    ({"depth": 200, "embed_dim": 16384, "num_heads": 128}, "parameters"),
]


@pytest.mark.parametrize(("changes", "field"), CONFIG_BOMBS, ids=[f for _, f in CONFIG_BOMBS])
def test_config_asking_for_a_huge_model_is_refused(tmp_path, changes, field):
    model = write_model_folder(tmp_path / "m", changes)
    image = write_image(tmp_path / "a.png")
    line = assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), field)
    assert "limit" in line or "must" in line


def test_limit_is_configurable_by_environment(tmp_path):
    """Lowered below a built-in preset (depth 32 at most) a limit would refuse that preset."""
    model = write_model_folder(tmp_path / "m", {"depth": 41})
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(model)], env={"VITKIT_MAX_DEPTH": "40"})
    assert_user_error(r, "depth", "VITKIT_MAX_DEPTH")


def test_bad_limit_in_environment_warns_once_and_keeps_the_default(tmp_path):
    model = write_model_folder(tmp_path / "m")
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(model)], env={"VITKIT_MAX_DEPTH": "lots"})
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        "vitkit: warning: VITKIT_MAX_DEPTH='lots' is not a positive integer; using the default 256"
    ]


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"size": {"height": 12000, "width": 12000}}, ["size"]),
        ({"size": {"shortest_edge": 100_000}}, ["resize"]),
        ({"do_center_crop": True, "crop_size": {"height": 9000, "width": 9000}}, ["crop_size"]),
        ({"size": 10**9}, ["size"]),
    ],
)
def test_preprocessor_asking_for_a_huge_resize_is_refused(tmp_path, config, words):
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_text(json.dumps(config))
    image = write_image(tmp_path / "a.png")
    assert_user_error(
        run_cli(["predict", str(image), "--model", str(model)]), "preprocessor_config", *words
    )


def test_shortest_edge_resize_of_a_thin_strip_fails_that_image_only(tmp_path):
    """shortest_edge 224 on a 20000 x 1 strip would be 224 x 4.5 million pixels."""
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": 16})
    )
    strip = write_image(tmp_path / "strip.png", (20000, 1))
    line = assert_user_error(run_cli(["predict", str(strip), "--model", str(model)]), "strip.png")
    assert "limit" in line


def test_timm_crop_pct_tiny_is_refused():
    r = run_code(
        "from vitkit import ImageProcessor\n"
        "ImageProcessor.from_timm_cfg({'input_size': (3, 224, 224), 'crop_pct': 1e-9})"
    )
    assert r.returncode == 1 and "ConfigError" in r.stderr and "resize" in r.stderr
    assert "MemoryError" not in r.stderr


def test_npz_whose_zip_directory_claims_gigabytes_is_refused(tmp_path):
    bomb = npz_bomb(tmp_path / "bomb.npz")
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(bomb)]), "bomb.npz", "zip")


def test_pth_zip_bomb_is_refused_through_the_api(tmp_path):
    import vitkit

    bomb = pth_zip_bomb(tmp_path / "bomb.pth")  # a few hundred bytes claiming 3 GiB
    with pytest.raises(CheckpointError, match=r"bomb\.pth.*zip bomb"):
        vitkit.from_pretrained(bomb, model_name="vit_tiny_patch16_224")


def test_pytorch_model_bin_zip_bomb_in_a_folder_is_refused_by_the_cli(tmp_path):
    folder = write_model_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    pth_zip_bomb(folder / "pytorch_model.bin")
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(folder)])
    assert_user_error(r, "pytorch_model.bin", "zip bomb")


def test_pth_whose_pickle_declares_more_than_its_records_is_refused(tmp_path):
    import vitkit

    liar = pth_lying_storage(tmp_path / "liar.pth")
    with pytest.raises(CheckpointError, match=r"liar\.pth: storage '0' declares 1,073,741,824"):
        vitkit.from_pretrained(liar, model_name="vit_tiny_patch16_224")


def test_pth_over_the_checkpoint_and_pickle_limits_is_refused(tmp_path, monkeypatch):
    import torch

    import vitkit

    path = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    monkeypatch.setenv("VITKIT_MAX_CHECKPOINT_BYTES", "1000")
    with pytest.raises(CheckpointError, match="VITKIT_MAX_CHECKPOINT_BYTES"):
        vitkit.from_pretrained(path, model_name="vit_tiny_patch16_224")
    monkeypatch.delenv("VITKIT_MAX_CHECKPOINT_BYTES")
    monkeypatch.setenv("VITKIT_MAX_PICKLE_BYTES", "10")
    with pytest.raises(CheckpointError, match="VITKIT_MAX_PICKLE_BYTES"):
        vitkit.from_pretrained(path, model_name="vit_tiny_patch16_224")


def test_pre_zip_torch_pickle_is_refused_in_one_line(tmp_path):
    import torch

    path = tmp_path / "old.pth"  # the pre-1.6 format streams the sizes it declares
    torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    image = write_image(tmp_path / "a.png")
    r = run_cli(["predict", str(image), "--model", str(path)])
    assert_user_error(r, "old.pth", "zip format")


def test_npy_header_lying_about_its_shape_is_refused(tmp_path):
    liar = npz_lying_header(tmp_path / "liar.npz")
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(liar)]), "liar.npz", "header")


def test_npz_over_the_checkpoint_limit_is_refused(tmp_path):
    npz = small_npz(tmp_path / "w.npz")
    image = write_image(tmp_path / "a.png")
    r = run_cli(
        ["predict", str(image), "--model", str(npz)], env={"VITKIT_MAX_CHECKPOINT_BYTES": "1000"}
    )
    assert_user_error(r, "w.npz", "VITKIT_MAX_CHECKPOINT_BYTES")


@pytest.mark.parametrize(
    "payload",
    [pickle_giant_bytearray, pickle_giant_bytes_length, pickle_giant_reconstruct,
     pickle_ndarray_call],
    ids=["bytearray(2**40)", "BINBYTES8 2**40", "_reconstruct 2**40", "ndarray(2**40)"],
)  # fmt: skip
def test_cifar_pickle_asking_for_a_terabyte_is_refused(tmp_path, payload):
    data = write_cifar(tmp_path / "cifar", batch_1=payload())
    model = write_model_folder(tmp_path / "m")
    r = run_cli(["eval", "--model", str(model), "--data", str(data), "--split", "train"])
    assert_user_error(r, "data_batch_1", "refused")


def test_cifar_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    data = write_cifar(tmp_path / "cifar")
    model = write_model_folder(tmp_path / "m")
    r = run_cli(
        ["eval", "--model", str(model), "--data", str(data)],
        env={"VITKIT_MAX_DATA_FILE_BYTES": "100"},
    )
    assert_user_error(r, "VITKIT_MAX_DATA_FILE_BYTES")


def test_cifar_label_of_2e7_is_refused(tmp_path):
    data = write_cifar(tmp_path / "cifar", labels_1=[0, 20_000_000])
    model = write_model_folder(tmp_path / "m")
    r = run_cli(["eval", "--model", str(model), "--data", str(data), "--split", "train"])
    assert_user_error(r, "data_batch_1", "20000000")


def test_image_list_label_of_2e7_does_not_make_2e7_classes(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text("path,label\na.png,0\na.png,20000000\n")
    model = write_model_folder(tmp_path / "m")
    r = run_cli(
        ["eval", "--model", str(model), "--data", str(tmp_path / "list.csv")],
        env={"VITKIT_MAX_CLASSES": "100000"},
    )
    assert_user_error(r, "list.csv", "classes")


def test_preprocessor_config_over_the_json_limit_is_refused(tmp_path):
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_text(json.dumps({"size": 16, "pad": " " * 5000}))
    image = write_image(tmp_path / "a.png")
    r = run_cli(
        ["predict", str(image), "--model", str(model)], env={"VITKIT_MAX_JSON_BYTES": "2000"}
    )
    assert_user_error(r, "preprocessor_config.json", "VITKIT_MAX_JSON_BYTES")


def test_config_json_over_the_json_limit_is_refused(tmp_path):
    model = write_model_folder(tmp_path / "m")
    image = write_image(tmp_path / "a.png")
    r = run_cli(
        ["predict", str(image), "--model", str(model)], env={"VITKIT_MAX_JSON_BYTES": "100"}
    )
    assert_user_error(r, "config.json", "VITKIT_MAX_JSON_BYTES")


def test_deeply_nested_json_is_one_line(tmp_path):
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_text("[" * 200_000 + "]" * 200_000)
    image = write_image(tmp_path / "a.png")
    assert_user_error(
        run_cli(["predict", str(image), "--model", str(model)]), "preprocessor_config"
    )


def test_png_decompression_bomb_is_refused_per_image(tmp_path):
    """Holds today (PIL's guard and vitkit's max_pixels): a 30000 x 30000 PNG of a few KB."""
    from PIL import Image

    model = write_model_folder(tmp_path / "m")
    Image.new("1", (30000, 30000)).save(tmp_path / "bomb.png")
    r = run_cli(["predict", str(tmp_path / "bomb.png"), "--model", str(model)])
    assert_user_error(r, "bomb.png", "decompression bomb")
