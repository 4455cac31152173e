"""Inference throughput of vitkit vs timm vs HF transformers, measured in one alternating run.

    python benchmarks/infer.py                       # ViT-S/16 and ViT-B/16, batch 1 and 16
    python benchmarks/infer.py --quick               # ViT-S/16, batch 1, fp32, a few repeats
    python benchmarks/infer.py --models vit_base_patch16_224 --batch-sizes 16 --dtypes bf16

For every (model, dtype, batch size) the contenders (vitkit with SDPA and with eager attention,
timm, transformers' ViTForImageClassification with SDPA and with eager attention, optionally
torch.compile'd vitkit and timm) run on the same input, in eval mode under
`torch.inference_mode()`, after warm-up, round-robin; the table gives the median images/s, the
ratios vitkit/timm and vitkit/transformers, and the fraction of this machine's matmul peak
(measured in the same run) that vitkit reaches. vitkit and timm share the same weights, and their
outputs are checked to agree before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import common
import vitkit

DEFAULT_MODELS = "vit_small_patch16_224,vit_base_patch16_224"
PEAK = "matmul peak"  # the reference matmul timed alongside the models in every row
BF16_WEIGHTS = " bf16 weights"  # suffix of contenders whose parameters are bf16 (no autocast)


@dataclass
class Row:
    """One (model, batch, dtype) cell of the benchmark: median seconds per call per contender."""

    model: str
    batch: int
    dtype: str
    gmacs_per_image: float
    seconds: dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    peak_flops: float = 0.0  # FLOPs of one call of the PEAK matmul
    paired: dict[str, float] = field(default_factory=dict)  # name -> median per-round time ratio

    def speedup(self, name: str, over: str) -> float:
        """How many times faster `name` is than `over`: the median over rounds of their time
        ratio in the same round (robust to load drifting between rounds)."""
        return self.paired.get(f"{over}/{name}", self.seconds[over] / self.seconds[name])

    def images_per_s(self, name: str) -> float:
        return self.batch / self.seconds[name]

    def fraction_of_peak(self, name: str) -> float:
        """Achieved FLOP/s over the matmul peak timed in the same rounds (NaN if none)."""
        if PEAK not in self.seconds:
            return float("nan")
        peak = self.peak_flops / self.seconds[PEAK]
        return self.images_per_s(name) * 2 * self.gmacs_per_image * 1e9 / peak


# ------------------------------------------------------------------------------ contenders
def build_vitkit(name: str, image_size: int | None, implementation: str) -> nn.Module:
    overrides = {"attn_implementation": implementation}
    if image_size:
        overrides["image_size"] = image_size
    return vitkit.create_model(name, **overrides)


def build_timm(config: vitkit.ViTConfig) -> nn.Module:
    """timm's VisionTransformer with the same architecture as `config` (plain ViT/DeiT only)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        global_pool=config.global_pool,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
    )


def build_transformers(config: vitkit.ViTConfig, implementation: str) -> nn.Module:
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTForImageClassification

    hf = HFViTConfig(
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_hidden_dim,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.in_chans,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        num_labels=config.num_classes,
    )
    return ViTForImageClassification._from_config(hf, attn_implementation=implementation)


