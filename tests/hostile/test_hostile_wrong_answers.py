"""Class 4: silent wrong answers. A value that cannot be right (NaN, zero or negative std, 2.7
layers, `true` for a count, NaN weights) is refused where it enters, with one line saying what
to change; a bad image costs that image only, and is counted once."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _hostile import TINY, assert_user_error, run_cli, write_image, write_model_folder

from vitkit import ViTConfig
from vitkit.checkpoints._safety import check_finite, check_float_dtypes
from vitkit.data.folders import ImageFolderDataset
from vitkit.errors import CheckpointError
from vitkit.presets import create_model


def _weights(**changes):
    torch.manual_seed(0)
    sd = create_model(ViTConfig(**TINY)).state_dict()
    for key, fn in changes.items():
        sd[key.replace("__", ".")] = fn(sd[key.replace("__", ".")])
    return sd


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


@pytest.mark.parametrize(
    "weights",
    [_weights(head__weight=_nan), _weights(blocks__0__attn__qkv__weight=_inf)],
    ids=["nan", "inf"],
)
def test_non_finite_weights_are_refused_naming_the_key(tmp_path, weights):
    bad = next(k for k, v in weights.items() if not torch.isfinite(v).all())
    model = write_model_folder(tmp_path / "m", weights=weights)
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), bad)


def test_integer_weight_where_a_float_is_due_is_refused(tmp_path):
    weights = _weights(head__weight=lambda t: (t * 100).to(torch.int64))
    model = write_model_folder(tmp_path / "m", weights=weights)
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), "head.weight")


def test_safety_checks_name_the_key():
    with pytest.raises(CheckpointError, match=r"'head\.weight' holds 1 NaN"):
        check_finite(_weights(head__weight=_nan), "f.safetensors")
    with pytest.raises(CheckpointError, match=r"'head\.bias' is torch\.int32"):
        check_float_dtypes(_weights(head__bias=lambda t: t.int()), "f.safetensors")
    check_finite(_weights(), "ok")
    check_float_dtypes({"step": torch.tensor(3), **_weights()}, "ok", allow=["step"])


PREPROCESSOR = [
    ({"image_std": [float("nan"), 0.5, 0.5]}, "image_std"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"image_std": [-0.5, 0.5, 0.5]}, "image_std"),
    ({"image_mean": [float("inf"), 0.5, 0.5]}, "image_mean"),
    ({"image_mean": "0.5"}, "image_mean"),
    ({"rescale_factor": 0}, "rescale_factor"),
    ({"rescale_factor": float("nan")}, "rescale_factor"),
    ({"rescale_factor": -1 / 255}, "rescale_factor"),
    ({"do_normalize": "false"}, "do_normalize"),
    ({"do_resize": 0}, "do_resize"),
    ({"size": {"height": 16.7, "width": 16}}, "size"),
    ({"size": {"shortest_edge": True}}, "shortest_edge"),
    ({"resample": 2.5}, "resample"),
    ({"crop_pct": 0}, "crop_pct"),
    ({"crop_pct": float("nan")}, "crop_pct"),
]


@pytest.mark.parametrize(("config", "key"), PREPROCESSOR, ids=[k for _, k in PREPROCESSOR])
def test_preprocessor_values_that_cannot_be_right_are_refused(tmp_path, config, key):
    model = write_model_folder(tmp_path / "m")
    (model / "preprocessor_config.json").write_text(json.dumps(config))  # NaN as JSON allows
    image = write_image(tmp_path / "a.png")
    assert_user_error(
        run_cli(["predict", str(image), "--model", str(model)]), "preprocessor_config", key
    )


CONFIG = [
    ({"layer_norm_eps": -1e-6}, "layer_norm_eps"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps"),
    ({"depth": 2.7}, "depth"),
    ({"depth": True}, "depth"),
    ({"depth": "12"}, "depth"),
    ({"drop_path_rate": float("nan")}, "drop_path_rate"),
    ({"mlp_ratio": float("inf")}, "mlp_ratio"),
    ({"mlp_ratio": 0.01}, "mlp_ratio"),
    ({"qkv_bias": "yes"}, "qkv_bias"),
    ({"id2label": {"0": "a", "1": "b", "7": "c"}}, "id2label"),
    ({"image_size": [16.5, 16]}, "image_size"),
]


@pytest.mark.parametrize(("changes", "key"), CONFIG, ids=[k for _, k in CONFIG])
def test_config_values_that_cannot_be_right_are_refused(tmp_path, changes, key):
    model = write_model_folder(tmp_path / "m", changes)
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), key)


@pytest.mark.parametrize(("value", "shown"), [(1.5, "1.5"), (math.inf, "inf"), (math.nan, "nan")])
def test_hf_config_with_a_layer_count_that_is_not_whole_is_refused(tmp_path, value, shown):
    """1.5 layers, or Infinity / NaN, which Python's JSON reader accepts (int(inf) would raise
    an OverflowError traceback)."""
    from vitkit.checkpoints.pretrained import save_pretrained

    model = tmp_path / "hf"
    save_pretrained(create_model(ViTConfig(**TINY)), model, format="hf")
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = value
    (model / "config.json").write_text(json.dumps(config))  # writes Infinity / NaN as JSON allows
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(model)]), shown)


@pytest.mark.parametrize(
    ("family", "key", "value"),
    [
        ("vit", "layer_norm_eps", "1e-12"),  # text is not parsed
        ("vit", "hidden_dropout_prob", math.nan),
        ("vit", "image_size", math.inf),
        ("vit", "id2label", {"cat": "cat"}),
        ("dinov2", "layerscale_value", [1.0]),
        ("dinov2", "mlp_ratio", math.inf),
        ("clip", "layer_norm_eps", True),
    ],
)
def test_foreign_config_numbers_are_checked_not_cast(tmp_path, family, key, value):
    """Every number vitkit reads from a transformers config.json goes through one check (a
    float() or int() of it gave a traceback for text, lists, Infinity and NaN, or cast "1e-12")."""
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                 patch_size=14, intermediate_size=64)  # fmt: skip
    make = {
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**small, num_labels=2)),
        "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**small)),
        "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**small)),
    }[family]()
    folder = tmp_path / family
    make.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(folder)]), key)


@pytest.mark.parametrize("pair", ["lr=.nan", "lr=.inf", "weight_decay=.nan", "warmup_epochs=.inf"])
def test_recipe_override_nan_is_refused(tmp_path, pair):
    r = run_cli(["train", "--set", pair, "--print-recipe"], cwd=tmp_path)
    assert_user_error(r, pair.split("=")[0])


def _truncated_png(path):
    write_image(path, (64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut


def test_one_bad_image_costs_that_image_only(tmp_path):
    model = write_model_folder(tmp_path / "m")
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = run_cli(["predict", str(good), str(bad), "--model", str(model)])
    assert_user_error(r, "bad.png")
    assert r.stdout.startswith(str(good))


def test_truncated_image_is_recorded_once_and_not_replaced(tmp_path):
    for name in ("x1", "x2"):
        write_image(tmp_path / "a" / f"{name}.png")
    _truncated_png(tmp_path / "b" / "t.png")
    ds = ImageFolderDataset(tmp_path, on_error="none")
    assert len(ds) == 3 and ds.num_skipped == 0  # the header check passes
    with pytest.warns(UserWarning, match="t.png"):
        assert ds[2] is None
    assert ds[2] is None and ds[0] is not None
    assert [p.name for p, _ in ds.skipped] == ["t.png"]


def test_eval_counts_a_truncated_image_once(tmp_path):
    data = tmp_path / "data"
    for cls in ("0", "1", "2"):
        write_image(data / cls / "ok.png")
    _truncated_png(data / "2" / "t.png")
    model = write_model_folder(tmp_path / "m")
    r = run_cli(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["num_skipped"] == 1
    assert metrics.get("num_samples", metrics.get("images")) == 3


def test_nan_is_never_a_valid_config_number():
    for field in ("mlp_ratio", "layer_norm_eps", "drop_rate", "attn_drop_rate"):
        with pytest.raises(Exception, match=field) as info:
            ViTConfig(**{**TINY, field: math.nan})
        assert type(info.value).__name__ == "ConfigError"


def test_npz_with_an_integer_array_is_refused(tmp_path):
    import numpy as np

    from vitkit.checkpoints.jax import npz_from_state_dict

    model = create_model(ViTConfig(**TINY))
    arrays = npz_from_state_dict(model.state_dict(), model.config)
    arrays["head/kernel"] = (arrays["head/kernel"] * 100).astype(np.int64)
    np.savez(tmp_path / "w.npz", **arrays)
    image = write_image(tmp_path / "a.png")
    assert_user_error(
        run_cli(["predict", str(image), "--model", str(tmp_path / "w.npz")]), "head/kernel", "int64"
    )


# Integer weights are refused as the file holds them, before q, k and v are merged into one qkv
# (the merge would cast them silently), in every format vitkit reads.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "dinov2": ("dinov2_small_patch14_518", {"num_classes": 0}),
    "clip": ("clip_vit_base_patch32_224", {"num_classes": 0}),
    "siglip": ("siglip_base_patch16_224", {"num_classes": 0}),
}


def _tiny_family(name):
    preset, extra = FAMILIES[name]
    small = dict(depth=1, embed_dim=32, num_heads=2, image_size=32, patch_size=16)
    return create_model(preset, **{**small, **extra})


def _int8(tensors, is_target):
    (key,) = [k for k in tensors if is_target(k)]
    tensors[key] = tensors[key].to(torch.int8) if torch.is_tensor(tensors[key]) else (
        tensors[key].astype("int8"))  # fmt: skip
    return key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_integer_query_in_a_transformers_folder_is_refused_before_the_merge(tmp_path, family):
    from safetensors.torch import load_file, save_file

    import vitkit

    folder = vitkit.save_pretrained(_tiny_family(family), tmp_path / "m", format="hf")
    weights = load_file(folder / "model.safetensors")
    key = _int8(weights, lambda k: k.endswith(("0.attention.attention.query.weight",
                                               "0.attention.query.weight",
                                               "0.self_attn.q_proj.weight")))  # fmt: skip
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{key}' is torch\.int8"):
        vitkit.from_pretrained(folder)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_integer_qkv_in_a_timm_file_is_refused(tmp_path, suffix):
    import vitkit
    from vitkit.checkpoints.timm import save_timm

    path = tmp_path / f"w{suffix}"
    save_timm(_tiny_family("vit"), str(tmp_path / "w.safetensors"))
    weights = vitkit.checkpoints.pretrained.read_state_dict(tmp_path / "w.safetensors")
    key = _int8(weights, lambda k: k == "blocks.0.attn.qkv.weight")
    if suffix == ".pth":
        torch.save(weights, path)
    else:
        from safetensors.torch import save_file

        save_file(weights, path)
    with pytest.raises(CheckpointError, match=rf"'{key}' is torch\.int8"):
        vitkit.from_pretrained(path, model_name="vit_tiny_patch16_224")


def test_integer_query_kernel_in_an_npz_is_refused_before_the_merge(tmp_path):
    import numpy as np

    import vitkit
    from vitkit.checkpoints.jax import npz_from_state_dict

    model = _tiny_family("vit")
    arrays = npz_from_state_dict(model.state_dict(), model.config)
    key = _int8(
        arrays, lambda k: k.endswith("encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    )
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(CheckpointError, match=f"'{key}' is int8"):
        vitkit.from_pretrained(tmp_path / "w.npz")


def test_integer_query_in_a_transformers_folder_is_one_line_in_the_cli(tmp_path):
    from safetensors.torch import load_file, save_file

    import vitkit

    folder = vitkit.save_pretrained(_tiny_family("vit"), tmp_path / "m", format="hf")
    weights = load_file(folder / "model.safetensors")
    key = _int8(weights, lambda k: k.endswith("layer.0.attention.attention.query.weight"))
    save_file(weights, folder / "model.safetensors")
    image = write_image(tmp_path / "a.png")
    assert_user_error(run_cli(["predict", str(image), "--model", str(folder)]), key, "int8")
