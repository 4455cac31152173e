"""vitkit.data.processor: pixel parity with transformers' ViTImageProcessor and timm's eval
transform on real photos, preprocessor_config.json round trips, and every input type."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import vitkit
from vitkit import ConfigError, ImageError
from vitkit.data.images import load_image
from vitkit.data.processor import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageProcessor

PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket")  # camera is grayscale


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {n: load_image(Image.fromarray(getattr(skimage.data, n)())) for n in PHOTOS}


def _levels(a: torch.Tensor, b: torch.Tensor, std) -> float:
    """Largest difference in 8-bit levels (undoing the normalization's std)."""
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return float(((a - b).abs() * std).max() * 255)


def _chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8


@pytest.mark.parity
def test_hf_vit_matches_transformers_both_backends(photos):
    from transformers import ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    hf_torch, hf_pil = ViTImageProcessor(), ViTImageProcessorPil()
    ours = ImageProcessor.hf_vit()
    for name, image in photos.items():
        ref_pil = torch.as_tensor(hf_pil(image, return_tensors="np")["pixel_values"][0])
        ref_torch = hf_torch(image, return_tensors="pt")["pixel_values"][0]
        pil_path = ours(image)[0]
        tensor_path = ours(_chw(image))[0]
        assert pil_path.shape == tensor_path.shape == (3, 224, 224), name
        # each path is exact against the backend it mirrors ...
        assert _levels(pil_path, ref_pil, ours.std) < 1e-3, name
        assert _levels(tensor_path, ref_torch, ours.std) < 1e-3, name
        # ... and within one 8-bit level of the other one
        assert _levels(pil_path, ref_torch, ours.std) <= 1.0 + 1e-3, name
        assert _levels(tensor_path, ref_pil, ours.std) <= 1.0 + 1e-3, name


@pytest.mark.parity
@pytest.mark.parametrize("model_name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_eval_matches_timm_create_transform(photos, model_name):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(model_name, pretrained=False, num_classes=0, depth=1)
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)
    ours = ImageProcessor.from_timm_cfg(cfg)
    assert ours.interpolation == cfg["interpolation"] and ours.std == tuple(cfg["std"])
    for name, image in photos.items():
        ref = transform(image)
        assert _levels(ours(image)[0], ref, cfg["std"]) < 1e-3, name  # PIL path: exact
        assert _levels(ours(_chw(image))[0], ref, cfg["std"]) <= 2.0 + 1e-3, name  # bicubic


def test_timm_eval_geometry():
    deit = ImageProcessor.timm_eval(crop_pct=0.875)
    assert deit.resize == 256 and deit.crop_size == (224, 224) and deit.interpolation == "bicubic"
    assert deit.mean == IMAGENET_DEFAULT_MEAN and deit.std == IMAGENET_DEFAULT_STD
    assert ImageProcessor.timm_eval().resize == 248  # floor(224 / 0.9)
    squash = ImageProcessor.timm_eval(384, crop_pct=1.0, crop_mode="squash")
    assert squash.resize == (384, 384)
    with pytest.raises(ConfigError, match="border"):
        ImageProcessor.timm_eval(crop_mode="border")
    out = deit(Image.new("RGB", (500, 300), (255, 0, 0)))
    assert out.shape == (1, 3, 224, 224)
    expected = (1.0 - IMAGENET_DEFAULT_MEAN[0]) / IMAGENET_DEFAULT_STD[0]
    assert torch.allclose(out[0, 0], torch.full((224, 224), expected))


def test_crop_rounding_floor_vs_round():
    # 5 pixels of margin: floor puts 2 on top, round(2.5) = 2 too; 7: floor 3, round(3.5) = 4
    array = np.arange(11 * 4, dtype=np.uint8).reshape(11, 4)
    for rounding, top in (("floor", 3), ("round", 4)):
        p = ImageProcessor(resize=None, crop_size=(4, 4), crop_rounding=rounding, mean=None, std=None, rescale_factor=None)  # fmt: skip
        for source in (Image.fromarray(array), torch.from_numpy(array)):
            out = p(source)[0, 0]
            np.testing.assert_array_equal(out.numpy(), array[top : top + 4].astype(np.float32))


@pytest.mark.parity
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, photos):
    from transformers import AutoImageProcessor

    image = photos["chelsea"]
    for i, ours in enumerate(
        [
            ImageProcessor.hf_vit(),
            ImageProcessor.timm_eval(crop_pct=0.875),
            ImageProcessor.hf_vit(384, interpolation="bicubic", mean=(0.1, 0.2, 0.3)),
        ]
    ):
        folder = tmp_path / str(i)
        file = ours.save_pretrained(folder)
        assert file.name == "preprocessor_config.json"
        # a transformers config is applied as transformers does: resized with torchvision
        assert ImageProcessor.from_pretrained(folder) == dataclasses.replace(ours, backend="tensor")
        hf = AutoImageProcessor.from_pretrained(folder)
        ref = hf(image, return_tensors="pt")["pixel_values"][0]
        assert _levels(ours(_chw(image))[0], ref, ours.std) < 1e-3