class WithSDPABackend(nn.Module):
    """`model` with scaled_dot_product_attention pinned to one backend (flash, efficient, cudnn,
    math) for the whole forward pass, so the rows show what each kernel is worth."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[self.backend]
        with sdpa_kernel(kernel):
            return self.model(x)


def build_contenders(
    name: str,
    *,
    image_size: int | None,
    device: torch.device,
    libraries: set[str],
    compile_models: bool,
    bf16_weights: bool = False,
    sdpa_backends: tuple[str, ...] = (),
) -> dict[str, nn.Module]:
    """name -> model in eval mode on `device`; vitkit and timm share one set of weights.

    `bf16_weights` adds vitkit and timm converted with `.to(torch.bfloat16)` (the alternative to
    autocast that casts the weights once instead of on every call); they run in bf16 rows only.
    """
    ours = build_vitkit(name, image_size, "sdpa")
    models: dict[str, nn.Module] = {"vitkit": ours}
    eager = build_vitkit(name, image_size, "eager")
    eager.load_state_dict(ours.state_dict())
    models["vitkit eager"] = eager
    if "timm" in libraries:
        timm_model = build_timm(ours.config)
        timm_model.load_state_dict(ours.state_dict())  # vitkit's names are timm's for plain ViT
        models["timm"] = timm_model
    if "transformers" in libraries:
        models["HF sdpa"] = build_transformers(ours.config, "sdpa")
        models["HF eager"] = build_transformers(ours.config, "eager")
    for model in models.values():
        model.eval().to(device)
    if bf16_weights:
        for key in [k for k in ("vitkit", "timm") if k in models]:
            models[key + BF16_WEIGHTS] = copy.deepcopy(models[key]).to(torch.bfloat16)
    for backend in sdpa_backends:
        models[f"vitkit sdpa={backend}"] = WithSDPABackend(models["vitkit"], backend)
    if compile_models:
        for key in [k for k in ("vitkit", "timm") if k in models]:
            models[f"{key} compiled"] = torch.compile(models[key])
    return models


def forward_fn(
    model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None
) -> Callable[[], torch.Tensor]:
    """A no-argument call of `model` on `x` under inference mode (and autocast), -> logits."""

    def run() -> torch.Tensor:
        ctx = (
            torch.autocast(x.device.type, dtype=autocast_dtype)
            if autocast_dtype
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            out = model(x)
        return out if isinstance(out, torch.Tensor) else out.logits

    return run


def check_same_model(fns: dict[str, Callable[[], torch.Tensor]], atol: float = 1e-3) -> float:
    """Max |vitkit - timm| logits (fp32): proves the two contenders compute the same network."""
    if "timm" not in fns:
        return float("nan")
    diff = (fns["vitkit"]() - fns["timm"]()).abs().max().item()
    if diff > atol:
        raise AssertionError(f"vitkit and timm disagree by {diff:.2e} on the same weights")
    return diff


# ------------------------------------------------------------------------------ the run
def profile_table(
    fns: dict[str, Callable[[], torch.Tensor]],
    device: torch.device,
    *,
    iters: int = 5,
    top: int = 15,
) -> str:
    """Where each contender's time goes: torch.profiler's self time per operator (device time
    on CUDA, CPU time otherwise), in ms per call, the `top` operators by their largest time,
    then the total. Finds why two implementations of the same network differ."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_op: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        fn()
        common.synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(iters):
                fn()
            common.synchronize(device)
        for event in prof.key_averages():
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            if us > 0:
                per_op.setdefault(event.key, {})[name] = us / iters / 1e3
    names = list(fns)
    ranked = sorted(per_op, key=lambda op: -max(per_op[op].values()))
    rows = [[op[:60], *(f"{per_op[op].get(n, 0.0):.3f}" for n in names)] for op in ranked[:top]]
    totals = [sum(v.get(n, 0.0) for v in per_op.values()) for n in names]
    rows.append(["total", *(f"{t:.3f}" for t in totals)])
    kind = "device" if cuda else "CPU"
    return common.format_table([f"operator (self {kind} ms per call)", *names], rows)


