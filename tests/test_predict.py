"""`vitkit predict`, run in-process on photos and broken files written to tmp_path."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import vitkit
from conftest import png_header
from vitkit.checkpoints.resolve import processor_for
from vitkit.cli import main
from vitkit.data.labels import id2label_for, imagenet_labels
from vitkit.data.processor import ImageProcessor
from vitkit.infer.predictor import expand_inputs

TINY = dict(embed_dim=32, depth=1, num_heads=2)  # keeps every forward pass in milliseconds


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Good images in every mode load_image converts, plus one of each kind of bad file."""
    root = tmp_path_factory.mktemp("images")
    good = root / "good"
    good.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(good / "chelsea.jpg", quality=90)
    Image.fromarray(skimage.data.camera()).save(good / "camera.png")  # L
    Image.fromarray(skimage.data.coffee()).convert("RGBA").save(good / "coffee_rgba.png")
    Image.fromarray(skimage.data.astronaut()).convert("P").save(good / "astronaut_p.png")
    Image.fromarray(skimage.data.rocket()).convert("CMYK").save(good / "rocket_cmyk.jpg")
    sixteen = (skimage.data.camera().astype(np.uint16) * 257)[:200, :300]
    Image.fromarray(sixteen).save(good / "camera16.png")  # I;16
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(skimage.data.coffee()).save(good / "coffee_rot.jpg", exif=exif.tobytes())
    (good / "notes.txt").write_text("not listed: folders expand to image extensions only")

    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("hello, I am not a JPEG\n" * 20)
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "JPEG")
    (bad / "truncated.jpg").write_bytes(buffer.getvalue()[:3000])
    (bad / "bomb.png").write_bytes(png_header(12_000, 12_000))
    (root / "nothing_here").mkdir()
    return root


@pytest.fixture
def fake_from_pretrained(tmp_path):
    """A checkpoint folder holding a tiny 32x32 3-class model with labels."""
    folder = tmp_path / "tiny-model"
    labels = {0: "cat", 1: "dog", 2: "rocket"}
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=3, id2label=labels, **TINY)
    vitkit.save_pretrained(model, folder)
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lines_for_good_and_bad_files(capsys, image_dir, fake_from_pretrained):
    missing = image_dir / "missing.jpg"
    code, out, err = _run(
        capsys, image_dir / "good", image_dir / "bad", missing, image_dir / "nothing_here",
        "--model", fake_from_pretrained, "--json", "--top-k", "2", "--batch-size", "3",
        "--max-pixels", 10_000_000,
    )  # fmt: skip
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in records}
    good = ["astronaut_p.png", "camera.png", "camera16.png", "chelsea.jpg", "coffee_rgba.png",
            "coffee_rot.jpg", "rocket_cmyk.jpg"]  # fmt: skip
    bad = ["empty.jpg", "text.jpg", "truncated.jpg", "bomb.png", "missing.jpg", "nothing_here"]
    assert sorted(by_name) == sorted(good + bad)
    for name in good:
        top = by_name[name]["top_k"]
        assert len(top) == 2 and {t["label"] for t in top} <= {"cat", "dog", "rocket"}
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["label"] == ["cat", "dog", "rocket"][t["index"]] for t in top)
    reasons = {name: by_name[name]["error"] for name in bad}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"].startswith("not an image file")
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"] and "10,000,000" in reasons["bomb.png"]
    assert reasons["missing.jpg"] == "no such file or directory"
    assert reasons["nothing_here"] == "directory contains no image files"
    # each failure also on stderr, one line each, as `path: reason`
    err_lines = err.strip().splitlines()
    assert len(err_lines) == len(bad)
    for name in bad:
        record = by_name[name]
        assert f"{record['path']}: {record['error']}" in err_lines


def test_text_output_and_exit_code_zero(capsys, image_dir, fake_from_pretrained):
    photo = image_dir / "good" / "chelsea.jpg"
    code, out, err = _run(capsys, photo, "--model", fake_from_pretrained, "-k", "3")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 4
    percents = [float(line.split("%")[0]) for line in lines[1:]]
    assert percents == sorted(percents, reverse=True) and sum(percents) == pytest.approx(
        100, abs=0.02
    )
    assert all(line.rstrip().endswith(("(0)", "(1)", "(2)")) for line in lines[1:])


def test_results_do_not_depend_on_batching(capsys, image_dir, fake_from_pretrained):
    args = [image_dir / "good", "--model", fake_from_pretrained, "--json", "-k", "3"]
    torch.manual_seed(0)
    _, one_by_one, _ = _run(capsys, *args, "--batch-size", "1")
    torch.manual_seed(0)
    _, all_at_once, _ = _run(capsys, *args, "--batch-size", "16")
    a = [json.loads(line) for line in one_by_one.splitlines()]
    b = [json.loads(line) for line in all_at_once.splitlines()]
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 7
    for ra, rb in zip(a, b):
        assert [t["index"] for t in ra["top_k"]] == [t["index"] for t in rb["top_k"]]
        for ta, tb in zip(ra["top_k"], rb["top_k"]):
            assert ta["probability"] == pytest.approx(tb["probability"], abs=1e-5)


def test_preset_name_warns_about_random_weights(capsys, image_dir):
    photo = image_dir / "good" / "camera.png"
    code, out, err = _run(capsys, photo, "--model", "vit_tiny_patch4_32", "--json", "-k", "1")
    assert code == 0
    assert "RANDOM weights" in err and "vit_tiny_patch4_32" in err
    (record,) = [json.loads(line) for line in out.splitlines()]
    top = record["top_k"][0]
    assert top["label"] == str(top["index"])  # no id2label, not 1000 classes: indices


