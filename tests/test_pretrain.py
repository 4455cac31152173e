"""Self-supervised objectives in the one trainer: each method runs and exports a fine-tunable
encoder, kill -9 + resume equals an uninterrupted run, two processes equal one, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import kill_at_first_checkpoint
from vitkit import from_pretrained
from vitkit.cli import main
from vitkit.train import PRETRAIN_DEFAULTS, Recipe, train
from vitkit.train.state import load_state

SMALL = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def image_folder(tmp_path):
    """32 random 8x8 grayscale PNGs in nested folders (no labels)."""
    g = torch.Generator().manual_seed(0)
    for i in range(32):
        path = tmp_path / "imgs" / f"sub{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(8, 8, generator=g) * 255).byte().numpy()).save(path)
    return tmp_path / "imgs"


def _recipe(method: str, data: str, out: Path, **changes) -> Recipe:
    base = {**Recipe().to_dict(), **PRETRAIN_DEFAULTS}
    return Recipe.from_dict(
        {
            **base,
            "objective": method,
            "data": data,
            "output": str(out),
            "model": "vit_digits_patch2_8",
            "model_overrides": SMALL,
            "epochs": 1,
            "batch_size": 16,
            "warmup_epochs": 0.5,
            "decoder_dim": 16,
            "decoder_depth": 1,
            "decoder_heads": 2,
            "out_dim": 32,
            "local_crops": 2,
            "progress": False,
            "plot": False,
            "threads": 1,
            **changes,
        }
    )


@pytest.mark.parametrize("method", ["simmim", "mae", "dino"])
def test_each_method_exports_an_encoder_that_fine_tunes(method, image_folder, tmp_path):
    result = train(_recipe(method, str(image_folder), tmp_path / "run"))
    assert result.steps == 2 and result.best_dir is None and result.test_acc is None
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["train_loss"] == rows[-1]["train_loss"]  # not NaN
    picture = "attention.png" if method == "dino" else "reconstruction.png"
    assert (tmp_path / "run" / picture).is_file()
    model = from_pretrained(tmp_path / "run", num_classes=10)  # the run's last/ folder
    assert model.config.num_classes == 10 and not model.config.use_mask_token
    x = torch.rand(2, 1, 8, 8)
    assert model(x).logits.shape == (2, 10)
    assert torch.count_nonzero(model.head.weight) == 0  # fresh zero head, encoder kept


def test_exported_encoder_holds_the_trained_weights(image_folder, tmp_path):
    train(_recipe("mae", str(image_folder), tmp_path / "run"))
    state = load_state(tmp_path / "run")
    assert {k.split(".")[0] for k in state["objective"]} == {"mae"}  # the decoder, apart
    model = from_pretrained(tmp_path / "run")
    assert model.config.global_pool == "avg"  # MAE fine-tunes on the patch mean
    renamed = {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][renamed.get(k, k)]), k


def test_mae_kill_and_resume_is_bit_exact(tmp_path):
    recipe = _recipe("mae", "digits", tmp_path / "ref", epochs=2, batch_size=128,
                     save_every_steps=3)  # fmt: skip
    n = torch.get_num_threads()
    try:
        ref = train(recipe)
        run = tmp_path / "killed"
        kill_at_first_checkpoint(recipe.to_dict(), run)
        saved = load_state(run)
        assert saved["epoch"] == 0 and 0 < saved["step"] < 11  # mid-epoch
        res = train(None, resume=run)
        assert res.steps == ref.steps == 2 * (1437 // 128)
    finally:
        torch.set_num_threads(n)
    a, b = load_state(tmp_path / "ref"), load_state(run)
    for part in ("model", "objective"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), key
    assert a["metrics"][-1]["train_loss"] == b["metrics"][-1]["train_loss"]


def test_cli_pretrains_a_folder_of_images(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["pretrain", "--method", "mae", "--data", str(image_folder), "--model",
            "vit_digits_patch2_8", "--epochs", "1", "--batch-size", "16", "--output", str(out)]  # fmt: skip
    assert main([*args, "--no-progress"]) == 0
    assert "vitkit train --init" in capsys.readouterr().out
    config = json.loads((out / "last" / "config.json").read_text())
    assert config["num_classes"] == 0 and config["image_size"] == 8
    assert main([*args, "--no-progress"]) == 1  # never overwrites a finished run
    assert "--overwrite" in capsys.readouterr().err


def test_cli_rejects_unknown_data(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--model", "vit_digits_patch2_8",
                 "--output", str(tmp_path / "o")]) == 1  # fmt: skip
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a run that never started leaves no directory


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_masked_pretraining_refuses_the_convolutional_stem(method, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--method", method, "--model", "vit_digits_convstem_patch2_8",
                 "--epochs", "1", "--output", str(out), "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "reads across their borders" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_vitkit_train_init_fine_tunes_the_pretrained_encoder(image_folder, tmp_path, capsys):
    train(_recipe("mae", str(image_folder), tmp_path / "pre"))
    rc = main(["train", "--init", str(tmp_path / "pre"), "--data", "digits", "--epochs", "1",
               "--output", str(tmp_path / "ft"), "--threads", "1", "--no-progress"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "validation accuracy" in text and "test accuracy" in text
    tuned = from_pretrained(tmp_path / "ft" / "best")
    assert tuned.config.num_classes == 10 and tuned.config.embed_dim == SMALL["embed_dim"]
