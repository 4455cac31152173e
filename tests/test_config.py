import json
import os
import threading

import pytest

import vitkit
from vitkit import ConfigError, ViTConfig


def test_defaults_are_vit_base_16():
    c = ViTConfig()
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.image_hw) == (
        768,
        12,
        12,
        16,
        (224, 224),
    )
    assert c.grid_size == (14, 14) and c.num_patches == 196 and c.num_prefix_tokens == 1


def test_json_round_trip_keeps_every_field(tmp_path):
    c = ViTConfig(
        image_size=(224, 320),
        num_classes=3,
        distilled=True,
        num_register_tokens=4,
        global_pool="token",
        head="mlp",
        head_hidden_dim=32,
        embed_dim=64,
        num_heads=4,
        depth=2,
        id2label={0: "cat", 1: "dog", 2: "fox"},
    )
    path = tmp_path / "config.json"
    c.save(path)
    data = json.loads(path.read_text())
    assert data["model_type"] == "vitkit" and data["id2label"] == {
        "0": "cat",
        "1": "dog",
        "2": "fox",
    }
    back = ViTConfig.load(path)
    assert back == c
    assert back.image_hw == (224, 320) and back.id2label[2] == "fox"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"embed_dim": 100, "num_heads": 12}, "not divisible by num_heads"),
        ({"image_size": 230}, "not a multiple of patch_size"),
        ({"global_pool": "max"}, "global_pool='max' must be one of "),
        ({"class_token": False}, "global_pool='token' needs class_token"),
        ({"drop_path_rate": 1.5}, "drop_path_rate=1.5 must be in [0, 1)"),
        ({"num_classes": 2, "id2label": {0: "a"}}, "id2label has 1 entries"),
        ({"depth": 0}, "depth=0 must be positive"),
        ({"depth": 2.7}, "depth=2.7 must be a whole number"),  # refused, never cast
        ({"qkv_bias": 1}, "qkv_bias=1 must be true or false"),
        ({"mlp_ratio": float("inf")}, "mlp_ratio=inf must be a finite number"),
        ({"head_hidden_dim": "64"}, "head_hidden_dim='64' must be a whole number"),
    ],
)
def test_validation_names_the_problem(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ViTConfig(**changes)


def test_every_problem_is_in_one_message():
    """Fields first, each against its declaration (choices from the Literal aliases), then the
    rules between fields and the limits: every one broken is named, none stops the others."""
    with pytest.raises(ConfigError) as info:
        ViTConfig(depth=0, num_heads=True, act="relu", stem_channels=[8, 0], layer_norm_eps=-1.0)
    assert str(info.value) == (
        "invalid ViTConfig: depth=0 must be positive; num_heads=True must be a whole number; "
        "layer_norm_eps=-1.0 must be positive, e.g. 1e-6; act='relu' must be one of ('gelu', "
        "'gelu_tanh', 'quick_gelu'); stem_channels must be a list of positive whole numbers, "
        "got [8, 0]"
    )
    with pytest.raises(ConfigError) as info:
        ViTConfig(embed_dim=100, class_token=False, depth=300)
    message = str(info.value)
    assert "not divisible by num_heads=12; pick num_heads from [1, 2, 4, 5, 10, 20, 25]" in message
    assert "global_pool='token' needs class_token=True" in message
    assert (
        "depth=300 exceeds vitkit's limit of 256" in message and "VITKIT_MAX_DEPTH=300" in message
    )


def test_values_are_normalised_never_cast():
    c = ViTConfig(image_size=[224, 320], stem_channels=[8], stem_strides=[2], mlp_ratio=4)
    assert (c.image_size, c.stem_channels, c.stem_strides) == ((224, 320), (8,), (2,))
    assert type(c.mlp_ratio) is float and c.image_hw == (224, 320)
    with pytest.raises(
        ConfigError, match=r"stem_strides must be a list of 1s and 2s, got \[True\]"
    ):
        ViTConfig(stem_channels=[8], stem_strides=[True])
    with pytest.raises(ConfigError, match=r"image_size must be .*, got \[224, 224\.0\]"):
        ViTConfig(image_size=[224, 224.0])


def test_limits_follow_the_environment(monkeypatch):
    monkeypatch.setenv("VITKIT_MAX_DEPTH", "4")
    with pytest.raises(
        ConfigError, match=r"depth=12 exceeds vitkit's limit of 4.*VITKIT_MAX_DEPTH"
    ):
        ViTConfig()
    monkeypatch.setenv("VITKIT_MAX_DEPTH", "12")
    assert ViTConfig().depth == 12


def test_padding_allows_any_size():
    c = ViTConfig(image_size=230, dynamic_img_pad=True)
    assert c.grid_size == (15, 15)


def test_replace_rejects_unknown_fields_and_clears_labels():
    c = ViTConfig(num_classes=2, id2label={0: "a", 1: "b"})
    assert c.replace(num_classes=5).id2label is None
    with pytest.raises(ConfigError, match="unknown ViTConfig field"):
        c.replace(hidden_size=3)


def test_load_reports_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json"):
        ViTConfig.load(bad)


def test_a_config_that_is_no_regular_file_is_refused_not_waited_on(tmp_path):
    """A FIFO named config.json: opening it to read would wait for a writer forever."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(ViTConfig.load, fifo)))
    reader.daemon = True
    reader.start()
    reader.join(30)
    assert outcome and isinstance(outcome[0], ConfigError), "the reader waited on the FIFO"
    assert "not a regular file" in str(outcome[0]) and str(fifo) in str(outcome[0])


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


def test_presets_and_unknown_name():
    names = vitkit.list_models("vit_base_*")
    assert "vit_base_patch16_224" in names and "vit_base_patch14_384" not in names
    assert "deit_tiny_distilled_patch16_224" in vitkit.list_models("deit*")
    with pytest.raises(ConfigError, match="unknown model"):
        vitkit.get_config("vit_gigantic_patch16_224")
    assert vitkit.get_config("vit_large_patch32_384").grid_size == (12, 12)
