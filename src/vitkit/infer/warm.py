"""A warm `vitkit predict` that never imports torch.

When a local checkpoint's OpenVINO path (int8, bf16, or `auto`'s cached pick) is prepared in
the cache (`vitkit.infer.cache`), nothing of torch is needed to answer: the checkpoint's
config and preprocessing are in its alias entry, the quantized or converted model and its
compiled blob in the prepared entry. `start` finds them with the same keys and checks as
`vitkit.infer.precision`, preprocesses with PIL and numpy to the very pixels the predictor
makes (`ImageProcessor.to_array`), runs the compiled model and yields what the predictor
yields. Anything it cannot answer exactly (a miss, a hub id, a torch path, a GPU, an
unusual processor) returns None before printing anything, and the command takes the full
path. `import torch` alone is about half of a warm int8 call's wall time.

The torch-free pieces both paths share also live here: `auto`'s CPU candidates, the alias
entry's reading, OpenVINO's compile settings and the probabilities of the logits.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vitkit.checkpoints._local import local_files
from vitkit.config import ViTConfig
from vitkit.data.images import reason_of
from vitkit.data.labels import id2label_for
from vitkit.data.processor import ImageProcessor
from vitkit.errors import ImageError, VitkitError
from vitkit.infer.cache import Cache, Key, alias_key, cpu_capability, cpu_flags, path_key

Say = Callable[[str], None]

# a GPU torch might use: then `--device auto` is not surely the CPU, and the full path decides
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


# ------------------------------------------------------------------------ shared with torch's path
def cpu_machine() -> dict[str, bool]:
    """The CPU's instruction sets and the runtimes installed (`precision.machine` without
    torch's own view of the machine)."""
    flags = cpu_flags()
    return {
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "amx": bool({"amx_bf16", "amx_int8"} & flags),
        "openvino": _installed("openvino") and _installed("nncf"),
        "onnxruntime": _installed("onnxruntime") and _installed("onnxscript"),
    }


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def native_bf16(info: dict[str, Any]) -> bool:
    return bool(info["avx512_bf16"] or info["amx"])


def needs_calibration(picks: list[tuple[str, str, str]]) -> bool:
    """Static int8 needs real images, and `auto` checks its pick on them (among several); the
    other paths convert from the model's input shape alone."""
    return len(picks) > 1 or any(p == "int8" and b != "torch" for p, b, _ in picks)


def cpu_candidates(info: dict[str, Any]) -> list[tuple[str, str, str]]:
    """`auto`'s candidates on a CPU, fastest first (`precision.choose` says why)."""
    isa = "AMX" if info["amx"] else "AVX-512" if info["avx512"] else "AVX2" if info["avx2"] else ""
    vnni = " with VNNI" if info["vnni"] else ""
    out = []
    if info["openvino"]:
        out.append(("int8", "openvino", f"{isa}{vnni}: OpenVINO static int8 is fastest"))
    if native_bf16(info):
        bf16_backend = "openvino" if info["openvino"] else "torch"
        out.append(("bf16", bf16_backend, f"{isa} has native bf16"))
    if info["onnxruntime"]:
        out.append(("int8", "onnxruntime", f"{isa}{vnni}: onnxruntime dynamic int8"))
    out.append(("fp32", "torch", "fallback: exact"))
    return out


def described(cache: Cache, key: Key, say: Say, source: Any) -> tuple | None:
    """(config, processor, fingerprint, pixels) kept by the alias entry `key`, or None (no
    entry, or one that does not parse: said, and the checkpoint is loaded instead). `pixels`:
    whether `ImageProcessor.matches_without_torch` held on a CPU like this one."""
    folder = cache.get(key)
    if folder is None:
        return None
    try:
        meta = cache.meta(folder)
        here = cpu_capability()
        return (ViTConfig.from_dict(meta["config"]), ImageProcessor.from_fields(meta["processor"]),
                str(meta["fingerprint"]), here is not None and meta.get("pixels") == here)  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError, VitkitError) as exc:
        say(f"cache entry {folder} is unusable ({exc}); loading {os.fspath(source)}")
        return None