def test_from_pretrained_reads_hf_configs(tmp_path):
    config = {
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": 224,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "ViTImageProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    p = ImageProcessor.from_pretrained(tmp_path)
    assert p.resize == 256 and p.crop_size == (224, 224) and p.interpolation == "bicubic"
    assert p.mean == IMAGENET_DEFAULT_MEAN and p.crop_rounding == "floor"
    old = ImageProcessor.from_hf_dict({"size": 384, "do_normalize": False})
    assert old.resize == (384, 384) and old.mean is None and old.interpolation == "bilinear"

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json"):
        ImageProcessor.from_pretrained(bad)
    with pytest.raises(ConfigError, match=r"no preprocessor_config\.json"):
        ImageProcessor.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="longest_edge"):
        ImageProcessor.from_hf_dict({"size": {"longest_edge": 5}})


def test_every_input_type_gives_the_same_pixels(photos, tmp_path):
    p = ImageProcessor.hf_vit(32)
    image = photos["coffee"]
    path = tmp_path / "coffee.png"
    image.save(path)
    array = np.asarray(image)  # (H, W, 3) uint8
    reference = p(_chw(image))
    assert reference.shape == (1, 3, 32, 32) and reference.dtype == torch.float32
    torch.testing.assert_close(p(array), reference, atol=0, rtol=0)
    for source in (array.astype(np.float32) / 255.0, _chw(image).float() / 255.0):
        # floats are resampled without rounding to 8 bits in between: within one level
        assert _levels(p(source), reference, p.std) <= 1.0
    assert _levels(p(path), reference, p.std) <= 1.0 + 1e-3  # PIL path
    assert _levels(p(image), reference, p.std) <= 1.0 + 1e-3

    batch = torch.stack([_chw(image)] * 3)  # (3, 3, H, W)
    torch.testing.assert_close(p(batch), reference.expand(3, -1, -1, -1))
    mixed = p([path, array, image, _chw(photos["astronaut"])])
    assert mixed.shape == (4, 3, 32, 32)
    torch.testing.assert_close(mixed[1], reference[0])


def test_grayscale_inputs_and_single_channel_models(photos):
    gray = np.asarray(skimage.data.camera())  # (H, W) uint8
    p = ImageProcessor.hf_vit(16)
    out = p(gray)
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out[0, 0], out[0, 2])
    torch.testing.assert_close(out, p(photos["camera"]), atol=1 / 127.5 + 1e-5, rtol=0)
    mono = ImageProcessor.hf_vit(16, num_channels=1, mean=(0.5,), std=(0.5,))
    assert mono(gray).shape == mono(photos["astronaut"]).shape == (1, 1, 16, 16)
    assert mono(np.asarray(photos["astronaut"])).shape == (1, 1, 16, 16)


def test_rgba_array_composites_like_load_image():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent
    p = ImageProcessor(resize=None, mean=None, std=None)
    torch.testing.assert_close(p(rgba), torch.ones(1, 3, 8, 8))
    torch.testing.assert_close(p(Image.fromarray(rgba)), torch.ones(1, 3, 8, 8))


