"""Precision paths prepared once and reused (vitkit.infer.cache): the second run of a model
converts and calibrates nothing, new weights make a new entry, a bad entry is rebuilt."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import vitkit
from vitkit.cli import main
from vitkit.infer import _graph
from vitkit.infer.cache import Cache
from vitkit.infer.precision import prepare


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def calls(monkeypatch):
    """How often each costly step ran."""
    counts = {"to_openvino": 0, "quantize_openvino": 0, "to_onnx": 0, "quantize_onnx": 0}
    for name in counts:
        real = getattr(_graph, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(_graph, name, counted)
    return counts


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return vitkit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=8, depth=1,
                               num_classes=5).eval()  # fmt: skip


def _images(seed: int = 0, n: int = 8):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_a_second_int8_run_converts_and_calibrates_nothing(calls, cache_dir):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model, x = _model(), _images()
    log: list[str] = []
    first = prepare(model, "int8", backend="openvino", calibration=x, log=log.append)
    assert calls == {"to_openvino": 1, "quantize_openvino": 1, "to_onnx": 0, "quantize_onnx": 0}
    assert any(line.startswith("calibrating NNCF static int8 on 8 images: ") for line in log)
    assert any(line.startswith("cached in ") for line in log)
    log.clear()
    second = prepare(_model(), "int8", backend="openvino", calibration=x, log=log.append)
    assert calls["to_openvino"] == calls["quantize_openvino"] == 1  # nothing rebuilt
    assert "from the cache" in second.describe() and any("from the cache" in s for s in log)
    torch.testing.assert_close(second(x), first(x), rtol=0, atol=1e-5)
    # the first batch calibrates when no images are given, and later runs reuse that path
    lazy = prepare(model, "int8", backend="openvino", cache=True)
    lazy(_images(1))
    again = prepare(model, "int8", backend="openvino")
    again(_images(2))  # other images: the entry calibrated on the first run's serves
    assert calls["quantize_openvino"] == 2
    assert len(Cache().entries()) == 2


def test_new_weights_at_the_same_path_make_a_new_entry(calls, tmp_path):
    pytest.importorskip("openvino")
    folder = tmp_path / "model"
    vitkit.save_pretrained(_model(0), folder)
    prepare(vitkit.from_pretrained(folder), "fp32", backend="openvino")
    prepare(vitkit.from_pretrained(folder), "fp32", backend="openvino")
    assert calls["to_openvino"] == 1
    vitkit.save_pretrained(_model(1), folder)  # the same path, other weights
    runner = prepare(vitkit.from_pretrained(folder), "fp32", backend="openvino")
    assert calls["to_openvino"] == 2 and len(Cache().entries()) == 2
    torch.testing.assert_close(runner(_images()), _model(1)(_images()).logits, atol=1e-4,
                               rtol=1e-4)  # fmt: skip


def test_a_corrupt_entry_is_rebuilt_with_a_note(calls):
    pytest.importorskip("openvino")
    model, x = _model(), _images()
    want = prepare(model, "fp32", backend="openvino")(x)
    (entry,) = [e["path"] for e in Cache().entries()]
    weights = entry / "model.bin"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    log: list[str] = []
    got = prepare(model, "fp32", backend="openvino", log=log.append)(x)
    assert calls["to_openvino"] == 2
    assert any("is unusable (model.bin is truncated or changed); rebuilding it" in s for s in log)
    torch.testing.assert_close(got, want)
    meta = entry / "entry.json"  # a description from another version
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 99}))
    log.clear()
    prepare(model, "fp32", backend="openvino", log=log.append)
    # (a slow machine adds timed lines for the costly steps after the note)
    assert calls["to_openvino"] == 3 and "written by another version" in log[0], log


def test_onnxruntime_int8_and_autos_pick_are_kept(calls):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = _model(), _images()
    for _ in range(2):
        prepare(model, "int8", backend="onnxruntime")(x)  # built at the first call
    assert calls["to_onnx"] == calls["quantize_onnx"] == 1
    log: list[str] = []
    first = prepare(model, "auto", calibration=x, log=log.append)
    built = dict(calls)
    second = prepare(model, "auto", calibration=x, log=log.append)
    assert dict(calls) == built  # neither the candidates nor the pick's path were rebuilt
    assert (second.precision, second.backend) == (first.precision, first.backend)
    assert any("as picked before" in s for s in log)


def test_no_cache_eviction_and_the_cache_command(capsys, monkeypatch, cache_dir):
    pytest.importorskip("onnxruntime")
    prepare(_model(), "fp32", backend="onnxruntime", cache=False)
    assert not cache_dir.exists() or not Cache().entries()
    prepare(_model(0), "fp32", backend="onnxruntime")
    prepare(_model(1), "fp32", backend="onnxruntime")
    assert len(Cache().entries()) == 2
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and out.count("fp32 on onnxruntime") == 2
    newest = Cache().entries()[0]["path"]
    monkeypatch.setenv("VITKIT_CACHE_MB", "0.001")  # ~1 kB: only what was just used stays... none
    prepare(_model(2), "fp32", backend="onnxruntime")
    assert not Cache().entries() and not newest.exists()
    monkeypatch.setenv("VITKIT_CACHE_MB", "4096")
    prepare(_model(0), "fp32", backend="onnxruntime")
    assert main(["cache", "--clear"]) == 0 and "deleted 1 entry" in capsys.readouterr().out
    assert not Cache().entries()


def test_a_failed_write_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path / "c")
    from vitkit.infer.cache import Key

    key = Key("m", "int8", "openvino", (3, 32, 32), "none", "AVX2", "v")
    with pytest.raises(RuntimeError), cache.put(key, "x") as folder:
        (folder / "model.xml").write_text("half")
        raise RuntimeError("killed")
    assert cache.get(key) is None and list((tmp_path / "c" / "prepared").iterdir()) == []


def test_a_warm_run_never_loads_the_weights(calls, tmp_path, monkeypatch):
    """The second run of a checkpoint whose path is cached gets a Deferred model (its config,
    not its weights) and the same answers; the weights are loaded only if the path is gone."""
    pytest.importorskip("openvino")
    from vitkit.infer import precision

    folder, x = tmp_path / "model", _images()
    vitkit.save_pretrained(_model(0), folder)
    cold = precision.resolve_for(folder, "fp32", backend="openvino", log=lambda s: None)
    assert not isinstance(cold.model, precision.Deferred)
    expected = prepare(cold.model, "fp32", backend="openvino")(x)
    compiled = list(Cache().prepared.glob("*/compiled/*"))
    assert compiled, "OpenVINO keeps its compiled model in the entry"

    loads = []
    real_resolve = precision.resolve
    monkeypatch.setattr(
        precision, "resolve", lambda *a, **k: loads.append(1) or real_resolve(*a, **k)
    )
    warm = precision.resolve_for(folder, "fp32", backend="openvino", log=lambda s: None)
    assert isinstance(warm.model, precision.Deferred) and loads == []
    assert warm.model.config.to_dict() == cold.model.config.to_dict()
    assert warm.processor == cold.processor
    runner = prepare(warm.model, "fp32", backend="openvino", log=lambda s: None)
    torch.testing.assert_close(runner(x), expected, rtol=0, atol=0)
    assert loads == [] and calls["to_openvino"] == 1  # neither loaded nor converted again

    for entry in Cache().entries():  # the path evicted: the Deferred model loads its weights
        if entry["what"] != "a checkpoint's config and preprocessing":
            shutil.rmtree(entry["path"])
    again = precision.resolve_for(folder, "fp32", backend="openvino", log=lambda s: None)
    runner = prepare(again.model, "fp32", backend="openvino", log=lambda s: None)
    torch.testing.assert_close(runner(x), expected, rtol=0, atol=1e-6)
    assert loads == [1] and calls["to_openvino"] == 2

    vitkit.save_pretrained(_model(1), folder)  # new weights at the same path: loaded anew
    fresh = precision.resolve_for(folder, "fp32", backend="openvino", log=lambda s: None)
    assert not isinstance(fresh.model, precision.Deferred) and loads == [1, 1]


def test_predict_int8_warm_equals_cold(tmp_path, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from PIL import Image

    folder = tmp_path / "model"
    vitkit.save_pretrained(_model(0), folder)
    image = tmp_path / "a.png"
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(image)
    argv = ["predict", str(image), "--model", str(folder), "--precision", "int8", "--json"]
    assert main(argv) == 0
    cold = capsys.readouterr()
    assert "calibrating NNCF static int8" in cold.err
    assert main(argv) == 0
    warm = capsys.readouterr()
    assert "from the cache" in warm.err and "calibrating" not in warm.err
    assert json.loads(warm.out) == json.loads(cold.out)
