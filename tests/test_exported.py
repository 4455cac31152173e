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
