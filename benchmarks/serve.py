"""Load test of `vitkit serve` over real HTTP on 127.0.0.1, against offline batch throughput.

Starts `vitkit serve` in a subprocess, then for 1, 4, 16 and 64 concurrent clients (threads with
keep-alive connections, each sending the same encoded photo to POST /v1/classify back to back)
measures throughput, p50/p99 latency, failed requests and the mean batch size the server ran
(from its /metrics). Each level runs --rounds rounds; each round first times the same model
offline in this process (one forward on a preprocessed batch of --max-batch) and then the
served round, so every served/offline ratio compares neighbouring measurements on a machine
whose load drifts. The table gives medians over rounds.

    PYTHONPATH=src python benchmarks/serve.py --threads 2              # ViT-S/16, random weights
    PYTHONPATH=src python benchmarks/serve.py --model out/ --clients 1,16 --requests 64

Every round is bounded by --requests (at least one per client) and --seconds.
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
    p.add_argument("--rounds", type=int, default=3, help="offline/HTTP pairs per level")
    p.add_argument("--requests", type=int, default=24, help="requests per round (>= clients)")
    p.add_argument("--seconds", type=float, default=40.0, help="time limit per HTTP round")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (server and offline)")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    photo = _photo()

    print(machine_line(machine_info()))
    print(
        f"model: {args.model}, max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
        f"image: {len(photo)} byte PNG (512 x 512), {args.rounds} rounds per level"
    )
    offline = _Offline(args, photo)
    print(f"offline decode + preprocess + model, batch {args.max_batch}: "
          f"{offline.end_to_end():.2f} img/s")  # fmt: skip
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vitkit", "serve", "--model", args.model, "--port", str(port),
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
        "--threads", str(args.threads),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    table = []
    try:
        _wait_ready(port, server)
        _run_round(port, photo, 2, 4, 30.0)  # warm-up: connections, allocator, kernels
        for n in clients:
            # offline and served alternate, so each ratio compares two neighbouring measurements
            pairs = []
            for _ in range(args.rounds):
                alone = offline.model_only()
                pairs.append(
                    (alone, _run_round(port, photo, n, max(args.requests, n), args.seconds))
                )
            table.append(_summary(n, pairs))
            print(json.dumps(dict(zip(HEADERS, table[-1]))), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    print(format_table(HEADERS, table))


HEADERS = [
    "clients", "requests", "failed", "img/s", "offline img/s", "served / offline",
    "p50 ms", "p99 ms", "mean batch",
]  # fmt: skip


def _summary(clients: int, pairs: list[tuple[float, dict]]) -> list:
    latencies = sorted(x for _, r in pairs for x in r["latencies"])
    served = [r["ok"] / r["wall"] for _, r in pairs]
    forwards = sum(r["forwards"] for _, r in pairs)
    return [
        clients,
        sum(r["ok"] + r["failed"] for _, r in pairs),
        sum(r["failed"] for _, r in pairs),
        f"{statistics.median(served):.2f}",
        f"{statistics.median(o for o, _ in pairs):.2f}",
        f"{statistics.median(s / o for s, (o, _) in zip(served, pairs)):.2f}",
        f"{1000 * _quantile(latencies, 0.50):.0f}",
        f"{1000 * _quantile(latencies, 0.99):.0f}",
        f"{sum(r['images'] for _, r in pairs) / forwards:.2f}" if forwards else "-",
    ]


def _photo() -> bytes:
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buffer, "PNG")
    return buffer.getvalue()


class _Offline:
    """The same model in this process, timed on batches of --max-batch. It runs in its own
    thread with its own torch thread count, exactly like the server's model thread: on a busy
    2-core machine two torch threads driven from the main thread measured 6x slower at batch 1
    than the same two driven from a worker thread (0.55 vs 3.57 img/s, ViT-S/16)."""

    def __init__(self, args, photo: bytes):
        from concurrent.futures import ThreadPoolExecutor

        from vitkit.checkpoints.resolve import resolve

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offline")
        self.pool.submit(torch.set_num_threads, args.threads).result()
        r = resolve(args.model, allow_preset=True)
        self.model, self.processor, self.photo = r.model.eval(), r.processor, photo
        self.batch = torch.stack([self.processor.preprocess_pil(photo)] * args.max_batch)
        self.model_only()  # warm-up

    def model_only(self) -> float:
        """img/s of one forward on a preprocessed batch."""
        return self.pool.submit(self._timed, lambda: self.batch).result()

    def end_to_end(self) -> float:
        """img/s of decode + preprocess + forward, as `vitkit predict` does."""
        decode = self.processor.preprocess_pil
        return self.pool.submit(
            self._timed, lambda: torch.stack([decode(self.photo) for _ in self.batch])
        ).result()

    @torch.inference_mode()
    def _timed(self, make_batch) -> float:
        start = time.perf_counter()
        self.model(make_batch()).logits.float().softmax(-1)
        return len(self.batch) / (time.perf_counter() - start)


def _run_round(port: int, photo: bytes, clients: int, requests: int, seconds: float) -> dict:
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
    return {
        "ok": len(latencies),
        "failed": failed[0],
        "wall": wall,
        "latencies": latencies,
        "forwards": after["vitkit_batch_size_count"] - before.get("vitkit_batch_size_count", 0),
        "images": after["vitkit_batch_size_sum"] - before.get("vitkit_batch_size_sum", 0),
    }


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
