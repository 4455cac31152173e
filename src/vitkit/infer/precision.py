"""Precision paths: run a loaded `VisionTransformer` in fp32, bf16, fp16 or int8, on the
runtime that is fastest for that precision on this machine.

    runner = prepare(model, "int8")        # -> Runner; runner(pixels) -> (B, K) float32 logits
    print(runner.describe())               # "int8 on openvino (NNCF static, ...)"

| precision | backend (default first)         | what runs                                          |
|-----------|---------------------------------|----------------------------------------------------|
| fp32      | torch                           | the model as it is (exact)                         |
|           | onnxruntime, openvino           | the torch.onnx / OpenVINO conversion, fp32         |
| bf16      | openvino (CPU), torch           | OpenVINO's bf16 inference hint; torch: bf16 weights|
| fp16      | torch                           | fp16 weights (meant for CUDA)                      |
| int8      | openvino, onnxruntime, torch    | NNCF static quantization (transformer preset);     |
|           |                                 | onnxruntime / torch.ao dynamic int8 Linear layers  |

Static int8 needs calibration images: pass `calibration=` (a (B, C, H, W) batch, 16-64 real
images) or the first batch the runner sees is used. `auto` picks by the CPU's flags and
installed runtimes (see `choose`), checks the pick's top-1 against fp32 on that first batch, and
falls back to the next candidate when they disagree.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import quantize_dynamic

from vitkit._names import BACKENDS, PRECISIONS
from vitkit.checkpoints._local import local_files
from vitkit.checkpoints.resolve import Resolved, resolve
from vitkit.config import ViTConfig
from vitkit.errors import ConfigError, VitkitError
from vitkit.infer import _graph, warm
from vitkit.infer.cache import (
    Cache,
    Key,
    alias_key,
    cpu_capability,
    fingerprint,
    path_key,
    tensor_id,
)
from vitkit.models.vit import logits_of

AUTO_MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 `auto` demands on the calibration batch
# (for embeddings, `vitkit.features.Embedder`: the mean cosine similarity of the rows)

Fn = Callable[[Tensor], Tensor]


def is_plain(precision: str, backend: str | None) -> bool:
    """Whether (precision, backend) is the model as it is (fp32 on torch): no runner needed."""
    return precision == "fp32" and backend in (None, "torch")


# ------------------------------------------------------------------------------ the machine
def machine() -> dict[str, Any]:
    """What the precision choice depends on: ISA level, bf16/int8 instructions, CUDA, runtimes."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **warm.cpu_machine(),
            "cuda": torch.cuda.is_available()}  # fmt: skip


def native_bf16(info: dict[str, Any] | None = None) -> bool:
    return warm.native_bf16(info or machine())


def choose(device: torch.device | str = "cpu", info: dict[str, Any] | None = None) -> list[
    tuple[str, str, str]
]:  # fmt: skip
    """`auto`'s candidates, fastest first: [(precision, backend, why)]; fp32 torch is last.

    Measured on ViT-B/16 (benchmarks/RESULTS.md): on a CPU, static int8 in OpenVINO is the
    fastest path on every ISA (VNNI / AMX make it more so), then onnxruntime's dynamic int8;
    bf16 pays only with native bf16 instructions (AVX-512 BF16, AMX), where it is about 2x fp32
    and is emulated (slower than fp32) elsewhere. On CUDA, bf16 (fp16 before Ampere).
    """
    info = info or machine()
    device = torch.device(device)
    if device.type == "cuda":
        half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return [(half, "torch", f"CUDA: {half} weights"), ("fp32", "torch", "fallback")]
    return warm.cpu_candidates(info)


def default_backend(precision: str, device: torch.device | str = "cpu") -> str:
    """The backend `prepare` uses for `precision` when none is named: `auto`'s first candidate
    at that precision (`choose`), else torch."""
    return next((b for p, b, _ in choose(device) if p == precision), "torch")


