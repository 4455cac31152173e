from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SRC = str(Path(__file__).parents[1] / "src")  # for subprocesses: python -m vitkit, torchrun
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Each test its own cache of prepared precision paths (vitkit.infer.cache): no test
    reuses another's, and none writes to the user's ~/.cache."""
    monkeypatch.setenv("VITKIT_CACHE_DIR", str(tmp_path_factory.mktemp("vitkit-cache")))


_SESSION_CACHE: str | None = None  # for module fixtures, which run before the above


def pytest_configure(config):
    """Made here, not on import: a process that only imports this module (a spawned worker
    unpickling a test's function) would leave an empty folder in /tmp."""
    global _SESSION_CACHE
    if "VITKIT_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
        _SESSION_CACHE = tempfile.mkdtemp(prefix="vitkit-test-cache-")
        os.environ["VITKIT_CACHE_DIR"] = _SESSION_CACHE


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# CIFAR batches in the published python-pickle layout, with random pixels
def cifar_batch(n, seed, label_key=b"labels", k=10):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, k, size=n)]
    return {
        b"batch_label": b"batch",
        label_key: labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def dump_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar10(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = [cifar_batch(3, i) for i in range(6)]
    for i in range(5):
        dump_pickle(batches[i], d / f"data_batch_{i + 1}")
    dump_pickle(batches[5], d / "test_batch")
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    dump_pickle(
        {b"label_names": names, b"num_vis": 3072, b"num_cases_per_batch": 3}, d / "batches.meta"
    )
    return tmp_path, batches


# scikit-image's bundled photos (no download), as 8-bit RGB arrays (H, W, 3) of varied sizes
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry",
               "hubble_deep_field", "grass", "retina", "page", "brick", "clock", "coins",
               "colorwheel", "logo", "text")  # fmt: skip


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTO_NAMES:
        a = getattr(skimage.data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        out.append(np.ascontiguousarray(a))
    return out


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that claims `width` x `height` pixels in about 100 bytes (a decompression
    bomb when that is large): the header and a few bytes of image data, never the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def fake_hub_cache(cache, repo_id: str, files: dict[str, bytes]) -> None:
    """The layout huggingface_hub keeps: refs/main -> commit, snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (servers, torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SLOW_TRAIN = """
import json, sys, time
from vitkit.train import Recipe, train
train(Recipe.from_dict(json.loads(sys.argv[1])), on_step=lambda s: time.sleep(0.15))
"""


def kill_at_first_checkpoint(recipe: dict, run: Path, timeout: float = 240) -> None:
    """Train `recipe` (output `run`) in a subprocess, slowed per step, and SIGKILL it as soon as
    run/last/state.pt exists: a run that dies mid-epoch."""
    env = {**os.environ, "PYTHONPATH": SRC}
    spec = json.dumps({**recipe, "output": str(run)})
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN, spec], env=env)
    state_file = run / "last" / "state.pt"
    deadline = time.time() + timeout
    while not state_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------------------ text towers
IMAGENET_CLASSES = Path(__file__).parents[1] / "src" / "vitkit" / "data" / "imagenet_classes.txt"


def _spiece_sentences(n: int = 600) -> list[str]:
    rng = random.Random(0)
    words = [
        w
        for line in IMAGENET_CLASSES.read_text("utf-8").splitlines()[:400]
        for w in line.split(", ")
    ]
    extra = ["photo", "picture", "of", "a", "the", "this", "is", "123", "2024", "café", "東京"]
    return [
        " ".join(rng.choice(words + extra) for _ in range(rng.randint(2, 9)))
        + rng.choice([".", "!", "", " 42"])
        for _ in range(n)
    ]


def train_spiece(odd: bool = False) -> bytes:
    """A small SentencePiece unigram model with SigLIP's piece ids: SigLIP-like (T5's normalization), or with byte fallback and spaces kept as they are."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_spiece_sentences()),
        model_writer=out,
        model_type="unigram",
        vocab_size=800,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # SigLIP's (T5's): <pad> 0, </s> 1, <unk> 2
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        byte_fallback=odd,
        remove_extra_whitespaces=not odd,
        minloglevel=2,
    )  # fmt: skip
    return out.getvalue()