def run_benchmark(
    *,
    models: list[str],
    batch_sizes: list[int],
    dtypes: list[str],
    repeats: int | None,
    warmup: int = 1,
    seconds_per_row: float = 60.0,
    image_size: int | None = None,
    device: str = "cpu",
    libraries: set[str] | None = None,
    compile_models: bool = False,
    bf16_weights: bool = False,
    sdpa_backends: tuple[str, ...] = (),
    peak_sizes: dict[str, int] | None = None,
    profile: bool = False,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Time every contender on every (model, dtype, batch); see the module docstring.

    `repeats=None` picks a repeat count per row from a warm-up round so that each row takes about
    `seconds_per_row` (at least 3, at most 25 repeats). `peak_sizes` (dtype -> n) adds an
    (n x n) matmul in that dtype to every row's rounds, so that the fraction of peak compares
    with the peak under the same machine load. `profile` logs each row's `profile_table` of
    vitkit against timm.
    """
    libraries = {"timm", "transformers"} if libraries is None else libraries
    dev = torch.device(device)
    rows = []
    for name in models:
        contenders = build_contenders(
            name,
            image_size=image_size,
            device=dev,
            libraries=libraries,
            compile_models=compile_models,
            bf16_weights=bf16_weights,
            sdpa_backends=sdpa_backends,
        )
        config = contenders["vitkit"].config
        gmacs = contenders["vitkit"].flops() / 1e9
        for dtype in dtypes:
            autocast = None if dtype == "fp32" else common.DTYPES[dtype]
            for batch in batch_sizes:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(batch, config.in_chans, *config.image_hw, generator=gen).to(dev)
                fns = {
                    k: forward_fn(m, x, autocast)
                    for k, m in contenders.items()
                    if not k.endswith(BF16_WEIGHTS)
                }
                if dtype == "bf16":
                    fns.update(
                        {
                            k: forward_fn(m, x.to(torch.bfloat16), None)
                            for k, m in contenders.items()
                            if k.endswith(BF16_WEIGHTS)
                        }
                    )
                peak_flops = 0.0
                if peak_sizes and dtype in peak_sizes:
                    fns[PEAK], peak_flops = common.matmul_case(
                        common.DTYPES[dtype], peak_sizes[dtype], dev
                    )
                if dtype == "fp32":
                    diff = check_same_model(fns)
                    log(f"{name} batch {batch}: max |vitkit - timm| logits = {diff:.1e}")
                for key in [k for k in fns if k.endswith("compiled")]:
                    start = time.perf_counter()
                    fns[key]()
                    log(
                        f"{name} {dtype} batch {batch}: {key} first call (compile) "
                        f"{time.perf_counter() - start:.1f} s"
                    )
                for key in [k for k in fns if "sdpa=" in k]:
                    try:
                        fns[key]()
                    except RuntimeError as exc:  # e.g. Flash attention has no fp32 kernel
                        log(f"{name} {dtype} batch {batch}: {key} skipped ({str(exc)[:80]})")
                        del fns[key]
                n = repeats
                if n is None:
                    round_s = sum(
                        common.time_calls(f, repeats=1, warmup=warmup, device=dev)[0]
                        for f in fns.values()
                    )
                    n = max(3, min(25, int(seconds_per_row / max(round_s, 1e-9))))
                    warm = 0
                else:
                    warm = warmup
                times = common.round_robin(fns, repeats=n, warmup=warm, device=dev)
                paired = {
                    f"{other}/vitkit": common.median(
                        [t / v for t, v in zip(times[other], times["vitkit"])]
                    )
                    for other in times
                    if other != "vitkit"
                }
                row = Row(
                    name,
                    batch,
                    dtype,
                    gmacs,
                    {k: common.median(v) for k, v in times.items()},
                    repeats=n,
                    peak_flops=peak_flops,
                    paired=paired,
                )
                rows.append(row)
                log(
                    f"{name} {dtype} batch {batch} ({n} repeats): "
                    + ", ".join(f"{k} {row.images_per_s(k):.2f}" for k in row.seconds if k != PEAK)
                    + " img/s"
                )
                if profile:
                    pair = {k: fns[k] for k in ("vitkit", "timm") if k in fns}
                    log(f"{name} {dtype} batch {batch}, profiled:\n{profile_table(pair, dev)}")
    return rows


def results_table(rows: list[Row]) -> str:
    """One line per (model, dtype, batch): img/s of each contender, ratios, fraction of peak."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.seconds if k not in keys and k != PEAK]
    headers = ["model", "dtype", "batch", *(f"{k} img/s" for k in keys)]
    if "timm" in keys:
        headers.append("vitkit/timm")
    hf = [k for k in keys if k.startswith("HF")]
    if hf:
        headers.append("vitkit/HF best")
    headers += ["peak GFLOP/s", "vitkit % peak", "repeats"]
    lines = []
    for row in rows:
        line: list[object] = [row.model.replace("_224", ""), row.dtype, row.batch]
        line += [f"{row.images_per_s(k):.2f}" if k in row.seconds else "-" for k in keys]
        if "timm" in keys:
            line.append(f"{row.speedup('vitkit', 'timm'):.3f}")
        if hf:
            line.append(f"{min(row.speedup('vitkit', k) for k in hf if k in row.seconds):.3f}")
        if PEAK in row.seconds:
            line.append(f"{row.peak_flops / row.seconds[PEAK] / 1e9:.0f}")
            line.append(f"{100 * row.fraction_of_peak('vitkit'):.0f}%")
        else:
            line += ["-", "-"]
        line.append(row.repeats)
        lines.append(line)
    return common.format_table(headers, lines)


# ------------------------------------------------------------------------------ deployment paths
def photo_batch(n: int, size: int, processor: vitkit.ImageProcessor) -> torch.Tensor:
    """`n` of scikit-image's bundled photos (repeated if needed) preprocessed: (n, 3, S, S)."""
    import numpy as np
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry",
             "hubble_deep_field", "grass", "retina", "page", "brick", "clock", "coins",
             "colorwheel", "logo", "text"]  # fmt: skip
    images = []
    for i in range(n):
        a = getattr(skimage.data, names[i % len(names)])()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        images.append(np.ascontiguousarray(a if i < len(names) else a[:, ::-1]))
    return processor(images)


