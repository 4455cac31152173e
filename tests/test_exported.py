"""`vitkit predict --model FILE` with a file `vitkit export` wrote (vitkit.infer.exported): the
same answers as the checkpoint it came from, nothing rebuilt, and clear refusals."""

from __future__ import annotations

import json

import pytest
import skimage.data
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.errors import CheckpointError
from vitkit.infer.exported import load_exported

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
LABELS = {0: "cat", 1: "coffee", 2: "rocket"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=3, embed_dim=32, depth=1,
                                num_heads=2, id2label=LABELS)  # fmt: skip
    with torch.no_grad():
        model.head.weight.mul_(20)
    vitkit.save_pretrained(model, root / "model")
    # not transformers' default mean/std: the file must carry them
    vitkit.ImageProcessor.timm_eval(32, crop_pct=0.875).save_pretrained(root / "model")
    for name in ("chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.png")
    return root


def _predict(capsys, *args):
    code = main(["predict", *map(str, args), "--json", "--top-k", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [{t["label"]: t["probability"] for t in json.loads(line)["top_k"]}
            for line in out.splitlines()], err  # fmt: skip


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_an_exported_file_predicts_as_its_checkpoint(capsys, folder, suffix):
    if suffix == ".xml":
        pytest.importorskip("openvino")
    out = folder / f"vit{suffix}"
    assert main(["export", str(folder / "model"), "-o", str(out)]) == 0
    capsys.readouterr()
    photos = sorted(folder.glob("*.png"))
    want, _ = _predict(capsys, *photos, "--model", folder / "model")
    got, err = _predict(capsys, *photos, "--model", out)
    assert "fp32" in err and "as exported" in err and "states no preprocessing" not in err
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() == set(LABELS.values())
        assert max(abs(g[k] - w[k]) for k in w) < 1e-4
    model, processor = load_exported(out)
    assert model.config.id2label == LABELS and processor.crop_size == (32, 32)


def test_int8_file_and_refusals(capsys, folder, tmp_path):
    out = tmp_path / "vit.int8.onnx"
    assert main(["export", str(folder / "model"), "-o", str(out), "--precision", "int8"]) == 0
    capsys.readouterr()
    got, err = _predict(capsys, folder / "rocket.png", "--model", out)
    assert "int8" in err and set(got[0]) == set(LABELS.values())
    for flags, words in [
        (["--precision", "bf16"], "--precision"),
        (["--image-size", "64"], "--image-size"),
        (["--labels", "a", "b"], "--labels"),
    ]:
        code = main(["predict", str(folder / "rocket.png"), "--model", str(out), *flags])
        err = capsys.readouterr().err
        assert code == 1 and words in err and "exported file" in err, err
    hf = tmp_path / "hf"  # a processor that can be baked in: a fixed resize
    vitkit.save_pretrained(vitkit.from_pretrained(folder / "model"), hf)
    vitkit.ImageProcessor.hf_vit(32).save_pretrained(hf)
    baked = tmp_path / "baked.onnx"
    assert main(["export", str(hf), "-o", str(baked), "--with-preprocessing"]) == 0
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="preprocessing built in"):
        load_exported(baked)
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not an onnx graph" * 10)
    code = main(["predict", str(folder / "rocket.png"), "--model", str(foreign)])
    err = capsys.readouterr().err
    assert code == 1 and "onnxruntime cannot read it" in err and "Traceback" not in err


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_an_exported_encoder_embeds_as_its_checkpoint(capsys, folder, tmp_path, suffix):
    """`vitkit embed --model FILE`: an encoder's export gives the checkpoint's rows; a
    classifier's export and flags that would change the file are refused in one line."""
    import numpy as np

    if suffix == ".xml":
        pytest.importorskip("openvino")
    encoder = tmp_path / "encoder"
    model = vitkit.from_pretrained(folder / "model")
    model.reset_classifier(0)
    vitkit.save_pretrained(model, encoder)
    vitkit.ImageProcessor.timm_eval(32, crop_pct=0.875).save_pretrained(encoder)
    out = tmp_path / f"encoder{suffix}"
    assert main(["export", str(encoder), "-o", str(out)]) == 0
    photos = [str(p) for p in sorted(folder.glob("*.png"))]
    for source, name in ((encoder, "want.npy"), (out, "got.npy")):
        assert main(["embed", *photos, "--model", str(source), "-o", str(tmp_path / name),
                     "--normalize"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "as exported" in err
    want, got = np.load(tmp_path / "want.npy"), np.load(tmp_path / "got.npy")
    assert got.shape == want.shape == (3, 32)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (tmp_path / "got.npy.paths.txt").read_text().split() == photos
    for flags, words in [(["--pool", "cls"], "--pool"), (["--layers", "-1"], "--layers"),
                         (["--precision", "int8"], "--precision")]:  # fmt: skip
        code = main(["embed", photos[0], "--model", str(out), "-o", str(tmp_path / "x.npy"),
                     *flags])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 1 and words in err and "exported file" in err, err
    classifier = tmp_path / f"classifier{suffix}"
    assert main(["export", str(folder / "model"), "-o", str(classifier)]) == 0
    capsys.readouterr()
    code = main(["embed", photos[0], "--model", str(classifier), "-o", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err
    assert code == 1 and "3 class scores, not an embedding" in err and "Traceback" not in err


def test_vitkit_serve_runs_an_exported_file(folder, tmp_path):
    """`vitkit serve --model FILE`: a classifier's export answers /v1/classify as the checkpoint
    does, an encoder's /v1/embed; what the file cannot do is a 400 or a refused setting."""
    import numpy as np

    pytest.importorskip("uvicorn")
    from conftest import Server, http, multipart, post_json
    from vitkit.errors import ConfigError
    from vitkit.serve.app import Settings

    classifier = tmp_path / "vit.onnx"
    assert main(["export", str(folder / "model"), "-o", str(classifier)]) == 0
    photo = (folder / "rocket.png").read_bytes()
    with Server(Settings(model=str(folder / "model"), max_batch=2)) as server:
        server.wait_ready()
        status, want = post_json(server.port, "/v1/classify?top_k=3", photo)
    with Server(Settings(model=str(classifier), max_batch=2)) as server:
        server.wait_ready()
        status, got = post_json(server.port, "/v1/classify?top_k=3", photo)
        assert status == 200 and [t["label"] for t in got["top_k"]] == [
            t["label"] for t in want["top_k"]]  # fmt: skip
        for g, w in zip(got["top_k"], want["top_k"]):
            assert g["probability"] == pytest.approx(w["probability"], abs=1e-4)
        health = json.loads(http(server.port, "GET", "/healthz")[2])
        assert health["precision"] == "fp32" and "as exported" in health["runtime"]
        status, answer = post_json(server.port, "/v1/embed", photo)
        assert status == 400 and "exported classifier" in answer["error"]
        body, headers = multipart(photo)
        status, _, data = http(server.port, "POST", "/v1/explain", body, headers)
        assert status == 400 and b"serve the checkpoint to explain" in data

    encoder_dir = tmp_path / "encoder"
    model = vitkit.from_pretrained(folder / "model")
    model.reset_classifier(0)
    vitkit.save_pretrained(model, encoder_dir)
    encoder = tmp_path / "encoder.onnx"
    assert main(["export", str(encoder_dir), "-o", str(encoder)]) == 0
    assert main(["embed", str(folder / "rocket.png"), "-m", str(encoder_dir),
                 "-o", str(tmp_path / "want.npy")]) == 0  # fmt: skip
    with Server(Settings(model=str(encoder), max_batch=2)) as server:
        server.wait_ready()
        status, answer = post_json(server.port, "/v1/embed", photo)
        assert status == 200 and answer["dim"] == 32
        np.testing.assert_allclose(answer["embedding"], np.load(tmp_path / "want.npy")[0],
                                   atol=1e-4)  # fmt: skip
    for changes in ({"precision": "int8"}, {"image_size": 64}, {"index": str(tmp_path)}):
        with pytest.raises(ConfigError, match="is an exported file"):
            Settings(model=str(classifier), **changes)
