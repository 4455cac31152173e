"""Precision paths against fp32 on a small model and real photos; `auto`'s choices and checks."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.errors import ConfigError, VitkitError
from vitkit.infer import precision as P
from vitkit.infer import prepare

# max |logits - fp32 logits| / max |fp32 logits| each path must stay within (stated in
# docs/inference.md); the converters of fp32 are exact up to float reordering
BOUNDS = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2, "int8": 0.1}
PATHS = [
    ("fp32", "torch"), ("bf16", "torch"), ("fp16", "torch"), ("int8", "torch"),
    ("fp32", "onnxruntime"), ("int8", "onnxruntime"),
    ("fp32", "openvino"), ("bf16", "openvino"), ("int8", "openvino"),
]  # fmt: skip


@pytest.fixture(scope="module")
def pixels(photos):
    """16 real photos through transformers' ViT preprocessing at 32x32: (16, 3, 32, 32)."""
    return vitkit.ImageProcessor.hf_vit(32, backend="tensor")(photos)


@pytest.fixture(scope="module")
def model(pixels):
    """A small ViT fitted to tell the 16 photos apart, so that its top-1 has real
    margins, as a trained model's does (a random one's logits are near ties)."""
    torch.manual_seed(0)
    m = vitkit.create_model("vit_tiny_patch4_32", num_classes=16, embed_dim=64, depth=2,
                            num_heads=2)  # fmt: skip
    labels = torch.arange(len(pixels))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(m(pixels).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(pixels).logits.argmax(-1), labels)
    return m


def _available(backend: str) -> bool:
    return backend == "torch" or P.machine()[backend]


@pytest.mark.parametrize(("precision", "backend"), PATHS, ids=[f"{p}-{b}" for p, b in PATHS])
def test_path_matches_fp32(model, pixels, precision, backend):
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    with torch.inference_mode():
        ref = model(pixels).logits
    runner = prepare(model, precision, backend=backend, calibration=pixels)
    assert (runner.precision, runner.backend) == (precision, backend)
    out = runner(pixels)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= BOUNDS[precision], f"{precision} on {backend}: {rel:.2e}"
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    if precision != "fp32":
        assert rel > 0  # really ran at lower precision
    # any batch and any size the patch divides
    other = torch.nn.functional.interpolate(pixels[:3], size=(40, 24), mode="bilinear")
    with torch.inference_mode():
        ref2 = model(other).logits
    assert ((runner(other) - ref2).abs().max() / ref2.abs().max()).item() <= BOUNDS[precision]


def test_int8_is_real_int8_arithmetic(model, pixels):
    runner = prepare(model, "int8", backend="torch")
    # torch.ao swaps every Linear for a dynamically quantized one holding int8 weights
    linears = [m for m in runner._fn.module.modules() if type(m).__name__ == "Linear"]
    assert len(linears) == 2 * 4 + 1 and all(m.weight().dtype == torch.qint8 for m in linears)
    if _available("openvino"):
        # OpenVINO runs the matmuls on 8-bit integers after NNCF's quantization
        runner = prepare(model, "int8", backend="openvino", calibration=pixels)
        ops = runner._fn.compiled.get_runtime_model().get_ordered_ops()
        kinds = {op.get_rt_info()["layerType"].astype(str): set() for op in ops}
        for op in ops:
            kind = op.get_rt_info()["layerType"].astype(str)
            kinds[kind].add(op.get_rt_info()["runtimePrecision"].astype(str))
        assert kinds["FullyConnected"] & {"u8", "i8"}


def test_static_int8_calibrates_on_the_first_batch(model, pixels):
    if not _available("openvino"):
        pytest.skip("openvino is not installed")
    runner = prepare(model, "int8", backend="openvino")
    assert not runner.ready
    runner(pixels)
    assert runner.ready and "calibrated on 16 images" in runner.describe()


CPUS = {
    "avx2": dict(avx2=True, avx512=False, avx512_bf16=False, vnni=False, amx=False),
    "zen4": dict(avx2=True, avx512=True, avx512_bf16=True, vnni=True, amx=False),
    "amx": dict(avx2=True, avx512=True, avx512_bf16=True, vnni=True, amx=True),
}


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_auto_choice_follows_cpu_flags_and_runtimes(cpu):
    def picks(**runtimes):
        info = dict(CPUS[cpu], cuda=False, cpu_capability="x", **runtimes)
        return [(p, b) for p, b, _ in P.choose("cpu", info)]

    native = cpu != "avx2"
    both = picks(openvino=True, onnxruntime=True)
    assert both[0] == ("int8", "openvino") and both[-1] == ("fp32", "torch")
    assert (("bf16", "openvino") in both) == native
    bare = picks(openvino=False, onnxruntime=False)
    assert bare == ([("bf16", "torch")] if native else []) + [("fp32", "torch")]
    assert picks(openvino=False, onnxruntime=True)[0] == (
        ("bf16", "torch") if native else ("int8", "onnxruntime")
    )