def peer_paths(timm_model: nn.Module, x: torch.Tensor, log: Callable[[str], None]) -> dict:
    """The runtimes people deploy with, on timm's model: name -> no-argument call -> logits."""
    import tempfile

    from vitkit.infer import _graph

    fns: dict[str, Callable[[], torch.Tensor]] = {}
    threads = torch.get_num_threads()
    module = timm_model  # returns logits: no wrapper needed
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The sessions hold the graphs in memory, so the files go when the block ends (or fails).
        with tempfile.TemporaryDirectory(prefix="vitkit-bench-") as tmp:
            fp32, int8 = Path(tmp) / "timm.onnx", Path(tmp) / "int8.onnx"
            start = time.perf_counter()
            with _graph.quiet(), torch.no_grad():
                torch.onnx.export(module, (x[:1],), dynamo=True, opset_version=18,
                                  input_names=["x"],
                                  dynamic_shapes={"x": {0: torch.export.Dim("b", max=64)}}).save(
                    str(fp32))  # fmt: skip
                quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
            log(
                f"onnxruntime: torch.onnx export + quantize_dynamic {time.perf_counter() - start:.0f} s"
            )
            for name, file in (("ort fp32", fp32), ("ort int8", int8)):
                session = _graph.onnx_session(file, threads)
                fns[name] = functools.partial(
                    lambda s: torch.from_numpy(s.run(None, {"x": x.numpy()})[0]), session
                )
    except ImportError:
        log("onnxruntime not installed: its rows are skipped")
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401

        start = time.perf_counter()
        ov_model = _graph.to_openvino(module, x[:1])
        quantized = _graph.quantize_openvino(ov_model, x)
        log(f"OpenVINO: convert + NNCF quantize {time.perf_counter() - start:.0f} s")
        for name, m, precision in (("OV f32", ov_model, "fp32"), ("OV bf16", ov_model, "bf16"),
                                   ("OV int8 (NNCF)", quantized, "int8")):  # fmt: skip
            compiled = _graph.compile_openvino(m, precision, threads)
            fns[name] = functools.partial(
                lambda c: torch.from_numpy(c(x.numpy())[c.output(0)].copy()), compiled
            )
    except ImportError:
        log("openvino / nncf not installed: their rows are skipped")
    return fns


VITKIT_PATHS = [("fp32", "torch"), ("bf16", "torch"), ("bf16", "openvino"), ("int8", "torch"),
                ("int8", "onnxruntime"), ("int8", "openvino")]  # fmt: skip


