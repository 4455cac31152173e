"""Export a model to a file another runtime loads: ONNX, torch.export (.pt2) or OpenVINO IR.

    export(model, "vit.onnx", dynamic_size=True)                     # (B, 3, H, W) float32
    export(model, "vit.onnx", processor=proc, precision="int8")      # uint8 images, any size

Every export checks itself before it returns: the written file runs (onnxruntime for ONNX,
`torch.export.load` for .pt2, OpenVINO for IR) on a test input of another batch size (and
another image size when sizes are dynamic) against vitkit's PyTorch model; the max difference
is printed, and a file that does not match is deleted (it is written under a temporary name and
renamed only once it passed). With baked-in preprocessing the check holds the two parts apart: the
file's pixels within one 8-bit level of the processor's (a level is what torch's fixed-point
uint8 resize and a runtime's float resize can disagree by), and its probabilities against vitkit's
model run on the file's own pixels. Class names travel in the file: ONNX `metadata_props`
(`id2label`, `vitkit_preprocessing`), .pt2 extra files, OpenVINO `rt_info`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit._io import atomic_path
from vitkit.data.labels import id2label_for
from vitkit.errors import ConfigError, VitkitError
from vitkit.infer import _graph

FORMATS = ("onnx", "pt2", "openvino")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "openvino": ".xml"}
# max |file - vitkit| allowed, relative to max |vitkit output| (probabilities: to 1)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.15}
# max |file pixels - processor pixels| allowed with baked-in preprocessing, in 8-bit levels: one
# level moves a confident model's probabilities by more than 1e-4, so the model part is checked
# on the file's own pixels (the slack covers a runtime's float affine step, fp16 constants)
PIXEL_LEVELS = 1
PIXELS = "pixel_values"  # the preprocessed-pixels output that only the check's twin file keeps
PRECISIONS = {
    "onnx": ("fp32", "fp16", "int8"),
    "pt2": ("fp32", "bf16", "fp16"),
    "openvino": ("fp32", "fp16", "int8"),
}


@dataclasses.dataclass
class ExportResult:
    path: Path
    format: str
    precision: str
    input_name: str
    max_diff: float
    tolerance: float
    checked_shapes: list[tuple[int, ...]]
    # baked-in preprocessing: the most 8-bit levels a pixel of the file is from the processor's
    # (max_diff is then the model part's: the file against vitkit's model on the file's pixels)
    pixel_levels: float | None = None

    def summary(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_shapes)
        model = f"max |difference| {self.max_diff:.2e} (allowed {self.tolerance:.0e})"
        if self.pixel_levels is not None:
            model = (
                f"pixels at most {self.pixel_levels:.2g} 8-bit level(s) off the processor's "
                f"(allowed {PIXEL_LEVELS}), model on those pixels {model}"
            )
        return (
            f"wrote {self.path} ({self.format}, {self.precision}, input {self.input_name!r}); "
            f"checked against vitkit on {shapes}: {model}"
        )


def export(
    model: nn.Module,
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    precision: str = "fp32",
    dynamic_size: bool = False,
    processor: Any = None,
    channels_last: bool = True,
    top_k: int = 5,
    opset: int = 18,
    calibration: Tensor | None = None,
    labels: dict[int, str] | None = None,
    log: Callable[[str], None] | None = print,
    stated_processor: Any = None,
) -> ExportResult:
    """Write `model` (a VisionTransformer) to `output` and check the file; see the module doc.

    format: onnx | pt2 | openvino (default: from the suffix of `output`).
    precision: fp32; fp16 (onnx, pt2, openvino: fp16 weights); bf16 (pt2); int8 (onnx:
        onnxruntime dynamic quantization; openvino: NNCF static, needs `calibration`).
    dynamic_size: batch, height and width dynamic (the position table is resampled inside the
        graph); otherwise only the batch is.
    processor: an `ImageProcessor` to bake in (--with-preprocessing): the file then takes uint8
        images (B, H, W, C) (`channels_last`) or (B, C, H, W) of any size (C = 3, or 1 for a
        grayscale model), and returns (probabilities (B, K), top-k class indices (B, top_k)).
    calibration: preprocessed (B, C, H, W) real images for static int8.
    stated_processor: the checkpoint's `ImageProcessor`, written into the file's metadata
        (`vitkit_processor`) so that `vitkit predict --model FILE` preprocesses as it did.
    """
    output = Path(output)
    format = format or _format_from_suffix(output)
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS[format]:
        raise ConfigError(
            f"{precision} is not offered for {format}; use one of {', '.join(PRECISIONS[format])}"
        )
    if format == "openvino" and precision == "int8" and calibration is None:
        raise ConfigError("static int8 for OpenVINO needs calibration images (--calibration DIR)")
    config = model.config  # type: ignore[attr-defined]
    model = model.eval().float().cpu()
    net = model
    if precision in ("bf16", "fp16") and format != "openvino":
        net = copy.deepcopy(model).to(torch.bfloat16 if precision == "bf16" else torch.float16)
    preprocessing = processor is not None
    module: nn.Module
    if preprocessing:
        top_k = min(top_k, config.num_classes or 1)
        # onnx and openvino: the check runs a twin of the file that outputs its pixels too
        module = _graph.PreprocessedModule(net, processor, channels_last=channels_last,
                                           top_k=top_k, with_pixels=format != "pt2").eval()  # fmt: skip
        if not config.num_classes:
            raise ConfigError("--with-preprocessing needs a classifier (num_classes > 0)")
    else:
        module = _graph.LogitsModule(net).eval()
    name = _graph.input_name(preprocessing, channels_last)
    outputs = ["probabilities", "top_indices", PIXELS] if preprocessing else ["logits"]
    example, tests = _inputs(config, processor, channels_last, dynamic_size or preprocessing)
    dyn = _graph.dynamic_shapes(module, example, patch=config.patch_size,
                                preprocessing=preprocessing, channels_last=channels_last)  # fmt: skip
    if not (dynamic_size or preprocessing):
        arg = next(iter(dyn))
        dyn = {arg: {0: dyn[arg][0]}}  # the batch only
    meta = {
        "id2label": json.dumps({str(k): v for k, v in (labels or _labels(config)).items()}),
        "vitkit_config": config.to_json() if hasattr(config, "to_json") else "",
        "vitkit_precision": precision,
        "vitkit_input": name,
    }
    if preprocessing:
        meta["vitkit_preprocessing"] = json.dumps(processor.to_hf_dict())
    if stated_processor is not None or preprocessing:
        meta["vitkit_processor"] = json.dumps((stated_processor or processor).to_hf_dict())
    reference = _reference(model, processor, channels_last, top_k)

    if format == "openvino":
        return _export_openvino(module, output, example, tests, reference, precision,
                                calibration, meta, name, log)  # fmt: skip
    with atomic_path(output) as tmp, tempfile.TemporaryDirectory(prefix="vitkit-export-") as work:
        made = None  # with preprocessing: the pixels the file makes of each test input
        if format == "onnx":
            twin = Path(work) / "pixels.onnx" if preprocessing else None
            _write_onnx(module, tmp, example, dyn, opset, name, outputs, precision, meta, twin)
            if twin is not None:
                made = _onnx_pixels(twin, name, tests)
            run = _onnx_runner(tmp, name)
        else:
            _write_pt2(module, tmp, example, dyn, meta)
            if preprocessing:  # torch.export keeps torch's resize ops (aten._upsample_*_aa)
                with torch.inference_mode():
                    made = [module.pixels(x) for x in tests]  # type: ignore[operator]
            run = _pt2_runner(tmp)
        result = _verify(run, tests, reference, precision, output, format, name, log, made)
    return result


def _format_from_suffix(output: Path) -> str:
    for format, suffix in SUFFIXES.items():
        if output.suffix.lower() == suffix:
            return format
    raise ConfigError(
        f"cannot tell the format from {output.name!r}; pass --format onnx|pt2|openvino"
    )


def _labels(config: Any) -> dict[int, str]:
    return id2label_for(config) if config.num_classes else {}


def _inputs(config: Any, processor: Any, channels_last: bool, dynamic: bool) -> tuple[
    Tensor, list[Tensor]
]:  # fmt: skip
    """(the example the graph is traced with, the test inputs it is checked on)."""
    gen = torch.Generator().manual_seed(0)
    if processor is not None:

        def images(b: int, h: int, w: int) -> Tensor:
            # smooth images: noise at full resolution is not what cameras produce, and makes
            # 8-bit rounding after the resize flip on ties
            shape = (b, processor.num_channels, max(2, h // 8), max(2, w // 8))
            small = torch.randint(0, 256, shape, generator=gen)
            x = torch.nn.functional.interpolate(small.float(), size=(h, w), mode="bilinear")
            x = x.round().clamp(0, 255).to(torch.uint8)
            return x.permute(0, 2, 3, 1).contiguous() if channels_last else x

        return images(2, 180, 260), [images(3, 317, 205), images(1, 64, 96)]
    h, w = config.image_hw
    p = config.patch_size
    example = torch.randn(2, config.in_chans, h, w, generator=gen)
    tests = [torch.randn(3, config.in_chans, h, w, generator=gen)]
    if dynamic:
        tests.append(torch.randn(1, config.in_chans, h + 2 * p, max(p, w - p), generator=gen))
    return example, tests


def _reference(model: nn.Module, processor: Any, channels_last: bool, top_k: int) -> Callable:
    """vitkit's own answer for a test input: [logits]. With a processor it is called with the
    pixels the file made of the input too, and answers [probabilities and top indices of the
    model on those pixels, the most 8-bit levels a pixel of them is from the processor's (its
    tensor path, transformers' torchvision backend)]."""
    level = None
    if processor is not None:  # one 8-bit level in the model's units, per channel
        level = torch.from_numpy(np.abs(processor._affine()[0])).view(1, -1, 1, 1)

    def run(x: Tensor, made: Tensor | None = None) -> list[Any]:
        with torch.inference_mode():
            if processor is None:
                return [model(x).logits.float().numpy()]
            images = x.permute(0, 3, 1, 2) if channels_last else x
            pixels = dataclasses.replace(processor, backend="tensor")(images)
            made = pixels if made is None else made
            probs = model(made).logits.float().softmax(-1)
            levels = float(((made - pixels).abs() / level).max())
            return [probs.numpy(), probs.topk(top_k).indices.numpy(), levels]

    return run


def _verify(run: Callable, tests: list[Tensor], reference: Callable, precision: str,
            output: Path, format: str, name: str, log: Callable | None,
            made: list[Tensor] | None = None) -> ExportResult:  # fmt: skip
    """Run the file on each test input against vitkit's model. With baked-in preprocessing,
    `made` holds the pixels the file makes of each input, and the two parts are checked apart:
    those pixels within PIXEL_LEVELS of the processor's, the probabilities at TOLERANCE against
    vitkit's model on the same pixels (end to end, a pixel one level off moves a confident
    model's probabilities past 1e-4, and the file was refused)."""
    worst, tolerance = 0.0, TOLERANCE[precision]
    levels: float | None = None if made is None else 0.0
    top_ok = True
    for i, x in enumerate(tests):
        got = run(x)
        want = reference(x) if made is None else reference(x, made[i])
        if levels is not None:
            levels = max(levels, want[2])
        scale = max(1.0, float(np.abs(want[0]).max())) if len(want) == 1 else 1.0
        diff = float(np.abs(np.asarray(got[0], dtype=np.float64) - want[0]).max())
        worst = max(worst, diff / scale)
        if len(want) > 1 and precision == "fp32":  # the top classes, where not tied
            probs = np.sort(want[0], axis=-1)[:, ::-1]
            clear = (probs[:, 0] - probs[:, 1]) > 2 * tolerance
            top_ok &= np.array_equal(np.asarray(got[1])[clear, 0], want[1][clear, 0])
    result = ExportResult(output, format, precision, name, worst, tolerance,
                          [tuple(t.shape) for t in tests], levels)  # fmt: skip
    # the file's pixels are whole levels apart from the processor's; 0.5 is float slack
    if levels is not None and levels >= PIXEL_LEVELS + 0.5:
        raise VitkitError(
            f"{output}: the exported {format} file's preprocessing puts pixels {levels:.1f} 8-bit "
            f"levels from the processor's (allowed {PIXEL_LEVELS}); the file was not written"
        )
    if not (worst <= tolerance and top_ok):
        what = (
            f"by {worst:.2e} (allowed {tolerance:.0e} for {precision})"
            if top_ok
            else ("in its top class")
        )
        raise VitkitError(
            f"{output}: the exported {format} file differs from vitkit's model {what}; "
            "the file was not written"
        )
    if log is not None:
        log(result.summary())
    return result


# ------------------------------------------------------------------------------ ONNX
def _write_onnx(module: nn.Module, path: Path, example: Tensor, dyn: dict, opset: int,
                name: str, outputs: list[str], precision: str, meta: dict[str, str],
                twin: Path | None = None) -> None:  # fmt: skip
    """Write the graph to `path`; with `twin`, the graph exports the pixels too, and is written
    there as it is, and to `path` without that output (the same graph otherwise)."""
    onnx = _graph.need("onnx", "export")
    if opset < 18 and isinstance(module, _graph.PreprocessedModule):
        raise ConfigError("--with-preprocessing needs --opset 18 or later (antialiased Resize)")
    if precision == "int8":
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".vitkit-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _graph.to_onnx(module, example, fp32, dynamic=dyn, opset=opset, input_name=name,
                           output_names=outputs)  # fmt: skip
            _graph.quantize_onnx(fp32, Path(tmp) / "int8.onnx")
            proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    else:
        _graph.to_onnx(module, example, path, dynamic=dyn, opset=opset, input_name=name,
                       output_names=outputs)  # fmt: skip
        proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"vitkit export: input {name!r}; " + (
        "uint8 images of any size" if name.startswith("images") else "float32 pixels"
    )
    if twin is not None:
        onnx.save(proto, str(twin))
        kept = [o for o in proto.graph.output if o.name != PIXELS]
        del proto.graph.output[:]
        proto.graph.output.extend(kept)
    onnx.save(proto, str(path))


