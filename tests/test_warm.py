"""A warm `vitkit predict` without torch (vitkit.infer.warm): once a local checkpoint's OpenVINO
path is prepared, a fresh process answers from the cache without importing torch, and prints
what the full path prints, to the bit; anything it cannot serve falls back to the full path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from conftest import tiny_classifier
from vitkit.data.processor import ImageProcessor
from vitkit.infer import warm
from vitkit.infer.cache import Cache, cpu_capability
from vitkit.infer.predictor import preprocess

pytest.importorskip("openvino")
pytest.importorskip("nncf")

# runs the command, then says on stderr which heavy modules the process imported
_RUN = (
    "import sys\nfrom vitkit.cli import main\nrc = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
    "print('IMPORTED', ','.join(heavy) or '-', file=sys.stderr)\nsys.exit(rc)"
)


def _predict(cache: Path, *argv: str, warm_path: bool = True) -> tuple[str, str, str]:
    """(stdout, stderr, heavy modules imported) of `vitkit predict ARGV` in a fresh process."""
    env = {**os.environ, "VITKIT_CACHE_DIR": str(cache)}
    env.pop("VITKIT_NO_WARM", None)
    if not warm_path:
        env["VITKIT_NO_WARM"] = "1"
    done = subprocess.run([sys.executable, "-c", _RUN, "predict", *argv], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    imported = done.stderr.strip().splitlines()[-1]
    assert imported.startswith("IMPORTED "), done.stderr[-2000:]
    return done.stdout, done.stderr, imported.split(" ", 1)[1]


def _hf_folder(root: Path, seed: int = 0) -> Path:
    """A tiny transformers-style folder: ViTImageProcessor, resized as a uint8 tensor."""
    torch.manual_seed(seed)
    model = vitkit.create_model("vit_tiny_patch16_224", image_size=32, patch_size=8, depth=1,
                                num_classes=7).eval()  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.5)  # peaked answers
    vitkit.save_pretrained(model, root)
    return root


@pytest.fixture
def images(tmp_path, photos) -> list[str]:
    """Photos and noise of several sizes, PNG and JPEG, and one file that is no image."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = [photos[0], photos[1][::3, ::2], (rng.random((37, 53, 3)) * 255).astype(np.uint8)]
    for i, a in enumerate(arrays):
        Image.fromarray(np.ascontiguousarray(a)).save(folder / f"{i}.png")
        Image.fromarray(np.ascontiguousarray(a)).save(folder / f"{i}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return sorted(str(p) for p in folder.iterdir())


def _torch_free_here(folder: Path) -> bool:
    """Whether this CPU's torch resizes as `to_array` does for the folder's processor (the PIL
    path always; torchvision's 8-bit kernel on the CPUs whose kernel it reproduces)."""
    return vitkit.resolve(folder).processor.matches_without_torch()


def _check_warm(cache: Path, *argv: str, torch_free: bool = True) -> str:
    """Run ARGV cold, then warm: the warm process imports no torch (where `torch_free`; else
    it takes the full path) and prints what the full path prints (text and JSON); returns
    the warm stderr."""
    _, _, cold = _predict(cache, *argv)
    assert "torch" in cold  # nothing prepared yet: the full path builds it
    for extra in ((), ("--json", "--top-k", "3")):
        out, err, heavy = _predict(cache, *argv, *extra)
        assert (heavy == "-") == torch_free, err[-2000:]
        full, full_err, full_heavy = _predict(cache, *argv, *extra, warm_path=False)
        assert "torch" in full_heavy and "from the cache" in full_err
        assert out == full and out.count("%" if not extra else "probability") > 0
        assert err.count("broken.jpg") == full_err.count("broken.jpg") == 1
    return err


def test_warm_int8_needs_no_torch_and_prints_what_the_full_path_prints(tmp_path, images):
    cache = tmp_path / "cache"
    for folder in (_hf_folder(tmp_path / "hf"), tiny_classifier(tmp_path / "timm")):
        argv = (*images, "--model", str(folder), "--precision", "int8", "--batch-size", "4")
        err = _check_warm(cache, *argv, torch_free=_torch_free_here(folder))
        assert "int8 on OpenVINO from the cache" in err and "calibrating" not in err
    compiled = [p for p in Cache(cache).prepared.glob("*/compiled/*")]
    _predict(cache, *images, "--model", str(tmp_path / "hf"), "--precision", "int8",
             "--batch-size", "4")  # fmt: skip
    # the compiled blob was imported, not rebuilt under other settings (threads: torch's)
    assert sorted(Cache(cache).prepared.glob("*/compiled/*")) == sorted(compiled)


def test_new_weights_or_a_removed_entry_take_the_full_path(tmp_path, images):
    cache, folder = tmp_path / "cache", _hf_folder(tmp_path / "hf")
    argv = (*images, "--model", str(folder), "--precision", "int8", "--json")
    _predict(cache, *argv)
    _hf_folder(folder, seed=1)  # other weights at the same path
    out, err, heavy = _predict(cache, *argv)
    assert "torch" in heavy and "calibrating NNCF static int8" in err  # a new entry
    again, _, heavy = _predict(cache, *argv)
    assert (heavy == "-") == _torch_free_here(folder) and again == out
    for entry in Cache(cache).entries():  # the prepared path gone: the full path rebuilds it
        if entry["what"] != "a checkpoint's config and preprocessing":
            shutil.rmtree(entry["path"])
    rebuilt, err, heavy = _predict(cache, *argv)
    assert "torch" in heavy and "calibrating NNCF static int8" in err
    top = [json.loads(line).get("top_k") for line in rebuilt.splitlines()]
    assert [t and t[0]["index"] for t in top] == [
        t and t[0]["index"] for t in (json.loads(line).get("top_k") for line in out.splitlines())
    ]


def test_bf16_and_autos_cached_pick(tmp_path, images):
    cache, folder = tmp_path / "cache", _hf_folder(tmp_path / "hf")
    free = _torch_free_here(folder)
    err = _check_warm(cache, *images, "--model", str(folder), "--precision", "bf16", "--backend",
                      "openvino", torch_free=free)  # fmt: skip
    assert "bf16 on OpenVINO from the cache" in err
    err = _check_warm(cache, *images, "--model", str(folder), "--precision", "auto", "--backend",
                      "openvino", torch_free=free)  # fmt: skip
    assert "as picked before" in err and "on OpenVINO from the cache" in err
    # a torch path (bf16 on torch) is never served without torch
    _, _, heavy = _predict(cache, *images, "--model", str(folder), "--precision", "bf16",
                           "--backend", "torch")  # fmt: skip
    assert "torch" in heavy


def test_pixels_without_torch_equal_the_predictors(tmp_path, photos):
    """`ImageProcessor.to_array` (PIL + numpy, torchvision's uint8 resize reproduced) gives the
    predictor's pixels bit for bit, for both backends, upscaling and downscaling, wherever
    `matches_without_torch` (what a warm run relies on) says so; on the PIL path everywhere. On AVX2
    (the kernel it reproduces) the torchvision path matches too."""
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu_capability() == capability
    if capability == "AVX2":
        assert ImageProcessor(backend="tensor", interpolation="bilinear").matches_without_torch()
    rng = np.random.default_rng(1)
    arrays = [photos[0], photos[2][::2], (rng.random((37, 53, 3)) * 255).astype(np.uint8),
              (rng.random((300, 200, 3)) * 255).astype(np.uint8)]  # fmt: skip
    processors = [ImageProcessor(), ImageProcessor(backend="tensor", interpolation="bicubic"),
                  ImageProcessor.timm_eval(224), ImageProcessor.timm_eval(64, backend="tensor"),
                  ImageProcessor(resize=300, crop_size=(320, 280), backend="tensor")]  # fmt: skip
    checked = 0
    for i, a in enumerate(arrays):
        for suffix in (".png", ".jpg"):
            path = tmp_path / f"{i}{suffix}"
            Image.fromarray(np.ascontiguousarray(a)).save(path)
            for p in processors:
                if p.matches_without_torch():
                    np.testing.assert_array_equal(p.to_array(path), preprocess(path, p).numpy())
                    checked += 1
    assert checked >= 2 * len(arrays) * 2  # at least the PIL ones, wherever this runs


def test_a_cpu_whose_resize_kernel_differs_is_caught():
    """torch's generic (non-AVX2) 8-bit bilinear kernel rounds otherwise: forced here with
    ATEN_CPU_CAPABILITY=default, the probe says no, so a warm run would take the full path."""
    code = ("from vitkit.data.processor import ImageProcessor as P\n"
            "print(P(backend='tensor', interpolation='bilinear').matches_without_torch(),"
            " P(backend='pil').matches_without_torch())")  # fmt: skip
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=True)  # fmt: skip
    assert done.stdout.split() == ["False", "True"]


def test_threads_and_probabilities_match_torchs():
    code = "import torch\nfrom vitkit.infer import warm\nprint(warm.default_threads(), torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )  # fmt: skip  (a fresh process: torch's default)
    ours, torchs = done.stdout.split()
    assert ours == torchs
    logits = torch.randn(4, 1000) * 5
    np.testing.assert_allclose(warm.probabilities(logits.numpy()), logits.softmax(-1).numpy(),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