# ------------------------------------------------------------------------------ vitkit serve
TIMEOUT = 60  # seconds: a bound on every wait of the serve tests, never expected to be reached


class Server:
    """uvicorn in a thread on a pre-bound free port of 127.0.0.1."""

    def __init__(self, settings, **app_kwargs):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        import uvicorn

        from vitkit.serve.app import create_app, server_options

        self.app = create_app(settings, **app_kwargs)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5,
                                **server_options(settings))  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while http(self.port, "GET", "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()


def http(port, method, path, body=None, headers=None, timeout=TIMEOUT):
    """One request on a new connection -> (status, headers, body bytes)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def multipart(data: bytes, field: str = "file", filename: str = "image.png"):
    boundary = "vitkit-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_json(port, path, data: bytes, **headers):
    status, _, body = http(port, "POST", path, data, headers)
    return status, json.loads(body)


def metrics(port) -> dict[str, float]:
    """GET /metrics, parsed: {'name{labels}': value}."""
    from vitkit.serve.metrics import parse

    status, _, body = http(port, "GET", "/metrics")
    assert status == 200
    return parse(body.decode())


def raw_exchange(port, head: bytes, chunks=(), timeout=10.0) -> bytes:
    """Send request headers and body chunks on a socket, then read whatever comes back
    without closing our side: a server that waits for the rest of the body never answers."""
    import contextlib

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for chunk in chunks:
            with contextlib.suppress(OSError):  # the server may close once it has refused
                s.sendall(chunk)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                part = s.recv(65536)
                if not part:
                    break
                data += part
        return data


SERVE_LABELS = {0: "astronaut", 1: "rocket", 2: "flag", 3: "helmet", 4: "coffee"}


def tiny_classifier(root: Path) -> Path:
    """A tiny classifier folder (64 px, 2 blocks of width 32) with named classes and
    timm-style preprocessing (resize + crop): what the serve tests load."""
    import vitkit
    from vitkit.data.processor import ImageProcessor

    torch.manual_seed(0)
    cfg = vitkit.ViTConfig(
        image_size=64, patch_size=16, num_classes=5, embed_dim=32, depth=2, num_heads=2,
        id2label=SERVE_LABELS,
    )  # fmt: skip
    model = vitkit.VisionTransformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # peaked answers: bars worth showing
    vitkit.save_pretrained(model, root)
    ImageProcessor.timm_eval(64, crop_pct=0.875).save_pretrained(root)
    return root


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    import contextlib

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(stat.parent.name))
    return kids


def serve_process(model: str, port: int, *extra: str, log: Path | None = None, env=None):
    """`vitkit serve` in a subprocess (one torch thread); its output goes to a pipe, or to
    the file `log` when the test makes many requests (uvicorn logs each: a pipe would fill)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(env or {})}  # fmt: skip
    cmd = [sys.executable, "-m", "vitkit", "serve", "--model", model, "--port", str(port),
           "--threads", "1", *extra]  # fmt: skip
    out = open(log, "wb") if log is not None else subprocess.PIPE  # noqa: SIM115
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()


def wait_workers(proc: subprocess.Popen, port: int, workers: int = 1, exclude=()) -> set[int]:
    """Poll /healthz of a `vitkit serve` process until `workers` different processes (its
    "pid"), none of them in `exclude`, have answered 200: connections reach any worker, ready
    or still loading."""
    import contextlib

    deadline = time.monotonic() + TIMEOUT
    ready: set[int] = set()
    while len(ready) < workers:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else proc.args
        with contextlib.suppress(OSError):
            status, _, body = http(port, "GET", "/healthz", timeout=2)
            if status == 200 and json.loads(body)["pid"] not in exclude:
                ready.add(json.loads(body)["pid"])
        assert time.monotonic() < deadline, f"{len(ready)} of {workers} workers became ready"
        time.sleep(0.05)
    return ready


# ------------------------------------------------------------------------------ parity
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.2^2) (seeded), in eval mode: weights far from any
    initialisation, so a wrong mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two tensors of one shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def headless():
    """(playwright's sync_api, the path of Debian's chromium) for the page tests, or a skip:
    browsers cannot be downloaded here, so Playwright drives the system's."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api"), chromium