def test_unlabelled_1000_class_checkpoint_prints_imagenet_names(capsys, image_dir, tmp_path):
    # a timm state dict of an ImageNet model carries no id2label
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=1000, **TINY)
    vitkit.save_pretrained(model, tmp_path / "in1k", format="vitkit")
    photo = image_dir / "good" / "camera.png"
    code, out, _ = _run(capsys, photo, "--model", tmp_path / "in1k", "--json", "-k", "3")
    assert code == 0
    (record,) = [json.loads(line) for line in out.splitlines()]
    names = imagenet_labels()
    assert [t["label"] for t in record["top_k"]] == [names[t["index"]] for t in record["top_k"]]


def test_single_channel_model(capsys, image_dir):
    photo = image_dir / "good" / "chelsea.jpg"
    code, out, _ = _run(capsys, photo, "--model", "vit_digits_patch2_8", "--json", "-k", "10")
    assert code == 0
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert sorted(t["index"] for t in record["top_k"]) == list(range(10))
    assert sum(t["probability"] for t in record["top_k"]) == pytest.approx(1, abs=1e-5)


def test_only_failures_exit_one_and_usage_errors(capsys, tmp_path):
    code, out, err = _run(capsys, tmp_path / "nope.png", "--model", "vit_tiny_patch4_32")
    assert (
        code == 1
        and out == ""
        and err.strip() == f"{tmp_path / 'nope.png'}: no such file or directory"
    )
    code, _, err = _run(capsys, tmp_path, "--model", "vit_tiny_patch4_32", "--top-k", "0")
    assert code == 1 and "--top-k" in err
    photo = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(photo)
    code, out, err = _run(capsys, photo, "--model", "vit_tiny_patch4_32", "--device", "potato")
    assert code == 1 and out == "" and "'potato' is not a device" in err
    code, _, err = _run(capsys, photo, "--model", "no_such_model_or_folder")
    assert code == 1 and "no_such_model_or_folder" in err and "Traceback" not in err


def test_image_size_runs_the_model_at_another_resolution(capsys, image_dir, fake_from_pretrained):
    """--image-size 48 resamples the 8x8 position table to 12x12 and preprocesses to 48 px,
    exactly as `resolve(..., image_size=48)` does; a size the patches do not tile is one line."""
    from vitkit.infer.predictor import Predictor

    photo = image_dir / "good" / "chelsea.jpg"
    code, out, _ = _run(capsys, photo, "--model", fake_from_pretrained, "--json",
                        "--image-size", "48")  # fmt: skip
    got = {d["index"]: d["probability"] for d in json.loads(out)["top_k"]}
    resolved = vitkit.resolve(fake_from_pretrained, image_size=48)
    assert resolved.model.pos_embed.shape[1] == 1 + 12 * 12
    assert resolved.processor.output_hw == (48, 48)
    (want,) = Predictor(resolved.model, resolved.processor, top_k=3).predict([str(photo)])
    assert code == 0 and got == pytest.approx({i: p for i, _, p in want.top_k}, abs=1e-6)
    code, _, err = _run(capsys, photo, "--model", fake_from_pretrained, "--image-size", "50")
    assert code == 1 and err.count("\n") == 1 and "patch_size=4" in err
    code, _, err = _run(
        capsys, photo, "--model", fake_from_pretrained, "--image-size", "1", "2", "3"
    )
    assert code == 1 and "--image-size takes one size or a height and a width" in err
    code, _, err = _run(capsys, photo, "--model", fake_from_pretrained, "--image-size", "99999")
    assert code == 1 and err.startswith("vitkit predict: error: --image-size 99,999 is over")


def test_processor_comes_from_the_model_folder(tmp_path):
    config = vitkit.get_config("vit_tiny_patch4_32")
    assert processor_for(config, tmp_path) == ImageProcessor.hf_vit(32, backend="tensor")
    saved = ImageProcessor.timm_eval(32, crop_pct=0.875, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    saved.save_pretrained(tmp_path)
    assert processor_for(config, tmp_path) == dataclasses.replace(saved, backend="tensor")
    hf = processor_for(config, tmp_path, "hf")
    assert hf.resize == (32, 32) and hf.crop_size is None and hf.mean == (0.1, 0.2, 0.3)
    timm_style = processor_for(vitkit.get_config("deit_tiny_distilled_patch16_224"), None, "timm")
    assert timm_style.resize == 256 and timm_style.crop_size == (224, 224)

    timm_folder = tmp_path / "timm"
    timm_folder.mkdir()
    pretrained_cfg = {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear",
                      "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
    (timm_folder / "config.json").write_text(json.dumps({"pretrained_cfg": pretrained_cfg}))
    from_timm = processor_for(config, timm_folder)
    assert from_timm.resize == 32 and from_timm.crop_size == (32, 32)
    assert from_timm.interpolation == "bilinear"

    mono = processor_for(vitkit.get_config("vit_digits_patch2_8"), tmp_path)
    assert mono.num_channels == 1 and mono.mean == pytest.approx((0.2,))


def test_expand_inputs_sorts_folders_and_skips_hidden(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.JPG").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.png").write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")
    paths, failures = expand_inputs([str(tmp_path), str(tmp_path / "readme.md")])
    assert paths == [
        str(tmp_path / "b.png"),
        str(tmp_path / "sub" / "a.JPG"),
        str(tmp_path / "readme.md"),
    ]
    assert failures == []


def test_labels():
    names = imagenet_labels()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca" and names[281] == "tabby, tabby cat"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"
    config = vitkit.get_config("vit_tiny_patch4_32")
    assert id2label_for(config) == {i: str(i) for i in range(10)}
    assert id2label_for(config.replace(id2label={i: f"c{i}" for i in range(10)}))[3] == "c3"
    assert id2label_for(vitkit.get_config("vit_tiny_patch16_224"))[1] == names[1]
