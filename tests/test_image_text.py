"""CLIP and SigLIP with both towers against transformers and open_clip, both ways.

Every case builds the peer with random weights on a small config, loads it in vitkit and
compares text embeddings and `logits_per_image` (ids with padding, the end-of-text token at
several positions, a larger id before it, and for SigLIP with and without attention_mask);
then a vitkit model with fresh random weights is written in the peer's format, loaded by the
peer with no missing or unexpected key, and compared the same way. Parameter counts of the
presets are checked against the peers' classes built on the meta device.
`pytest -s` prints each measured difference on a `PARITY` line.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import max_diff, randomize
from vitkit import resolve, save_pretrained
from vitkit.checkpoints import hf_clip, hf_siglip
from vitkit.checkpoints import open_clip as oc
from vitkit.checkpoints.pretrained import build_model, read_state_dict
from vitkit.errors import CheckpointError
from vitkit.models.image_text import ImageTextModel
from vitkit.models.text import TextTransformer
from vitkit.presets import create_image_text_model, get_image_text_config, list_models

T = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

TOL = 1e-5
EOS = 50  # a "modern" end-of-text id, with larger ids in the vocabulary (99)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=99, max_position_embeddings=12)  # fmt: skip
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=28, patch_size=14)  # fmt: skip
# rows: eos after a larger id then padding (0); eos repeated as padding; eos first, no padding
IDS = torch.tensor([
    [3, 97, EOS, 0, 0, 0, 0],
    [5, 6, 7, 8, EOS, EOS, EOS],
    [EOS, 1, 2, 98, 4, 9, 11],
])  # fmt: skip
MASK = (torch.arange(7) < torch.tensor([[3], [5], [7]])).long()


def _report(case: str, direction: str, diff: float) -> None:
    print(f"PARITY {case:34s} {direction:5s} {diff:.3g}")
    assert diff <= TOL, (case, direction, diff)


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _no_problems(info: dict) -> None:
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems


# ------------------------------------------------------------------------------ transformers
JOINT = {
    "CLIPModel-eos": lambda: T.CLIPModel(T.CLIPConfig(
        text_config={**TEXT, "eos_token_id": EOS}, vision_config=VISION, projection_dim=16)),
    "CLIPModel-legacy-eos2": lambda: T.CLIPModel(T.CLIPConfig(
        text_config={**TEXT, "eos_token_id": 2}, vision_config=VISION, projection_dim=16)),
    "SiglipModel": lambda: T.SiglipModel(T.SiglipConfig(
        text_config={**TEXT, "eos_token_id": 1}, vision_config=VISION)),
}  # fmt: skip
POOL = {"CLIPModel-eos": "eos", "CLIPModel-legacy-eos2": "argmax", "SiglipModel": "last"}


def _compare_joint(ours: ImageTextModel, peer) -> float:
    x, diffs = _pixels(), []
    with torch.no_grad():
        for mask in (None, MASK):
            theirs = peer(input_ids=IDS, pixel_values=x, attention_mask=mask)
            out = ours(x, IDS, mask)
            features = _features(peer.get_text_features(input_ids=IDS, attention_mask=mask))
            diffs += [
                max_diff(out.logits_per_image, theirs.logits_per_image),
                max_diff(out.text_embeds, theirs.text_embeds),
                max_diff(out.image_embeds, theirs.image_embeds),
                max_diff(ours.encode_text(IDS, mask, normalize=False), features),
            ]
    return max(diffs)


@pytest.mark.parametrize("case", sorted(JOINT))
def test_transformers_image_text_both_ways(case, tmp_path):
    peer = randomize(JOINT[case]())
    peer.save_pretrained(tmp_path / "theirs")
    resolved = resolve(tmp_path / "theirs", text=True)
    ours = resolved.image_text
    assert resolved.model is ours.vision and resolved.tokenizer is None
    assert ours.config.text.pool == POOL[case]
    assert ours.config.scores == ("sigmoid" if case == "SiglipModel" else "softmax")
    _report(case, "load", _compare_joint(ours, peer))

    fresh = randomize(ImageTextModel(ours.config), seed=2)
    save_pretrained(fresh, tmp_path / "ours")  # "auto": transformers holds it
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert meta["architectures"] == [type(peer).__name__]
    back, info = type(peer).from_pretrained(tmp_path / "ours", output_loading_info=True)
    _no_problems(info)
    _report(case, "save", _compare_joint(fresh, back.eval()))
    if case.startswith("CLIP"):  # the scale travels in the weights and in the config
        assert meta["logit_scale_init_value"] == pytest.approx(fresh.logit_scale.item())
        assert meta["text_config"]["eos_token_id"] == (2 if "legacy" in case else EOS)


def test_the_pooling_rule_follows_the_eos_id_of_the_config(tmp_path):
    """A legacy config (eos_token_id 2) pools the largest id, a modern one the first eos: the
    two give different embeddings on these ids, so each must be read from the config."""
    peer = randomize(JOINT["CLIPModel-eos"]())
    peer.save_pretrained(tmp_path)
    ours = resolve(tmp_path, text=True).image_text
    wrong = ImageTextModel(ours.config.replace(pool="argmax"))
    wrong.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert max_diff(ours.encode_text(IDS), wrong.eval().encode_text(IDS)) > 1e-2


TEXT_ONLY = {
    "CLIPTextModel": lambda: T.CLIPTextModel(T.CLIPTextConfig(**TEXT, eos_token_id=EOS)),
    "CLIPTextModelWithProjection": lambda: T.CLIPTextModelWithProjection(
        T.CLIPTextConfig(**TEXT, eos_token_id=2, projection_dim=24)),
    "SiglipTextModel": lambda: T.SiglipTextModel(T.SiglipTextConfig(**TEXT, projection_size=24)),
}  # fmt: skip


def _compare_text(ours: TextTransformer, peer) -> float:
    diffs = []
    with torch.no_grad():
        for mask in (None, MASK):
            out = peer(input_ids=IDS, attention_mask=mask)
            theirs = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            diffs.append(max_diff(ours(IDS, mask), theirs))
            tokens = out.last_hidden_state  # after the final norm in both
            diffs.append(max_diff(ours.forward_features(IDS, mask), tokens))
    return max(diffs)


@pytest.mark.parametrize("case", sorted(TEXT_ONLY))
def test_transformers_text_towers_both_ways(case, tmp_path):
    peer = randomize(TEXT_ONLY[case]())
    peer.save_pretrained(tmp_path / "theirs")  # transformers 5 drops the text_model. prefix
    family = hf_siglip if case.startswith("Siglip") else hf_clip
    data = json.loads((tmp_path / "theirs" / "config.json").read_text())
    raw = read_state_dict(tmp_path / "theirs" / "model.safetensors")
    config = family.text_config_from_hf(data)
    assert config.projection_dim == (None if case == "CLIPTextModel" else 24)
    ours = build_model(config, family.text_state_dict_from_hf(raw, config), source="test")
    assert isinstance(ours, TextTransformer) and ours.num_params() == peer.num_parameters()
    _report(case, "load", _compare_text(ours, peer))

    fresh = randomize(TextTransformer(config), seed=3)
    with pytest.raises(CheckpointError, match="transformers' format only"):
        save_pretrained(fresh, tmp_path / "ours", format="vitkit")
    save_pretrained(fresh, tmp_path / "ours", format="hf")  # the Hub's text_model. layout
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [case]
    back, info = type(peer).from_pretrained(tmp_path / "ours", output_loading_info=True)
    _no_problems(info)
    _report(case, "save", _compare_text(fresh, back.eval()))


# ------------------------------------------------------------------------------ open_clip
V_CFG = dict(image_size=28, patch_size=14, width=32, layers=2, head_width=16)
T_CFG = dict(context_length=12, vocab_size=99, width=32, heads=2, layers=2)
OPEN_CLIP = {
    "open_clip CLIP quick_gelu": lambda: open_clip.model.CLIP(
        24, V_CFG, T_CFG, quick_gelu=True),
    "open_clip CustomTextCLIP": lambda: open_clip.model.CustomTextCLIP(24, V_CFG, T_CFG),
    "open_clip CLIP logit_bias (1,)": lambda: open_clip.model.CLIP(
        24, V_CFG, T_CFG, init_logit_bias=-10.0, nonscalar_logit_scale=True),
}  # fmt: skip
MODEL_CFG = {
    "open_clip CLIP quick_gelu": dict(quick_gelu=True),
    "open_clip CustomTextCLIP": dict(custom_text=True),
    "open_clip CLIP logit_bias (1,)": dict(init_logit_bias=-10.0, nonscalar_logit_scale=True),
}


def _open_clip_ids(length: int) -> torch.Tensor:
    """open_clip reads whole contexts: ids padded with 0 after the end-of-text (largest) id."""
    ids = torch.zeros(3, length, dtype=torch.long)
    ids[0, :4] = torch.tensor([5, 60, 98, 3])  # the largest id is not the last one
    ids[1, :2] = torch.tensor([4, 97])
    ids[2] = torch.randint(1, 98, (length,), generator=torch.Generator().manual_seed(4))
    return ids


def _compare_open_clip(ours: ImageTextModel, peer) -> float:
    x, ids = _pixels(), _open_clip_ids(ours.config.text.context_length)
    with torch.no_grad():
        logits, _ = peer.get_logits(x, ids)
        out = ours(x, ids)
        return max(
            max_diff(out.logits_per_image, logits),
            max_diff(ours.encode_text(ids, normalize=False), peer.encode_text(ids)),
            max_diff(out.image_embeds, peer.encode_image(x, normalize=True)),
        )


@pytest.mark.parametrize("case", sorted(OPEN_CLIP))
def test_open_clip_both_towers(case, tmp_path):
    peer = randomize(OPEN_CLIP[case]())
    folder = tmp_path / "open_clip"
    folder.mkdir()
    torch.save(peer.state_dict(), folder / "open_clip_pytorch_model.bin")
    model_cfg = dict(embed_dim=24, vision_cfg=V_CFG, text_cfg=T_CFG, **MODEL_CFG[case])
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    ours = resolve(folder, text=True).image_text
    c = ours.config
    assert (c.text.num_heads, c.text.act, c.text.pool, c.text.projection_dim) == (
        2, "quick_gelu" if "quick" in case else "gelu", "argmax", 24)  # fmt: skip
    assert c.scores == ("sigmoid" if "bias" in case else "softmax")
    _report(case, "load", _compare_open_clip(ours, peer))

    # the text table read the other way: a fresh vitkit text tower in open_clip's names
    fresh = randomize(TextTransformer(c.text), seed=5)
    prefix = "text." if "Custom" in case else ""
    theirs = oc.text_state_dict_to_open_clip(fresh.state_dict(), c.text, prefix)
    missing, unexpected = peer.load_state_dict(theirs, strict=False)
    assert not unexpected and all(k.startswith("visual.") or "logit" in k for k in missing)
    ids = _open_clip_ids(c.text.context_length)
    with torch.no_grad():
        _report(case, "save", max_diff(fresh(ids), peer.encode_text(ids)))


def test_open_clip_file_without_config_reads_the_shapes(tmp_path):
    """A bare open_clip state dict: the text tower from its shapes with heads of 64 channels
    (open_clip's reading of OpenAI's files) and open_clip's default exact GELU; with
    act="quick_gelu" both towers switch."""
    text_cfg = dict(context_length=8, vocab_size=99, width=64, heads=1, layers=1)
    vision_cfg = dict(image_size=28, patch_size=14, width=64, layers=1)
    peer = randomize(open_clip.model.CLIP(16, vision_cfg, text_cfg, quick_gelu=True))
    torch.save(peer.state_dict(), tmp_path / "clip.pt")
    ours = resolve(tmp_path / "clip.pt", text=True).image_text
    t = ours.config.text
    assert (t.vocab_size, t.context_length, t.width, t.num_heads, t.depth, t.act) == (
        99, 8, 64, 1, 1, "gelu")  # fmt: skip
    quick = resolve(tmp_path / "clip.pt", text=True, act="quick_gelu").image_text
    assert quick.config.vision.act == quick.config.text.act == "quick_gelu"
    _report("open_clip bare file (quick_gelu)", "load", _compare_open_clip(quick, peer))
    assert _compare_open_clip(ours, peer) > 1e-3  # the wrong GELU shows


# ------------------------------------------------------------------------------ parameters
def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ours(name: str) -> ImageTextModel:
    with torch.device("meta"):
        return create_image_text_model(name)


CLIP_PEERS = {  # preset -> (open_clip name, CLIPConfig vision / text / projection), count
    "clip_vit_base_patch32_224": ("ViT-B-32", dict(patch_size=32), {}, 512, 151_277_313),
    "clip_vit_base_patch16_224": ("ViT-B-16", dict(patch_size=16), {}, 512, 149_620_737),
    "clip_vit_large_patch14_224": ("ViT-L-14", dict(
        patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16), dict(hidden_size=768, intermediate_size=3072,
        num_attention_heads=12), 768, 427_616_513),
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(CLIP_PEERS))
def test_clip_preset_counts_match_transformers_and_open_clip(preset):
    name, vision, text, projection, expected = CLIP_PEERS[preset]
    ours = _ours(preset)
    with torch.device("meta"):
        hf = T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text,
                                      projection_dim=projection))  # fmt: skip
        hf_text = T.CLIPTextModelWithProjection(T.CLIPTextConfig(**text, projection_dim=projection))
        oc_model = open_clip.model.CLIP(**open_clip.get_model_config(name))
    assert ours.num_params() == _count(hf) == _count(oc_model) == expected
    assert ours.text.num_params() == _count(hf_text) == ours.config.text.estimated_params()
    # open_clip's text tower is everything but `visual` (and its logit_scale)
    assert ours.text.num_params() == _count(oc_model) - _count(oc_model.visual) - 1
    assert ours.config.text.pool == "argmax" and ours.config.text.eos_token_id == 49_407


@pytest.mark.parametrize("res", [224, 256, 384, 512])
def test_siglip_preset_counts_match_transformers(res):
    ours = _ours(f"siglip_base_patch16_{res}")
    with torch.device("meta"):
        hf = T.SiglipModel(T.SiglipConfig(vision_config=dict(image_size=res)))
        hf_text = T.SiglipTextModel(T.SiglipTextConfig())
    assert ours.num_params() == _count(hf)
    assert ours.text.num_params() == _count(hf_text) == ours.config.text.estimated_params()
    assert ours.text.num_params() == 110_271_744


def test_presets_with_text_towers_save_to_the_classes_they_name():
    from vitkit.checkpoints import hf

    assert list_models("clip_*", text=True) == [
        "clip_vit_base_patch16_224",
        "clip_vit_base_patch32_224",
        "clip_vit_large_patch14_224",
    ]
    for name in list_models(text=True):
        config = get_image_text_config(name)
        want = "SiglipModel" if name.startswith("siglip") else "CLIPModel"
        assert hf.hf_unsupported(config) == [] and hf.hf_architecture(config) == want, name
