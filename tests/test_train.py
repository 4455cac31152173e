import json
import math

import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.errors import ConfigError
from vitkit.train import Recipe, TrainingDiverged, train
from vitkit.train.state import load_state

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


TRAIN_IMAGES = 1295  # digits: the 80% training part less the carved validation (142)


def test_recipe_validation_messages():
    with pytest.raises(ConfigError, match=r"unknown recipe key.*'lrr'"):
        Recipe.from_dict({"lrr": 1})
    # the same type checks as ViTConfig (vitkit._fields), with the file named
    with pytest.raises(ConfigError, match=r"^r.yaml: epochs=2.5 must be a whole number$"):
        Recipe.from_dict({"epochs": 2.5}, source="r.yaml")
    with pytest.raises(ConfigError, match="hflip=1 must be true or false"):
        Recipe.from_dict({"hflip": 1})
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
    assert Recipe().with_overrides(["elastic=[34, 4]"]).elastic == (34.0, 4.0)
    for bad in ("[34]", "[-1, 4]", "[34, x]"):
        with pytest.raises(ConfigError, match="elastic"):
            Recipe().with_overrides([f"elastic={bad}"])


def test_shipped_recipes_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        Recipe.from_yaml(path)


def test_cli_trains_digits_and_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [
        f"--set={k}={json.dumps(v)}"
        for k, v in TINY.items()
        if k not in ("epochs", "batch_size", "progress")
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
    captured = capsys.readouterr()
    text = captured.out
    assert "test accuracy" in text and str(out / "best") in text
    # bars on, but stderr is no terminal: no bar frames, one line per epoch, with its time
    assert "\r" not in captured.err and "it/s" not in captured.err
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert all("val_acc" in line and line.endswith(" s") for line in epochs)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_acc" in r]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(0 <= r["val_acc"] <= r["val_top5"] <= 1 and r["val_loss"] < 2.5 for r in evals)
    assert {"train_loss", "lr", "img_per_s"} <= set(rows[0]) and "ema_val_acc" in evals[-1]
    assert (out / "metrics.csv").read_text().startswith("epoch,step,train_loss")
    state = load_state(out)
    assert (
        state["epoch"] == 2
        and state["step"] == 0
        and state["global_step"] == 2 * (TRAIN_IMAGES // 16)
    )
    config, weights = _weights(out / "best")
    assert config.embed_dim == 32 and config.id2label[3] == "3"
    assert set(weights) == set(state["model"])


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    import sys
    from types import SimpleNamespace

    from vitkit.train.trainer import _bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def bar(stderr, progress=True, is_main=True):
        monkeypatch.setattr(sys, "stderr", stderr)
        run = SimpleNamespace(info=SimpleNamespace(is_main=is_main), start_step=0, epoch=0,
                              recipe=SimpleNamespace(progress=progress, epochs=2),
                              data=SimpleNamespace(steps_per_epoch=3))  # fmt: skip
        b = _bar(run)
        on = not b.disable
        b.update(1)
        b.close()
        return on, stderr.getvalue()

    on, shown = bar(Terminal())
    assert on and "epoch 1/2" in shown and "\r" in shown
    assert bar(io.StringIO()) == (False, "")  # a redirected log
    assert bar(Terminal(), progress=False) == (False, "")
    assert bar(Terminal(), is_main=False) == (False, "")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    recipe = Recipe(**{**TINY, "epochs": 2, "output": str(tmp_path)})
    train(recipe)
    good = load_state(tmp_path)
    bad = recipe.replace(lr=1e30, warmup_epochs=0, output=str(tmp_path / "bad"), save_every_steps=1)
    with pytest.raises(TrainingDiverged, match=r"(loss is (nan|inf)|NaN/inf) .*step \d+"):
        train(bad)
    # injected NaN: a model whose head emits NaN from the first step
    recipe3 = recipe.replace(output=str(tmp_path / "nan"))

    from vitkit.train.objectives import Classify

    orig = Classify.forward
    Classify.forward = lambda self, x, y, rng: orig(self, x, y, rng) * math.nan
    try:
        with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 1"):
            train(recipe3)
    finally:
        Classify.forward = orig
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
    config, weights = _weights(res.run_dir / "last")
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
    config, _ = _weights(res.run_dir / "best")
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
    weights = [v for v in state["model"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 for v in weights)  # + BatchNorm's step count


def _weights(folder):
    """(config, state dict) of a saved model folder."""
    import vitkit

    model = vitkit.from_pretrained(folder)
    return model.config, model.state_dict()


def test_fine_tuning_keeps_the_checkpoints_preprocessing(tmp_path, capsys):
    """--init from a transformers folder whose processor uses ImageNet statistics: training and
    evaluation normalise with them, and best/ carries that preprocessor_config.json."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, num_labels=3,
    )  # fmt: skip
    folder = tmp_path / "hf"
    transformers.ViTForImageClassification(hf_cfg).save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 8, "width": 8}, image_mean=[0.485], image_std=[0.229]
    ).save_pretrained(folder)
    rc = main(["train", "--init", str(folder), "--epochs", "1", "--output", str(tmp_path / "ft"),
               "--no-progress", "--set", "plot=false"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "validation accuracy" in text and "test accuracy" in text
    state = load_state(tmp_path / "ft")
    assert state["preprocessor"]["image_mean"] == [0.485]
    saved = json.loads((tmp_path / "ft" / "best" / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [0.485] and saved["image_std"] == [0.229]
    from vitkit.data.datasets import open_splits
    from vitkit.eval import evaluate

    best = vitkit.from_pretrained(tmp_path / "ft" / "best")
    test = open_splits("digits", mode="L").test
    x = (test.images - 0.485) / 0.229
    expected = evaluate(best, [(x, test.labels)]).top1
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["test_acc"] == expected


def test_label_fraction_trains_and_selects_on_that_fraction_of_the_labels(tmp_path):
    from vitkit.data.datasets import build_data
    from vitkit.data.transforms import Augmentation

    recipe = Recipe(**{**TINY, "label_fraction": 0.1, "batch_size": 8, "output": str(tmp_path)})
    data = build_data(recipe, augmentation=Augmentation(), in_chans=1, image_size=8)
    counts = torch.bincount(data.train.labels, minlength=10)
    assert len(data.train) == 129 and counts.min() >= 12 and counts.max() <= 14  # 10% per class
    val_counts = torch.bincount(data.val.labels, minlength=10)
    assert len(data.val) == 12 and val_counts.min() == 1 and val_counts.max() == 2  # of 142
    full = build_data(Recipe(**TINY), augmentation=Augmentation(), in_chans=1, image_size=8)
    seen = {tuple(x.flatten().tolist()) for x in full.train.images}
    assert all(tuple(x.flatten().tolist()) in seen for x in data.train.images)  # a subset
    train(recipe)
    assert load_state(tmp_path)["global_step"] == 129 // 8
    with pytest.raises(ConfigError, match="label_fraction=0"):
        Recipe(label_fraction=0).validate()


def test_an_rgb_checkpoint_fine_tunes_on_grayscale_digits(tmp_path):
    """Built-in sets are grayscale; a 3-channel --init sees them as RGB (the gray value in each
    channel), as it would see a folder of grayscale files, instead of being refused."""
    from vitkit.data.datasets import open_splits

    gray, rgb = open_splits("digits", mode="L"), open_splits("digits", mode="RGB")
    assert gray.train.images.shape[1:] == (1, 8, 8) and rgb.train.images.shape[1:] == (3, 8, 8)
    assert torch.equal(rgb.test.images, gray.test.images.expand(-1, 3, -1, -1))
    init = vitkit.create_model(
        "vit_tiny_patch16_224", image_size=8, patch_size=2, depth=1, num_classes=0
    )
    vitkit.save_pretrained(init, tmp_path / "rgb")
    recipe = Recipe(**{**TINY, "model_overrides": {}}, init=str(tmp_path / "rgb"),
                    output=str(tmp_path / "ft"))  # fmt: skip
    result = train(recipe)
    from vitkit.eval import evaluate

    best = vitkit.from_pretrained(tmp_path / "ft" / "best")
    p = load_state(tmp_path / "ft")["preprocessor"]
    mean, std = (torch.tensor(p[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
    x = (rgb.test.images - mean) / std  # the test split as the run saw it: gray in RGB
    assert best.config.in_chans == 3
    assert result.test_acc == evaluate(best, [(x, rgb.test.labels)]).top1
