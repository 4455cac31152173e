"""A file written by `vitkit export` as a model: `vitkit predict --model vit.int8.onnx`.

The export is the prepared model (converted, quantized, checked), so nothing is rebuilt: the
file runs in its runtime (onnxruntime for `.onnx`, OpenVINO for `.xml`) at the precision it
was exported with. What it needs besides its graph travels in it (`vitkit.infer.export`): the
model's config and class names, and the checkpoint's preprocessing (`vitkit_processor`;
files exported before it was written get transformers' defaults at the model's size, and
`processor_stated` is False). Files with the preprocessing baked in (`--with-preprocessing`: uint8 images in,
probabilities out) are for other runtimes; vitkit runs the float-pixel exports.

    model, processor = load_exported("vit.onnx")
    logits = model(processor(["cat.jpg"]))          # (B, K) float32
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitkit import limits
from vitkit.checkpoints.preprocessing import from_hf_dict
from vitkit.config import ViTConfig
from vitkit.data.processor import ImageProcessor
from vitkit.errors import CheckpointError, ConfigError
from vitkit.infer import _graph

SUFFIXES = (".onnx", ".xml")


def is_exported(source: str | os.PathLike[str]) -> bool:
    """Whether `source` names a file `vitkit export` writes (ONNX or OpenVINO IR)."""
    path = Path(source)
    return path.suffix.lower() in SUFFIXES and path.is_file()


def check_unchanged(source: str | os.PathLike[str], changes: dict[str, bool]) -> None:
    """Refuse, in one line, the options in `changes` that were given (flag -> given): an
    exported file runs at the precision, size and preprocessing it was exported with."""
    refused = [flag for flag, given in changes.items() if given]
    if refused:
        raise ConfigError(f"{os.fspath(source)} is an exported file: it runs at the precision, "
                          f"size and preprocessing it was exported with ({', '.join(refused)} "
                          "cannot change them; export again, or pass the checkpoint)")  # fmt: skip


class ExportedModel(nn.Module):
    """Pixels (B, C, H, W) -> (B, K) float32 logits from an exported file, on the CPU; `config`
    is the model's (`ViTConfig`, with its class names) and `precision` the file's."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], config: ViTConfig,
                 precision: str, source: str) -> None:  # fmt: skip
        super().__init__()
        self._run, self.config, self.precision, self.source = run, config, precision, source
        self.processor_stated = True

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(np.asarray(self._run(x), dtype=np.float32))


def load_exported(path: str | os.PathLike[str]) -> tuple[ExportedModel, ImageProcessor]:
    """(model, its preprocessing) of a `vitkit export` file; `CheckpointError` naming the file
    for anything else (another tool's graph, baked-in preprocessing, a damaged file)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        session = _onnx(path)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        name = meta.get("vitkit_input", "")

        def run(x: np.ndarray) -> np.ndarray:
            return session.run(None, {name: x})[0]

    else:
        compiled, meta = _openvino(path)

        def run(x: np.ndarray) -> np.ndarray:
            return compiled(x)[compiled.output(0)]

    config, processor, precision = _read_meta(meta, str(path))
    model = ExportedModel(run, config, precision, str(path))
    model.processor_stated = "vitkit_processor" in meta or "vitkit_preprocessing" in meta
    return model, processor


def _onnx(path: Path) -> Any:
    try:
        return _graph.onnx_session(path)
    except ConfigError:
        raise
    except Exception as exc:  # onnxruntime's own errors: a damaged or foreign file
        raise CheckpointError(f"{path}: onnxruntime cannot read it ({str(exc)[:200]})") from None


def _openvino(path: Path) -> tuple[Any, dict[str, str]]:
    ov = _graph.need("openvino", "openvino")
    try:
        model = ov.Core().read_model(str(path))
        meta = {}
        for key in ("id2label", "vitkit_config", "vitkit_precision", "vitkit_input",
                    "vitkit_processor", "vitkit_preprocessing"):  # fmt: skip
            if model.has_rt_info(["vitkit", key]):
                meta[key] = str(model.get_rt_info(["vitkit", key]).astype(str))
        return _graph.compile_openvino(model, "fp32"), meta
    except Exception as exc:
        raise CheckpointError(f"{path}: OpenVINO cannot read it ({str(exc)[:200]})") from None


def _read_meta(meta: dict[str, str], source: str) -> tuple[ViTConfig, ImageProcessor, str]:
    if "vitkit_config" not in meta:
        raise CheckpointError(f"{source} was not written by `vitkit export` (no vitkit_config "
                              "in its metadata)")  # fmt: skip
    if meta.get("vitkit_input") != _graph.input_name(False, False):
        raise CheckpointError(
            f"{source} has the preprocessing built in (input {meta.get('vitkit_input')!r}: uint8 "
            "images in, probabilities out), for runtimes without vitkit; export without "
            "--with-preprocessing to run it with vitkit"
        )
    cap = limits.limit("JSON_BYTES")
    if any(len(v) > cap for v in meta.values()):
        raise CheckpointError(f"{source}: a metadata entry is over {cap:,d} bytes")
    try:
        config = ViTConfig.from_dict(json.loads(meta["vitkit_config"]))
        labels = json.loads(meta.get("id2label") or "{}")
        if labels and config.num_classes:
            config = config.replace(id2label=labels)
        stated = meta.get("vitkit_processor") or meta.get("vitkit_preprocessing")
        processor = from_hf_dict(json.loads(stated)) if stated else None
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{source}: its vitkit metadata is invalid ({exc})") from None
    if processor is None:
        processor = ImageProcessor.for_model(config, backend="tensor")
    return config, processor.with_channels(config.in_chans), meta.get("vitkit_precision", "fp32")
