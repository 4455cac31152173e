"""Every shipped recipe in configs/ runs end to end, shrunk to a tiny model and one short epoch."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitkit
from vitkit.train.recipe import Recipe
from vitkit.train.trainer import train

CONFIGS = Path(__file__).parents[1] / "configs"
TINY_MODEL = {"embed_dim": 16, "depth": 1, "num_heads": 2}
SMOKE = {"epochs": 1, "progress": False, "plot": False, "num_workers": 0, "threads": 1}


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
