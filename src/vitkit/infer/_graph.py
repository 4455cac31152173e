"""The plain-tensor modules that runtimes and exporters see, and the converters into each runtime.

`LogitsModule` turns a `VisionTransformer` (which returns a `ViTOutput`) into a module with one
tensor in and one tensor out. `PreprocessedModule` puts the checkpoint's preprocessing and a
softmax around it, so an exported graph takes uint8 images of any size. The converters
(`to_onnx`, `to_openvino`, `quantize_openvino`, `quantize_onnx`) are shared by the precision
paths (`vitkit.infer.precision`) and the exporter (`vitkit.infer.export`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from vitkit._warnings import ignoring
from vitkit.errors import ConfigError, VitkitError
from vitkit.infer import warm
from vitkit.infer.cache import cpu_flags
from vitkit.models.vit import logits_of

MAX_SIDE = 8192  # largest image side an exported graph accepts (a bound torch.export needs)


class LogitsModule(nn.Module):
    """(B, C, H, W) float32 -> (B, K) float32 logits (pooled features for a model without a
    head); a bf16/fp16 model gets its input cast inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def forward(self, pixel_values: Tensor) -> Tensor:
        return logits_of(self.model(pixel_values.to(self.dtype))).float()


class PreprocessedModule(nn.Module):
    """uint8 images (B, H, W, C) or (B, C, H, W) of any size, C the model's channels (3 for RGB,
    1 for a grayscale model) -> (probabilities (B, K), top-k class indices (B, k)).

    Does what `vitkit.data.processor.ImageProcessor` does on its tensor path (transformers'
    torchvision backend): resize with antialiasing in two passes (width, then height), each
    rounded back to 8-bit levels as torch's uint8 kernel does, centre crop, then rescale and
    normalize in one affine step. torch computes its uint8 weights in fixed point, so a pixel
    can still differ by one level, far more rarely than with one float pass.

    with_pixels: also return the model's input (B, C, h, w) as a third output, so that the
    exporter can check the preprocessing and the model apart (`vitkit.infer.export._verify`).
    """

    def __init__(self, model: nn.Module, processor: Any, *, channels_last: bool, top_k: int,
                 with_pixels: bool = False):  # fmt: skip
        super().__init__()
        if not isinstance(processor.resize, tuple):
            raise ConfigError(
                "--with-preprocessing supports processors that resize to a fixed (height, width) "
                f"(transformers' ViT style), not resize={processor.resize!r}"
            )
        crop = processor.crop_size
        if crop is not None and (crop[0] > processor.resize[0] or crop[1] > processor.resize[1]):
            raise ConfigError(f"crop_size {crop} is larger than resize {processor.resize}")
        if processor.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ConfigError(
                f"--with-preprocessing cannot bake interpolation={processor.interpolation!r}; "
                "use bilinear, bicubic or nearest"
            )
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.processor = processor
        self.channels_last = channels_last
        self.top_k = top_k
        self.with_pixels = with_pixels
        weight, bias = (torch.from_numpy(v).view(1, -1, 1, 1) for v in processor._affine())
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        pixels = self.pixels(images)
        probs = self.model(pixels.to(self.dtype)).logits.float().softmax(-1)
        top = probs.topk(self.top_k, dim=-1)
        return (probs, top.indices, pixels) if self.with_pixels else (probs, top.indices)

    def pixels(self, images: Tensor) -> Tensor:
        """uint8 images -> the model's float32 input (B, C, h, w)."""
        x = images.permute(0, 3, 1, 2) if self.channels_last else images  # (B, C, H, W)
        x = x.float()
        p = self.processor
        if p.interpolation == "nearest":
            x = F.interpolate(x, size=p.resize, mode="nearest")
        else:  # as torch resizes uint8: width, then height, each pass rounded (half up) to uint8
            for size in ((x.shape[-2], p.resize[1]), p.resize):
                x = F.interpolate(x, size=size, mode=p.interpolation, antialias=True,
                                  align_corners=False)  # fmt: skip
                x = (x + 0.5).floor().clamp(0, 255)
        if p.crop_size is not None:
            top, left = p._crop_offsets(*p.resize)
            x = x[..., top : top + p.crop_size[0], left : left + p.crop_size[1]]
        return x * self.weight + self.bias


def input_name(preprocessing: bool, channels_last: bool) -> str:
    """The graph's input name; it states the layout an exported file expects."""
    if not preprocessing:
        return "pixel_values_nchw_float32"
    return "images_uint8_nhwc" if channels_last else "images_uint8_nchw"


