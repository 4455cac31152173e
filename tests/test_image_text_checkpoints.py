"""Loading both towers through the one resolver: what `text=True` / "auto" / False give, the
clear refusal of sources without a text tower, vitkit's own image-text folders, presets, and
hostile files (huge sizes refused before anything is allocated, NaN weights, towers vitkit
does not build)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from conftest import randomize
from vitkit import resolve, save_pretrained
from vitkit.errors import CheckpointError, ConfigError
from vitkit.models.image_text import ImageTextConfig, ImageTextModel
from vitkit.models.vit import VisionTransformer
from vitkit.presets import create_image_text_model, get_image_text_config

T = pytest.importorskip("transformers")

TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=99, max_position_embeddings=12, eos_token_id=50)  # fmt: skip
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              image_size=28, patch_size=14)  # fmt: skip
IDS = torch.tensor([[3, 97, 50, 0], [5, 6, 7, 50]])


def _pixels(size: int = 28) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def clip_folder(tmp_path):
    peer = T.CLIPModel(T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    randomize(peer).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def _edit_config(folder, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------ the resolver
def test_text_false_true_and_auto_on_a_clip_folder(clip_folder):
    image_only = resolve(clip_folder)
    assert isinstance(image_only.model, VisionTransformer) and image_only.image_text is None
    both = resolve(clip_folder, text=True)
    auto = resolve(clip_folder, text="auto")
    assert isinstance(both.image_text, ImageTextModel) and both.model is both.image_text.vision
    assert isinstance(auto.image_text, ImageTextModel)
    assert both.processor == image_only.processor and both.folder == clip_folder
    x = _pixels()
    with torch.no_grad():
        a = image_only.model(x).image_embeds
        b = both.image_text.encode_image(x, normalize=False)
    assert torch.equal(a, b)
    assert vitkit.from_pretrained(clip_folder, text=True).config == image_only.model.config


def test_sources_without_a_text_tower_are_refused_clearly(clip_folder, tmp_path):
    vit = vitkit.create_model("vit_tiny_patch16_224", depth=1, image_size=32, num_classes=3)
    save_pretrained(vit, tmp_path / "vit")  # transformers ViTForImageClassification
    save_pretrained(vit, tmp_path / "vitkit", format="vitkit")
    tower = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**VISION, projection_dim=16))
    tower.save_pretrained(tmp_path / "tower")
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    cases = [
        (tmp_path / "vit", "ViTForImageClassification"),
        (tmp_path / "vitkit", "vitkit VisionTransformer"),
        (tmp_path / "tower", "CLIPVisionModelWithProjection"),
        (tmp_path / "timm.pth", "image model's state dict"),
    ]
    for source, what in cases:
        with pytest.raises(CheckpointError) as err:
            resolve(source, text=True)
        message = str(err.value)
        assert "has no text tower" in message and what in message, message
        assert "CLIP or SigLIP checkpoint with both towers" in message and "\n" not in message
        assert resolve(source, text="auto", model_name="vit_tiny_patch16_224").image_text is None


def test_early_clip_configs_with_config_dicts(clip_folder):
    """Early CLIP config.json files state the towers in text_config_dict / vision_config_dict,
    which transformers builds (with defaults) over text_config / vision_config."""
    before = resolve(clip_folder, text=True).image_text.config

    def move(data):
        for key in ("text_config", "vision_config"):
            data[f"{key}_dict"] = data[key]
            data[key] = {"hidden_size": 7}  # what transformers overrides

    _edit_config(clip_folder, move)
    assert resolve(clip_folder, text=True).image_text.config == before


def test_a_text_tower_alone_is_not_an_image_model(tmp_path):
    T.CLIPTextModel(T.CLIPTextConfig(**TEXT)).save_pretrained(tmp_path)
    for text in (False, True):
        with pytest.raises(CheckpointError, match="CLIPTextModel is a text tower alone"):
            resolve(tmp_path, text=text)


def test_text_true_refuses_a_new_head_and_keeps_image_size(clip_folder):
    with pytest.raises(ConfigError, match="num_classes"):
        resolve(clip_folder, text=True, num_classes=5)
    both = resolve(clip_folder, text=True, image_size=42)
    image = resolve(clip_folder, image_size=42)
    assert both.model.config.image_size == 42 and both.processor == image.processor
    x = _pixels(42)
    with torch.no_grad():
        assert torch.equal(both.model(x).image_embeds, image.model(x).image_embeds)


def test_dtype_device_and_overrides_reach_both_towers(clip_folder):
    both = resolve(clip_folder, text=True, dtype=torch.bfloat16, attn_implementation="eager")
    model = both.image_text
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.vision.attn_implementation == "eager"
    assert model.config.text.attn_implementation == "eager"
    assert not model.training


def test_vitkit_image_text_folders_round_trip(tmp_path):
    config = ImageTextConfig(
        vitkit.get_config("vit_tiny_patch16_224", depth=1, image_size=32, num_classes=0,
                          embed_dim=32, num_heads=2),
        get_image_text_config("clip_vit_base_patch32_224").text.replace(
            vocab_size=64, context_length=8, width=32, num_heads=2, depth=1, projection_dim=None,
            eos_token_id=63, pool="eos"),
        scores="sigmoid",
    )  # fmt: skip
    model = randomize(ImageTextModel(config))
    save_pretrained(model, tmp_path / "ours")  # "auto": no transformers class holds it
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "vitkit_image_text"
    back = resolve(tmp_path / "ours", text=True).image_text
    assert back.config == config
    x, ids = _pixels(32), torch.tensor([[1, 63, 0], [2, 3, 63]])
    with torch.no_grad():
        assert torch.equal(back(x, ids).logits_per_image, model(x, ids).logits_per_image)
        image_only = resolve(tmp_path / "ours").model  # the image tower alone
        assert torch.equal(image_only(x).pooler_output, model.vision(x).pooler_output)
    with pytest.raises(CheckpointError, match=r"causal=True.*format='vitkit'"):
        save_pretrained(model, tmp_path / "hf", format="hf")


def test_presets_with_and_without_text_towers():
    both = resolve("clip_vit_base_patch32_224", text=True, allow_preset=True, depth=1)
    assert both.random_weights and both.model is both.image_text.vision
    assert both.image_text.config.text.depth == both.model.config.depth == 1
    with pytest.raises(CheckpointError, match="preset name"):
        resolve("clip_vit_base_patch32_224", text=True)
    with pytest.raises(ConfigError, match=r"no text tower.*siglip_base_patch16_224"):
        resolve("vit_tiny_patch16_224", text=True, allow_preset=True)
    assert resolve("vit_tiny_patch16_224", text="auto", allow_preset=True).image_text is None
    with pytest.raises(ConfigError, match="no text tower"):
        create_image_text_model("deit_tiny_patch16_224")


def test_a_hub_snapshot_of_a_clip_model_loads_both_towers(clip_folder, tmp_path):
    from conftest import fake_hub_cache

    files = {p.name: p.read_bytes() for p in clip_folder.iterdir()}
    fake_hub_cache(tmp_path / "hub", "openai/fake-clip", files)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        hub = resolve("openai/fake-clip", text=True, cache_dir=tmp_path / "hub")
    local = resolve(clip_folder, text=True).image_text
    with torch.no_grad():
        assert torch.equal(hub.image_text.encode_text(IDS), local.encode_text(IDS))


# ------------------------------------------------------------------------------ hostile files
HUGE = [
    (lambda d: d["text_config"].update(vocab_size=10**12), "vocab_size"),
    (lambda d: d["text_config"].update(max_position_embeddings=10**9), "context_length"),
    (lambda d: d["text_config"].update(intermediate_size=10**12), "MLP"),
    (lambda d: d["text_config"].update(num_hidden_layers=10**7), "depth"),
    (lambda d: d["text_config"].update(hidden_size=2.5), "hidden_size"),
    (lambda d: d["text_config"].update(hidden_act=["gelu"]), "hidden_act"),
    (lambda d: d["text_config"].update(eos_token_id=[2, 3]), "eos_token_id"),
    (lambda d: d.update(text_config="none"), "text_config"),
    (lambda d: d.update(projection_dim=10**12), "projection_dim"),
]


@pytest.mark.parametrize(("edit", "field"), HUGE, ids=[f for _, f in HUGE])
def test_hostile_text_configs_are_refused_before_allocating(clip_folder, edit, field):
    _edit_config(clip_folder, edit)
    with pytest.raises(CheckpointError, match=field) as err:
        resolve(clip_folder, text=True)
    assert "config.json" in str(err.value)


def test_hostile_vitkit_image_text_config_is_refused(tmp_path):
    model = randomize(create_image_text_model("siglip_base_patch16_224", depth=1, width=32,
                                               num_heads=2, vocab_size=10, context_length=4))  # fmt: skip
    save_pretrained(model, tmp_path / "m", format="vitkit")
    _edit_config(tmp_path / "m", lambda d: d["text"].update(vocab_size=10**12))
    with pytest.raises(CheckpointError, match="vocab_size"):
        resolve(tmp_path / "m", text=True)


def test_nan_text_weights_are_refused_naming_the_key(clip_folder):
    weights = clip_folder / "model.safetensors"
    sd = load_file(weights)
    sd["text_model.final_layer_norm.weight"][0] = float("nan")
    save_file(sd, weights, metadata={"format": "pt"})
    resolve(clip_folder)  # the image tower alone is fine
    with pytest.raises(CheckpointError, match=r"text\.norm\.weight.*NaN"):
        resolve(clip_folder, text=True)


def test_unexpected_text_keys_are_errors(clip_folder):
    weights = clip_folder / "model.safetensors"
    sd = load_file(weights)
    sd["text_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra"):
        resolve(clip_folder, text=True)


OPEN_CLIP_REFUSED = [
    ({"hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}, "hf_tokenizer_name"),
    ({"hf_model_name": "roberta-base"}, "hf_model_name"),
    ({"no_causal_mask": True}, "no_causal_mask"),
    ({"pool_type": "last"}, "pool_type"),
    ({"proj_bias": True}, "proj_bias"),
    ({"ls_init_value": 0.1}, "ls_init_value"),
    ({"new_switch": 1}, "new_switch"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"norm_kwargs": {"elementwise_affine": False}}, "norm_kwargs"),
]


@pytest.mark.parametrize(
    ("change", "field"), OPEN_CLIP_REFUSED, ids=[f for _, f in OPEN_CLIP_REFUSED]
)
def test_open_clip_text_towers_vitkit_does_not_build_are_refused(tmp_path, change, field):
    open_clip = pytest.importorskip("open_clip")
    v_cfg = dict(image_size=28, patch_size=14, width=32, layers=1, head_width=16)
    t_cfg = dict(context_length=8, vocab_size=20, width=32, heads=2, layers=1)
    peer = open_clip.model.CLIP(16, v_cfg, t_cfg)
    torch.save(peer.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model_cfg = dict(embed_dim=16, vision_cfg=v_cfg, text_cfg={**t_cfg, **change})
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    resolve(tmp_path)  # the image tower alone still loads
    with pytest.raises(CheckpointError, match=field) as err:
        resolve(tmp_path, text=True)
    assert "open_clip_config.json" in str(err.value)
