import math

import pytest
import torch

import vitkit
from vitkit.train.optim import build_optimizer, lr_at, param_groups, set_lr
from vitkit.train.recipe import Recipe


def _tiny():
    return vitkit.create_model(
        "vit_digits_patch2_8",
        embed_dim=32,
        depth=2,
        num_heads=2,
        global_pool="token",
        pos_embed="learned",
    )


def test_no_decay_on_norms_biases_tokens_positions():
    model = _tiny()
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "head.bias",
        "norm.weight",
    } <= plain
    assert {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
        "head.weight",
    } <= decayed
    assert not decayed & plain
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_layer_decay_scales():
    model = _tiny()
    groups = param_groups(model, weight_decay=0.0, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale["pos_embed"] == scale["patch_embed.proj.weight"] == 0.125
    assert model.layer_id("blocks.1.attn.qkv.weight") == 2 and model.num_layers == 4


def test_schedule_warmup_then_cosine():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1.0, min_lr=0.0)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)
    assert lr_at(110, **kw) == pytest.approx(0.0)
    assert lr_at(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(60, **kw, schedule="linear") == pytest.approx(0.5)
    assert lr_at(100, **kw, schedule="constant") == 1.0


def test_build_optimizer_adamw_and_sgd():
    model = _tiny()
    opt = build_optimizer(model, Recipe(lr=1e-3, weight_decay=0.1, layer_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW)
    set_lr(opt, 2e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(
        [2e-3 * 0.5**k for k in (3, 2, 1, 0)]
    )
    sgd = build_optimizer(model, Recipe(optimizer="sgd", weight_decay=0.0, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0 for g in sgd.param_groups)


def test_ema_follows_the_weights():
    from vitkit.train.ema import ModelEMA

    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    start = ema.module.weight.clone()
    ema.update(model)  # effective decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, start * d + (1 - d))
    state = ema.state_dict()
    other = ModelEMA(model, decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 1 and other.decay == 0.5
    assert torch.equal(other.module.weight, ema.module.weight)