# ------------------------------------------------------------------------------ the runner
@dataclass
class Runner:
    """A model at one precision on one backend: `runner(pixels)` -> (B, K) float32 logits
    (pooled features for a model without a head), on `device`.

    Built lazily when calibration is needed and was not given: the first call's batch
    calibrates (and, for `auto`, checks) the path.
    """

    model: nn.Module
    precision: str
    backend: str
    device: torch.device
    note: str = ""
    candidates: list[tuple[str, str, str]] = field(default_factory=list)
    log: Callable[[str], None] | None = None
    processor: Any = None  # the checkpoint's ImageProcessor, when built by `load`
    cache: Cache | None = None  # where prepared paths are kept (`vitkit.infer.cache`)
    calibration_given: bool = False  # the images came from `prepare`, not the first batch
    _fn: Fn | None = None
    _agreement: float | None = None
    _fingerprint: str | None = None

    training = False  # a Runner only infers: it stands in for a model in eval mode

    @property
    def config(self) -> Any:
        return self.model.config

    def eval(self) -> Runner:
        return self

    def train(self, mode: bool = True) -> Runner:
        return self

    def __call__(self, pixels: Tensor) -> Tensor:
        self.calibrate(pixels)
        with torch.inference_mode():
            return self._fn(pixels)  # type: ignore[misc]

    @property
    def ready(self) -> bool:
        return self._fn is not None

    def calibrate(self, pixels: Tensor) -> None:
        """Build the path now, calibrating (and for `auto` checking) on `pixels`."""
        if self._fn is None:
            self._build(pixels)

    def describe(self) -> str:
        text = f"{self.precision} on {self.backend}"
        if self.note:
            text += f" ({self.note})"
        if self._agreement is not None:
            text += f"; {self._measure} with fp32 on the calibration batch {self._agreement:.1%}"
        return text

    @property
    def _embeddings(self) -> bool:
        return getattr(self.model, "produces", "logits") == "embeddings"

    @property
    def _measure(self) -> str:
        return "mean cosine similarity" if self._embeddings else "top-1 agreement"

    def _agreement_with(self, out: Tensor, reference: Tensor) -> float:
        if self._embeddings:
            return torch.nn.functional.cosine_similarity(out, reference, dim=-1).mean().item()
        return (out.argmax(-1) == reference.argmax(-1)).float().mean().item()

    def _build(self, calibration: Tensor | None) -> None:
        """Build the path, or for `auto` the first candidate that keeps fp32's answers on
        `calibration`; torch paths wrap the model, the others convert a copy of it (or read
        it from the cache, as `auto`'s pick)."""
        auto = bool(self.candidates)
        candidates = self.candidates or [(self.precision, self.backend, "")]
        example, reference = calibration, None
        if example is None:  # the other paths convert from the input's shape alone
            example = torch.zeros(1, self.config.in_chans, *self.config.image_hw)
        picked = self._cached_pick(example, calibration) if auto else None
        if picked is not None:
            candidates = [picked]
        fp32 = _torch_fn(self._real_model(), "fp32", self.device) if len(candidates) > 1 else None
        for i, (precision, backend, why) in enumerate(candidates):
            last = i == len(candidates) - 1
            try:
                if backend == "torch":
                    fn = _torch_fn(self._real_model(), precision, self.device)
                    note = _TORCH_NOTES[precision]
                elif precision == "int8" and calibration is None:
                    raise VitkitError(f"static int8 on {backend} needs calibration images")
                else:
                    make = _onnxruntime_fn if backend == "onnxruntime" else _openvino_fn
                    key = self._key(precision, backend, example, calibration)
                    fn, note = make(self._logits_module, precision, example.detach().float().cpu(),
                                    self.device, self._store(key))  # fmt: skip
            except Exception as exc:  # a runtime that cannot take this model: `auto` moves on
                if not auto or last:
                    raise
                self._say(f"auto: {precision} on {backend} failed ({exc}); trying the next path")
                continue
            if fp32 is not None and precision != "fp32" and not last:
                with torch.inference_mode():
                    if reference is None:
                        reference = fp32(calibration)  # type: ignore[arg-type]
                    agree = self._agreement_with(fn(calibration), reference)  # type: ignore[arg-type]
                if agree < AUTO_MIN_AGREEMENT:
                    self._say(
                        f"auto: {precision} on {backend} keeps only {agree:.1%} {self._measure} "
                        "with fp32 on the calibration batch; trying the next path"
                    )
                    continue
                self._agreement = agree
            self.precision, self.backend, self._fn = precision, backend, fn
            self.note = f"auto: {why}; {note}" if auto else note
            if auto and picked is None:
                self._keep_pick(example, calibration, (precision, backend, why))
            if auto:
                self._say(f"auto picked {self.describe()}")
            return

    def _logits_module(self) -> nn.Module:
        """A float32 CPU copy of the model that returns logits, to convert (only when the
        cache does not hold the path already: a copy of ViT-B is 350 MB)."""
        return _graph.LogitsModule(copy.deepcopy(self._real_model()).float().cpu()).eval()

    def _real_model(self) -> nn.Module:
        """The model with its weights: a `Deferred` one reads them now (a path it needs is
        not in the cache after all, or runs on torch)."""
        if isinstance(self.model, Deferred):
            self.model = self.model.load().eval()
            self._fingerprint = None  # keyed by what was loaded, should the files have changed
        return self.model

    # ---- the cache of prepared paths (vitkit.infer.cache) ------------------------------------
    def _key(self, precision: str, backend: str, example: Tensor, calibration: Any) -> Key:
        if self._fingerprint is None:
            known = self.model.fingerprint if isinstance(self.model, Deferred) else None
            self._fingerprint = known or fingerprint(self.model)
        given = self.calibration_given and calibration is not None
        return path_key(self._fingerprint, precision, backend, tuple(example.shape[1:]),
                        tensor_id(calibration) if given else None)  # fmt: skip

    def _store(self, key: Key) -> Any:
        return (self.cache, key, self._say) if self.cache is not None else None

    def _cached_pick(self, example: Tensor, calibration: Any) -> tuple[str, str, str] | None:
        """`auto`'s pick in an earlier run on this model, machine and calibration, if any."""
        if self.cache is None:
            return None
        folder = self.cache.get(self._key("auto", "auto", example, calibration))
        if folder is None:
            return None
        pick = self.cache.meta(folder).get("pick")
        known = {(p, b) for p, b, _ in self.candidates}
        if not (isinstance(pick, list) and len(pick) == 3 and tuple(pick[:2]) in known):
            return None
        self._say(f"auto: {pick[0]} on {pick[1]}, as picked before ({folder})")
        return (str(pick[0]), str(pick[1]), str(pick[2]))

    def _keep_pick(self, example: Tensor, calibration: Any, pick: tuple[str, str, str]) -> None:
        if self.cache is not None:
            key = self._key("auto", "auto", example, calibration)
            with self.cache.put(key, "auto's pick", {"pick": list(pick)}):
                pass

    def _say(self, text: str) -> None:
        (self.log or (lambda s: print(f"vitkit: {s}", file=sys.stderr)))(text)


