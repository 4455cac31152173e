"""`vitkit serve` in the open, over real HTTP on 127.0.0.1: the queue limit, the deadline,
cancellation on disconnect, slow clients, limits that name themselves, a fuzz corpus, the
access token, kill -9 of a worker under load and SIGTERM under load.

The model thread is held by a gate where a test needs requests to queue, so nothing depends on
how fast this machine is; the few timed bounds (slow clients) have wide margins, because CI
machines are small and shared."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import (
    TIMEOUT,
    Server,
    children,
    free_port,
    http,
    metrics,
    multipart,
    post_json,
    serve_process,
    tiny_classifier,
    wait_workers,
)

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("multipart")

from vitkit.serve.app import Settings

TOKEN = "open-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class Gate:
    """Holds the model: every batch waits until `open()`; counts the images that ran."""

    def __init__(self, server: Server):
        self.service = server.app.state.service
        self.opened, self.entered = threading.Event(), threading.Event()
        self.images = 0
        run = self.service.batcher.run

        def gated(pixels):
            self.entered.set()
            assert self.opened.wait(TIMEOUT)
            self.images += len(pixels)
            return run(pixels)

        self.service.batcher.run = gated

    def open(self) -> None:
        self.opened.set()

    def wait_in_flight(self, n: int) -> None:
        wait_in_flight(self.service, n)


def wait_in_flight(service, n: int) -> None:
    """Until exactly `n` requests are admitted to /v1 and not yet answered."""
    deadline = time.monotonic() + TIMEOUT
    while service.in_flight != n:
        assert time.monotonic() < deadline, f"{service.in_flight} in flight, not {n}"
        time.sleep(0.01)


def shed(port, reason: str) -> float:
    return metrics(port)[f'vitkit_shed_total{{reason="{reason}"}}']


# ---------------------------------------------------------------------------------- overload
def test_past_the_queue_limit_an_immediate_503_with_retry_after(model_dir, png):
    settings = Settings(model=str(model_dir), max_batch=1, max_wait_ms=0, max_queue=2)
    with Server(settings) as s, ThreadPoolExecutor(2) as pool:
        s.wait_ready()
        gate = Gate(s)
        held = [pool.submit(post_json, s.port, "/v1/classify", png) for _ in range(2)]
        gate.wait_in_flight(2)  # one in the model, one queued: the limit
        start = time.monotonic()
        status, headers, body = http(s.port, "POST", "/v1/classify", png)
        assert status == 503 and time.monotonic() - start < 10  # at once, not after the queue
        assert "--max-queue" in json.loads(body)["error"]
        assert int(headers["retry-after"]) >= 1
        assert http(s.port, "GET", "/healthz")[0] == 200  # busy is not unhealthy
        m = metrics(s.port)
        assert m['vitkit_shed_total{reason="queue_full"}'] == 1
        assert m['vitkit_requests_total{route="/v1/classify",status="503"}'] == 1
        assert m["vitkit_in_flight"] == 2 and m["vitkit_queue_limit"] == 2
        gate.open()
        assert [f.result(TIMEOUT)[0] for f in held] == [200, 200]
        assert gate.images == 2 and metrics(s.port)["vitkit_in_flight"] == 0


def test_a_request_queued_past_its_deadline_never_reaches_the_model(model_dir, png):
    settings = Settings(model=str(model_dir), max_batch=1, max_wait_ms=0, timeout_s=1.0)
    with Server(settings) as s, ThreadPoolExecutor(2) as pool:
        s.wait_ready()
        gate = Gate(s)
        first = pool.submit(post_json, s.port, "/v1/classify", png)
        assert gate.entered.wait(TIMEOUT)  # the first holds the model
        late = pool.submit(post_json, s.port, "/v1/classify", png)
        gate.wait_in_flight(2)
        time.sleep(2.0)  # the second waits in the queue past its 1 s deadline
        gate.open()
        assert first.result(TIMEOUT)[0] == 200
        status, answer = late.result(TIMEOUT)
        assert status == 504
        assert "deadline" in answer["error"] and "--timeout-s" in answer["error"]
        assert gate.images == 1  # the late one was dropped before the model
        assert shed(s.port, "deadline") == 1


def test_a_client_that_disconnects_has_its_queued_work_cancelled(model_dir, png):
    settings = Settings(model=str(model_dir), max_batch=1, max_wait_ms=0)
    with Server(settings) as s, ThreadPoolExecutor(1) as pool:
        s.wait_ready()
        gate = Gate(s)
        first = pool.submit(post_json, s.port, "/v1/classify", png)
        assert gate.entered.wait(TIMEOUT)
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(png)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as sock:
            sock.sendall(head + png)
            gate.wait_in_flight(2)  # queued behind the first
        deadline = time.monotonic() + TIMEOUT  # we hung up: the server notices and cancels
        while shed(s.port, "disconnected") < 1:
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.05)
        gate.wait_in_flight(1)
        gate.open()
        assert first.result(TIMEOUT)[0] == 200
        assert post_json(s.port, "/v1/classify", png)[0] == 200
        assert gate.images == 2  # the first and the last: never the one whose client left
        m = metrics(s.port)
        assert m['vitkit_requests_total{route="/v1/classify",status="499"}'] == 1


def test_explanations_hold_one_slot_so_classification_is_not_crowded_out(model_dir, png):
    """--max-explain 1: of three grad-rollout explanations only one is in the model thread at
    a time, so a classification sent after them runs after the first, before the other two."""
    with Server(Settings(model=str(model_dir), max_explain=1, max_wait_ms=0)) as s, \
            ThreadPoolExecutor(4) as pool:  # fmt: skip
        s.wait_ready()
        service = s.app.state.service
        opened, running = threading.Event(), []
        explain = service.explain

        def gated(*args):
            running.append(time.monotonic())
            assert opened.wait(TIMEOUT)
            return explain(*args)

        service.explain = gated
        classify_rows, classified = service.batcher.run, []

        def timed(*args):
            classified.append(time.monotonic())
            return classify_rows(*args)

        service.batcher.run = timed

        def post(name, path):
            return http(s.port, "POST", path, png)[0]

        explains = [pool.submit(post, f"explain{i}", "/v1/explain?method=grad-rollout")
                    for i in range(3)]  # fmt: skip
        wait_in_flight(service, 3)
        classify = pool.submit(post, "classify", "/v1/classify")
        wait_in_flight(service, 4)
        time.sleep(0.5)
        assert len(running) == 1  # the other two wait for the slot, not in the model's queue
        opened.set()
        assert (
            classify.result(TIMEOUT) == 200 and [f.result(TIMEOUT) for f in explains] == [200] * 3
        )
        # when each reached the model (responses can arrive in another order: an explanation
        # still renders its picture after the model is done)
        assert len(running) == 3 and len(classified) == 1
        assert running[0] < classified[0] < min(running[1:])


# ---------------------------------------------------------------------------------- slow clients
def _dribble(port, head: bytes, piece: bytes, every: float = 0.2) -> tuple[bytes, float]:
    """Send `head`, then `piece` every `every` seconds until the server answers or closes;
    -> (what it sent back, seconds from the first byte)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        sock.settimeout(every)
        reply = b""
        while time.monotonic() - start < TIMEOUT:
            try:
                part = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(piece)
                continue
            except OSError:
                break
            if not part:
                break
            reply += part
        return reply, time.monotonic() - start


