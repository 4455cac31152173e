import json
import math

import pytest
import torch

from vitkit.cli import main
from vitkit.errors import ConfigError
from vitkit.train import Recipe, TrainingDiverged, train
from vitkit.train.state import load_native_weights, load_state

TINY = dict(
    model_overrides={
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "global_pool": "token",
        "pos_embed": "learned",
    },
    batch_size=64,
    epochs=1,
    warmup_epochs=0.5,
    progress=False,
    plot=False,
    threads=1,
)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_recipe_validation_messages():
    with pytest.raises(ConfigError, match=r"unknown recipe key.*'lrr'"):
        Recipe.from_dict({"lrr": 1})
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        Recipe(dtype="fp8").validate()
    with pytest.raises(ConfigError, match="divisible by accum_steps"):
        Recipe(batch_size=10, accum_steps=3).validate()
    r = Recipe().with_overrides(
        ["lr=1e-3", "model_overrides.depth=6", "betas=[0.9, 0.95]", "rrc_scale=[0.3, 1]"]
    )
    assert r.lr == 1e-3 and r.betas == (0.9, 0.95) and r.rrc_scale == (0.3, 1.0)
    assert r.model_overrides == {**Recipe().model_overrides, "depth": 6}
    with pytest.raises(ConfigError, match="key=value"):
        Recipe().with_overrides(["lr"])


def test_shipped_recipes_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        Recipe.from_yaml(path)


def test_cli_trains_digits_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [
        f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k not in ("epochs", "batch_size")
    ]
    rc = main(
        [
            "train",
            "--output",
            str(out),
            "--epochs",
            "2",
            "--lr",
            "5e-3",
            *sets,
            "--batch-size",
            "16",
            "--set",
            "ema_decay=0.9",
            "--set",
            "log_every_steps=5",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and str(out / "best") in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_acc" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0 <= r["val_acc"] <= r["val_top5"] <= 1 and r["val_loss"] < 2.5 for r in evals)
    assert {"train_loss", "lr", "img_per_s"} <= set(rows[0]) and "ema_val_acc" in evals[-1]
    assert (out / "metrics.csv").read_text().startswith("epoch,step,train_loss")
    state = load_state(out)
    assert state["epoch"] == 2 and state["step"] == 0 and state["global_step"] == 2 * 89
    config, weights = load_native_weights(out / "best")
    assert config.embed_dim == 32 and config.id2label[3] == "3"
    assert set(weights) == set(state["model"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    recipe = Recipe(**{**TINY, "epochs": 2, "output": str(tmp_path)})
    train(recipe)
    good = load_state(tmp_path)
    bad = recipe.replace(lr=1e30, warmup_epochs=0, output=str(tmp_path / "bad"), save_every_steps=1)
    with pytest.raises(TrainingDiverged, match=r"(loss is (nan|inf)|NaN/inf) .*step \d+"):
        train(bad)
    # injected NaN: a model whose head emits NaN from the first step
    recipe3 = recipe.replace(output=str(tmp_path / "nan"))
    import vitkit.train.trainer as T

    orig = T._Logits.forward
    T._Logits.forward = lambda self, x: orig(self, x) * math.nan
    try:
        with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 1"):
            train(recipe3)
    finally:
        T._Logits.forward = orig
    assert not (tmp_path / "nan" / "last").exists()
    assert torch.equal(load_state(tmp_path)["model"]["head.weight"], good["model"]["head.weight"])


def test_init_from_run_new_head_and_size(tmp_path):
    src = tmp_path / "src"
    train(Recipe(**{**TINY, "output": str(src)}))
    r = Recipe(
        **{
            **TINY,
            "output": str(tmp_path / "ft"),
            "init": str(src),
            "image_size": 16,
            "epochs": 1,
            "optimizer": "sgd",
            "weight_decay": 0.0,
            "clip_grad": 1.0,
            "layer_decay": 0.75,
        }
    )
    res = train(r)
    config, weights = load_native_weights(res.run_dir / "last")
    assert config.image_size in (16, (16, 16)) and weights["pos_embed"].shape == (1, 65, 32)


def test_folder_data_with_mixup_randaugment_and_plot(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 128, (20, 20, 3)) + 100 * k
                Image.fromarray(pixels.astype(np.uint8)).save(
                    tmp_path / "data" / split / name / f"{i}.png"
                )
    r = Recipe(
        **{
            **TINY,
            "model": "vit_tiny_patch4_32",
            "image_size": 16,
            "batch_size": 4,
            "data": str(tmp_path / "data"),
            "output": str(tmp_path / "run"),
            "mixup_alpha": 0.8,
            "cutmix_alpha": 1.0,
            "auto_augment": "randaugment",
            "hflip": True,
            "random_shift": 2,
            "plot": True,
            "epochs": 2,
        }
    )
    res = train(r)
    assert res.steps == 2 * 3 and res.val_acc is not None
    config, _ = load_native_weights(res.run_dir / "best")
    assert config.num_classes == 2 and config.id2label == {0: "cat", 1: "dog"}
    assert (res.run_dir / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_accumulation_and_clipping_run(tmp_path, dtype):
    r = Recipe(
        **{
            **TINY,
            "batch_size": 256,
            "accum_steps": 2,
            "clip_grad": 1.0,
            "dtype": dtype,
            "output": str(tmp_path),
        }
    )
    res = train(r)
    state = load_state(tmp_path)
    assert res.steps == 1437 // 256 and math.isfinite(res.val_loss)
    assert bool(state["scaler"]) == (dtype == "fp16")
    assert all(v.dtype == torch.float32 for v in state["model"].values())
