import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit import VisionTransformer, ViTConfig
from vitkit.layers import attention as attention_module

TINY = dict(image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)


def tiny(**overrides) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{**TINY, **overrides})).eval()


def meta_params(name: str, **overrides) -> int:
    with torch.device("meta"):
        return vitkit.create_model(name, **overrides).num_params()


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("vit_tiny_patch16_224", 5_717_416),
        ("vit_small_patch16_224", 22_050_664),
        ("vit_base_patch16_224", 86_567_656),
        ("vit_large_patch16_224", 304_326_632),
        ("vit_huge_patch14_224", 632_045_800),  # timm with num_classes=1000
    ],
)
def test_parameter_counts_match_the_paper_and_timm(name, count):
    assert meta_params(name) == count


def test_huge_without_head_matches_timm_default():
    # timm's vit_huge_patch14_224 defaults to num_classes=0: 630,764,800 parameters
    assert meta_params("vit_huge_patch14_224", num_classes=0) == 630_764_800


def test_distilled_adds_token_position_and_head():
    base = meta_params("deit_tiny_patch16_224")
    assert meta_params("deit_tiny_distilled_patch16_224") - base == 192 + 192 + 192 * 1000 + 1000


@pytest.mark.parametrize("name", vitkit.list_models())
def test_every_preset_builds_and_has_the_right_shapes(name):
    config = vitkit.get_config(name)
    with torch.device("meta"):
        model = VisionTransformer(config).eval()
        h, w = config.image_hw
        out = model(torch.empty(2, config.in_chans, h, w))
    tokens = config.num_patches + config.num_prefix_tokens
    assert out.last_hidden_state.shape == (2, tokens, config.embed_dim)
    assert out.logits.shape == (2, config.num_classes or model.num_features)  # headless: pooled
    if config.pos_embed == "learned":
        table = (1, config.num_pos_prefix_tokens + config.num_patches, config.embed_dim)
        assert model.pos_embed.shape == table
    else:
        assert model.pos_embed is None


def test_macs_of_vit_base():
    macs = vitkit.create_model(vitkit.get_config("vit_tiny_patch16_224")).flops()
    assert macs == pytest.approx(1.2537e9, rel=1e-3)
    assert vitkit.models.vit.count_macs(vitkit.get_config("vit_base_patch16_224")) == 17_563_828_224


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"distilled": True},
        {"num_register_tokens": 2},
        {"global_pool": "avg", "class_token": False},
        {"head": "mlp", "head_hidden_dim": 16},
        {"pos_embed": "sincos2d"},
    ],
)
def test_eager_and_sdpa_agree(variant):
    sdpa = tiny(**variant)
    eager = tiny(**variant, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 3, 32, 32)
    a, b = sdpa(x), eager(x)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=0)


def test_attention_maps_on_request_only(monkeypatch):
    model = tiny()
    calls = []
    real = attention_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    assert plain.attentions is None and len(calls) == 3

    calls.clear()
    last = model(x, output_attentions=[-1])
    assert len(calls) == 2  # only the last layer left the fused kernel
    assert last.attention_layers == (2,) and len(last.attentions) == 1
    torch.testing.assert_close(last.logits, plain.logits, atol=1e-5, rtol=0)

    every = model(x, output_attentions=True)
    assert every.attention_layers == (0, 1, 2)
    probs = every.attentions[2]
    assert probs.shape == (2, 4, 17, 17)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, last.attentions[0])
    with pytest.raises(IndexError):
        model(x, output_attentions=[3])


def test_attention_maps_equal_a_hand_computation():
    model = tiny(depth=1)
    x = torch.randn(1, 3, 32, 32)
    out = model(x, output_attentions=True, output_hidden_states=True)
    block = model.blocks[0]
    h = block.norm1(out.hidden_states[0])
    q, k, _ = block.attn.qkv(h).reshape(1, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = F.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    torch.testing.assert_close(out.attentions[0], expected, atol=1e-6, rtol=0)


def test_hidden_states_are_block_inputs_and_final_output():
    model = tiny()
    out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])


def test_mean_pooling_uses_patch_tokens_and_fc_norm():
    model = tiny(global_pool="avg", num_register_tokens=2)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(model.norm, torch.nn.Identity)
    expected = model.fc_norm(out.last_hidden_state[:, 3:].mean(1))
    torch.testing.assert_close(out.pooler_output, expected)


def test_distilled_logits_average_both_heads():
    model = tiny(distilled=True)
    out = model(torch.randn(2, 3, 32, 32))
    dist = model.head_dist(out.last_hidden_state[:, 1])
    torch.testing.assert_close(out.distillation_logits, dist)
    torch.testing.assert_close(out.logits, (out.cls_logits + dist) / 2)


def test_logits_of_every_kind_of_output():
    from vitkit.errors import ConfigError
    from vitkit.models.vit import logits_of

    model = tiny(distilled=True)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert logits_of(out) is out.logits  # the mean of both heads
    assert logits_of(out.logits) is out.logits  # a plain module's tensor
    assert logits_of((out.cls_logits, "extra")) is out.cls_logits  # a foreign tuple output
    with pytest.raises(ConfigError, match="forward_features"):
        logits_of(model.forward_features(x))


