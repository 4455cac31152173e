"""Parameter-efficient fine-tuning (train/lora.py): LoRA adapters that merge exactly, an optimizer
that holds only what trains, linear probing and LoRA that learn digits on a frozen backbone, and a
LoRA run that resumes bit for bit."""

import copy

import pytest
import torch

import vitkit
from conftest import kill_at_first_checkpoint, randomize
from vitkit.errors import ConfigError
from vitkit.train import Recipe, build_objective, train
from vitkit.train.lora import LoRALinear, add_adapters, apply_finetune, merged
from vitkit.train.optim import build_optimizer
from vitkit.train.state import load_state

BASE = dict(progress=False, plot=False, threads=1)
TINY = dict(image_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2,
            num_classes=10)  # fmt: skip


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """The default digits model trained for 8 epochs (about 90% validation accuracy), saved
    without its head: the pre-trained backbone the fine-tuning tests start from."""
    out = tmp_path_factory.mktemp("init")
    n = torch.get_num_threads()
    try:
        train(
            Recipe.from_dict({**BASE, "epochs": 8, "warmup_epochs": 1, "output": str(out / "run")})
        )
    finally:
        torch.set_num_threads(n)
    model = vitkit.from_pretrained(out / "run" / "best")
    model.reset_classifier(0)
    vitkit.save_pretrained(model, out / "headless")
    return out / "headless"


def _tiny(**changes) -> vitkit.VisionTransformer:
    return vitkit.VisionTransformer(vitkit.ViTConfig(**{**TINY, **changes})).eval()


def test_merged_equals_unmerged():
    model = _tiny()
    n = add_adapters(model, rank=4, alpha=8.0)
    assert n == 2 * 4  # qkv, proj, fc1, fc2 in each of 2 blocks
    randomize(model)  # lora_b starts at zero: give the update something to merge
    x = torch.randn(3, 1, 8, 8)
    plain = merged(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # the original is untouched
    assert set(plain.state_dict()) == set(_tiny().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=1e-5)
    # a fresh adapter (B = 0) leaves the model as it was
    ref = _tiny()
    adapted = copy.deepcopy(ref)
    add_adapters(adapted, rank=2, alpha=4.0)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).logits, ref(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("finetune", ["full", "linear", "lora"])
def test_optimizer_holds_only_trainable_tensors(finetune):
    recipe = Recipe(finetune=finetune, lora_rank=4, lora_targets=("qkv", "fc2"))
    model = apply_finetune(_tiny(), recipe)
    optimizer = build_optimizer(build_objective(recipe, model), recipe)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    D, H, K, r = 32, 4 * 32, 10, 4
    head = D * K + K
    expected = {
        "full": model.num_params(),
        "linear": head,
        "lora": 2 * (r * (D + 3 * D) + r * (H + D)) + head,  # qkv and fc2 of 2 blocks
    }[finetune]
    assert sum(p.numel() for p in held) == expected
    assert len({id(p) for p in held}) == len(held)
    assert all(p.requires_grad for p in held)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_recipe_checks():
    with pytest.raises(ConfigError, match="finetune='lora' fine-tunes a classifier"):
        Recipe(objective="mae", finetune="lora").validate()
    with pytest.raises(ConfigError, match="lora_targets"):
        Recipe.from_dict({"finetune": "lora", "lora_targets": ["qkv", "head"]})
    with pytest.raises(ConfigError, match="finetune="):
        Recipe.from_dict({"finetune": "adapter"})


def _finetune(backbone, out, finetune, **changes):
    recipe = {**BASE, "init": str(backbone), "finetune": finetune, "epochs": 3,
              "warmup_epochs": 0, "lr": 1e-2, "ema_decay": None, "output": str(out), **changes}  # fmt: skip
    return train(Recipe.from_dict(recipe))


@pytest.mark.parametrize("finetune", ["linear", "lora"])
def test_finetuning_digits_learns_on_a_frozen_backbone(backbone, tmp_path, finetune, capsys):
    """A zero head on the pre-trained backbone: 3 epochs take the test accuracy from chance
    (10%) to well above it, the backbone's own weights stay as they were, and best/ is an
    ordinary model folder whose outputs equal the adapted model's."""
    result = _finetune(backbone, tmp_path / finetune, finetune)
    with capsys.disabled():
        print(f"\n{finetune} fine-tuning on digits: test accuracy {result.test_acc:.4f}")
    assert result.test_acc > 0.7
    init = vitkit.from_pretrained(backbone).state_dict()
    state = load_state(tmp_path / finetune)["model"]
    assert any(".lora_" in k for k in state) == (finetune == "lora")
    for key, value in init.items():
        assert torch.equal(state[key], value), key  # frozen, BatchNorm statistics included
    final = vitkit.from_pretrained(tmp_path / finetune / "last")
    assert set(final.state_dict()) == set(init) | {"head.weight", "head.bias"}
    adapted = vitkit.from_pretrained(backbone)
    adapted.reset_classifier(10)
    apply_finetune(adapted, Recipe(finetune=finetune)).load_state_dict(state)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(final.eval()(x).logits, adapted.eval()(x).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_lora_run_resumes_bit_exact(backbone, tmp_path):
    recipe = {**BASE, "init": str(backbone), "finetune": "lora", "lora_rank": 4,
              "lora_dropout": 0.1, "epochs": 2, "warmup_epochs": 0.5, "lr": 1e-2,
              "ema_decay": 0.9, "save_every_steps": 4}  # fmt: skip
    train(Recipe.from_dict({**recipe, "output": str(tmp_path / "ref")}))
    run = tmp_path / "killed"
    kill_at_first_checkpoint(recipe, run)
    assert 0 < load_state(run)["step"] < 20  # a mid-epoch checkpoint
    train(None, resume=run)
    a, b = load_state(tmp_path / "ref"), load_state(run)
    assert any(".lora_a" in k for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["ema"]["module"].items():
        assert torch.equal(value, b["ema"]["module"][key]), key


def test_cli_flags(capsys):
    from vitkit.cli import main

    assert main(["train", "--finetune", "lora", "--strategy", "fsdp", "--print-recipe"]) == 0
    out = capsys.readouterr().out
    assert "finetune: lora\n" in out and "strategy: fsdp\n" in out and "lora_rank: 8\n" in out