def test_auto_falls_back_when_top1_changes(model, pixels, monkeypatch):
    info = dict(CPUS["zen4"], cuda=False, cpu_capability="x", openvino=False, onnxruntime=False)
    monkeypatch.setattr(P, "machine", lambda: info)
    real_torch_fn = P._torch_fn

    def broken_bf16(model, precision, device):
        fn = real_torch_fn(model, precision, device)
        return (lambda x: -fn(x)) if precision == "bf16" else fn  # every top-1 changes

    monkeypatch.setattr(P, "_torch_fn", broken_bf16)
    said = []
    runner = prepare(model, "auto", log=said.append)
    assert not runner.ready  # waits for real images to check its pick
    with torch.inference_mode():
        ref = model(pixels).logits
    assert torch.equal(runner(pixels), ref)
    assert (runner.precision, runner.backend) == ("fp32", "torch")
    assert "bf16 on torch keeps only 0.0% top-1 agreement with fp32" in said[0]
    assert said[-1].startswith("auto picked fp32 on torch")

    monkeypatch.setattr(P, "_torch_fn", real_torch_fn)
    said.clear()
    runner = prepare(model, "auto", log=said.append, calibration=pixels)
    assert (runner.precision, runner.backend) == ("bf16", "torch")
    assert "top-1 agreement with fp32 on the calibration batch 100.0%" in runner.describe()


def test_errors_name_the_fix(model, monkeypatch):
    with pytest.raises(ConfigError, match="precision='int4' is not one of"):
        prepare(model, "int4")
    with pytest.raises(ConfigError, match="fp16 on openvino"):
        prepare(model, "fp16", backend="openvino")
    import importlib
    import importlib.util

    real = importlib.import_module

    def no_openvino(name, *a, **k):
        if name.split(".")[0] in ("openvino", "nncf"):
            raise ImportError(name)
        return real(name, *a, **k)

    def not_found(name, *a, **k):  # what is checked without importing it (NNCF: 0.7 s)
        return None if name.split(".")[0] in ("openvino", "nncf") else real_spec(name, *a, **k)

    real_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib, "import_module", no_openvino)
    monkeypatch.setattr(importlib.util, "find_spec", not_found)
    with pytest.raises(VitkitError, match=r"pip install 'vitkit\[openvino\]'"):
        prepare(model, "int8", backend="openvino")


def test_load_resolves_a_folder_with_its_processor(model, pixels, tmp_path):
    vitkit.save_pretrained(model, tmp_path)
    vitkit.ImageProcessor.hf_vit(32).save_pretrained(tmp_path)
    runner = P.load(tmp_path, "bf16", backend="torch")
    assert runner.processor == vitkit.ImageProcessor.hf_vit(32, backend="tensor")  # as transformers
    with torch.inference_mode():
        ref = model(pixels).logits
    assert torch.equal(runner(pixels).argmax(-1), ref.argmax(-1))


@pytest.mark.skipif(not _available("onnxruntime"), reason="onnxruntime not installed")
@pytest.mark.parametrize("flags", [{"avx2"}, {"avx2", "avx512f", "avx512_vnni"}])
def test_onnx_int8_takes_seven_bit_weights_without_vnni(model, tmp_path, monkeypatch, flags):
    import onnx
    from onnx import numpy_helper

    from vitkit.infer import _graph

    monkeypatch.setattr(_graph, "cpu_flags", lambda: frozenset(flags))
    _graph.to_onnx(_graph.LogitsModule(model).eval(), torch.zeros(1, 3, 32, 32),
                   tmp_path / "fp32.onnx", dynamic=None, input_name="x", output_names=["y"])  # fmt: skip
    _graph.quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    weights = [
        numpy_helper.to_array(t) for t in onnx.load(tmp_path / "int8.onnx").graph.initializer
    ]
    largest = max(int(abs(w.astype(int)).max()) for w in weights if w.dtype.name == "int8")
    assert largest <= 64 if "avx512_vnni" not in flags else largest == 127
