"""`vitkit serve` over real HTTP on 127.0.0.1: every route, every error code, batching under a
burst, SIGTERM drain, and the web page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import (
    SERVE_LABELS as LABELS,
)
from conftest import (
    TIMEOUT,
    Server,
    children,
    free_port,
    http,
    metrics,
    multipart,
    png_header,
    post_json,
    raw_exchange,
    serve_process,
    tiny_classifier,
    wait_workers,
)

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("multipart")


import vitkit
from vitkit.serve.app import Settings
from vitkit.serve.metrics import parse


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_classifier(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    files = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        files[name] = root / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(files[name])
    return files


@pytest.fixture(scope="module")
def server(model_dir):
    settings = Settings(model=str(model_dir), max_batch=8, max_wait_ms=50, max_body_mb=1)
    with Server(settings) as s:
        s.wait_ready()
        yield s


# ---------------------------------------------------------------------------------- routes
def test_classify_equals_predict_json(server, model_dir, photos, capsys):
    from vitkit.cli import main

    paths = [str(photos["astronaut"]), str(photos["chelsea"])]
    # batch size 1 on both sides: the same preprocessing and the same call give the same bits
    args = ["predict", *paths, "--model", str(model_dir), "--json", "--top-k", "3", "-b", "1"]
    assert main(args) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for path, want in zip(paths, expected):
        data = Path(path).read_bytes()
        raw_status, raw = post_json(server.port, "/v1/classify?top_k=3", data)
        body, headers = multipart(data)
        form_status, form = post_json(server.port, "/v1/classify?top_k=3", body, **headers)
        assert raw_status == form_status == 200
        assert raw["top_k"] == form["top_k"] == want["top_k"]  # same preprocessing, same call
        assert raw["model"] == str(model_dir) and raw["precision"] == "fp32"
        assert [t["label"] for t in raw["top_k"]] == [LABELS[t["index"]] for t in raw["top_k"]]
    status, answer = post_json(server.port, "/v1/classify", Path(paths[0]).read_bytes())
    assert status == 200 and len(answer["top_k"]) == 5  # the default
    status, answer = post_json(server.port, "/v1/classify?top_k=99", Path(paths[0]).read_bytes())
    assert status == 200 and len(answer["top_k"]) == 5  # no more than the classes
    assert abs(sum(t["probability"] for t in answer["top_k"]) - 1.0) < 1e-5


def test_embed_is_the_pooled_output(server, model_dir, photos):
    from vitkit.checkpoints.resolve import resolve

    status, answer = post_json(server.port, "/v1/embed", photos["coffee"].read_bytes())
    assert status == 200 and answer["dim"] == 32 == len(answer["embedding"])
    r = resolve(model_dir)
    with torch.inference_mode():
        pooled = r.model(r.processor([str(photos["coffee"])])).pooler_output[0]
    np.testing.assert_allclose(answer["embedding"], pooled.numpy(), rtol=1e-5, atol=1e-6)


def test_explain_returns_the_png_explain_image_draws(server, model_dir, photos):
    from vitkit.checkpoints.resolve import resolve
    from vitkit.explain import explain_image
    from vitkit.viz import png_bytes

    data = photos["chelsea"].read_bytes()
    r = resolve(model_dir)
    for method, query in [("rollout", ""), ("grad-rollout", "?method=grad-rollout&label=rocket")]:
        status, headers, png = http(server.port, "POST", f"/v1/explain{query}", data)
        assert status == 200 and headers["content-type"] == "image/png"
        result, picture = explain_image(
            r.model, r.processor, data, method, label=1 if query else None,
            with_image=False, per_head=False, max_side=512,
        )  # fmt: skip
        assert png == png_bytes(picture)
        c = int(result.labels[0])
        assert headers["x-vitkit-class-index"] == str(c)
        assert headers["x-vitkit-label"] == LABELS[c]
        assert float(headers["x-vitkit-probability"]) == pytest.approx(
            float(result.probabilities[0, c]), abs=1e-6
        )
    with Image.open(io.BytesIO(png)) as im:  # chelsea (451 x 300) -> 109 x 73 -> crop 64 x 64
        assert r.processor.crop_box(451, 300) == (91, 16, 356, 279)
        assert im.size == (356 - 91, 279 - 16)
    for query, reason in [
        ("?method=lrp", "method='lrp'"),
        ("?label=giraffe", "no class named 'giraffe'"),
        ("?head_fusion=median", "head_fusion"),
        ("?discard_ratio=1.5", "discard_ratio"),
    ]:
        status, answer = post_json(server.port, f"/v1/explain{query}", data)
        assert status == 400 and reason in answer["error"], (query, answer)


def test_healthz_metrics_page_and_openapi(server):
    status, _, body = http(server.port, "GET", "/healthz")
    assert status == 200
    assert json.loads(body) == {
        "status": "ok", "model": server.app.state.service.settings.model, "precision": "fp32",
        "runtime": "fp32 on torch (PyTorch, exact)", "device": "cpu", "pid": os.getpid(),
        "input_size": [64, 64], "zero_shot": False, "num_classes": 5, "auth": False,
        "search": None,  # without --index
    }  # fmt: skip

    status, headers, body = http(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "/v1/classify" in page and "/v1/explain" in page
    for external in ("http://", "https://", "//cdn", "@import", "<link"):
        assert external not in page  # self-contained: no scripts, fonts or styles from elsewhere

    status, headers, body = http(server.port, "GET", "/openapi.json")
    assert status == 200 and headers["content-type"] == "application/json"
    spec = json.loads(body)
    assert {"/v1/classify", "/v1/embed", "/v1/explain", "/healthz", "/metrics"} <= set(
        spec["paths"]
    )
    assert "post" in spec["paths"]["/v1/classify"]

    status, headers, body = http(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for family in ("vitkit_requests_total", "vitkit_request_seconds", "vitkit_batch_size"):
        assert f"# TYPE {family} " in text
    m = parse(text)
    assert m['vitkit_requests_total{route="/healthz",status="200"}'] >= 1
    assert m['vitkit_request_seconds_count{route="/healthz"}'] >= 1
    assert m['vitkit_batch_size_bucket{le="+Inf"}'] == m["vitkit_batch_size_count"]


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, photos):
    good = photos["rocket"].read_bytes()
    jpeg = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(jpeg, "JPEG")
    before = metrics(server.port)
    cases = [
        (b"hello, I am not an image" * 10, {}, 400, "not an image file"),
        (jpeg.getvalue()[:3000], {}, 400, "truncated"),
        (png_header(12_000, 12_000), {}, 400, "decompression bomb"),
        (b"", {}, 400, "empty request"),
        (*multipart(good, field="photo"), 400, "send the image as 'file'"),
        (b"--x\r\nnot really multipart", {"Content-Type": "multipart/form-data"}, 400, ""),
    ]
    for body, headers, code, reason in cases:
        status, answer = post_json(server.port, "/v1/classify", body, **headers)
        assert status == code and reason in answer["error"], answer
    status, answer = post_json(server.port, "/v1/classify?top_k=0", good)
    assert status == 400 and "top_k must be at least 1" in answer["error"]
    status, answer = post_json(server.port, "/v1/classify?top_k=five", good)
    assert status == 400 and "not an integer" in answer["error"]
    status, _, body = http(server.port, "POST", "/v1/embed", png_header(12_000, 12_000))
    assert status == 400 and b"decompression bomb" in body
    assert http(server.port, "GET", "/v2/classify")[0] == 404
    assert http(server.port, "GET", "/v1/classify")[0] == 405

    assert post_json(server.port, "/v1/classify", good)[0] == 200  # still serving
    after = metrics(server.port)
    key = 'vitkit_requests_total{route="/v1/classify",status="400"}'
    assert after[key] - before.get(key, 0) == len(cases) + 2
    assert after['vitkit_requests_total{route="other",status="404"}'] >= 1


def test_oversized_bodies_are_refused_while_reading(server):
    # Content-Length over the 1 MB limit: refused before a single body byte is sent
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 50000000\r\n\r\n"
    )
    reply = raw_exchange(server.port, head)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"over the limit of 1 MB" in reply

    # no Content-Length (chunked): counted while streaming, refused after 1.25 MB of a body that
    # would never end (the client sends no terminating chunk)
    head = (
        b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 65536
    chunks = [b"%x\r\n" % len(piece) + piece + b"\r\n"] * 20
    reply = raw_exchange(server.port, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]

    # multipart over the limit too
    body, headers = multipart(b"\0" * (1024 * 1024 + 1))
    assert post_json(server.port, "/v1/classify", body, **headers)[0] == 413


def test_a_burst_is_batched_and_every_answer_equals_the_one_at_a_time_answer(server, photos):
    images = [p.read_bytes() for p in photos.values()]
    alone = [post_json(server.port, "/v1/classify?top_k=5", data)[1] for data in images]
    before = metrics(server.port)

    def one(i):
        return post_json(server.port, "/v1/classify?top_k=5", images[i % len(images)])

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    after = metrics(server.port)
    forwards = after["vitkit_batch_size_count"] - before["vitkit_batch_size_count"]
    batched = after["vitkit_batch_size_sum"] - before["vitkit_batch_size_sum"]
    assert batched == 32
    assert forwards < 32, "no two requests shared a forward pass"
    for i, (status, answer) in enumerate(answers):
        assert status == 200
        want = alone[i % len(images)]
        assert [t["index"] for t in answer["top_k"]] == [t["index"] for t in want["top_k"]]
        got = np.array([t["probability"] for t in answer["top_k"]])
        np.testing.assert_allclose(got, [t["probability"] for t in want["top_k"]], atol=1e-6)


def test_healthz_is_503_until_the_model_is_loaded_and_warm(model_dir, photos, monkeypatch):
    from vitkit.serve.app import Service

    gate = threading.Event()
    load = Service.load

    def slow_load(self):
        gate.wait(TIMEOUT)
        load(self)

    monkeypatch.setattr(Service, "load", slow_load)
    with Server(Settings(model=str(model_dir))) as s:
        status, _, body = http(s.port, "GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "loading"
        status, answer = post_json(s.port, "/v1/classify", photos["rocket"].read_bytes())
        assert status == 503 and "loading" in answer["error"]
        gate.set()
        s.wait_ready()
        assert post_json(s.port, "/v1/classify", photos["rocket"].read_bytes())[0] == 200

    fatal = threading.Event()
    monkeypatch.setattr(Service, "load", load)
    with Server(Settings(model=str(model_dir / "missing")), on_fatal=fatal.set) as s:
        assert fatal.wait(TIMEOUT)
        status, _, body = http(s.port, "GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "failed"
        assert "missing" in json.loads(body)["error"]


def test_sigterm_drains_in_flight_requests_and_exits_0(model_dir, photos):
    port = free_port()
    # a 5 s batching window makes a lone request slow enough to be in flight at SIGTERM
    proc = serve_process(str(model_dir), port, "--max-wait-ms", "5000")
    try:
        wait_workers(proc, port)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post_json, port, "/v1/classify", photos["astronaut"].read_bytes())
            time.sleep(1.5)  # the request is waiting in the batcher
            assert not slow.done()
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status, answer = slow.result(TIMEOUT)
        assert status == 200 and len(answer["top_k"]) == 5
        code = proc.wait(timeout=TIMEOUT)
        assert time.monotonic() - sent < 25  # the drain itself: ~4 s; wide for a busy machine
        assert code == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_serve_the_same_answers_and_a_bad_model_exits_1(model_dir, photos, server):
    """--workers 2: two processes answer like the one-process server, SIGTERM stops both with
    exit 0; a model that cannot be loaded stops the server with exit 1 instead of leaving
    workers that answer 503 forever."""
    body = photos["rocket"].read_bytes()
    expected = post_json(server.port, "/v1/classify", body)[1]["top_k"]
    port = free_port()
    proc = serve_process(str(model_dir), port, "--workers", "2")
    try:
        pids = wait_workers(proc, port, workers=2)  # each worker loaded, not just one
        assert pids <= set(children(proc.pid))
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post_json(port, "/v1/classify", body), range(8)))
        for status, answer in answers:
            assert status == 200
            assert [a["label"] for a in answer["top_k"]] == [a["label"] for a in expected]
            got = [a["probability"] for a in answer["top_k"]]
            assert got == pytest.approx([a["probability"] for a in expected], abs=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    bad = serve_process(str(model_dir / "missing"), free_port(), "--workers", "2")
    try:
        assert bad.wait(timeout=TIMEOUT) == 1
        out = bad.stdout.read().decode()
        assert "vitkit serve: error: cannot load" in out and "Traceback" not in out
    finally:
        if bad.poll() is None:
            bad.kill()
            bad.wait()


# ---------------------------------------------------------------------------------- browser
def test_web_page_in_headless_chromium(server, tmp_path, headless):
    """Upload a real photo through the page and read back what it shows. Set
    VITKIT_SCREENSHOT=path to keep a copy of the screenshot outside the test's tmp dir."""
    sync_api, chromium = headless
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    status, api = post_json(server.port, "/v1/classify?top_k=5", photo.read_bytes())
    assert status == 200

    origin = f"http://127.0.0.1:{server.port}"
    requested = []
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.on("request", lambda r: requested.append(r.url))
            page.goto(origin + "/")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("body[data-state=done]", timeout=TIMEOUT * 1000)
            labels = page.locator("#labels .label").all_inner_texts()
            shown = page.locator("#labels .prob").all_inner_texts()
            widths = page.eval_on_selector_all(
                "#labels .bar span", "spans => spans.map(s => parseFloat(s.style.width))"
            )
            overlay = page.eval_on_selector(
                "#overlay", "img => [img.naturalWidth, img.naturalHeight]"
            )
            caption = page.inner_text("#overlay-caption")
            header = page.inner_text("#model")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("VITKIT_SCREENSHOT"):
        shutil.copyfile(tmp_path / "page.png", os.environ["VITKIT_SCREENSHOT"])

    assert labels == [t["label"] for t in api["top_k"]]
    for text, width, t in zip(shown, widths, api["top_k"]):
        assert float(text.rstrip("%")) == pytest.approx(100 * t["probability"], abs=0.006)
        assert width == pytest.approx(max(0.5, 100 * t["probability"]), abs=0.006)
    left, top, right, bottom = server.app.state.service.processor.crop_box(512, 512)
    assert overlay == [right - left, bottom - top] == [449, 449]  # the centre crop, 0.875
    assert caption == f"attention rollout for {api['top_k'][0]['label']}"
    assert header.endswith(" · fp32 · cpu · 64×64 px"), header  # what /healthz says
    assert requested and all(url.startswith((origin, "blob:")) for url in requested), requested
    with Image.open(tmp_path / "page.png") as im:
        assert im.width == 1200 and im.height >= 400


