"""from_pretrained / save_pretrained: folders, hub cache, round trips with transformers, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from conftest import fake_hub_cache, max_diff
from vitkit import CheckpointError, VisionTransformer, ViTConfig

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
)
TINY = ViTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3)


def _random(config: ViTConfig = TINY) -> VisionTransformer:
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_round_trip_through_transformers(tmp_path):
    """vitkit -> save_pretrained -> transformers -> save_pretrained -> vitkit, same logits."""
    ours = _random(TINY.replace(num_classes=3, id2label={0: "a", 1: "b", 2: "c"}))
    vitkit.save_pretrained(ours, tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "ours").eval()
    assert theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d1 = max_diff(ours(x).logits, theirs(x).logits)
    theirs.save_pretrained(tmp_path / "theirs")
    back = vitkit.from_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        d2 = max_diff(back(x).logits, ours(x).logits)
    print(f"round trip: vitkit->transformers {d1:.2e}, transformers->vitkit {d2:.2e}")
    assert d1 <= 1e-5 and d2 <= 1e-5
    assert back.config == ours.config


def test_real_size_vit_b16_parity(tmp_path):
    torch.manual_seed(0)
    theirs = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    theirs.save_pretrained(tmp_path)
    ours = vitkit.from_pretrained(tmp_path)
    assert ours.num_params() == 86_567_656
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = max_diff(ours(x).logits, theirs(x).logits)
    print(f"ViT-B/16 transformers -> vitkit: {diff:.2e}")
    assert diff <= 1e-5


def test_vit_model_folder_with_and_without_pooler(tmp_path):
    cfg = transformers.ViTConfig(**SMALL)
    x = torch.randn(2, 3, 32, 32)
    for pooler in (True, False):
        theirs = transformers.ViTModel(cfg, add_pooling_layer=pooler).eval()
        theirs.save_pretrained(tmp_path / str(pooler))
        ours = vitkit.from_pretrained(tmp_path / str(pooler))
        assert ours.config.head == ("mlp" if pooler else "linear")
        with torch.no_grad():
            a, b = ours(x), theirs(x)
        assert max_diff(a.last_hidden_state, b.last_hidden_state) <= 1e-5
        if pooler:
            assert max_diff(a.pooler_output, b.pooler_output) <= 1e-5
            vitkit.save_pretrained(ours, tmp_path / "again")
            again = transformers.ViTModel.from_pretrained(tmp_path / "again").eval()
            with torch.no_grad():
                assert max_diff(again(x).pooler_output, b.pooler_output) <= 1e-5


def test_deit_distilled_saves_as_deit_with_teacher(tmp_path):
    ours = _random(TINY.replace(distilled=True))
    vitkit.save_pretrained(ours, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "deit"
    assert meta["architectures"] == ["DeiTForImageClassificationWithTeacher"]
    theirs = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x).logits, theirs(x).logits) <= 1e-5


def test_384_against_transformers_interpolate_pos_encoding(tmp_path):
    """Both resample bicubically without antialias (align_corners=False): identical."""
    torch.manual_seed(0)
    theirs = transformers.ViTForImageClassification(
        transformers.ViTConfig(**{**SMALL, "image_size": 224, "patch_size": 16}, num_labels=3)
    ).eval()
    theirs.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ref = theirs(x, interpolate_pos_encoding=True).logits
        at_load = vitkit.from_pretrained(tmp_path, image_size=384)
        d_load = max_diff(at_load(x).logits, ref)
        d_run = max_diff(vitkit.from_pretrained(tmp_path)(x).logits, ref)
    print(
        f"384 vs transformers interpolate_pos_encoding: at load {d_load:.2e}, per call {d_run:.2e}"
    )
    assert at_load.config.image_hw == (384, 384) and at_load.pos_embed.shape[1] == 1 + 24 * 24
    assert d_load <= 1e-5 and d_run <= 1e-5


def test_new_head_is_zero_initialised(tmp_path):
    vitkit.save_pretrained(_random(), tmp_path)
    model = vitkit.from_pretrained(tmp_path, num_classes=10, drop_path_rate=0.1)
    assert model.head.out_features == 10 and model.config.drop_path_rate == 0.1
    assert torch.count_nonzero(model.head.weight) == 0
    assert model(torch.randn(1, 3, 32, 32)).logits.abs().max() == 0


def test_vitkit_format_for_variants_transformers_cannot_express(tmp_path):
    config = TINY.replace(num_register_tokens=2, global_pool="avg", pos_embed="sincos2d")
    ours = _random(config)
    vitkit.save_pretrained(ours, tmp_path)  # auto -> vitkit
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "vitkit"
    back = vitkit.from_pretrained(str(tmp_path))
    assert back.config == config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ours(x).logits)
    with pytest.raises(CheckpointError, match="register"):
        vitkit.save_pretrained(ours, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf" / "config.json").exists()


def test_failed_save_leaves_no_files(tmp_path, monkeypatch):
    from vitkit.checkpoints import pretrained

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(
        pretrained, "save_file", boom
    )  # safetensors' writer, as pretrained calls it
    with pytest.raises(OSError, match="disk full"):
        vitkit.save_pretrained(_random(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_hub_id_offline_from_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    ours = _random()
    vitkit.save_pretrained(ours, src, format="hf")
    cache = tmp_path / "cache"
    fake_hub_cache(
        cache,
        "google/vit-fake",
        {n: (src / n).read_bytes() for n in ("config.json", "model.safetensors")},
    )
    model = vitkit.from_pretrained("google/vit-fake", cache_dir=cache)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x).logits, ours(x).logits) <= 1e-5
    with pytest.raises(CheckpointError, match="huggingface-cli download google/other"):
        vitkit.from_pretrained("google/other", cache_dir=cache)


def test_timm_hub_folder(tmp_path):
    timm = pytest.importorskip("timm")
    theirs = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=4
    ).eval()
    save_file(theirs.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny_patch16_224",
                "num_classes": 4,
                "pretrained_cfg": {"label_names": ["a", "b", "c", "d"]},
            }
        )
    )
    ours = vitkit.from_pretrained(tmp_path)
    assert ours.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours(x).logits, theirs(x)) <= 1e-5


# ------------------------------------------------------------------------------ untrusted files
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"refusing .*safetensors"):
        vitkit.from_pretrained(path, model_name="vit_tiny_patch16_224")
    assert not marker.exists()


def test_weights_only_pickle_training_checkpoint_is_read(tmp_path):
    ours = _random()
    path = tmp_path / "ckpt.pth"
    torch.save(
        {"model": {"module." + k: v for k, v in ours.state_dict().items()}, "epoch": 3}, path
    )
    back = vitkit.from_pretrained(path, config=TINY)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_corrupt_files(tmp_path):
    vitkit.save_pretrained(_random(), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        vitkit.from_pretrained(tmp_path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"bad\.pth"):
        vitkit.from_pretrained(bad, model_name="vit_tiny_patch16_224")


def test_mismatch_is_one_error_listing_everything(tmp_path):
    ours = _random(TINY.replace(pos_embed="learned"))
    vitkit.save_pretrained(ours, tmp_path, format="vitkit")
    sd = load_file(tmp_path / "model.safetensors")
    sd["blocks.0.extra"] = torch.zeros(1)
    del sd["norm.bias"]
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 64)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        vitkit.from_pretrained(tmp_path)
    msg = str(err.value)
    for part in (
        "model.safetensors",
        "missing keys (1): norm.bias",
        "unexpected keys (1): blocks.0.extra",
        "blocks.1.mlp.fc1.weight (model [256, 64], file [7, 64])",
    ):
        assert part in msg


def test_non_strict_loads_what_matches(tmp_path):
    ours = _random()
    vitkit.save_pretrained(ours, tmp_path, format="vitkit")
    sd = load_file(tmp_path / "model.safetensors")
    del sd["norm.bias"]
    sd["extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="norm.bias"):
        back = vitkit.from_pretrained(tmp_path, strict=False)
    assert torch.equal(back.head.weight, ours.head.weight)
    assert torch.equal(back.norm.bias, torch.zeros(64))


def test_masked_image_modeling_folder_keeps_mask_token(tmp_path):
    """ViTForMaskedImageModeling: encoder and mask token load; the decoder is not vitkit's."""
    theirs = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**SMALL)).eval()
    with torch.no_grad():
        theirs.vit.embeddings.mask_token.normal_()
    theirs.save_pretrained(tmp_path)
    ours = vitkit.from_pretrained(tmp_path)
    assert ours.config.use_mask_token and ours.config.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        a = ours(x, bool_masked_pos=mask).last_hidden_state
        b = theirs.vit(x, bool_masked_pos=mask).last_hidden_state
    assert max_diff(a, b) <= 1e-5


def test_hub_id_without_network_says_how_to_get_the_files(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):  # what hf_hub_download raises after its retries
        raise LocalEntryNotFoundError("cannot reach the Hub and the file is not cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError, match="huggingface-cli download google/vit-x"):
        vitkit.from_pretrained("google/vit-x", cache_dir=tmp_path)
