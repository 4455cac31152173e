"""The pipelined predictor: transformers-pipeline parity on a saved folder, order, precision."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.checkpoints.resolve import processor_for
from vitkit.cli import main
from vitkit.infer.predictor import Predictor, decode

LABELS = {0: "cat", 1: "dog", 2: "rocket", 3: "coffee", 4: "face"}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random transformers ViT saved with its ViTImageProcessor (as on the hub)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=96, image_size=64, patch_size=8, num_labels=5,
                       id2label=LABELS, label2id={v: k for k, v in LABELS.items()})  # fmt: skip
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # spread the logits so the scores carry information
        model.classifier.weight.mul_(20)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("jpegs")
    for i, a in enumerate(photos):
        Image.fromarray(a).save(root / f"{i:02d}.jpg", quality=90)
    Image.fromarray(photos[0]).convert("RGBA").save(root / "16_rgba.png")  # the PIL fallback
    return root


def test_scores_equal_transformers_pipeline(hf_folder, jpeg_dir):
    from transformers import pipeline

    paths = sorted(str(p) for p in jpeg_dir.iterdir())
    classify = pipeline("image-classification", model=str(hf_folder), device="cpu")
    expected = classify(paths, top_k=5)
    model = vitkit.from_pretrained(str(hf_folder))
    processor = processor_for(model.config, hf_folder)
    got = list(Predictor(model, processor, batch_size=4, workers=2).predict(paths))
    assert [p.source for p in got] == paths
    worst = 0.0
    for want, have in zip(expected, got):
        assert [w["label"] for w in want] == [name for _, name, _ in have.top_k]
        worst = max(worst, *(abs(w["score"] - p) for w, (_, _, p) in zip(want, have.top_k)))
    assert worst < 1e-4
    # PIL resizing is the other backend, and it is not what the pipeline does
    pil = dataclasses.replace(processor, backend="pil")
    pil_probs = [p.top_k for p in Predictor(model, pil).predict(paths)]
    assert max(abs(a[2] - b[2]) for x, y in zip(pil_probs, [g.top_k for g in got])
               for a, b in zip(x, y)) > 1e-4  # fmt: skip


def test_jpeg_fast_path_decodes_like_pil(jpeg_dir):
    processor = vitkit.ImageProcessor.hf_vit(64)
    for path in sorted(jpeg_dir.glob("*.jpg"))[:4]:
        fast = decode(path, processor)
        slow = np.asarray(vitkit.data.images.load_image(path))
        assert torch.equal(fast, torch.from_numpy(slow.copy()).permute(2, 0, 1))


def test_order_errors_and_batching(jpeg_dir, tmp_path):
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=5, embed_dim=32, depth=1,
                                num_heads=2, id2label=LABELS)  # fmt: skip
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    good = sorted(str(p) for p in jpeg_dir.iterdir())
    sources = [good[0], str(bad), *good[1:6], str(tmp_path / "missing.png"), good[6]]
    processor = vitkit.ImageProcessor.hf_vit(32)
    one = list(Predictor(model, processor, batch_size=1, workers=1).predict(sources))
    many = list(Predictor(model, processor, batch_size=3, workers=4).predict(sources))
    assert [p.source for p in one] == [p.source for p in many] == sources
    assert [p.error is None for p in many] == [True, False, *[True] * 5, False, True]
    assert many[1].error.startswith("not an image file") and many[7].error == "no such file"
    for a, b in zip(one, many):
        if a.error is None:
            assert [c for c, _, _ in a.top_k] == [c for c, _, _ in b.top_k]
            assert np.allclose([p for *_, p in a.top_k], [p for *_, p in b.top_k], atol=1e-5)
    # in-memory inputs take the same path as files (a batch of one each: on AVX2-only CPUs the
    # batch size changes the matmul kernels' rounding in the 8th digit)
    array = np.asarray(Image.open(good[0]).convert("RGB"))
    (from_array,) = Predictor(model, processor, batch_size=1).predict([array])
    assert from_array.top_k == one[0].top_k


def test_cli_precision_flags(capsys, hf_folder, jpeg_dir):
    args = ["predict", str(jpeg_dir), "--model", str(hf_folder), "--json", "-k", "1"]
    assert main(args) == 0
    exact = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*args, "--precision", "int8", "--backend", "torch", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    quant = [json.loads(line) for line in out.splitlines()]  # stdout holds only results
    assert [r["path"] for r in quant] == [r["path"] for r in exact] and len(exact) == 17
    same = sum(a["top_k"][0]["index"] == b["top_k"][0]["index"] for a, b in zip(exact, quant))
    assert same >= 15
    assert main([*args, "--precision", "fp16", "--backend", "openvino"]) == 1
    assert "fp16 on openvino is not offered" in capsys.readouterr().err


def test_backend_follows_the_checkpoints_library(tmp_path):
    from vitkit.checkpoints.resolve import processor_for

    config = vitkit.get_config("vit_tiny_patch4_32")
    assert processor_for(config).backend == "tensor"  # a preset: transformers' defaults
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"crop_pct": 0.9}}))
    assert processor_for(config, tmp_path).backend == "pil"  # timm resizes with PIL
    assert processor_for(config, tmp_path, "hf").backend == "tensor"
    vitkit.ImageProcessor.hf_vit(32).save_pretrained(tmp_path)
    assert processor_for(config, tmp_path).backend == "tensor"  # a transformers processor config
    assert processor_for(config, tmp_path, "timm").backend == "pil"