def compile_openvino(ov_model: Any, precision: str, threads: int, blobs: Path | None) -> Any:
    """Compile a prepared OpenVINO path for this CPU; with `blobs`, OpenVINO keeps the compiled
    model there (named by the model and these settings) and a later process imports it."""
    import openvino as ov  # lazy: an optional runtime

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                              "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    if blobs is not None:
        config["CACHE_DIR"] = str(blobs)
    if precision in ("fp32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
    return ov.Core().compile_model(ov_model, "CPU", config)


def per_size(ov_model: Any, precision: str, threads: int,
             blobs: Path | None) -> Callable[[tuple[int, ...]], Any]:  # fmt: skip
    """`ov_model` compiled (`compile_openvino`) once per input size (C, H, W), the batch left
    dynamic: a graph with a fixed height and width folds the position-table resampling away,
    while the model itself stays size-free, so any size still runs."""
    compiled: dict[tuple[int, ...], Any] = {}

    def for_size(size: tuple[int, ...]) -> Any:
        if size not in compiled:
            sized = ov_model.clone()
            sized.reshape([-1, *size])
            compiled[size] = compile_openvino(sized, precision, threads, blobs)
        return compiled[size]

    return for_size


def openvino_note(precision: str, images: int, cached: bool) -> str:
    note = {"fp32": "f32", "bf16": "bf16 inference hint"}.get(precision, "")
    if precision == "int8":
        note = f"NNCF static int8, transformer preset, calibrated on {images} images"
    return f"{note}, from the cache" if cached else note


def probabilities(logits: np.ndarray) -> np.ndarray:
    """(B, K) logits -> softmax probabilities, float32 (computed in float64: what `vitkit
    predict` prints on every path)."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def default_threads() -> int | None:
    """torch's default intra-op thread count, which the prepared path was compiled with
    (physical cores, as torch counts them), or None where an environment variable sets it."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    root = Path("/sys/devices/system/cpu")
    cores, processors = set(), 0
    for cpu in root.glob("cpu[0-9]*"):
        try:
            core = (cpu / "topology" / "core_id").read_text().strip()
            package = (cpu / "topology" / "physical_package_id").read_text().strip()
        except OSError:
            continue
        processors += 1
        cores.add((package, core))
    if not processors:
        return None
    return len(cores) if 0 < len(cores) < processors else processors


# ------------------------------------------------------------------------------ the warm path
class Answer(NamedTuple):
    """One image's result, as `vitkit.infer.predictor.Prediction` gives it."""

    source: Any
    top_k: list[tuple[int, str, float]] | None = None
    error: str | None = None


def start(
    model: str,
    paths: list[str],
    *,
    precision: str,
    backend: str | None,
    device: str,
    options: dict[str, Any],
    processor_backend: str | None,
    max_pixels: int | None,
    batch_size: int,
    top_k: int,
    workers: int | None,
    say: Say,
) -> Iterator[Answer] | None:
    """`vitkit predict`'s answers for `paths` from the cache without torch, or None when they
    cannot be had that way (nothing printed then). `options` are `resolve`'s, as the command
    passes them (the alias entry is keyed by them)."""
    if precision not in ("int8", "bf16", "auto") or backend not in (None, "openvino"):
        return None
    if device != "cpu" and (device != "auto" or any(os.path.exists(p) for p in _GPU_NODES)):
        return None
    threads = default_threads()
    files = local_files(model)
    if files is None or threads is None or not paths:
        return None
    cache = Cache(say=say)
    found = described(cache, alias_key(files, {**options, "device": "cpu"}), say, model)
    if found is None:
        return None
    config, processor, fingerprint, pixels = found
    if not config.num_classes or processor.output_hw is None:
        return None
    if not pixels or processor_backend not in (None, processor.backend):
        return None  # these pixels need torch here (or were not checked for this backend)
    if max_pixels is not None:
        processor.max_pixels = max_pixels

    info = cpu_machine()
    if not info["openvino"]:
        return None
    candidates = cpu_candidates(info)
    if precision == "auto":
        if backend is not None:
            candidates = [c for c in candidates if c[1] == backend]
        candidates = candidates or [("fp32", "torch", "fallback: exact")]
        picks = candidates
    else:
        chosen = backend or next((b for p, b, _ in candidates if p == precision), "torch")
        picks = [(precision, chosen, "")]
    if any(b != "openvino" for p, b, _ in picks) and precision != "auto":
        return None
    calibrates = needs_calibration(picks)

    def load(path: str) -> np.ndarray | str:  # a reason, as the predictor's `load_or_reason`
        try:
            return processor.to_array(path)
        except ImageError as exc:
            return reason_of(path, exc)

    pool = ThreadPoolExecutor(workers or max(1, min(os.cpu_count() or 1, 8)))
    batches = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))
    first_paths = next(batches)
    first = list(pool.map(load, first_paths))
    good = [x for x in first if isinstance(x, np.ndarray)]
    if not good:
        pool.shutdown()
        return None
    shape = tuple(good[0].shape) if calibrates else (config.in_chans, *config.image_hw)
    run = _path(cache, say, fingerprint, precision, picks, shape, len(good), threads)
    if run is None:
        pool.shutdown()
        return None
    labels = id2label_for(config)
    k = min(top_k, config.num_classes)

    def answers() -> Iterator[Answer]:
        with pool:
            batch_paths, batch = first_paths, first
            while True:
                yield from _answer(batch_paths, batch, run, labels, k)
                batch_paths = next(batches, None)
                if batch_paths is None:
                    return
                batch = list(pool.map(load, batch_paths))

    return answers()


