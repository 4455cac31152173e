"""Google JAX .npz checkpoints: the official layout and big_vision's, checked against timm's loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from conftest import max_diff
from vitkit import CheckpointError, VisionTransformer, ViTConfig
from vitkit.checkpoints.jax import config_from_npz, load_npz, npz_from_state_dict, save_npz

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from timm.models.vision_transformer import _load_weights  # noqa: E402

CFG = ViTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


def _random_vitkit(config: ViTConfig = CFG) -> VisionTransformer:
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _big_vision(w: dict, *, stacked: bool, prefix: str, keep_cls: bool) -> dict:
    """The official layout rewritten the way big_vision stores it."""
    rename = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    out, blocks = {}, {}
    for k, v in w.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        if k.startswith("Transformer/encoderblock_"):
            i, rest = k[len("Transformer/encoderblock_") :].split("/", 1)
            blocks.setdefault(rest, {})[int(i)] = v
            if not stacked:
                out[k] = v
        elif k == "Transformer/posembed_input/pos_embedding":
            out["pos_embedding"] = v[:, 1:]  # big_vision has no [CLS] row
        elif k != "cls" or keep_cls:
            out[k] = v
    if stacked:
        for rest, per in blocks.items():
            out[f"Transformer/encoderblock/{rest}"] = np.stack([per[i] for i in sorted(per)])
    return {prefix + k: v for k, v in out.items()}


def test_official_layout_read_by_timm_and_vitkit(tmp_path):
    torch.manual_seed(0)
    source = TimmViT(**TIMM).eval()  # a timm model, written through vitkit's save_npz
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bridge = vitkit.from_pretrained(_save(source, tmp_path), config=CFG)
    path = tmp_path / "official.npz"
    save_npz(bridge, path)
    theirs = TimmViT(**TIMM).eval()
    _load_weights(theirs, str(path))
    ours = vitkit.from_pretrained(path, act="gelu")  # timm uses exact GELU
    assert ours.config.num_heads == 4 and ours.config.image_hw == (32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d_timm = max_diff(ours(x).logits, theirs(x))
        d_src = max_diff(ours(x).logits, source(x))
    print(f"npz official layout: vitkit vs timm _load_weights {d_timm:.2e}, vs source {d_src:.2e}")
    assert d_timm <= 1e-5 and d_src <= 1e-5


def _save(timm_model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "timm.safetensors"
    save_file(timm_model.state_dict(), str(path))
    return path


def test_default_activation_is_the_tanh_approximation(tmp_path):
    path = tmp_path / "m.npz"
    save_npz(_random_vitkit(), path)
    assert vitkit.from_pretrained(path).config.act == "gelu_tanh"
    assert config_from_npz(load_npz(path)).layer_norm_eps == 1e-6


@pytest.mark.parametrize("stacked", [True, False])
def test_big_vision_gap_without_cls(tmp_path, stacked):
    w = npz_from_state_dict(_random_vitkit().state_dict(), CFG)
    bv = _big_vision(w, stacked=stacked, prefix="params/", keep_cls=False)
    path = tmp_path / "bv.npz"
    np.savez(path, **bv)
    ours = vitkit.from_pretrained(path, act="gelu")
    c = ours.config
    assert (c.class_token, c.global_pool, c.use_fc_norm, c.depth) == (False, "avg", False, 2)
    theirs = TimmViT(**TIMM, class_token=False, global_pool="avg", fc_norm=False).eval()
    _load_weights(theirs, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x).logits, theirs(x)) <= 1e-5


def test_big_vision_token_pooling_pos_without_cls_row(tmp_path):
    w = npz_from_state_dict(_random_vitkit().state_dict(), CFG)
    path = tmp_path / "bv_tok.npz"
    np.savez(path, **_big_vision(w, stacked=False, prefix="", keep_cls=True))
    ours = vitkit.from_pretrained(path, act="gelu")
    assert torch.equal(ours.pos_embed[0, 0], torch.zeros(64))  # [CLS] carries no position
    theirs = TimmViT(**TIMM, no_embed_class=True).eval()
    _load_weights(theirs, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x).logits, theirs(x)) <= 1e-5


@pytest.mark.parametrize(
    ("pool", "stacked"), [("map", False), ("map", True), ("avg", False)], ids=str
)
def test_big_vision_without_cls_written_and_read_both_ways(tmp_path, pool, stacked):
    """A model without [CLS] (SigLIP's image tower: a MAP head, or mean pooling) is written in
    big_vision's layout; timm's loader and vitkit's read it back with the source's outputs,
    also with the blocks stacked and under SigLIP's "params/img/" prefix."""
    torch.manual_seed(0)
    kw = dict(class_token=False, global_pool=pool, fc_norm=False)
    source = TimmViT(**TIMM, **kw).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = CFG.replace(act="gelu", **kw)
    w = npz_from_state_dict(
        vitkit.from_pretrained(_save(source, tmp_path), config=cfg).state_dict(), cfg
    )
    assert "pos_embedding" in w and "cls" not in w and ("MAPHead_0/probe" in w) == (pool == "map")
    path = tmp_path / "bv.npz"
    np.savez(path, **_big_vision(w, stacked=stacked, prefix="params/img/", keep_cls=False))
    theirs = TimmViT(**TIMM, **kw).eval()
    _load_weights(theirs, str(path))
    ours = vitkit.from_pretrained(path, act="gelu")
    c = ours.config
    assert (c.class_token, c.global_pool, c.use_fc_norm) == (False, pool, False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = source(x)
        assert max_diff(theirs(x), want) <= 1e-5 and max_diff(ours(x).logits, want) <= 1e-5


def test_a_map_head_vitkit_cannot_hold_is_one_line(tmp_path):
    cfg = CFG.replace(class_token=False, global_pool="map", fc_norm=False)
    w = npz_from_state_dict(_random_vitkit(cfg).state_dict(), cfg)
    w["MAPHead_0/MlpBlock_0/Dense_0/kernel"] = np.zeros((64, 96), np.float32)
    path = tmp_path / "odd.npz"
    np.savez(path, **w)
    with pytest.raises(CheckpointError, match="MAP head has 4 heads and an MLP of 96"):
        vitkit.from_pretrained(path)


def test_in21k_pre_logits_become_the_tanh_head(tmp_path):
    model = _random_vitkit(CFG.replace(head="mlp", head_hidden_dim=32, num_classes=7))
    path = tmp_path / "in21k.npz"
    save_npz(model, path)
    assert "pre_logits/kernel" in load_npz(path)
    ours = vitkit.from_pretrained(path, act="gelu")
    assert ours.config.head == "mlp" and ours.config.head_hidden_dim == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ours(x)
        cls = out.last_hidden_state[:, 0]
        fc = model.pre_logits.fc
        expected = torch.tanh(cls @ fc.weight.T + fc.bias)
        assert max_diff(out.pooler_output, expected) <= 1e-6
        assert max_diff(out.logits, model(x).logits) <= 1e-5


def test_corrupt_and_foreign_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"bad\.npz"):
        vitkit.from_pretrained(bad)
    other = tmp_path / "other.npz"
    np.savez(other, something=np.zeros(3))
    with pytest.raises(CheckpointError, match="embedding/kernel"):
        vitkit.from_pretrained(other)
    w = npz_from_state_dict(_random_vitkit().state_dict(), CFG)
    w["Transformer/encoderblock_0/extra/kernel"] = np.zeros(2, dtype=np.float32)
    extra = tmp_path / "extra.npz"
    np.savez(extra, **w)
    with pytest.raises(CheckpointError, match="extra/kernel"):
        vitkit.from_pretrained(extra)
    del w["Transformer/encoderblock_0/extra/kernel"], w["head/bias"], w["cls"]
    np.savez(extra, **w)
    with pytest.raises(CheckpointError) as err:
        vitkit.from_pretrained(extra, config=CFG)
    assert "missing keys (2): cls, head/bias" in str(err.value)
    with pytest.raises(CheckpointError, match="has 4 attention heads"):
        vitkit.from_pretrained(_npz(tmp_path), config=CFG.replace(num_heads=8))


def _npz(tmp_path):
    path = tmp_path / "ok.npz"
    save_npz(_random_vitkit(), path)
    return path