def test_slowloris_is_cut_off_and_frees_its_slot(model_dir, png):
    settings = Settings(model=str(model_dir), max_queue=1, header_timeout_s=1.0,
                        body_timeout_s=1.5)  # fmt: skip
    with Server(settings) as s, ThreadPoolExecutor(1) as pool:
        s.wait_ready()
        # headers a line at a time, never finished: 408 and closed after about 1 s
        reply, seconds = _dribble(s.port, b"POST /v1/classify HTTP/1.1\r\n", b"X-Slow: 1\r\n")
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"--header-timeout-s" in reply and 0.9 <= seconds < 15

        # a body a few bytes at a time: it holds the only queue slot until cut off at 1.5 s
        head = (
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        slow = pool.submit(_dribble, s.port, head, b"\x89PNG\r\n\x1a\n")
        wait_in_flight(s.app.state.service, 1)
        status, _, body = http(s.port, "POST", "/v1/classify", png)
        assert status == 503 and b"--max-queue" in body  # the slow client holds the slot
        reply, seconds = slow.result(TIMEOUT)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"--body-timeout-s" in reply and b"connection: close" in reply.lower()
        assert 1.4 <= seconds < 15
        assert post_json(s.port, "/v1/classify", png)[0] == 200  # the slot is free again
        assert http(s.port, "GET", "/healthz")[0] == 200


# ---------------------------------------------------------------------------------- limits
@pytest.fixture(scope="module")
def server(model_dir):
    settings = Settings(model=str(model_dir), max_labels=3, max_text_chars=50,
                        header_timeout_s=2.0, body_timeout_s=2.0)  # fmt: skip
    with Server(settings) as s:
        s.wait_ready()
        yield s


def _exchange(port, request: bytes, wait: float = 0.5) -> bytes:
    """Send raw bytes; read until the server closes or stays quiet for `wait` seconds."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        sock.settimeout(wait)
        with contextlib.suppress(OSError):
            while part := sock.recv(65536):
                reply += part
    return reply


def _status(reply: bytes) -> int | None:
    return int(reply[9:12]) if reply.startswith(b"HTTP/1.1 ") else None


def test_every_limit_answers_a_4xx_that_names_it(server, png):
    port = server.port
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    reply = _exchange(port, huge)
    assert _status(reply) == 431 and b"16 KiB" in reply, reply[:300]

    fields = [("labels", str(i)) for i in range(6)]
    boundary = "lim"
    body = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in fields
        ).encode()
        + f"--{boundary}--\r\n".encode()
    )
    kind = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, answer = post_json(port, "/v1/classify", body, **kind)
    assert status == 400 and "more than 5 text fields" in answer["error"], answer
    assert "--max-labels" in answer["error"]

    long = f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{"x" * 300}\r\n'
    status, answer = post_json(port, "/v1/embed", (long + f"--{boundary}--\r\n").encode(), **kind)
    assert status == 400 and "over 200 bytes" in answer["error"], answer
    assert "--max-text-chars" in answer["error"]

    two = multipart(png)[0].replace(b"--\r\n", b"\r\n") + multipart(png)[0].split(b"\r\n", 1)[1]
    status, answer = post_json(port, "/v1/classify", two, **multipart(png)[1])
    assert status == 400 and "more than one file" in answer["error"], answer

    for query, reason in [
        ("/v1/classify?top_k=five", "top_k='five' is not an integer"),
        ("/v1/classify?top_k=%C2%B2", "is not an integer"),  # a superscript two
        ("/v1/classify?top_k=0", "top_k must be at least 1"),
        ("/v1/explain?discard_ratio=nan", "discard_ratio must be in [0, 1)"),
        ("/v1/explain?discard_ratio=1e999", "discard_ratio must be in [0, 1)"),
        ("/v1/explain?discard_ratio=half", "discard_ratio='half' is not a number"),
    ]:
        status, answer = post_json(port, query, png)
        assert status == 400 and reason in answer["error"], (query, answer)


# ---------------------------------------------------------------------------------- fuzz
CORPUS = [
    b"\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1 trailing\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: x\r\nNo-Colon-Here\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data\r\n"
    b"Content-Length: 9\r\n\r\n--x\r\n\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 12\r\n\r\n--b\r\n--b--\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b'Content-Length: 58\r\n\r\n--b\r\nContent-Disposition: form-data; name="\xff\xfe"\r\n\r\nx\r\n--b--',
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
    b"\r\nContent-Length: 7\r\n\r\n%ff%fe=",
    b"POST /v1/explain?method=grad-rollout&label=%00 HTTP/1.1\r\nHost: x\r\nContent-Length: 4"
    b"\r\n\r\n\x89PNG",
    b"POST /v1/embed?text=%ff HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/classify?labels=a&labels=a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
]


def test_a_hand_made_corpus_of_malformed_requests_gets_4xx(server):
    for request in CORPUS:
        reply = _exchange(server.port, request)
        status = _status(reply)
        assert status is not None and 400 <= status < 500, (request, reply[:300])
    assert http(server.port, "GET", "/healthz")[0] == 200


def test_fuzzed_http_and_multipart_never_take_the_server_down(server, png):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fragments = st.sampled_from([
        b"--b\r\n", b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n',
        b'Content-Disposition: form-data; name="labels"\r\n', b"Content-Type: image/png\r\n",
        b"\r\n", b"--b--\r\n", png[:200], png, b"0\r\n\r\n", b"5\r\nhello\r\n", b"\xff" * 8,
    ])  # fmt: skip
    headers = st.sampled_from([
        b"Host: x", b"Content-Type: multipart/form-data; boundary=b", b"Content-Type: image/png",
        b"Content-Length: 5", b"Content-Length: 99999999999", b"Transfer-Encoding: chunked",
        b"Expect: 100-continue", b"Authorization: Bearer x", b"Connection: close",
        b"Content-Type: application/x-www-form-urlencoded",
    ])  # fmt: skip
    request = st.tuples(
        st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"P\xffST"]),
        st.sampled_from([b"/v1/classify", b"/v1/embed?text=a", b"/v1/explain?method=grad-rollout",
                         b"/v1/classify?top_k=-1&labels=", b"/healthz", b"*", b"/%00%ff"]),
        st.lists(headers | st.binary(max_size=30), max_size=5),
        st.lists(fragments | st.binary(max_size=40), max_size=8),
    ).map(lambda r: r[0] + b" " + r[1] + b" HTTP/1.1\r\n" + b"\r\n".join(r[2]) + b"\r\n\r\n"
          + b"".join(r[3]))  # fmt: skip
    statuses = []

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.one_of(request, st.binary(max_size=300)))
    def exchange(data):
        reply = _exchange(server.port, data, wait=0.3)
        statuses.append(_status(reply))
        assert _status(reply) is None or _status(reply) < 500, (data, reply[:300])

    exchange()
    assert http(server.port, "GET", "/healthz")[0] == 200
    assert post_json(server.port, "/v1/classify", png)[0] == 200
    assert not [k for k in metrics(server.port) if 'status="5' in k and "503" not in k]
    assert any(s is not None for s in statuses)


# ---------------------------------------------------------------------------------- token
def test_the_token_is_required_on_v1_and_healthz_stays_open(model_dir, png):
    with Server(Settings(model=str(model_dir), api_key=TOKEN)) as s:
        s.wait_ready()
        status, headers, body = http(s.port, "POST", "/v1/classify", png)
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in json.loads(body)["error"]
        for auth in ("Bearer wrong-token-0123456789abcdef", f"Basic {TOKEN}", "Bearer ",
                     f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):  # fmt: skip
            status, answer = post_json(s.port, "/v1/classify", png, Authorization=auth)
            assert status == 401, auth
        status, answer = post_json(s.port, "/v1/classify", png, Authorization=f"Bearer {TOKEN}")
        assert status == 200 and len(answer["top_k"]) == 5
        status, _, _ = http(
            s.port, "POST", "/v1/explain", png, {"authorization": f"bearer {TOKEN}"}
        )
        assert status == 200  # the scheme is case-insensitive
        status, _, body = http(s.port, "GET", "/healthz")
        assert status == 200 and json.loads(body)["auth"] is True
        assert http(s.port, "GET", "/metrics")[0] == 200
        assert http(s.port, "GET", "/")[0] == 200  # the page, which asks for the token
        m = metrics(s.port)
        assert m['vitkit_requests_total{route="/v1/classify",status="401"}'] == 6


def test_auth_probes_puts_healthz_and_metrics_behind_the_token(model_dir, png):
    from vitkit.errors import ConfigError

    with pytest.raises(ConfigError, match="--auth-probes needs a token"):
        Settings(model=str(model_dir), auth_probes=True)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Server(Settings(model=str(model_dir), api_key=TOKEN, auth_probes=True)) as s:
        deadline = time.monotonic() + TIMEOUT
        while http(s.port, "GET", "/healthz", headers=auth)[0] != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)
        for route in ("/healthz", "/metrics"):
            status, headers, _ = http(s.port, "GET", route)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer"), route
            assert http(s.port, "GET", route, headers={"Authorization": "Bearer nope"})[0] == 401
            assert http(s.port, "GET", route, headers=auth)[0] == 200
        assert http(s.port, "GET", "/")[0] == 200  # the page, which asks for the token
        assert post_json(s.port, "/v1/classify", png, **auth)[0] == 200


def test_a_public_address_without_a_token_is_refused(model_dir, capsys, monkeypatch, tmp_path):
    import uvicorn

    from vitkit.cli import main

    monkeypatch.delenv("VITKIT_API_KEY", raising=False)
    base = ["serve", "--model", str(model_dir), "--port", str(free_port())]
    assert main([*base, "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "--api-key-file" in err and "--no-auth" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("VITKIT_API_KEY", "short")
    assert main([*base, "--host", "0.0.0.0"]) == 1
    assert "at least 16" in capsys.readouterr().err
    monkeypatch.setenv("VITKIT_API_KEY", TOKEN)
    assert main([*base, "--host", "0.0.0.0", "--no-auth"]) == 1
    assert "contradicts" in capsys.readouterr().err
    monkeypatch.delenv("VITKIT_API_KEY")

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)  # start nothing
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)
    assert main([*base, "--host", "0.0.0.0", "--no-auth"]) == 0
    err = capsys.readouterr().err
    assert "warning: --no-auth" in err and "at most 64 requests queued" in err
    assert main([*base, "--host", "::1"]) == 0  # loopback needs no token
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main([*base, "--api-key-file", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl command")  # fmt: skip
def test_token_file_and_tls_on_a_public_address(model_dir, png, tmp_path):
    import http.client as client
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    secret = tmp_path / "api-key"
    secret.write_text(TOKEN + "\n")
    port = free_port()
    proc = serve_process(str(model_dir), port, "--host", "0.0.0.0", "--api-key-file",
                         str(secret), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                         log=tmp_path / "log")  # fmt: skip
    context = ssl._create_unverified_context()

    def https(path, body=None, headers=None):
        conn = client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        try:
            conn.request("POST" if body else "GET", path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            with contextlib.suppress(OSError):
                if https("/healthz")[0] == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert https("/v1/classify", png)[0] == 401
        status, body = https("/v1/classify", png, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"top_k" in body
        with pytest.raises((OSError, client.HTTPException)):
            http(port, "GET", "/healthz", timeout=5)  # plain HTTP is not spoken
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    assert TOKEN not in (tmp_path / "log").read_text()


# ---------------------------------------------------------------------------------- faults
class Load:
    """`clients` threads posting the image back to back, each on a new connection, until
    `stop()` or until one gets a 503 or a refused connection when `until_refused`; every
    outcome is kept: (client, start, end, HTTP status or the exception's name)."""

    def __init__(self, port: int, png: bytes, clients: int, until_refused: bool = False):
        self.port, self.png, self.until_refused = port, png, until_refused
        self.outcomes: list[tuple[int, float, float, int | str]] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        while not self.stopped.is_set():
            start = time.monotonic()
            try:
                outcome: int | str = http(self.port, "POST", "/v1/classify", self.png)[0]
            except OSError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # http.client's RemoteDisconnected, BadStatusLine, ...
                outcome = type(exc).__name__
            self.outcomes.append((i, start, time.monotonic(), outcome))
            if self.until_refused and outcome in (503, "ConnectionRefusedError"):
                return

    def wait_answers(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while sum(o[3] == 200 for o in self.outcomes) < n:
            assert time.monotonic() < deadline, self.outcomes[-5:]
            time.sleep(0.02)

    def stop(self) -> list[tuple[int, float, float, int | str]]:
        self.stopped.set()
        for t in self.threads:
            t.join(TIMEOUT)
        return self.outcomes


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_kill_9_of_a_worker_under_load_fails_only_its_requests(model_dir, png, tmp_path):
    """--workers 2: SIGKILL one worker while 4 clients run. Only requests on that worker's
    connections are lost (at most one per client; the rest get 200, or 503 from the
    replacement while it loads), uvicorn's supervisor starts a replacement, and /healthz
    answers 200 from two live workers again."""
    port, clients = free_port(), 4
    proc = serve_process(str(model_dir), port, "--workers", "2", "--max-wait-ms", "5",
                         log=tmp_path / "log")  # fmt: skip
    try:
        pids = wait_workers(proc, port, workers=2)
        load = Load(port, png, clients)
        load.wait_answers(20)
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = wait_workers(proc, port, workers=1, exclude=pids)  # a new process
        load.wait_answers(sum(o[3] == 200 for o in load.outcomes) + 20)  # serving on
        outcomes = load.stop()
        alive = set(children(proc.pid))
        assert victim not in alive and replacement <= alive
        assert wait_workers(proc, port, workers=2) <= alive  # both answer 200
        # the replacement answers 503 while its model loads: explicit, not lost
        assert {o[3] for o in outcomes if isinstance(o[3], int)} <= {200, 503}
        lost = [o for o in outcomes if not isinstance(o[3], int)]
        assert len(lost) <= clients, lost  # in flight on the victim: one per client at most
        assert all(o[2] >= killed_at for o in lost), lost  # none before the kill
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0, (tmp_path / "log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_under_load_answers_every_accepted_request(model_dir, png, tmp_path):
    """SIGTERM while 6 clients run: every request the server accepted gets its answer (200),
    new ones get 503 (or find the port closed once it has drained), nothing is cut off, and
    the server exits 0 with /healthz saying "draining" meanwhile."""
    port = free_port()
    log = tmp_path / "log"
    proc = serve_process(str(model_dir), port, "--max-wait-ms", "100", log=log)
    try:
        wait_workers(proc, port)
        load = Load(port, png, 6, until_refused=True)
        load.wait_answers(12)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(OSError):  # gone already is fine too
            status, _, body = http(port, "GET", "/healthz", timeout=5)
            assert status == 503 and json.loads(body)["status"] == "draining"
        assert proc.wait(TIMEOUT) == 0, log.read_text()[-3000:]
        outcomes = load.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # every request is answered 200, or refused with 503 (draining) or at a closed port:
    # none cut off mid-way, and the ones in flight at the signal were answered after it
    assert {o[3] for o in outcomes} <= {200, 503, "ConnectionRefusedError"}, outcomes
    assert any(o[1] < sent < o[2] and o[3] == 200 for o in outcomes)
    assert 503 in [o[3] for o in outcomes if o[1] > sent]  # new ones refused while draining
    assert "draining" in log.read_text()