def dynamic_shapes(module: nn.Module, example: Tensor, *, patch: int, preprocessing: bool,
                   channels_last: bool) -> dict[str, dict[int, Any]]:  # fmt: skip
    """torch.export dynamic shapes: batch, height and width (multiples of the patch for a bare
    model, since the patch embedding needs them; any size with preprocessing)."""
    batch = Dim("batch", min=1, max=4096)
    name = next(iter(_forward_args(module)))
    if preprocessing:
        h, w = Dim("height", min=2, max=MAX_SIDE), Dim("width", min=2, max=MAX_SIDE)
        axes = {0: batch, 1: h, 2: w} if channels_last else {0: batch, 2: h, 3: w}
        return {name: axes}
    gh = Dim("grid_h", min=1, max=MAX_SIDE // patch)
    gw = Dim("grid_w", min=1, max=MAX_SIDE // patch)
    return {name: {0: batch, 2: patch * gh, 3: patch * gw}}


def _forward_args(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the exporters' and quantizers' chatter (progress bars, tracer warnings) off stdout,
    which `vitkit predict --json` reserves for results."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), ignoring():
        names = ("nncf", "torch.onnx", "torch.export", "torch.utils.cpp_extension")
        loggers = [logging.getLogger(n) for n in names]  # cpp_extension: "No CUDA runtime"
        loggers.append(logging.getLogger())  # onnxruntime's quantizer warns on the root logger
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        # a root logger without handlers would get one from the first logging.warning() call
        # (logging.basicConfig) and print every later warning of the process
        sink_handler = logging.NullHandler() if not logging.getLogger().handlers else None
        if sink_handler is not None:
            logging.getLogger().addHandler(sink_handler)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            if sink_handler is not None:
                logging.getLogger().removeHandler(sink_handler)


def need(module: str, extra: str) -> Any:
    """Import an optional dependency or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(module, extra) from None


def check_installed(module: str, extra: str) -> None:
    """`need` without the import (NNCF alone takes 0.7 s to import, and a cached path never
    calls it)."""
    if importlib.util.find_spec(module) is None:
        raise _missing(module, extra)


def _missing(module: str, extra: str) -> VitkitError:
    return VitkitError(
        f"this needs {module.split('.')[0]}, which is not installed; pip install 'vitkit[{extra}]'"
    )


def to_onnx(module: nn.Module, example: Tensor, path: Path, *, dynamic: dict | None,
            opset: int = 18, input_name: str, output_names: list[str]) -> None:  # fmt: skip
    """torch.onnx (dynamo) export of `module` to `path`."""
    need("onnx", "export")
    need("onnxscript", "export")
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamic_shapes=dynamic, dynamo=True, opset_version=opset,
            input_names=[input_name], output_names=output_names, verbose=False,
        )  # fmt: skip
        program.save(str(path))


def quantize_onnx(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights, int8 activations quantized per call.

    Without VNNI, onnxruntime's x86 kernels multiply u8 x s8 pairs into int16 sums that
    saturate; its documentation's remedy is 7-bit weights (`reduce_range`), taken here on such
    CPUs (on a Zen 3 the full range was 0.104 off fp32 on a fitted model, past the 0.1 bound)."""
    need("onnxruntime", "export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = not ({"avx512_vnni", "avx_vnni"} & cpu_flags())
    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=reduce_range)


@functools.cache
def onnx_session(path: Path | bytes, threads: int | None = None) -> Any:
    ort = need("onnxruntime", "export")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def to_openvino(module: nn.Module, example: Tensor) -> Any:
    """An OpenVINO model of `module` with dynamic batch, height and width."""
    ov = need("openvino", "openvino")
    with quiet(), torch.no_grad():
        return ov.convert_model(module, example_input=example)


def quantize_openvino(ov_model: Any, calibration: Tensor, chunk: int = 4) -> Any:
    """NNCF post-training static quantization (transformer preset) on `calibration` images."""
    nncf = need("nncf", "openvino")
    items = [calibration[i : i + chunk].numpy() for i in range(0, len(calibration), chunk)]
    with quiet():
        return nncf.quantize(
            ov_model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
        )  # fmt: skip


def compile_openvino(
    ov_model: Any, precision: str, threads: int | None = None, blobs: Path | None = None
) -> Any:
    """`warm.compile_openvino` with torch's thread count by default."""
    need("openvino", "openvino")
    return warm.compile_openvino(ov_model, precision, threads or torch.get_num_threads(), blobs)
