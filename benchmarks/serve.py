"""Load test of `vitkit serve` over real HTTP on 127.0.0.1, against offline batch throughput.

Starts `vitkit serve` in a subprocess, then for 1, 4, 16 and 64 concurrent clients (threads with
keep-alive connections, each sending the same encoded photo to POST /v1/classify back to back)
measures throughput, p50/p99 latency, failed requests and the mean batch size the server ran
(from its /metrics). In the same run, before and after the HTTP levels, the same model is timed
offline in this process: model only (preprocessed batches of --max-batch) and end to end
(decode + preprocess + forward, as `vitkit predict` does).

    PYTHONPATH=src python benchmarks/serve.py --threads 2              # ViT-S/16, random weights
    PYTHONPATH=src python benchmarks/serve.py --model out/ --clients 1,16 --requests 64

Every level is bounded by --requests (at least 2 per client) and --seconds.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import format_table, machine_info, machine_line  # noqa: E402
from vitkit.serve.metrics import parse  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="preset, folder or hub id")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least)")
    p.add_argument("--seconds", type=float, default=45.0, help="time limit per level")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (server and offline)")
    p.add_argument("--offline-batches", type=int, default=4, help="timed batches per offline run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    photo = _photo()

    info = machine_info()
    print(machine_line(info))
    print(
        f"model: {args.model}, max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
        f"image: {len(photo)} byte PNG (512 x 512)"
    )
    offline = [_offline(args, photo)]
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vitkit", "serve", "--model", args.model, "--port", str(port),
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    rows = []
    try:
        _wait_ready(port, server)
        _run_level(port, photo, 2, 4, 30.0)  # warm-up: connections, allocator, kernels
        for n in clients:
            rows.append(_run_level(port, photo, n, max(args.requests, 2 * n), args.seconds))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    offline.append(_offline(args, photo))

    model_only = statistics.median(o[0] for o in offline)
    end_to_end = statistics.median(o[1] for o in offline)
    print(
        f"offline (this process, {args.threads} threads), before / after the HTTP levels: "
        f"model only, batch {args.max_batch}: "
        f"{' / '.join(f'{o[0]:.2f}' for o in offline)} img/s; "
        f"decode + preprocess + model: {' / '.join(f'{o[1]:.2f}' for o in offline)} img/s"
    )
    table = [
        (
            r["clients"], r["ok"], r["failed"], f"{r['throughput']:.2f}",
            f"{1000 * r['p50']:.0f}", f"{1000 * r['p99']:.0f}", f"{r['mean_batch']:.2f}",
            f"{100 * r['throughput'] / model_only:.0f}%",
            f"{100 * r['throughput'] / end_to_end:.0f}%",
        )
        for r in rows
    ]  # fmt: skip
    print(
        format_table(
            [
                "clients", "ok", "failed", "img/s", "p50 ms", "p99 ms", "mean batch",
                "% offline model", "% offline e2e",
            ],
            table,
        )
    )  # fmt: skip


def _photo() -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "PNG")
    return buffer.getvalue()


def _offline(args, photo: bytes) -> tuple[float, float]:
    """(model-only img/s on preprocessed batches, decode + preprocess + model img/s)."""
    from vitkit.checkpoints.resolve import resolve

    r = resolve(args.model, allow_preset=True)
    model, processor = r.model.eval(), r.processor
    n = args.max_batch
    pixels = torch.stack([processor.preprocess_pil(photo)] * n)
    with torch.inference_mode():
        model(pixels)  # warm-up
        start = time.perf_counter()
        for _ in range(args.offline_batches):
            model(pixels).logits.float().softmax(-1)
        model_only = n * args.offline_batches / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(args.offline_batches):
            batch = torch.stack([processor.preprocess_pil(photo) for _ in range(n)])
            model(batch).logits.float().softmax(-1)
        end_to_end = n * args.offline_batches / (time.perf_counter() - start)
    return model_only, end_to_end


def _run_level(port: int, photo: bytes, clients: int, requests: int, seconds: float) -> dict:
    before = parse(_get(port, "/metrics").decode())
    lock = threading.Lock()
    remaining = [requests]
    latencies: list[float] = []
    failed = [0]
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify?top_k=5", photo, {"Content-Type": "image/png"})
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and b'"top_k"' in body
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failed[0] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = parse(_get(port, "/metrics").decode())
    forwards = after["vitkit_batch_size_count"] - before.get("vitkit_batch_size_count", 0)
    images = after["vitkit_batch_size_sum"] - before.get("vitkit_batch_size_sum", 0)
    latencies.sort()
    row = {
        "clients": clients,
        "ok": len(latencies),
        "failed": failed[0],
        "throughput": len(latencies) / wall,
        "p50": _quantile(latencies, 0.50),
        "p99": _quantile(latencies, 0.99),
        "mean_batch": images / forwards if forwards else float("nan"),
    }
    print(json.dumps(row), flush=True)
    return row


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def _wait_ready(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vitkit serve exited with {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("vitkit serve did not become ready in 120 s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