def test_backbone_without_head():
    model = tiny(num_classes=0)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 32) and model.num_features == 32


def test_reset_classifier_zero_init_and_labels():
    model = tiny()
    model.reset_classifier(2, id2label={0: "a", 1: "b"})
    assert model.head.weight.abs().sum() == 0 and model.config.num_classes == 2
    out = model(torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 2) and torch.all(out.logits == 0)
    assert model.config.id2label == {0: "a", 1: "b"}


def test_any_resolution_resamples_positions():
    model = tiny()
    out = model(torch.randn(2, 3, 48, 64))  # a 6 x 8 grid instead of 4 x 4
    assert out.last_hidden_state.shape == (2, 1 + 48, 32)
    # the same as a model built for 48x64 holding the resampled table
    big = VisionTransformer(model.config.replace(image_size=(48, 64))).eval()
    state = model.state_dict()
    state["pos_embed"] = model.position_table((6, 8), torch.device("cpu"), torch.float32)
    big.load_state_dict(state)
    x = torch.randn(2, 3, 48, 64)
    torch.testing.assert_close(big(x).logits, model(x).logits)


def test_size_not_multiple_of_patch_is_a_clear_error_unless_padding():
    with pytest.raises(vitkit.ConfigError, match="not a multiple of the patch size 8"):
        tiny()(torch.randn(1, 3, 30, 32))
    padded = tiny(dynamic_img_pad=True)
    assert padded(torch.randn(1, 3, 30, 33)).last_hidden_state.shape == (1, 1 + 4 * 5, 32)


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(vitkit.ConfigError, match="expects 3 input channels, got 1"):
        tiny()(torch.randn(1, 1, 32, 32))


def test_gradients_reach_every_parameter():
    model = tiny(distilled=True, num_register_tokens=1).train()
    out = model(torch.randn(2, 3, 32, 32))
    (out.cls_logits.sum() + out.distillation_logits.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_stochastic_depth_only_while_training():
    model = tiny(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    b = model(x).logits
    assert not torch.allclose(a, b)
    assert [round(b.drop_path.p, 4) for b in list(model.blocks)[1:]] == [0.25, 0.5]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(depth=2).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).logits.sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).logits.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_bf16_autocast_runs_and_stays_close():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, output_attentions=[-1])
    assert low.logits.dtype == torch.bfloat16
    torch.testing.assert_close(low.logits.float(), model(x).logits, atol=5e-2, rtol=5e-2)


def test_masked_patches_use_the_mask_token():
    model = tiny(use_mask_token=True)
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    tokens = model.embed(x, mask)
    expected = model.mask_token[0, 0] + model.pos_embed[0, 6]
    torch.testing.assert_close(tokens[0, 6], expected)
    assert not torch.allclose(tokens[0, 7], model.mask_token[0, 0] + model.pos_embed[0, 7])


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_export_with_dynamic_image_size():
    from torch.export import Dim, export

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).logits

    model = tiny(depth=1)
    b, h, w = Dim("b", min=1, max=64), Dim("h", min=2, max=16), Dim("w", min=2, max=16)
    program = export(
        Logits(model),
        (torch.randn(2, 3, 32, 32),),
        dynamic_shapes={"x": {0: b, 2: 8 * h, 3: 8 * w}},
    )
    for batch, size in [(2, (32, 32)), (3, (48, 48)), (1, (32, 56))]:
        x = torch.randn(batch, 3, *size)
        torch.testing.assert_close(program.module()(x), model(x).logits, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_attention_matches_eager(dtype):
    sdpa = tiny(embed_dim=64, num_heads=2).cuda()
    eager = tiny(embed_dim=64, num_heads=2, attn_implementation="eager").cuda()
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        a = sdpa(x, output_attentions=[-1])
        b = eager(x)
    torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=2e-2, rtol=2e-2)
    assert a.attentions[0].shape == (4, 2, 17, 17)


def test_rebuild_moves_the_final_norm_when_pooling_changes():
    model = tiny()
    with torch.no_grad():
        model.norm.weight.uniform_()
    avg = vitkit.models.vit.rebuild(model, global_pool="avg", drop_path_rate=0.1)
    assert isinstance(avg.norm, torch.nn.Identity) and avg.config.drop_path_rate == 0.1
    torch.testing.assert_close(avg.fc_norm.weight, model.norm.weight)
    torch.testing.assert_close(avg.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    back = vitkit.models.vit.rebuild(avg, global_pool="token")
    torch.testing.assert_close(back.norm.weight, model.norm.weight)
    with pytest.raises(vitkit.ConfigError, match="keep every weight's shape"):
        vitkit.models.vit.rebuild(model, distilled=True)


# ------------------------------------------------------------------------------ conv stem
def test_conv_stem_feeds_the_patch_projection_and_keeps_the_grid():
    model = tiny(stem_channels=[8, 16])
    assert model.config.stem_channels == (8, 16)  # JSON lists become tuples
    stem = model.patch_embed.stem
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [8, 16]
    assert model.patch_embed.proj.in_channels == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.patch_embed.proj(stem(x)).flatten(2).transpose(1, 2)
        assert torch.equal(model.patch_embed(x), expected)
        # the same tokens as without a stem: any size still runs, the grid is the patch grid
        assert model(torch.randn(1, 3, 48, 40)).last_hidden_state.shape == (1, 1 + 6 * 5, 32)
    model.train()(x).logits.sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in stem.parameters())


