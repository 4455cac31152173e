"""Inference: precision paths (fp32 / bf16 / fp16 / int8 on torch, onnxruntime or OpenVINO),
export to ONNX / torch.export / OpenVINO files, and the pipelined batch predictor.

The names below load on first use (PEP 562): a warm `vitkit predict` imports the torch-free
submodules (`vitkit.infer.cache`, `vitkit.infer.warm`) without loading torch."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PRECISIONS", "Runner", "load", "prepare"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("vitkit.infer.precision"), name)
    raise AttributeError(f"module 'vitkit.infer' has no attribute {name!r}")
