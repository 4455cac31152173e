"""`vitkit embed`: rows equal the model's pooled output on the processor's pixels, in input
order, bad images per image; feature maps; two torchrun processes write what one does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import vitkit
from conftest import SRC, free_port
from vitkit.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=3, embed_dim=32, depth=2,
                                num_heads=2, projection_dim=16)  # fmt: skip
    vitkit.save_pretrained(model, root / "model")
    images = root / "images"
    images.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        Image.fromarray(getattr(skimage.data, name)()).save(images / f"{name}.png")
    (images / "zz_bad.png").write_bytes(b"not an image")
    return root


def test_rows_are_the_pooled_output_in_input_order(folder, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    code = main(["embed", str(folder / "images"), "--model", str(folder / "model"),
                 "--output", str(out), "--batch-size", "2"])  # fmt: skip
    assert code == 1 and "zz_bad.png" in capsys.readouterr().err  # reported, not fatal
    rows = np.load(out)
    paths = (tmp_path / "emb.npy.paths.txt").read_text().splitlines()
    assert [Path(p).stem for p in paths] == ["astronaut", "camera", "chelsea", "coffee", "rocket"]
    r = vitkit.resolve(folder / "model")
    with torch.inference_mode():
        out_ = r.model(r.processor(paths))
    assert rows.shape == (5, 16)  # CLIP-style: the image embedding (projection)
    np.testing.assert_allclose(rows, out_.image_embeds.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["embed", str(folder / "images"), "--model", str(folder / "model"),
                 "--output", str(out)]) == 1  # fmt: skip
    assert "--overwrite" in capsys.readouterr().err  # never replaced unasked


def test_pools_normalize_layers_and_safetensors(folder, tmp_path):
    from safetensors.numpy import load_file

    args = [str(folder / "images" / "coffee.png"), "--model", str(folder / "model")]
    assert main(["embed", *args, "--output", str(tmp_path / "a.safetensors"), "--pool", "cls",
                 "--normalize"]) == 0  # fmt: skip
    rows = load_file(str(tmp_path / "a.safetensors"))["embeddings"]
    r = vitkit.resolve(folder / "model")
    with torch.inference_mode():
        cls = r.model.forward_features(r.processor([folder / "images" / "coffee.png"]))
    expected = torch.nn.functional.normalize(cls.last_hidden_state[:, 0], dim=-1)
    np.testing.assert_allclose(rows, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["embed", *args, "--output", str(tmp_path / "m.npy"), "--layers", "0", "-1"]) == 0
    assert np.load(tmp_path / "m.npy").shape == (1, 2, 32, 8, 8)  # (N, L, D, Hp, Wp)


def test_two_processes_write_what_one_does(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    args = [str(folder / "images"), "--model", str(folder / "model"), "--batch-size", "2"]
    one = [sys.executable, "-m", "vitkit", "embed"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "vitkit",
           "embed"]  # fmt: skip
    for cmd, name in ((one, "one.npy"), (two, "two.npy")):
        r = subprocess.run([*cmd, *args, "--output", str(tmp_path / name)], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 1 and "zz_bad.png" in r.stderr, r.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert (tmp_path / "two.npy.paths.txt").read_text() == (
        tmp_path / "one.npy.paths.txt"
    ).read_text()


def test_precision_paths_keep_the_rows_direction(folder, tmp_path, capsys):
    from vitkit.features import Embedder
    from vitkit.infer import prepare

    images = str(folder / "images")
    args = [images, "--model", str(folder / "model"), "--pool", "mean"]
    assert main(["embed", *args, "--output", str(tmp_path / "fp32.npy")]) == 1  # zz_bad.png
    ref = torch.from_numpy(np.load(tmp_path / "fp32.npy"))
    for precision, backend in [("bf16", "torch"), ("int8", "torch"), ("auto", None)]:
        out = tmp_path / f"{precision}.npy"
        extra = ["--backend", backend] if backend else []
        assert main(["embed", *args, "--output", str(out), "--precision", precision, *extra]) == 1
        rows = torch.from_numpy(np.load(out))
        cos = torch.nn.functional.cosine_similarity(rows, ref)
        assert rows.shape == ref.shape and cos.min() > 0.99, (precision, cos)
        if precision != "auto":
            assert not torch.equal(rows, ref)  # it really ran at that precision
    assert "auto picked" in capsys.readouterr().err
    # `auto` judges rows by cosine similarity (argmax of an embedding means nothing)
    r = vitkit.resolve(folder / "model")
    runner = prepare(Embedder(r.model, "mean"), "bf16", backend="torch")
    x = r.processor([str(folder / "images" / "coffee.png")])
    assert runner._agreement_with(runner(x), Embedder(r.model, "mean")(x)) > 0.99
    assert "cosine" in runner._measure
    code = main(["embed", *args, "--output", str(tmp_path / "maps.npy"), "--layers", "-1",
                 "--precision", "bf16"])  # fmt: skip
    assert code == 1 and "--layers" in capsys.readouterr().err