def _path(cache: Cache, say: Say, fingerprint: str, precision: str,
          picks: list[tuple[str, str, str]], shape: tuple[int, ...], images: int,
          threads: int) -> Callable[[np.ndarray], np.ndarray] | None:  # fmt: skip
    """The compiled OpenVINO path the full command would run, from the cache; None if it is
    not there (or `auto`'s cached pick is not an OpenVINO one)."""
    why = ""
    if precision == "auto":
        folder = cache.get(path_key(fingerprint, "auto", "auto", shape, None))
        pick = cache.meta(folder).get("pick") if folder is not None else None
        known = {(p, b) for p, b, _ in picks}
        if not (isinstance(pick, list) and len(pick) == 3 and tuple(pick[:2]) in known):
            return None
        if pick[1] != "openvino":
            return None
        precision, why = str(pick[0]), str(pick[2])
        say(f"auto: {pick[0]} on {pick[1]}, as picked before ({folder})")
    folder = cache.get(path_key(fingerprint, precision, "openvino", shape, None))
    if folder is None:
        return None
    import openvino as ov  # lazy: an optional runtime

    ov_model = ov.Core().read_model(str(folder / "model.xml"))
    say(f"{precision} on OpenVINO from the cache ({folder})")
    compiled = per_size(ov_model, precision, threads, folder / "compiled")

    def run(x: np.ndarray) -> np.ndarray:
        net = compiled(tuple(x.shape[1:]))
        return net(x)[net.output(0)]

    if why:
        note = openvino_note(precision, images, cached=True)
        say(f"auto picked {precision} on openvino (auto: {why}; OpenVINO {note}, {threads} "
            "threads)".replace("  ", " "))  # fmt: skip
    return run


def _answer(paths: list[str], batch: list[np.ndarray | str], run: Callable,
            labels: dict[int, str], k: int) -> Iterator[Answer]:  # fmt: skip
    """One batch's answers in input order, as the predictor gives them (`answered`)."""

    def rows(pixels: list[np.ndarray]) -> list[list[tuple[int, str, float]]]:
        return top_rows(probabilities(run(np.ascontiguousarray(np.stack(pixels)))), k, labels)

    ready = lambda x: isinstance(x, np.ndarray)  # noqa: E731
    for path, top, x in answered(list(zip(paths, batch)), ready, rows):
        yield Answer(path, top_k=top) if top is not None else Answer(path, error=x)


def answered(batch: list[tuple[Any, Any]], ready: Callable[[Any], bool],
             rows: Callable[[list[Any]], list[Any]]) -> Iterator[tuple[Any, Any, Any]]:  # fmt: skip
    """(source, its top-k row or None, its item) for a batch of (source, pixels or the reason
    it could not be read), in input order: one forward pass (`rows`) per pixel size, one
    unless the processor keeps sizes. The predictor's batches and the warm path's alike."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_, x) in enumerate(batch):
        if ready(x):
            groups.setdefault(tuple(x.shape), []).append(i)
    tops: dict[int, Any] = {}
    for indices in groups.values():
        tops.update(zip(indices, rows([batch[i][1] for i in indices])))
    for i, (source, x) in enumerate(batch):
        yield source, tops.get(i), x


def top_rows(
    probs: np.ndarray, k: int, labels: dict[int, str]
) -> list[list[tuple[int, str, float]]]:
    """(B, K) probabilities -> per row [(index, label, probability)] of the top k, highest
    first (ties: the lower index first)."""
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(c), labels.get(int(c), str(int(c))), float(row[c])) for c in cs]
            for row, cs in zip(probs, order)]  # fmt: skip