def digits_agreement(log: Callable[[str], None], epochs: int = 15) -> str:
    """Accuracy cost of each vitkit path on a trained model: a digits ViT fitted for `epochs`
    on the built-in digits (80/20 split, seed 0), its 360 test images, against fp32."""
    from vitkit.data.builtin import load_digits
    from vitkit.infer import prepare
    from vitkit.infer.precision import machine

    train, test = load_digits()
    torch.manual_seed(0)
    model = vitkit.create_model("vit_digits_patch2_8")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    x_train, x_test = (train.images - 0.5) / 0.5, (test.images - 0.5) / 0.5
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(64):
            loss = nn.functional.cross_entropy(model(x_train[idx]).logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        ref = model(x_test).logits
    accuracy = (ref.argmax(-1) == test.labels).float().mean().item()
    log(
        f"digits ViT: {epochs} epochs in {time.perf_counter() - start:.0f} s, fp32 test {accuracy:.2%}"
    )
    info = machine()
    lines = []
    for precision, backend in VITKIT_PATHS:
        if backend in ("onnxruntime", "openvino") and not info[backend]:
            continue
        runner = prepare(model, precision, backend=backend, calibration=x_train[:64], log=log)
        out = runner(x_test)
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        acc = (out.argmax(-1) == test.labels).float().mean().item()
        lines.append([f"vitkit {precision} {backend}", f"{agree:.2%}",
                      f"{(out - ref).abs().max().item():.4f}", f"{acc:.2%}"])  # fmt: skip
    headers = ["path", "top-1 = fp32 (360 test images)", "max |logit diff|", "test accuracy"]
    return common.format_table(headers, lines)


def run_paths(args: argparse.Namespace, log: Callable[[str], None] = print) -> str:
    """One alternating run of every vitkit precision path against timm, transformers,
    onnxruntime and OpenVINO on ViT-B/16 (or --models), real photos as input."""
    from vitkit.infer import prepare
    from vitkit.infer.precision import choose, describe_machine, machine

    log(describe_machine())
    name = args.models.split(",")[0]
    batch = int(args.batch_sizes.split(",")[0])
    models = build_contenders(name, image_size=args.image_size, device=torch.device("cpu"),
                              libraries={"timm", "transformers"}, compile_models=False,
                              bf16_weights=True)  # fmt: skip
    ours = models["vitkit"]
    config = ours.config
    x = photo_batch(batch, config.image_size, vitkit.ImageProcessor.hf_vit(config.image_hw))
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "timm fp32": forward_fn(models["timm"], x, None),
        "timm bf16 weights": forward_fn(models["timm" + BF16_WEIGHTS], x.bfloat16(), None),
        "transformers fp32": forward_fn(models["HF sdpa"], x, None),
    }
    fns.update(peer_paths(models["timm"], x, log))
    info = machine()
    notes = {}
    for precision, backend in VITKIT_PATHS:
        if backend in ("onnxruntime", "openvino") and not info[backend]:
            continue
        start = time.perf_counter()
        runner = prepare(ours, precision, backend=backend, calibration=x, log=log)
        key = f"vitkit {precision}" + (f" {backend}" if backend else "")
        fns[key] = functools.partial(runner, x)
        notes[key] = runner.note
        log(f"{key}: {runner.describe()} (set up in {time.perf_counter() - start:.0f} s)")
    auto = choose("cpu")[0]
    log(f"auto on this machine: {auto[0]} on {auto[1]} ({auto[2]}), the row 'vitkit {auto[0]} "
        f"{auto[1]}' when its top-1 matches fp32 on the first batch")  # fmt: skip
    # the bf16 matmul limit at the MLP's shape: (batch * tokens, D) @ (D, 4D)
    tokens = batch * (config.grid_size[0] * config.grid_size[1] + 1)
    a = torch.randn(tokens, config.embed_dim).bfloat16()
    w = torch.randn(config.mlp_hidden_dim, config.embed_dim).bfloat16()
    fns["bf16 matmul limit"] = lambda: torch.nn.functional.linear(a, w)
    mlp_flops = 2.0 * tokens * config.embed_dim * config.mlp_hidden_dim
    model_flops = 2.0 * ours.flops() * batch

    with torch.inference_mode():
        reference = fns["timm fp32"]().float()
        outputs = {k: fn().float() for k, fn in fns.items() if k != "bf16 matmul limit"}
    times = common.round_robin(fns, repeats=args.repeats or 5, warmup=0)
    base = times["timm fp32"]
    lines = []
    for key, t in times.items():
        ratio = common.median([b / s for b, s in zip(base, t)])
        if key == "bf16 matmul limit":
            seconds = common.median(t) * model_flops / mlp_flops  # a whole model at that rate
            ratio = common.median(base) / seconds
            lines.append([key, f"{batch / seconds:.2f}", f"{ratio:.2f}", "", "", ""])
            continue
        out = outputs[key]
        agree = f"{(out.argmax(-1) == reference.argmax(-1)).float().mean().item():.0%}"
        diff = f"{(out - reference).abs().max().item():.3f}"
        if key.startswith("transformers"):
            agree = diff = "(own weights)"
        lines.append([key, f"{batch / common.median(t):.2f}", f"{ratio:.2f}", agree, diff,
                      notes.get(key, "")])  # fmt: skip
    headers = ["path", "img/s", "x timm fp32", "top-1 = fp32", "max |logit diff|", "what runs"]
    return common.format_table(headers, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated vitkit presets")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated from fp32,bf16,fp16 (bf16/fp16 = autocast); default fp32,bf16, "
        "where bf16 is skipped if this machine's bf16 matmul is slower than fp32",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per row (default: about --seconds-per-row each, 3..25)",
    )
    p.add_argument("--seconds-per-row", type=float, default=45.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--image-size", type=int, default=None, help="override the preset's size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--libraries",
        default="timm,transformers",
        help="peers to compare with (comma-separated, may be empty)",
    )
    p.add_argument("--compile", action="store_true", help="add torch.compile'd vitkit and timm")
    p.add_argument(
        "--sdpa-backends",
        default="",
        help="comma-separated from flash,efficient,cudnn,math: add vitkit with attention pinned "
        "to each (CUDA; math also runs on the CPU)",
    )
    p.add_argument(
        "--bf16-weights",
        action="store_true",
        help="in bf16 rows, also time vitkit and timm converted to bf16 (no autocast)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each row, torch.profiler's time per operator for vitkit and timm",
    )
    p.add_argument(
        "--paths",
        action="store_true",
        help="time every vitkit precision path against timm fp32/bf16, transformers, "
        "onnxruntime fp32/int8 and OpenVINO f32/bf16/int8 (first model and batch size only)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="ViT-S/16, batch 1, fp32, 3 repeats: a one-minute sanity run",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.batch_sizes, args.repeats = (
            "vit_small_patch16_224",
            "1",
            args.repeats or 3,
        )
        args.dtypes = args.dtypes or "fp32"
    info = common.machine_info(args.device)
    print(common.machine_line(info), flush=True)
    if args.paths:
        log = lambda s: print(s, flush=True)  # noqa: E731
        print(run_paths(args, log=log), flush=True)
        print(digits_agreement(log), flush=True)
        return 0
    dtypes = (args.dtypes or "fp32,bf16").split(",")
    sizes = {d: common.matmul_size(common.DTYPES[d], device=args.device) for d in dtypes}
    peaks = {
        d: common.matmul_peak(common.DTYPES[d], n=n, device=args.device) for d, n in sizes.items()
    }
    print(
        "matmul peak (before the run): "
        + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s (n={sizes[d]})" for d, p in peaks.items())
    )
    if args.dtypes is None and "bf16" in peaks and peaks["bf16"] < peaks["fp32"]:
        print(
            "bf16 rows skipped: bf16 matmuls are slower than fp32 on this machine "
            "(no AVX-512-BF16/AMX); pass --dtypes bf16 to time them anyway"
        )
        dtypes.remove("bf16")
    rows = run_benchmark(
        models=args.models.split(","),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        dtypes=dtypes,
        repeats=args.repeats,
        warmup=args.warmup,
        seconds_per_row=args.seconds_per_row,
        image_size=args.image_size,
        device=args.device,
        libraries={lib for lib in args.libraries.split(",") if lib},
        compile_models=args.compile,
        bf16_weights=args.bf16_weights,
        sdpa_backends=tuple(b for b in args.sdpa_backends.split(",") if b),
        peak_sizes=sizes,
        profile=args.profile,
        log=lambda s: print(s, flush=True),
    )
    print()
    print(results_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
