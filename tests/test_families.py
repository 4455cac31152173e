"""The encoder families (DINOv2, CLIP, SigLIP, DeiT III) against transformers and timm, both ways.

Every case builds the peer with random weights on a small config, converts it to vitkit and
compares last_hidden_state, pooled output and image embedding at the native size and at a
non-square size through the peer's own position interpolation (transformers
`interpolate_pos_encoding=True`, DINOv2 always; timm `dynamic_img_size=True`); then a vitkit
model with fresh random weights is written in the peer's format, loaded strictly by the peer,
and compared the same way. `scripts/family_parity.py` prints the same numbers as a table.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import vitkit
from conftest import max_diff, randomize
from vitkit import from_pretrained, resolve, save_pretrained
from vitkit.checkpoints import hf as hf_ckpt
from vitkit.checkpoints.timm import config_from_timm, export_timm, state_dict_from_timm
from vitkit.data.processor import ImageProcessor
from vitkit.errors import CheckpointError
from vitkit.models.vit import VisionTransformer

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-5
NATIVE, OTHER = (56, 56), (42, 70)  # patch 14: a 4x4 grid, then 3x5


def _images(hw: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ transformers
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56)
HF_CASES = {
    "Dinov2Model": lambda: T.Dinov2Model(
        T.Dinov2Config(**_SMALL, patch_size=14, layerscale_value=0.5)
    ),
    "Dinov2Model-swiglu": lambda: T.Dinov2Model(
        T.Dinov2Config(**_SMALL, patch_size=14, use_swiglu_ffn=True)
    ),
    "Dinov2WithRegistersModel": lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**_SMALL, patch_size=14, num_register_tokens=4)
    ),
    "Dinov2ForImageClassification": lambda: T.Dinov2ForImageClassification(
        T.Dinov2Config(**_SMALL, patch_size=14, id2label={0: "cat", 1: "dog", 2: "fox"})
    ),
    "Dinov2WithRegistersForImageClassification": lambda: (
        T.Dinov2WithRegistersForImageClassification(
            T.Dinov2WithRegistersConfig(**_SMALL, patch_size=14, num_labels=5)
        )
    ),
    "CLIPVisionModel": lambda: T.CLIPVisionModel(
        T.CLIPVisionConfig(**_SMALL, patch_size=14, intermediate_size=128)
    ),
    "CLIPVisionModelWithProjection": lambda: T.CLIPVisionModelWithProjection(
        T.CLIPVisionConfig(**_SMALL, patch_size=14, intermediate_size=128, projection_dim=32)
    ),
    "SiglipVisionModel": lambda: T.SiglipVisionModel(
        T.SiglipVisionConfig(**_SMALL, patch_size=14, intermediate_size=128)
    ),
}


def _hf_outputs(peer, x: torch.Tensor, norm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The peer's outputs in vitkit's terms. transformers' CLIP returns its tokens before
    post_layernorm; vitkit's last_hidden_state is after the final norm, so the peer's tokens
    go through that same norm (`norm`, vitkit's copy of post_layernorm) to be compared."""
    name = type(peer).__name__
    kwargs = {} if name.startswith("Dinov2") else {"interpolate_pos_encoding": True}
    if name.endswith("ForImageClassification"):  # the encoder's tokens, then the logits
        tokens = peer.base_model(pixel_values=x).last_hidden_state
        return {"last_hidden_state": tokens, "logits": peer(pixel_values=x).logits}
    out = peer(pixel_values=x, **kwargs)
    tokens = norm(out.last_hidden_state) if name.startswith("CLIP") else out.last_hidden_state
    result = {"last_hidden_state": tokens}
    if name == "CLIPVisionModelWithProjection":
        result["pooler_output"] = peer.vision_model(pixel_values=x, **kwargs).pooler_output
        result["image_embeds"] = out.image_embeds
    else:
        result["pooler_output"] = out.pooler_output
    return result


def _ours(model: VisionTransformer, x: torch.Tensor, keys) -> dict[str, torch.Tensor]:
    out = model(x)
    return {k: getattr(out, k) for k in keys}