def test_strided_stem_downsamples_and_the_projection_covers_the_rest_of_the_patch(tmp_path):
    model = tiny(stem_channels=[8, 16], stem_strides=[2, 1])  # patch 8: 2 x 4 pixels
    stem = model.patch_embed.stem
    assert [m.stride for m in stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (1, 1)]
    assert model.patch_embed.proj.kernel_size == model.patch_embed.proj.stride == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert stem(x).shape == (2, 16, 16, 16)
        assert model(x).last_hidden_state.shape == (2, 1 + 4 * 4, 32)  # the patch grid
        assert model(torch.randn(1, 3, 48, 40)).last_hidden_state.shape == (1, 1 + 6 * 5, 32)
    built = model.num_params()
    assert abs(model.config.estimated_params() - built) / built < 0.03
    vitkit.save_pretrained(model.eval(), tmp_path / "m")
    back = vitkit.from_pretrained(tmp_path / "m")
    assert back.config.stem_strides == (2, 1)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    # dynamic_img_pad pads the image before a strided stem: 36 -> 40 pixels, 5 x 5 patches
    padded = tiny(stem_channels=[8], stem_strides=[2], dynamic_img_pad=True)
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 36, 36)).last_hidden_state.shape == (1, 1 + 25, 32)


def test_stem_strides_are_checked():
    for bad, match in (
        ([3], "1s and 2s"),
        ([2.0], "1s and 2s"),
        ([True], "1s and 2s"),
        ([2, 2], "one stride per stem_channels entry"),
    ):
        with pytest.raises(vitkit.ConfigError, match=match):
            ViTConfig(**TINY, stem_channels=[8], stem_strides=bad)
    with pytest.raises(vitkit.ConfigError, match="does not divide patch_size=8"):
        ViTConfig(**TINY, stem_channels=[8, 8, 8, 8], stem_strides=[2, 2, 2, 2])
    ok = ViTConfig(**TINY, stem_channels=[8, 8, 8], stem_strides=[2, 2, 2])  # 1x1 projection
    assert ok.stem_stride == 8 and ViTConfig.from_dict(ok.to_dict()) == ok


def test_conv_stem_is_checked_like_any_size():
    for bad in ([0], [8, -1], "8", [8.5], [True]):
        with pytest.raises(vitkit.ConfigError, match="stem_channels must be a list"):
            ViTConfig(**TINY, stem_channels=bad)
    with pytest.raises(vitkit.ConfigError, match=r"stem_channels \(layers\)"):
        ViTConfig(**TINY, stem_channels=[4] * 17)
    with pytest.raises(vitkit.ConfigError, match=r"stem_channels \(width\)"):
        ViTConfig(**TINY, stem_channels=[100_000])
    config = ViTConfig(**TINY, stem_channels=[8, 16])
    assert ViTConfig.from_dict(config.to_dict()) == config
    built = VisionTransformer(config).num_params()
    assert abs(config.estimated_params() - built) / built < 0.03


def test_conv_stem_saves_as_vitkit_only_and_masked_pretraining_refuses_it(tmp_path):
    from vitkit.checkpoints.jax import npz_from_state_dict
    from vitkit.checkpoints.timm import state_dict_to_timm
    from vitkit.errors import CheckpointError
    from vitkit.models.mae import MaskedAutoencoder
    from vitkit.models.mim import SimMIM

    model = tiny(stem_channels=[8])
    model.train()(torch.randn(4, 3, 32, 32))  # BatchNorm statistics and its step counter move
    model.eval()
    assert int(model.patch_embed.stem.bn0.num_batches_tracked) == 1
    vitkit.save_pretrained(model, tmp_path / "auto")  # auto: transformers cannot hold it
    back = vitkit.from_pretrained(tmp_path / "auto")
    assert back.config.stem_channels == (8,)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)  # running statistics came back
    sd = model.state_dict()
    for write in (
        lambda: vitkit.save_pretrained(model, tmp_path / "hf", format="hf"),
        lambda: state_dict_to_timm(sd, model.config),
        lambda: npz_from_state_dict(sd, model.config),
    ):
        with pytest.raises(CheckpointError, match="stem"):
            write()
    assert not (tmp_path / "hf").exists()
    for build in (MaskedAutoencoder, SimMIM):
        with pytest.raises(vitkit.ConfigError, match="reads across their borders"):
            build(model.config)
