"""Inference: precision paths (fp32 / bf16 / fp16 / int8 on torch, onnxruntime or OpenVINO),
export to ONNX / torch.export / OpenVINO files, and the pipelined batch predictor."""

from vitkit.infer.precision import PRECISIONS, Runner, load, prepare

__all__ = ["PRECISIONS", "Runner", "load", "prepare"]
