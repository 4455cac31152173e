"""Pre-training loop: each method runs and exports a fine-tunable encoder, resume equals an
uninterrupted run, schedules, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from vitkit import from_pretrained
from vitkit.cli import main
from vitkit.train.optim import lr_at
from vitkit.train.pretrain import PretrainConfig, pretrain

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


def _cfg(method, out, **kw):
    return PretrainConfig(
        method=method,
        out=str(out),
        model="vit_digits_patch2_8",
        model_overrides=SMALL,
        epochs=kw.pop("epochs", 1),
        batch_size=16,
        warmup_epochs=0.5,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
        out_dim=32,
        local_crops=2,
        progress_bar=False,
        **kw,
    )


@pytest.mark.parametrize("method", ["simmim", "mae", "dino"])
def test_each_method_exports_an_encoder_that_fine_tunes(method, tmp_path):
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    metrics = pretrain(_cfg(method, tmp_path), images=images)
    assert metrics["epoch"] == 1 and metrics["loss"] == metrics["loss"]  # finite, not NaN
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2
    picture = "attention.png" if method == "dino" else "reconstruction.png"
    assert (tmp_path / picture).is_file()
    model = from_pretrained(tmp_path, num_classes=10)
    assert model.config.num_classes == 10 and not model.config.use_mask_token
    assert model(images[:2]).logits.shape == (2, 10)
    assert torch.count_nonzero(model.head.weight) == 0  # fresh zero head, encoder kept


def test_encoder_weights_are_the_trained_ones(tmp_path):
    images = torch.rand(16, 1, 8, 8)
    pretrain(_cfg("mae", tmp_path), images=images)
    state = torch.load(tmp_path / "pretrain_state.pt", weights_only=True)["model"]
    model = from_pretrained(tmp_path)
    assert model.config.global_pool == "avg"  # MAE fine-tunes on the patch mean
    renamed = {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[f"encoder.{renamed.get(k, k)}"])


def test_resume_equals_uninterrupted_run(tmp_path):
    method = "simmim"
    images = torch.rand(32, 1, 8, 8)
    pretrain(_cfg(method, tmp_path / "a", epochs=2), images=images)
    pretrain(_cfg(method, tmp_path / "b", epochs=1), images=images)
    pretrain(_cfg(method, tmp_path / "b", epochs=2), images=images, resume=True)
    a = torch.load(tmp_path / "a/pretrain_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b/pretrain_state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "b/metrics.jsonl").read_text().splitlines()) == 2


def test_warmup_then_cosine():
    assert lr_at(0, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.0) == pytest.approx(0.1)
    assert lr_at(9, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.0) == pytest.approx(1.0)
    assert lr_at(55, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.0) == pytest.approx(
        0.5
    )
    assert lr_at(100, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.1) == pytest.approx(
        0.1
    )


def test_cli_pretrains_a_folder_of_images(tmp_path, capsys):
    from PIL import Image

    for i in range(6):
        pixels = (torch.rand(12, 12) * 255).byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    rc = main(
        [
            "pretrain",
            "--method",
            "mae",
            "--data",
            str(tmp_path),
            "--model",
            "vit_digits_patch2_8",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    tmp_path = tmp_path / "out"
    assert rc == 0 and "vitkit train --init" in capsys.readouterr().out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == 0 and config["image_size"] == 8  # resized to the model's


def test_cli_rejects_unknown_data(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 1
    assert "neither" in capsys.readouterr().err


def test_vitkit_train_init_fine_tunes_the_pretrained_encoder(tmp_path, capsys):
    pretrain(_cfg("mae", tmp_path / "pre"), images=torch.rand(16, 1, 8, 8) * 2 - 1)
    rc = main(
        [
            "train",
            "--init",
            str(tmp_path / "pre"),
            "--data",
            "digits",
            "--epochs",
            "1",
            "--output",
            str(tmp_path / "ft"),
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0 and "test accuracy" in capsys.readouterr().out
    tuned = from_pretrained(tmp_path / "ft" / "best")
    assert tuned.config.num_classes == 10 and tuned.config.embed_dim == SMALL["embed_dim"]
