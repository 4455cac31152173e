"""timm ViT / DeiT state dicts <-> vitkit: parity with models timm initialises randomly."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit import CheckpointError, VisionTransformer, ViTConfig
from vitkit.checkpoints.timm import config_from_timm, export_timm, save_timm, timm_kwargs

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _timm_model(name: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm starts biases, norms and tokens at constants; perturb them
        for p in model.parameters():
            if p.numel() < 200_000:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "name",
    [
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "deit_tiny_distilled_patch16_224",
    ],
)
def test_timm_parity(name, tmp_path):
    theirs = _timm_model(name)
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file(theirs.state_dict(), str(path))
    ours = vitkit.from_pretrained(path, model_name=f"{name}.fake_tag")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = _max_diff(ours(x).logits, theirs(x))
    print(f"{name}: logits max-abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_timm_without_name_says_what_is_needed(tmp_path):
    theirs = _timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(theirs.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="model_name="):
        vitkit.from_pretrained(path)


def test_shapes_override_the_preset():
    """Classes, image size, depth and pooling come from the weights, heads from the name."""
    theirs = _timm_model(
        "vit_tiny_patch16_224", img_size=64, num_classes=7, depth=3, global_pool="avg"
    )
    config = config_from_timm(theirs.state_dict(), model_name="vit_tiny_patch16_224")
    assert (config.image_hw, config.num_classes, config.depth) == ((64, 64), 7, 3)
    assert config.global_pool == "avg" and config.use_fc_norm
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x).logits, theirs(x)) <= 1e-5


def test_export_to_timm_round_trip(tmp_path):
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=5,
        global_pool="avg",
        num_register_tokens=2,
    )
    ours = VisionTransformer(config).eval()
    with torch.no_grad():
        ours.pos_embed.add_(1.0)  # a non-zero [CLS] position, folded into cls_token for timm
    theirs = timm.models.vision_transformer.VisionTransformer(**timm_kwargs(config)).eval()
    theirs.load_state_dict(export_timm(ours), strict=True)
    path = tmp_path / "timm.safetensors"
    save_timm(ours, path)
    back = vitkit.from_pretrained(path, config=config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x).logits, theirs(x)) <= 1e-5
        assert _max_diff(back(x).logits, ours(x).logits) <= 1e-5


def test_qk_norm_is_refused_by_name():
    """Layer scale became a switch (tests/test_families.py); q/k normalisation is not one."""
    theirs = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=1,
        qk_norm=True,
    )
    with pytest.raises(CheckpointError, match="q/k normalisation"):
        config_from_timm(theirs.state_dict(), model_name="vit_tiny_patch16_224")


def test_384_against_timm_resampling(tmp_path):
    """Position table 14x14 -> 24x24. timm resamples bicubically with antialias=True (both at
    load and with dynamic_img_size); vitkit matches it with resample_antialias=True. vitkit's
    default (antialias=False, as transformers) differs by an interpolation kernel: the
    antialiased bicubic uses a=-0.5, the plain one a=-0.75."""
    dynamic = _timm_model("vit_tiny_patch16_224", dynamic_img_size=True)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(dynamic.state_dict(), str(path))
    ours_aa = vitkit.from_pretrained(
        path, model_name="vit_tiny_patch16_224", image_size=384, resample_antialias=True
    )
    ours = vitkit.from_pretrained(path, model_name="vit_tiny_patch16_224", image_size=384)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ref = dynamic(x)
        aa = _max_diff(ours_aa(x).logits, ref)
        plain = _max_diff(ours(x).logits, ref)
    print(f"384 vs timm dynamic_img_size: antialias {aa:.2e}, plain bicubic {plain:.2e}")
    assert aa <= 1e-5
    assert plain > 1e-5  # the kernels differ; the test documents by how much
