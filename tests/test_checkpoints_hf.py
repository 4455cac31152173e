"""transformers ViT/DeiT <-> vitkit: config and state-dict mapping, numerical parity."""

from __future__ import annotations

import pytest
import torch

from vitkit import CheckpointError, VisionTransformer, ViTConfig
from vitkit.checkpoints.hf import (
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
)


def _vitkit_from(hf_model) -> VisionTransformer:
    hf_dict = hf_model.config.to_dict()
    hf_dict["architectures"] = [type(hf_model).__name__]
    config = config_from_hf(hf_dict)
    sd = {k: v for k, v in hf_model.state_dict().items()}
    model = VisionTransformer(config)
    model.load_state_dict(state_dict_from_hf(sd, config))
    return model.eval()


def _file_state_dict(hf_model, tmp_path):
    """The state dict as transformers writes it to disk (v4 key names)."""
    from safetensors.torch import load_file

    hf_model.save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


def test_vit_classifier_parity_and_round_trip(tmp_path):
    cfg = transformers.ViTConfig(**SMALL, num_labels=5)
    hf = transformers.ViTForImageClassification(cfg).eval()
    file_sd = _file_state_dict(hf, tmp_path)
    config = config_from_hf({**cfg.to_dict(), "architectures": ["ViTForImageClassification"]})
    assert config.layer_norm_eps == 1e-12 and config.num_classes == 5 and config.head == "linear"
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state_dict_from_hf(file_sd, config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-5
    back = state_dict_to_hf(ours.state_dict(), config)
    assert set(back) == set(file_sd)
    assert all(torch.equal(back[k], file_sd[k]) for k in file_sd)


def test_in_memory_transformers5_names_are_accepted():
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=3))
    ours = _vitkit_from(hf.eval())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= 1e-5


def test_vit_model_pooler_parity(tmp_path):
    cfg = transformers.ViTConfig(**SMALL)
    hf = transformers.ViTModel(cfg).eval()
    file_sd = _file_state_dict(hf, tmp_path)
    config = config_from_hf({**cfg.to_dict(), "architectures": ["ViTModel"]})
    assert config.head == "mlp" and config.num_classes == 0
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state_dict_from_hf(file_sd, config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), hf(x)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= 1e-5
    back = state_dict_to_hf(ours.state_dict(), config)
    assert set(back) == set(file_sd) and all(torch.equal(back[k], file_sd[k]) for k in file_sd)


def test_deit_with_teacher_parity(tmp_path):
    cfg = transformers.DeiTConfig(**SMALL, num_labels=4)
    hf = transformers.DeiTForImageClassificationWithTeacher(cfg).eval()
    with torch.no_grad():  # DeiT initialises its tokens to zero; make them matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    file_sd = _file_state_dict(hf, tmp_path)
    config = config_from_hf(
        {**cfg.to_dict(), "architectures": ["DeiTForImageClassificationWithTeacher"]}
    )
    assert config.distilled
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state_dict_from_hf(file_sd, config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), hf(x)
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    assert (a.cls_logits - b.cls_logits).abs().max().item() <= 1e-5
    assert (a.distillation_logits - b.distillation_logits).abs().max().item() <= 1e-5
    back = state_dict_to_hf(ours.state_dict(), config)
    assert set(back) == set(file_sd) and all(torch.equal(back[k], file_sd[k]) for k in file_sd)


def test_config_round_trip_keeps_labels_and_eps():
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=2,
        id2label={0: "cat", 1: "dog"},
        layer_norm_eps=1e-6,
        act="gelu_tanh",
    )
    hf = config_to_hf(config)
    assert hf["id2label"] == {"0": "cat", "1": "dog"} and hf["label2id"] == {"cat": 0, "dog": 1}
    assert hf["hidden_act"] == "gelu_pytorch_tanh"
    assert config_from_hf(hf) == config


def test_unmapped_and_missing_keys_are_listed():
    config = ViTConfig(
        image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3
    )
    sd = state_dict_to_hf(VisionTransformer(config).state_dict(), config)
    sd["vit.encoder.layer.0.extra.weight"] = torch.zeros(1)
    del sd["vit.encoder.layer.1.attention.attention.key.bias"]
    with pytest.raises(CheckpointError) as err:
        state_dict_from_hf(sd, config, source="x.safetensors")
    msg = str(err.value)
    assert "x.safetensors" in msg and "vit.encoder.layer.0.extra.weight" in msg
    assert "vit.encoder.layer.1.attention.attention.key.bias" in msg


def test_shape_conflicts_are_listed():
    config = ViTConfig(
        image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3
    )
    sd = state_dict_to_hf(VisionTransformer(config).state_dict(), config)
    with pytest.raises(CheckpointError, match=r"head.weight \(model \[5, 64\], file \[3, 64\]\)"):
        state_dict_from_hf(sd, config.replace(num_classes=5))


def test_variants_transformers_cannot_express_are_refused():
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=3,
        num_register_tokens=2,
    )
    with pytest.raises(CheckpointError, match="register"):
        config_to_hf(config)
    with pytest.raises(CheckpointError, match="reg_token"):
        state_dict_to_hf(VisionTransformer(config).state_dict(), config)