# ---------------------------------------------------------------------------------- deploy/
def test_deploy_files_agree_with_the_server(server):
    import yaml

    from vitkit.cli.serve import DRAIN_SECONDS

    root = Path(__file__).resolve().parents[1] / "deploy"
    dockerfile = (root / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert 'ENTRYPOINT ["vitkit", "serve"]' in lines
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("0", "root")
    # the image's HEALTHCHECK command, pointed at the test server: 0 when ready
    check = dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n\n")[0]
    argv = json.loads(check.replace("\\\n", " ").strip())
    argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}") for a in argv]
    assert subprocess.run([sys.executable, *argv[1:]], timeout=TIMEOUT).returncode == 0

    docs = list(yaml.safe_load_all((root / "kubernetes" / "vitkit-serve.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["args"][container["args"].index("--port") + 1] == "8000"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    # preStop, the drain, then uvicorn's wait for connections still busy, then exit
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 2 * DRAIN_SECONDS + 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the token is a file from a Secret, readable by the container's user (fsGroup)
    args = container["args"]
    key_file = Path(args[args.index("--api-key-file") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["items"] == [{"key": "api-key", "path": key_file.name}]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # memory covers the queue's uploads (--max-queue x --max-body-mb) on top of the model
    queued_mb = int(args[args.index("--max-queue") + 1]) * float(
        args[args.index("--max-body-mb") + 1]
    )
    request, limit = (container["resources"][k]["memory"] for k in ("requests", "limits"))
    mib = {"Mi": 1, "Gi": 1024}
    assert (
        int(limit[:-2]) * mib[limit[-2:]]
        >= int(request[:-2]) * mib[request[-2:]]
        >= queued_mb + 1024
    )
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_image_size_reaches_the_workers_model_and_preprocessing(model_dir):
    """--image-size travels in the settings (JSON for --workers) to the model each process
    loads: the position table and the processor at that size."""
    from vitkit.serve.app import Service, settings_from_env, settings_to_env

    settings = Settings(model=str(model_dir), image_size=(96, 128))
    again = settings_from_env(settings_to_env(settings))
    assert again == settings and again.image_size == (96, 128)
    service = Service(again)
    service.load()
    assert service.model.pos_embed.shape[1] == 1 + 6 * 8
    assert service.processor.output_hw == (96, 128)
    assert service.describe()["input_size"] == [96, 128]  # what /healthz reports


def test_precision_runs_the_predict_runner(model_dir, photos):
    """--precision goes through vitkit.infer.precision, the runner `vitkit predict` uses."""
    from vitkit.infer.predictor import preprocess
    from vitkit.serve.app import Service

    exact, half = (
        Service(Settings(model=str(model_dir))),
        Service(Settings(model=str(model_dir), precision="fp16", device="cpu")),
    )
    exact.load()
    half.load()
    pixels = torch.stack([preprocess(photos[n], exact.processor) for n in ("coffee", "rocket")])
    p32, p16 = torch.stack(exact.classify_rows(pixels)), torch.stack(half.classify_rows(pixels))
    assert half.runner.precision == "fp16" and half.describe()["precision"] == "fp16"
    assert torch.equal(p32.argmax(1), p16.argmax(1)) and not torch.equal(p32, p16)
    assert (p32 - p16).abs().max() < 1e-2
    e32, e16 = torch.stack(exact.embed_rows(pixels)), torch.stack(half.embed_rows(pixels))
    assert half.embed_runner.precision == "fp16"
    assert (exact.embed_runner.precision, exact.embed_runner.backend) == ("fp32", "torch")
    cos = torch.nn.functional.cosine_similarity(e32, e16)
    assert cos.min() > 0.999 and not torch.equal(e32, e16)
    with pytest.raises(vitkit.ConfigError):
        Settings(model=str(model_dir), precision="int4")
    with pytest.raises(vitkit.ConfigError, match="--backend"):
        Settings(model=str(model_dir), backend="tensorrt")


def test_web_page_asks_for_the_token_and_keeps_it_for_the_tab(model_dir, tmp_path, headless):
    """A server with a token: the page shows the token box (from /healthz's "auth"), a wrong
    token brings it back with the server's reason, the right one classifies and stays in
    sessionStorage."""
    sync_api, chromium = headless
    photo = tmp_path / "rocket.png"
    Image.fromarray(skimage.data.rocket()).save(photo)
    token = "page-test-token-0123456789"
    with Server(Settings(model=str(model_dir), api_key=token)) as s:
        s.wait_ready()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{s.port}/")
                page.wait_for_selector("#token-box:not([hidden])", timeout=TIMEOUT * 1000)
                page.fill("#token", "not-the-token-at-all")
                page.click("#token-box button")
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("body[data-state=needs-token]", timeout=TIMEOUT * 1000)
                wrong = page.inner_text("#status")
                assert page.is_visible("#token-box")
                page.fill("#token", token)
                page.click("#token-box button")
                page.wait_for_selector("body[data-state=done]", timeout=TIMEOUT * 1000)
                labels = page.locator("#labels .label").all_inner_texts()
                stored = page.evaluate("sessionStorage.getItem('vitkit-serve-token')")
                hidden = page.is_hidden("#token-box")
            finally:
                browser.close()
    assert wrong == "wrong access token"
    assert len(labels) == 5 and set(labels) <= set(LABELS.values())
    assert stored == token and hidden
