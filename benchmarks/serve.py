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

--soak runs the server under overload instead (issue 24), in three parts:
  soak   --soak-clients (64) clients for --minutes (10): requests answered, 503s, 504s, lost
         ones (neither 200 nor an explicit 503/504), p50/p99 latency in the first and the last
         third of the run (p99 must not grow with time), and the server's resident memory at
         the start and the end;
  burst  4 x the queue limit requests at once: how many were admitted, and how fast the
         refused ones got their 503;
  mixed  the same clients for --mixed-seconds with 10% of the requests grad-rollout
         explanations, against a run of the same length without: classification p99 in both.

    PYTHONPATH=src python benchmarks/serve.py --soak --minutes 10 --threads 2
"""

from __future__ import annotations

import argparse
import collections
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
    p.add_argument("--soak", action="store_true", help="the overload benchmark (see above)")
    p.add_argument("--minutes", type=float, default=10.0, help="--soak: length of the soak")
    p.add_argument("--soak-clients", type=int, default=64, help="--soak: concurrent clients")
    p.add_argument("--max-queue", type=int, default=None, help="--soak: the server's limit")
    p.add_argument("--timeout-s", type=float, default=30.0, help="--soak: the server's deadline")
    p.add_argument("--mixed-seconds", type=float, default=120.0,
                   help="--soak: length of each of the two mixed runs")  # fmt: skip
    args = p.parse_args()
    if args.soak:
        return _soak(args)
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


CLASSIFY = "/v1/classify?top_k=5"
EXPLAIN = "/v1/explain?method=grad-rollout"


def _drive(port, photo, clients, seconds, requests=None, explain_every=0) -> tuple[list, float]:
    """`clients` threads, each on a keep-alive connection, sending the photo back to back for
    `seconds` (and at most `requests` in all); every `explain_every`-th request of a client
    is a grad-rollout explanation. -> ([(path, status or -1 if lost, seconds, end time)], wall)."""
    lock = threading.Lock()
    remaining = [requests if requests is not None else float("inf")]
    outcomes: list[tuple[str, int, float, float]] = []
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        n = i  # clients start at different points of the explanation cycle
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            n += 1
            path = EXPLAIN if explain_every and n % explain_every == 0 else CLASSIFY
            start = time.perf_counter()
            try:
                conn.request("POST", path, photo, {"Content-Type": "image/png"})
                response = conn.getresponse()
                body = response.read()
                status = response.status
                if status == 200 and path == CLASSIFY and b'"top_k"' not in body:
                    status = -1
                if response.getheader("connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                outcomes.append((path, status, time.perf_counter() - start, time.monotonic()))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - start


def _run_round(port: int, photo: bytes, clients: int, requests: int, seconds: float) -> dict:
    before = parse(_get(port, "/metrics").decode())
    outcomes, wall = _drive(port, photo, clients, seconds, requests)
    latencies = [t for _, status, t, _ in outcomes if status == 200]
    after = parse(_get(port, "/metrics").decode())
    return {
        "ok": len(latencies),
        "failed": len(outcomes) - len(latencies),
        "wall": wall,
        "latencies": latencies,
        "forwards": after["vitkit_batch_size_count"] - before.get("vitkit_batch_size_count", 0),
        "images": after["vitkit_batch_size_sum"] - before.get("vitkit_batch_size_sum", 0),
    }


def _soak(args) -> None:
    photo = _photo()
    print(machine_line(machine_info()))
    port = _free_port()
    queue = args.max_queue if args.max_queue is not None else 8 * args.max_batch
    cmd = [
        sys.executable, "-m", "vitkit", "serve", "--model", args.model, "--port", str(port),
        "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
        "--threads", str(args.threads), "--max-queue", str(queue),
        "--timeout-s", str(args.timeout_s),
    ]  # fmt: skip
    print(
        f"model: {args.model}, max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
        f"max_queue {queue}, timeout_s {args.timeout_s:g}, clients {args.soak_clients}, "
        f"image: {len(photo)} byte PNG (512 x 512)"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    rows = []
    try:
        _wait_ready(port, server)
        # warm-up at full concurrency (connections, allocator pools for 64 decoded uploads and
        # full batches, kernels), so the memory at the start is the steady state's, not a cold one
        _drive(port, photo, args.soak_clients, 300.0, requests=3 * args.soak_clients)
        rss_start = _rss_mb(server.pid)
        outcomes, wall = _drive(port, photo, args.soak_clients, 60 * args.minutes)
        rss_end = _rss_mb(server.pid)
        rows.append(_soak_row(f"soak {args.minutes:g} min", outcomes, wall, rss_start, rss_end))
        print(json.dumps(dict(zip(SOAK_HEADERS, rows[-1]))), flush=True)

        burst = 4 * queue
        outcomes, wall = _drive(port, photo, burst, 600.0, requests=burst)
        rows.append(_soak_row(f"burst of {burst}", outcomes, wall))
        print(json.dumps(dict(zip(SOAK_HEADERS, rows[-1]))), flush=True)

        mixed = {}
        for name, every in [("classify only", 0), ("10% grad-rollout", 10)]:
            outcomes, wall = _drive(port, photo, args.soak_clients, args.mixed_seconds,
                                    explain_every=every)  # fmt: skip
            mixed[name] = outcomes
            rows.append(_soak_row(f"mixed: {name}", outcomes, wall))
            print(json.dumps(dict(zip(SOAK_HEADERS, rows[-1]))), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(format_table(SOAK_HEADERS, rows))
    p99 = {
        name: _quantile(sorted(t for path, s, t, _ in o if path == CLASSIFY and s == 200), 0.99)
        for name, o in mixed.items()
    }
    ratio = p99["10% grad-rollout"] / p99["classify only"]
    print(f"classification p99 with 10% grad-rollout explanations / without: {ratio:.2f}")
    if rows[0][SOAK_HEADERS.index("lost")] != "0":
        print(f"LOST requests in the soak: {rows[0][SOAK_HEADERS.index('lost')]}")


SOAK_HEADERS = [
    "run", "requests", "200", "503", "504", "lost", "classify/s", "p50 ms", "p99 ms",
    "p99 first third ms", "p99 last third ms", "503 p99 ms", "RSS start MB", "RSS end MB",
]  # fmt: skip


def _soak_row(name, outcomes, wall, rss_start=None, rss_end=None) -> list:
    count = collections.Counter(status for _, status, _, _ in outcomes)
    ok = sorted((end, t) for path, s, t, end in outcomes if s == 200 and path == CLASSIFY)
    latencies = sorted(t for _, t in ok)
    third = len(ok) // 3
    refused = sorted(t for _, s, t, _ in outcomes if s == 503)
    lost = len(outcomes) - count[200] - count[503] - count[504]

    def ms(values, q):
        return f"{1000 * _quantile(values, q):.0f}" if values else "-"

    return [
        name, len(outcomes), count[200], count[503], count[504], str(lost),
        f"{len(ok) / wall:.2f}", ms(latencies, 0.5), ms(latencies, 0.99),
        ms(sorted(t for _, t in ok[:third]), 0.99), ms(sorted(t for _, t in ok[-third:]), 0.99),
        ms(refused, 0.99),
        f"{rss_start:.0f}" if rss_start else "-", f"{rss_end:.0f}" if rss_end else "-",
    ]  # fmt: skip


def _rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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