def _compare(model, peer, hw) -> float:
    x = _images(hw)
    with torch.no_grad():
        theirs = _hf_outputs(peer, x, model.norm)
        ours = _ours(model, x, theirs)
    return max(max_diff(ours[k], theirs[k]) for k in theirs)


def hf_parity(case: str, tmp_path) -> dict[str, dict[str, float]]:
    """Max abs differences {direction: {size: diff}} of one transformers class."""
    peer = randomize(HF_CASES[case]())
    folder = tmp_path / "theirs"
    peer.save_pretrained(folder)
    ours = from_pretrained(folder)
    result = {"load": {}, "save": {}}
    for label, hw in (("native", NATIVE), ("other", OTHER)):
        result["load"][label] = _compare(ours, peer, hw)

    fresh = randomize(VisionTransformer(ours.config), seed=2)
    save_pretrained(fresh, tmp_path / "ours", format="hf")
    back, info = type(peer).from_pretrained(tmp_path / "ours", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    back.eval()
    for label, hw in (("native", NATIVE), ("other", OTHER)):
        result["save"][label] = _compare(fresh, back, hw)
    return result


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_both_ways(case, tmp_path):
    result = hf_parity(case, tmp_path)
    for direction, sizes in result.items():
        for size, diff in sizes.items():
            assert diff <= TOL, (direction, size, diff)


def test_dinov2_mask_token_matches(tmp_path):
    peer = randomize(HF_CASES["Dinov2Model"]())
    peer.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    x = _images(NATIVE)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        a = ours(x, bool_masked_pos=mask).last_hidden_state
        b = peer(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        unmasked = ours(x).last_hidden_state
    assert max_diff(a, b) <= TOL
    assert max_diff(a, unmasked) > 1e-2  # the mask token changed something


def test_each_peer_keeps_its_own_interpolation_rule(tmp_path):
    """Dinov2WithRegistersModel resamples positions with antialias, Dinov2Model without: the
    loader sets `pos_embed_antialias` per class, and the other rule would not match."""
    from vitkit.models.vit import rebuild

    for case, antialias in (("Dinov2WithRegistersModel", True), ("Dinov2Model", False)):
        peer = randomize(HF_CASES[case]())
        peer.save_pretrained(tmp_path / case)
        ours = from_pretrained(tmp_path / case)
        assert ours.config.pos_embed_antialias is antialias
        wrong = rebuild(ours, pos_embed_antialias=not antialias).eval()
        assert _compare(ours, peer, OTHER) <= TOL
        assert _compare(wrong, peer, OTHER) > 1e-3
        assert _compare(wrong, peer, NATIVE) <= TOL


@pytest.mark.parametrize(
    ("full", "vision"),
    [
        ("CLIPModel", "CLIPVisionModelWithProjection"),
        ("SiglipModel", "SiglipVisionModel"),
    ],
)
def test_vision_tower_of_a_full_model_folder(full, vision, tmp_path):
    """CLIPModel / SiglipModel folders: the image tower (and CLIP's visual_projection) load,
    the text tower and logit scale are left aside; the embedding is get_image_features'."""
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    vis = dict(_SMALL, patch_size=14, intermediate_size=128)
    if full == "CLIPModel":
        peer = T.CLIPModel(T.CLIPConfig(vision_config=vis, text_config=text, projection_dim=32))
    else:
        peer = T.SiglipModel(T.SiglipConfig(vision_config=vis, text_config=text))
    randomize(peer).save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    x = _images(NATIVE)
    with torch.no_grad():
        features = peer.get_image_features(pixel_values=x)
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        out = ours(x)
    embeds = out.image_embeds if full == "CLIPModel" else out.pooler_output
    assert max_diff(embeds, features) <= TOL
    assert hf_ckpt.save_hf(ours.config, ours.state_dict())[0]["architectures"] == [vision]


def test_unexpected_keys_next_to_the_text_tower_are_errors(tmp_path):
    peer = randomize(HF_CASES["CLIPVisionModel"]())
    sd = {f"vision_model.{k}": v for k, v in peer.state_dict().items()}
    sd["text_model.anything"] = torch.zeros(1)  # ignored on purpose
    cfg = hf_ckpt.hf_clip.config_from_hf(
        {"model_type": "clip_vision_model", **_SMALL, "patch_size": 14, "intermediate_size": 128}
    )
    assert "blocks.0.attn.qkv.weight" in hf_ckpt.hf_clip.state_dict_from_hf(sd, cfg)
    sd["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra"):
        hf_ckpt.hf_clip.state_dict_from_hf(sd, cfg)


def test_dinov2_classifier_keeps_its_labels_and_reads_cls_beside_the_patch_mean(tmp_path):
    peer = randomize(HF_CASES["Dinov2ForImageClassification"]())
    peer.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(tmp_path / "theirs")
    c = ours.config
    assert (c.global_pool, c.num_classes, c.id2label) == (
        "token_avg",
        3,
        {0: "cat", 1: "dog", 2: "fox"},
    )
    x = _images(NATIVE)
    with torch.no_grad():
        out = ours(x)
        tokens = out.last_hidden_state
    want = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)  # transformers' linear input
    assert out.pooler_output.shape == (2, 128) and max_diff(out.pooler_output, want) == 0.0
    assert ours.num_params() == sum(p.numel() for p in peer.parameters())
    assert abs(c.estimated_params() / ours.num_params() - 1) < 0.03

    save_pretrained(ours, tmp_path / "ours")  # auto: transformers can hold it
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["architectures"] == ["Dinov2ForImageClassification"]
    assert meta["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}

    from vitkit.explain import _readout  # the rollout's readout: half [CLS], half the patches

    weights = _readout(ours, 1 + c.num_patches, torch.device("cpu"))
    assert weights[0] == 0.5 and torch.allclose(weights[1:].sum(), torch.tensor(0.5))


def test_dinov2_heads_transformers_cannot_hold_are_refused(tmp_path):
    cls_only = vitkit.create_model("dinov2_small_patch14_518", depth=1, num_classes=4)
    with pytest.raises(CheckpointError, match="on \\[CLS\\] alone"):
        save_pretrained(cls_only, tmp_path / "a", format="hf")
    pair = vitkit.create_model(
        "dinov2_small_patch14_518", depth=1, num_classes=4, global_pool="token_avg"
    )
    with pytest.raises(CheckpointError, match=r"timm cannot hold.*side by side"):
        export_timm(pair)
    with pytest.raises(vitkit.ConfigError, match=r"token_avg.*class_token"):
        vitkit.ViTConfig(global_pool="token_avg", class_token=False)


def test_what_transformers_cannot_hold_is_refused_and_auto_falls_back(tmp_path):
    deit3 = vitkit.create_model("deit3_small_patch16_224", depth=1, num_classes=0)
    with pytest.raises(CheckpointError, match="no_embed_class"):
        save_pretrained(deit3, tmp_path / "hf", format="hf")
    save_pretrained(deit3, tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["model_type"] == "vitkit"
    back = from_pretrained(tmp_path / "auto")
    x = _images((32, 32))
    with torch.no_grad():
        assert max_diff(back(x).pooler_output, deit3.eval()(x).pooler_output) == 0.0


# ------------------------------------------------------------------------------ timm
TIMM_CASES = {
    "deit3_small_patch16_224": {},
    "vit_small_patch14_dinov2": {},
    "vit_small_patch14_reg4_dinov2": {},
    "vit_giant_patch14_dinov2": {},  # SwiGLU
    "vit_base_patch16_clip_quickgelu_224": {"num_classes": 32},  # head = the projection
    "vit_base_patch16_clip_224": {"num_classes": 0},
    "vit_base_patch16_siglip_224": {"num_classes": 0},
}


def _timm_small(name: str, **kwargs):
    patch = 14 if "patch14" in name else 16
    size = 56 if patch == 14 else 64
    kw = dict(img_size=size, embed_dim=96, depth=2, pretrained=False, **TIMM_CASES[name])
    return timm.create_model(name, **{**kw, **kwargs}).eval(), size


def _timm_outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    features = model.forward_features(x)
    result = {
        "last_hidden_state": features,
        "pooler_output": model.forward_head(features, pre_logits=True),
    }
    if model.num_classes:
        result["head"] = model.forward_head(features)
    return result


def _ours_timm(model: VisionTransformer, x: torch.Tensor, keys) -> dict[str, torch.Tensor]:
    out = model(x)
    ours = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    if "head" in keys:
        ours["head"] = out.image_embeds if out.image_embeds is not None else out.logits
    return ours


def _compare_timm(model, peer, hw) -> float:
    x = _images(hw)
    with torch.no_grad():
        theirs = _timm_outputs(peer, x)
        ours = _ours_timm(model, x, theirs)
    return max(max_diff(ours[k], theirs[k]) for k in theirs)


def timm_parity(name: str) -> dict[str, dict[str, float]]:
    peer, size = _timm_small(name)
    randomize(peer)
    if "clip" in name and peer.num_classes:
        peer.head.bias.data.zero_()  # timm's CLIP: the projection is a zero-bias head
    sd = peer.state_dict()
    config = config_from_timm(sd, model_name=name)
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state_dict_from_timm(sd, config))
    dynamic, _ = _timm_small(name, dynamic_img_size=True)
    dynamic.load_state_dict(sd)
    other = (size * 3 // 4, size * 5 // 4) if size == 64 else OTHER
    result = {"load": {}, "save": {}}
    result["load"]["native"] = _compare_timm(ours, peer, (size, size))
    result["load"]["other"] = _compare_timm(ours, dynamic, other)

    fresh = randomize(VisionTransformer(config), seed=2)
    back, _ = _timm_small(name)
    back.load_state_dict(export_timm(fresh), strict=True)
    back_dynamic, _ = _timm_small(name, dynamic_img_size=True)
    back_dynamic.load_state_dict(export_timm(fresh), strict=True)
    result["save"]["native"] = _compare_timm(fresh, back, (size, size))
    result["save"]["other"] = _compare_timm(fresh, back_dynamic, other)
    return result


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_both_ways(name):
    result = timm_parity(name)
    for direction, sizes in result.items():
        for size, diff in sizes.items():
            assert diff <= TOL, (direction, size, diff)


def _open_clip_names(timm_sd: dict) -> dict:
    """A timm CLIP tower's weights as open_clip saves a whole CLIP model: the image tower under
    `visual.` with open_clip's names, a text tower and logit_scale beside it."""
    renames = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
               ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
               ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")]  # fmt: skip
    out = {}
    for key, value in timm_sd.items():
        if key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key == "head.weight":
            out["visual.proj"] = value.T.contiguous()
        elif key == "norm.weight" or key == "norm.bias":
            out["visual.ln_post." + key.split(".")[1]] = value
        elif key != "head.bias":
            for old, new in renames:
                key = key.replace(old, new)
            out["visual." + key] = value
    width = timm_sd["cls_token"].shape[-1]
    out["token_embedding.weight"] = torch.zeros(10, width)  # the text tower, left aside
    out["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3 * width, width)
    out["logit_scale"] = torch.tensor(4.6)
    return out


def test_open_clip_checkpoints_load_with_their_config_and_preprocessing(tmp_path):
    """open_clip's layout (checked by timm's own converter) loads to the timm model's outputs:
    from a hub-style folder with open_clip_config.json (quick-GELU, heads, mean/std), and as a
    bare file with open_clip's defaults (exact GELU) unless act is given."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    peer = timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False, img_size=64,
                             embed_dim=128, depth=2, num_heads=2, num_classes=32).eval()  # fmt: skip
    randomize(peer)
    peer.head.bias.data.zero_()
    theirs = _open_clip_names(peer.state_dict())
    back = checkpoint_filter_fn(theirs, peer)  # timm's reading of the same file
    assert back.keys() == peer.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in peer.state_dict().items())

    folder = tmp_path / "open_clip"
    folder.mkdir()
    torch.save(theirs, folder / "open_clip_pytorch_model.bin")
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {
            "image_size": 64, "layers": 2, "width": 128, "patch_size": 32, "head_width": 64}},
        "preprocess_cfg": {"mean": mean, "std": std}}))  # fmt: skip
    resolved = resolve(folder)
    ours, p = resolved.model, resolved.processor
    c = ours.config
    assert (c.act, c.num_heads, c.projection_dim, c.pre_norm, c.patch_bias) == (
        "quick_gelu", 2, 32, True, False)  # fmt: skip
    assert _compare_timm(ours, peer, (64, 64)) <= TOL
    assert (p.resize, p.crop_size, p.interpolation) == (64, (64, 64), "bicubic")
    assert p.mean == pytest.approx(tuple(mean)) and p.std == pytest.approx(tuple(std))

    bare = tmp_path / "weights.bin"
    torch.save(theirs, bare)
    assert from_pretrained(bare).config.act == "gelu"  # open_clip's default without a config
    assert _compare_timm(from_pretrained(bare, act="quick_gelu"), peer, (64, 64)) <= TOL

    # a hub id whose cached snapshot is an open_clip repository (no config.json)
    from conftest import fake_hub_cache

    names = ("open_clip_config.json", "open_clip_pytorch_model.bin")
    fake_hub_cache(
        tmp_path / "hub", "laion/fake-clip", {n: (folder / n).read_bytes() for n in names}
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        hub = resolve("laion/fake-clip", cache_dir=tmp_path / "hub")
    assert hub.processor == p and _compare_timm(hub.model, peer, (64, 64)) <= TOL


def test_timm_names_set_the_family_switches():
    def cfg(name):
        peer, _ = _timm_small(name)
        return config_from_timm(peer.state_dict(), model_name=f"{name}.some_tag")

    deit3 = cfg("deit3_small_patch16_224")
    assert deit3.no_embed_class and deit3.layer_scale_init and deit3.num_classes == 1000
    reg = cfg("vit_small_patch14_reg4_dinov2")
    assert reg.num_register_tokens == 4 and not reg.no_embed_class and not reg.use_mask_token
    giant = cfg("vit_giant_patch14_dinov2")
    assert giant.mlp_layer == "swiglu" and giant.mlp_hidden_dim == 512
    quick = cfg("vit_base_patch16_clip_quickgelu_224")
    assert (quick.act, quick.pre_norm, quick.patch_bias) == ("quick_gelu", True, False)
    assert quick.projection_dim == 32 and quick.num_classes == 0
    assert cfg("vit_base_patch16_clip_224").act == "gelu"
    siglip = cfg("vit_base_patch16_siglip_224")
    assert (siglip.global_pool, siglip.class_token, siglip.act) == ("map", False, "gelu")


# ------------------------------------------------------------------------------ presets
def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _preset_count(name: str, **overrides) -> int:
    with torch.device("meta"):
        return _count(vitkit.create_model(name, **overrides))


@pytest.mark.parametrize(
    ("preset", "timm_name", "timm_kwargs", "overrides", "extra"),
    [
        ("deit3_base_patch16_224", "deit3_base_patch16_224", {}, {}, 0),
        ("deit3_large_patch16_384", "deit3_large_patch16_384", {}, {}, 0),
        (
            "dinov2_small_reg4_patch14_518",
            "vit_small_patch14_reg4_dinov2",
            {"num_classes": 0, "img_size": 518},
            {"use_mask_token": False},
            -384,  # vitkit keeps [CLS]'s position row (as transformers); timm folds it in
        ),
        (
            "dinov2_giant_patch14_518",
            "vit_giant_patch14_dinov2",
            {"num_classes": 0, "img_size": 518},
            {"use_mask_token": False},
            0,
        ),
        ("siglip_base_patch16_384", "vit_base_patch16_siglip_384", {"num_classes": 0}, {}, 0),
        # timm's CLIP head carries a zero bias where CLIP's projection has none
        ("clip_vit_large_patch14_224", "vit_large_patch14_clip_224", {"num_classes": 768}, {}, 768),
    ],
)
def test_preset_parameter_counts_match_timm(preset, timm_name, timm_kwargs, overrides, extra):
    with torch.device("meta"):
        theirs = _count(timm.create_model(timm_name, pretrained=False, **timm_kwargs))
    assert _preset_count(preset, **overrides) + extra == theirs


def _hf_count(cls, config) -> int:
    with torch.device("meta"):
        return _count(cls(config))


@pytest.mark.parametrize(
    ("preset", "make", "expected"),
    [
        ("dinov2_small_patch14_518", lambda: (T.Dinov2Model, T.Dinov2Config(
            hidden_size=384, num_attention_heads=6, image_size=518)), 22_056_576),
        ("dinov2_base_patch14_518", lambda: (T.Dinov2Model, T.Dinov2Config(
            image_size=518)), 86_580_480),
        ("dinov2_large_patch14_518", lambda: (T.Dinov2Model, T.Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518)),
         304_368_640),
        ("dinov2_giant_patch14_518", lambda: (T.Dinov2Model, T.Dinov2Config(
            hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, image_size=518,
            use_swiglu_ffn=True)), 1_136_480_768),
        ("dinov2_base_reg4_patch14_518", lambda: (T.Dinov2WithRegistersModel,
            T.Dinov2WithRegistersConfig(image_size=518, patch_size=14)), 86_583_552),
        ("clip_vit_base_patch32_224", lambda: (T.CLIPVisionModelWithProjection,
            T.CLIPVisionConfig(patch_size=32, projection_dim=512)), 87_849_216),
        ("clip_vit_base_patch16_224", lambda: (T.CLIPVisionModelWithProjection,
            T.CLIPVisionConfig(patch_size=16, projection_dim=512)), 86_192_640),
        ("clip_vit_large_patch14_224", lambda: (T.CLIPVisionModelWithProjection,
            T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, patch_size=14, projection_dim=768)), 303_966_208),
        ("siglip_base_patch16_224", lambda: (T.SiglipVisionModel,
            T.SiglipVisionConfig()), 92_884_224),
        ("siglip_base_patch16_512", lambda: (T.SiglipVisionModel,
            T.SiglipVisionConfig(image_size=512)), 93_520_128),
    ],
)  # fmt: skip
def test_preset_parameter_counts_match_transformers(preset, make, expected):
    cls, config = make()
    assert _hf_count(cls, config) == expected
    assert _preset_count(preset) == expected


def test_presets_save_to_the_transformers_class_they_name(tmp_path):
    for preset, arch in (
        ("dinov2_small_patch14_518", "Dinov2Model"),
        ("dinov2_small_reg4_patch14_518", "Dinov2WithRegistersModel"),
        ("clip_vit_base_patch32_224", "CLIPVisionModelWithProjection"),
        ("siglip_base_patch16_224", "SiglipVisionModel"),
    ):
        assert hf_ckpt.hf_unsupported(vitkit.get_config(preset)) == [], preset
        meta, _ = hf_ckpt.save_hf(
            vitkit.get_config(preset, depth=1),
            {k: v for k, v in vitkit.create_model(preset, depth=1).state_dict().items()},
        )
        assert meta["architectures"] == [arch]


# ------------------------------------------------------------------------------ dense features
def test_forward_intermediates_match_timm():
    peer, size = _timm_small("vit_small_patch14_reg4_dinov2")
    randomize(peer)
    sd = peer.state_dict()
    config = config_from_timm(sd, model_name="vit_small_patch14_reg4_dinov2")
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state_dict_from_timm(sd, config))
    x = _images((size, size))
    with torch.no_grad():
        for kwargs in (
            dict(indices=None),
            dict(indices=1, norm=True),
            dict(indices=[0, -1], return_prefix_tokens=True),
            dict(indices=[0], output_fmt="NLC", stop_early=True),
            dict(indices=2, intermediates_only=True),
        ):
            a, b = ours.forward_intermediates(x, **kwargs), peer.forward_intermediates(x, **kwargs)
            flat_a = torch.utils._pytree.tree_leaves(a)
            flat_b = torch.utils._pytree.tree_leaves(b)
            assert len(flat_a) == len(flat_b), kwargs
            assert max(max_diff(p, q) for p, q in zip(flat_a, flat_b, strict=True)) <= TOL, kwargs
    maps = ours.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert maps[0].shape == (2, 96, size // 14, size // 14)


# ------------------------------------------------------------------------------ preprocessing
@pytest.fixture(scope="module")
def astronaut():
    data = pytest.importorskip("skimage.data")
    return data.astronaut()  # (512, 512, 3) uint8


PROCESSORS = {
    "CLIP": lambda m: m.CLIPImageProcessor(),
    "DINOv2": lambda m: m.BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ),
    "SigLIP": lambda m: m.SiglipImageProcessor(),
}


@pytest.mark.parametrize("family", sorted(PROCESSORS))
def test_family_preprocessing_matches_transformers(family, astronaut, tmp_path):
    """The folder's preprocessor_config.json gives transformers' numbers: through the
    torchvision path (transformers' default backend, the one a transformers folder gets), and
    through PIL as its Pil processor when asked for (backend="pil")."""
    from PIL import Image

    theirs = PROCESSORS[family](T)
    theirs.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert ours.crop_size == ((224, 224) if family != "SigLIP" else None)
    expected = theirs(images=astronaut, return_tensors="pt")["pixel_values"]
    assert max_diff(ours([astronaut]), expected) <= TOL
    pil_class = getattr(T, type(theirs).__name__ + "Pil")
    pil = pil_class(
        **{
            k: v
            for k, v in theirs.to_dict().items()
            if k in ("size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std")
        }
    )
    image = Image.fromarray(astronaut)
    expected = pil(images=image, return_tensors="pt")["pixel_values"]
    assert max_diff(dataclasses.replace(ours, backend="pil")([image]), expected) <= TOL


def test_the_resolver_hands_out_the_folders_processor(astronaut, tmp_path):
    """A transformers CLIP folder with its preprocessor_config.json: resolve() returns the
    model and CLIP's own preprocessing, which gives the peer's embedding of the photo."""
    peer = randomize(
        T.CLIPVisionModelWithProjection(
            T.CLIPVisionConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                image_size=224,
                patch_size=32,
                projection_dim=32,
            )
        )
    )
    peer.save_pretrained(tmp_path)
    T.CLIPImageProcessor().save_pretrained(tmp_path)
    r = resolve(tmp_path)
    assert (r.processor.resize, r.processor.crop_size) == (224, (224, 224))
    pixels = T.CLIPImageProcessor()(images=astronaut, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = r.model(r.processor([astronaut])).image_embeds
        theirs = peer(pixel_values=pixels).image_embeds
    assert max_diff(ours, theirs) <= TOL


def test_legacy_integer_sizes_of_clip_configs():
    """Early CLIP files say "size": 224, "crop_size": 224: CLIPImageProcessor reads the size as
    the shortest edge (default_to_square=False); ViTImageProcessor would read a square."""
    clip = ImageProcessor.from_hf_dict(
        {"image_processor_type": "CLIPImageProcessor", "size": 224, "crop_size": 224}
    )
    assert (clip.resize, clip.crop_size, clip.interpolation) == (224, (224, 224), "bicubic")
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    vit = ImageProcessor.from_hf_dict({"image_processor_type": "ViTImageProcessor", "size": 224})
    assert vit.resize == (224, 224) and vit.crop_size is None


def test_family_switch_defaults_leave_vit_unchanged():
    """The new switches default off: a ViT-B/16 has the paper's parameter count."""
    assert _preset_count("vit_base_patch16_224") == 86_567_656
    assert math.isclose(np.float64(vitkit.get_config("vit_base_patch16_224").mlp_ratio), 4.0)