def _onnx_runner(path: Path, name: str) -> Callable:
    session = _graph.onnx_session(path)

    def run(x: Tensor) -> list[np.ndarray]:
        return session.run(None, {name: x.numpy()})

    return run


def _onnx_pixels(twin: Path, name: str, tests: list[Tensor]) -> list[Tensor]:
    """The pixels the twin graph makes of each test input (its session is gone on return)."""
    session = _graph.onnx_session(twin)
    return [torch.from_numpy(session.run([PIXELS], {name: x.numpy()})[0]) for x in tests]


# ------------------------------------------------------------------------------ torch.export
def _write_pt2(module: nn.Module, path: Path, example: Tensor, dyn: dict,
               meta: dict[str, str]) -> None:  # fmt: skip
    with _graph.quiet(), torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dyn)
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; `path` is a temp name
    torch.export.save(program, buffer, extra_files=meta)
    path.write_bytes(buffer.getvalue())


def _pt2_runner(path: Path) -> Callable:
    loaded = torch.export.load(io.BytesIO(path.read_bytes())).module()

    def run(x: Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            out = loaded(x)
        outs = out if isinstance(out, tuple) else (out,)
        return [o.float().numpy() if o.is_floating_point() else o.numpy() for o in outs]

    return run


# ------------------------------------------------------------------------------ OpenVINO
def _export_openvino(module: nn.Module, output: Path, example: Tensor, tests: list[Tensor],
                     reference: Callable, precision: str, calibration: Tensor | None,
                     meta: dict[str, str], name: str, log: Callable | None) -> ExportResult:  # fmt: skip
    ov = _graph.need("openvino", "openvino")
    if output.suffix.lower() != ".xml":
        raise ConfigError(f"OpenVINO IR is written as NAME.xml + NAME.bin; got {output.name!r}")
    ov_model = _graph.to_openvino(module, example)  # with preprocessing: + the pixels output
    if precision == "int8":
        ov_model = _graph.quantize_openvino(ov_model, calibration.float().cpu())  # type: ignore[union-attr]
    for key, value in meta.items():
        ov_model.set_rt_info(value, ["vitkit", key])
    ov_model.inputs[0].get_tensor().set_names({name})
    preprocessing = isinstance(module, _graph.PreprocessedModule)
    with tempfile.TemporaryDirectory(prefix="vitkit-export-") as tmp:
        made = None
        if preprocessing:  # the check's twin keeps the pixels output; the file does not
            twin = Path(tmp) / "pixels.xml"
            ov.save_model(ov_model, str(twin), compress_to_fp16=precision == "fp16")
            pixels = _openvino_runner(ov, twin)
            made = [torch.from_numpy(pixels(x)[-1]) for x in tests]
            del pixels
            ov_model.remove_result(ov_model.get_results()[-1])
        xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=precision == "fp16")
        run = _openvino_runner(ov, xml)
        result = _verify(run, tests, reference, precision, output, "openvino", name, log, made)
        with atomic_path(output) as tmp_xml, atomic_path(output.with_suffix(".bin")) as tmp_bin:
            shutil.copyfile(xml, tmp_xml)
            shutil.copyfile(xml.with_suffix(".bin"), tmp_bin)
    return result


def _openvino_runner(ov: Any, xml: Path) -> Callable:
    compiled = _graph.compile_openvino(ov.Core().read_model(str(xml)), "fp32")

    def run(x: Tensor) -> list[np.ndarray]:
        result = compiled(x.numpy())
        return [result[o] for o in compiled.outputs]

    return run
