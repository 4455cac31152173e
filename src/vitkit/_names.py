"""The choices the command line offers and the library checks, named once in a module that
imports nothing heavy (the CLI builds its help from them without importing torch)."""

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")  # vitkit.infer.precision
BACKENDS = ("torch", "onnxruntime", "openvino")  # runtimes of the precision paths
METHODS: tuple[str, ...] = ("attention", "rollout", "grad-rollout")  # vitkit.explain
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")  # rollout's fusion of the heads