def prepare(
    model: nn.Module,
    precision: str = "fp32",
    *,
    backend: str | None = None,
    device: torch.device | str | None = None,
    calibration: Tensor | None = None,
    log: Callable[[str], None] | None = None,
    cache: bool | Cache = True,
) -> Runner:
    """Make a `Runner` for `model` (a VisionTransformer in eval mode) at `precision`.

    precision: fp32 | bf16 | fp16 | int8 | auto (see the module docstring).
    backend: torch | onnxruntime | openvino, or None for the fastest one installed.
    device: where inputs and outputs live; non-torch backends and int8 run on the CPU.
    calibration: (B, C, H, W) preprocessed real images for static int8 and `auto`'s check; when
        None, the first batch the runner is called with is used.
    log: where `auto` reports its pick and a cold path its costly steps (default: stderr).
    cache: keep converted and quantized paths (and `auto`'s pick) on disk and reuse them in
        later processes (`vitkit.infer.cache`; a `Cache` for another folder); False builds
        everything anew.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else _model_device(model)
    model = model.eval()
    if precision == "auto":
        candidates = choose(device)
        if backend is not None:
            candidates = [c for c in candidates if c[1] == backend]
        candidates = candidates or [("fp32", "torch", "fallback: exact")]
        runner = Runner(model, "auto", "auto", device, candidates=candidates, log=log)
    else:
        backend = backend or default_backend(precision, device)
        _check_supported(precision, backend, device)
        runner = Runner(model, precision, backend, device, log=log)
    if cache is not False:
        runner.cache = cache if isinstance(cache, Cache) else Cache(say=runner._say)
    runner.calibration_given = calibration is not None
    if calibration is not None or not _needs_calibration(runner):
        runner._build(calibration)
    return runner


def load(
    source: str | os.PathLike[str],
    precision: str = "fp32",
    *,
    backend: str | None = None,
    device: torch.device | str | None = None,
    calibration: Tensor | None = None,
    log: Callable[[str], None] | None = None,
    **resolve_kwargs: Any,
) -> Runner:
    """`prepare(resolve(source).model, precision, ...)`, with `runner.processor` set to the
    checkpoint's preprocessing: what `vitkit.from_pretrained(src, precision=...)` can return.

        runner = load("google/vit-base-patch16-224", "auto")
        probs = runner(runner.processor(["cat.jpg"])).softmax(-1)
    """
    resolved = resolve_for(source, precision, backend=backend, log=log, device=device,
                           **resolve_kwargs)  # fmt: skip
    runner = prepare(resolved.model, precision, backend=backend, device=device,
                     calibration=calibration, log=log)  # fmt: skip
    runner.processor = resolved.processor
    return runner


class Deferred(nn.Module):
    """A model whose prepared path is in the cache: its config and content fingerprint without
    its weights, which `load()` reads only if a path needs them after all (the entry was
    evicted, or `auto` checks against fp32). For ViT-B that is 350 MB and a second not spent."""

    def __init__(self, config: Any, fingerprint: str, load: Callable[[], nn.Module]):
        super().__init__()
        self.config = config
        self.fingerprint = fingerprint
        self.load = load

    def forward(self, pixels: Tensor) -> Tensor:
        raise RuntimeError("a Deferred model runs through its Runner (`prepare`)")


def resolve_for(
    source: str | os.PathLike[str],
    precision: str,
    *,
    backend: str | None = None,
    cache: bool | Cache = True,
    log: Callable[[str], None] | None = None,
    **resolve_kwargs: Any,
) -> Resolved:
    """`resolve(source, **resolve_kwargs)` for a model about to run at `precision`: when that
    path is prepared in the cache for this very checkpoint (keyed by its files' bytes, read
    but not loaded), the model is a `Deferred` one and its weights are never loaded. Anything
    else (fp32, a torch path, a hub id or preset, both towers, no cache) resolves as usual."""
    device = resolve_kwargs.get("device")
    runs_on = backend or default_backend(precision, device or "cpu")
    cached_path = precision == "auto" or runs_on != "torch"
    files = local_files(source) if cached_path and cache is not False else None
    if files is None or resolve_kwargs.get("text"):
        return resolve(source, **resolve_kwargs)
    say = log or (lambda s: print(f"vitkit: {s}", file=sys.stderr))
    store = cache if isinstance(cache, Cache) else Cache(say=say)
    key = alias_key(files, resolve_kwargs)
    found = warm.described(store, key, say, source)
    if found is not None:
        config, processor, fp, _ = found
        model = Deferred(config, fp, lambda: resolve(source, **resolve_kwargs).model)
        return Resolved(model, processor, os.fspath(source), folder=files[0].parent)
    resolved = resolve(source, **resolve_kwargs)
    if isinstance(resolved.model.config, ViTConfig):
        pixels = resolved.processor.matches_without_torch()
        described = {"fingerprint": fingerprint(resolved.model),
                     "config": resolved.model.config.to_dict(),
                     "processor": resolved.processor.to_fields(),
                     "pixels": cpu_capability() if pixels else None}  # fmt: skip
        with store.put(key, "a checkpoint's config and preprocessing", described):
            pass
    return resolved


def _needs_calibration(runner: Runner) -> bool:
    return warm.needs_calibration(runner.candidates or [(runner.precision, runner.backend, "")])


def _check_supported(precision: str, backend: str, device: torch.device) -> None:
    if device.type != "cpu" and backend != "torch":
        raise ConfigError(f"backend={backend!r} runs on the CPU; use device='cpu' or torch")
    if device.type != "cpu" and precision == "int8":
        raise ConfigError("int8 runs on the CPU only; use bf16 or fp16 on a GPU")
    if backend == "openvino" and precision == "fp16":
        raise ConfigError("fp16 on openvino is not offered; use bf16 or int8")
    if backend == "onnxruntime" and precision in ("bf16", "fp16"):
        raise ConfigError(
            f"{precision} on onnxruntime's CPU provider is not faster than fp32; use "
            "backend='openvino' or 'torch'"
        )
    if backend in ("openvino", "onnxruntime"):
        extra = "openvino" if backend == "openvino" else "export"
        module = "nncf" if backend == "openvino" and precision == "int8" else backend
        _graph.check_installed(module, extra)
        if backend == "onnxruntime":
            _graph.check_installed("onnxscript", extra)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ------------------------------------------------------------------------------ the paths
_TORCH_NOTES = {
    "fp32": "PyTorch, exact",
    "bf16": "PyTorch, bf16 weights",
    "fp16": "PyTorch, fp16 weights",
    "int8": "PyTorch torch.ao dynamic int8 Linear layers",
}


def _torch_fn(model: nn.Module, precision: str, device: torch.device) -> Fn:
    if precision == "fp32":
        net = model.to(device)
        dtype = torch.float32
    elif precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        net = copy.deepcopy(model).to(device=device, dtype=dtype)
    else:  # int8: dynamic quantization of every Linear, CPU only
        with _graph.quiet():
            net = quantize_dynamic(copy.deepcopy(model).cpu().float(), {nn.Linear}, torch.qint8)
        dtype = torch.float32
    net.eval()

    def fn(pixels: Tensor) -> Tensor:
        return logits_of(net(pixels.to(device=device, dtype=dtype))).float()

    fn.module = net  # type: ignore[attr-defined]
    return fn


def _onnxruntime_fn(
    make_module: Callable[[], nn.Module],
    precision: str,
    example: Tensor,
    device: torch.device,
    store: Any = None,
) -> tuple[Fn, str]:
    name = _graph.input_name(False, False)
    cache, key, say = store or (None, None, _quiet)
    folder = cache.get(key) if cache is not None else None
    if folder is not None:
        data = (folder / "model.onnx").read_bytes()
        say(f"{precision} on onnxruntime from the cache ({folder})")
    else:
        with tempfile.TemporaryDirectory(prefix="vitkit-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            module = make_module()
            with _step(say, "converting to ONNX"):
                dyn = _graph.dynamic_shapes(module, example, patch=module.model.config.patch_size,
                                            preprocessing=False, channels_last=False)  # fmt: skip
                _graph.to_onnx(module, example[:1], path, dynamic=dyn, input_name=name,
                               output_names=["logits"])  # fmt: skip
            if precision == "int8":
                quantized = Path(tmp) / "model.int8.onnx"
                with _step(say, "quantizing to dynamic int8 (onnxruntime)"):
                    _graph.quantize_onnx(path, quantized)
                path = quantized
            data = path.read_bytes()
        if cache is not None:
            with cache.put(key, f"{precision} on onnxruntime") as entry:
                (entry / "model.onnx").write_bytes(data)
            say(f"cached in {cache.prepared / key.digest}")
    session = _graph.onnx_session(data)

    def fn(pixels: Tensor) -> Tensor:
        x = pixels.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(session.run(None, {name: x})[0]).to(device)

    fn.session = session  # type: ignore[attr-defined]
    note = "dynamic int8 (quantize_dynamic)" if precision == "int8" else "fp32"
    return fn, f"onnxruntime {note}, {session.get_session_options().intra_op_num_threads} threads"


def _openvino_fn(
    make_module: Callable[[], nn.Module],
    precision: str,
    example: Tensor,
    device: torch.device,
    store: Any = None,
) -> tuple[Fn, str]:
    """OpenVINO at `precision`, compiled once per input size (`warm.per_size`;
    benchmarks/openvino_ab.py: 0.99x of OpenVINO int8 on timm's graph with one size-free
    compile, 1.00-1.02x per size). The converted (and quantized) model is what `store` keeps
    (`vitkit.infer.cache`)."""
    cache, key, say = store or (None, None, _quiet)
    folder = cache.get(key) if cache is not None else None
    note = warm.openvino_note(precision, len(example), cached=folder is not None)
    if folder is not None:
        ov = _graph.need("openvino", "openvino")
        ov_model = ov.Core().read_model(str(folder / "model.xml"))
        say(f"{precision} on OpenVINO from the cache ({folder})")
    else:
        with _step(say, "converting to OpenVINO"):
            ov_model = _graph.to_openvino(make_module(), example[:1])
        if precision == "int8":
            n = len(example)
            with _step(say, f"calibrating NNCF static int8 on {n} image{'s' * (n != 1)}"):
                ov_model = _graph.quantize_openvino(ov_model, example)
        if cache is not None:
            ov = _graph.need("openvino", "openvino")
            with cache.put(key, f"{precision} on OpenVINO") as entry:
                ov.save_model(ov_model, str(entry / "model.xml"), compress_to_fp16=False)
            folder = cache.prepared / key.digest
            say(f"cached in {folder}")
    blobs = folder / "compiled" if folder is not None else None  # OpenVINO's compiled models
    compiled_for = warm.per_size(ov_model, precision, torch.get_num_threads(), blobs)
    with _step(say, "compiling for this CPU", quiet_below=2.0):
        compiled = compiled_for(tuple(example.shape[1:]))

    def fn(pixels: Tensor) -> Tensor:
        x = pixels.detach().float().cpu().contiguous().numpy()
        net = compiled_for(x.shape[1:])
        return torch.from_numpy(net(x)[net.output(0)].copy()).to(device)

    fn.compiled = compiled  # type: ignore[attr-defined]
    threads = compiled.get_property("INFERENCE_NUM_THREADS")
    return fn, f"OpenVINO {note}, {threads} threads".replace("  ", " ")


def _quiet(text: str) -> None:
    pass


@contextlib.contextmanager
def _step(say: Callable[[str], None], what: str, quiet_below: float = 0.0) -> Any:
    """Time a costly step of a cold path and say it in one line (`what: 12.3 s`)."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if seconds >= quiet_below:
        say(f"{what}: {seconds:.1f} s")


def describe_machine() -> str:
    """One line: the flags `auto` looks at."""
    info = machine()
    flags = [k for k in ("avx2", "avx512", "avx512_bf16", "vnni", "amx", "cuda") if info[k]]
    runtimes = [k for k in ("onnxruntime", "openvino") if info[k]]
    return (
        f"cpu capability {info['cpu_capability']}, flags: {' '.join(flags) or 'none'}; "
        f"runtimes: {' '.join(runtimes) or 'torch only'}; {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