def test_bad_inputs_raise_clear_errors(tmp_path):
    p = ImageProcessor.hf_vit(16)
    with pytest.raises(ImageError, match=r"missing\.png: no such file"):
        p([tmp_path / "missing.png"])
    with pytest.raises(ImageError, match=r"dtype torch\.int64"):
        p(torch.zeros(3, 8, 8, dtype=torch.int64))
    with pytest.raises(ImageError, match=r"dtype torch\.int64"):
        p(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ImageError, match="channels"):
        p(torch.zeros(2, 5, 8, 8))
    with pytest.raises(ImageError, match="unsupported input type"):
        p([object()])
    with pytest.raises(ImageError, match="different sizes"):
        ImageProcessor(resize=None)([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)])
    with pytest.raises(ConfigError, match="interpolation"):
        ImageProcessor(interpolation="cubic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="std"):
        ImageProcessor(mean=(0.5,) * 3, std=(0.0, 1.0, 1.0))


@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_crop_larger_than_image_pads_the_same_on_both_paths(rounding):
    array = np.full((5, 4, 3), 200, dtype=np.uint8)
    p = ImageProcessor(resize=None, crop_size=(8, 7), crop_rounding=rounding, mean=None, std=None)
    pil, tensor = p(Image.fromarray(array)), p(array)
    assert pil.shape == (1, 3, 8, 7)
    torch.testing.assert_close(pil, tensor)
    assert pil.sum() == pytest.approx(5 * 4 * 3 * 200 / 255)


def test_box_interpolation_falls_back_to_pil_for_tensors(photos):
    p = ImageProcessor.hf_vit(20, interpolation="box")
    image = photos["rocket"]
    torch.testing.assert_close(p(_chw(image)), p(image))


def test_crop_box_maps_the_centre_crop_back_to_the_input():
    # timm: shorter side 300 -> 256 (400 -> 341), crop 224 at (top 16, left 58), scaled back
    assert ImageProcessor.timm_eval(224, crop_pct=0.875).crop_box(400, 300) == (68, 19, 331, 281)
    assert ImageProcessor.hf_vit(224).crop_box(400, 300) == (0, 0, 400, 300)


def test_a_folder_gets_one_preprocessing_whichever_way_it_is_opened(tmp_path, photos):
    """`ImageProcessor.from_pretrained(folder)` and `resolve(folder).processor` are one
    processor, its library's: a transformers folder resizes with torchvision as transformers'
    default processor does, a timm folder with PIL as timm's eval transform does; a photo gives
    identical pixels either way (a path, a PIL image or an array)."""
    import timm
    import transformers
    from safetensors.torch import save_file
    from timm.data import create_transform

    hf = tmp_path / "hf"
    vit = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    transformers.ViTForImageClassification(vit).save_pretrained(hf)
    theirs_hf = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)
    theirs_hf.save_pretrained(hf)

    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=1, num_classes=3)  # fmt: skip
    save_file(model.state_dict(), str(timm_dir / "model.safetensors"))
    cfg = {"input_size": [3, 32, 32], "crop_pct": 0.875, "interpolation": "bicubic",
           "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}  # fmt: skip
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 3, "pretrained_cfg": cfg}
    (timm_dir / "config.json").write_text(json.dumps(config))

    image = photos["astronaut"]
    path = tmp_path / "astronaut.png"
    image.save(path)
    references = {
        hf: theirs_hf(image, return_tensors="pt")["pixel_values"][0],
        timm_dir: create_transform(**cfg)(image),
    }
    for folder, backend in ((hf, "tensor"), (timm_dir, "pil")):
        opened, resolved = ImageProcessor.from_pretrained(folder), vitkit.resolve(folder)
        assert opened == resolved.processor and opened.backend == backend, folder.name
        for source in (image, path, np.asarray(image)):
            torch.testing.assert_close(opened(source), resolved.processor(source), atol=0, rtol=0)
        assert _levels(opened(image)[0], references[folder], opened.std) < 1e-3, folder.name


def test_a_grayscale_model_folder_gives_its_channel_count(tmp_path):
    model = vitkit.create_model("vit_digits_patch2_8")
    vitkit.save_pretrained(model, tmp_path)
    ImageProcessor.for_model(model.config).save_pretrained(tmp_path)
    opened = ImageProcessor.from_pretrained(tmp_path)
    assert opened == vitkit.resolve(tmp_path).processor and opened.num_channels == 1
    assert opened(np.zeros((8, 8, 3), np.uint8)).shape == (1, 1, 8, 8)
