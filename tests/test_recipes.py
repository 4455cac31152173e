"""Every shipped recipe in configs/ runs end to end, shrunk to a tiny model and one short epoch."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit import ConfigError
from vitkit.train.recipe import Recipe
from vitkit.train.trainer import train

CONFIGS = Path(__file__).parents[1] / "configs"
TINY_MODEL = {"embed_dim": 16, "depth": 1, "num_heads": 2}
SMOKE = {"epochs": 1, "progress": False, "plot": False, "num_workers": 0, "threads": 1}


def test_every_bad_key_is_in_one_message():
    """Each key against its declaration (bounds, choices from the Literal aliases), in field
    order; the rules between keys once every key is sound. Nothing stops at the first."""
    bad = {"epochs": 0, "dtype": "fp8", "betas": [0.9, 1.0], "lr": "fast", "zoom": [1.1, 0.9],
           "mask_ratio": 1}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(bad, source="r.yaml")
    assert str(info.value) == (
        "r.yaml: epochs=0 must be positive; lr='fast' must be a finite number; betas must be a "
        "list of 2 numbers in [0, 1), got [0.9, 1.0]; zoom must be a list of 2 positive numbers, "
        "low <= high, got [1.1, 0.9]; mask_ratio=1 must be in (0, 1); dtype='fp8' must be one "
        "of ('fp32', 'bf16', 'fp16')"
    )
    crossed = {"batch_size": 10, "accum_steps": 3, "std": [0.5], "teacher": "t", "objective": "mae"}
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(crossed, source="r.yaml")
    assert str(info.value) == (
        "r.yaml: batch_size=10 must be divisible by accum_steps=3; mean and std go together: set "
        "both or neither; teacher= distils a classifier; objective='mae' takes none"
    )
    # YAML reads 1e-3 as text: a number all the same; lists become tuples
    recipe = Recipe.from_dict({"lr": "1e-3", "rrc_scale": [0.3, 1]})
    assert recipe.lr == 1e-3 and recipe.rrc_scale == (0.3, 1.0)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def _image_folder(root: Path, size: int = 40) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for label in ("ant", "bee"):
            (root / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _run(name: str, tmp_path: Path, **changes):
    recipe = Recipe.from_yaml(CONFIGS / name)
    overrides = {**recipe.model_overrides, **TINY_MODEL}
    recipe = recipe.replace(
        **SMOKE, output=str(tmp_path / "run"), model_overrides=overrides, **changes
    )
    return train(recipe)


def test_digits_recipe(tmp_path):
    result = _run("digits.yaml", tmp_path, batch_size=256)
    assert 0.0 <= result.val_acc <= 1.0
    assert (result.run_dir / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_mnist_recipe(tmp_path):
    result = _run("mnist.yaml", tmp_path, batch_size=512)
    assert vitkit.from_pretrained(result.run_dir / "best").config.image_hw == (28, 28)


def test_cifar10_recipe(cifar10, tmp_path):
    data, _ = cifar10  # 5 x 3 training images, 3 test images
    result = _run("cifar10.yaml", tmp_path, data=str(data), batch_size=5)
    model = vitkit.from_pretrained(result.run_dir / "best")
    assert model.config.num_classes == 10 and model.config.id2label[3] == "cat"


def test_finetune_384_recipe_from_a_pretrained_checkpoint(tmp_path):
    # stand-in for a 224 checkpoint: a tiny 32px model, fine-tuned at 48px with a new head
    source = vitkit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=8, **TINY_MODEL)
    vitkit.save_pretrained(source, tmp_path / "pretrained")
    data = _image_folder(tmp_path / "imgs")
    recipe = Recipe.from_yaml(CONFIGS / "finetune_384.yaml").replace(
        **SMOKE,
        output=str(tmp_path / "run"),
        init=str(tmp_path / "pretrained"),
        data=str(data),
        image_size=48,
        batch_size=8,
        accum_steps=2,
        dtype="fp32",
    )
    result = train(recipe)
    model = vitkit.from_pretrained(result.run_dir / "best")
    assert model.config.image_hw == (48, 48) and model.config.num_classes == 2
    assert model.pos_embed.shape == (1, 1 + 36, 16)  # 4x4 table resampled to 6x6


def test_every_objective_name_the_recipe_accepts_has_one_builder():
    import typing

    from vitkit.train.objectives import OBJECTIVES
    from vitkit.train.recipe import Objective

    assert list(OBJECTIVES) == list(typing.get_args(Objective))
