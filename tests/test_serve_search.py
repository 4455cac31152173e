"""`vitkit serve --index`: /v1/search answers an image or a text with the nearest indexed
photos, /v1/thumbnail shows indexed photos and nothing else, an index of another model is
refused at load, and the page searches in a real browser."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import urllib.parse

import pytest
from PIL import Image

from conftest import TIMEOUT, Server, http, multipart
from test_search import NAMES, _model, _photos
from vitkit.cli import main

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """(model folder, photos folder, index folder) of the tiny encoder over six photos."""
    root = tmp_path_factory.mktemp("serve-search")
    model, photos = _model(root / "model"), _photos(root / "photos")
    assert main(["index", str(photos), "--model", str(model), "--output", str(root / "idx")]) == 0
    return model, photos, root / "idx"


def _settings(model, index, **changes):
    from vitkit.serve.app import Settings

    return Settings(model=str(model), index=str(index), max_batch=2, max_wait_ms=1, **changes)


def _search(port, body: bytes | None = None, query: str = "", **headers):
    if body is not None:
        body, form = multipart(body)
        headers.update(form)
    status, _, data = http(port, "POST", f"/v1/search{query}", body, headers)
    return status, json.loads(data)


def _thumbnail(port, path: str):
    return http(port, "GET", "/v1/thumbnail?path=" + urllib.parse.quote(path))


def test_search_finds_the_photo_and_thumbnails_show_only_indexed_files(indexed, tmp_path):
    model, photos, idx = indexed
    with Server(_settings(model, idx)) as server:
        server.wait_ready()
        _, _, health = http(server.port, "GET", "/healthz")
        assert json.loads(health)["search"] == {"images": 6, "kind": "exact", "text": False}
        for name in NAMES:
            status, answer = _search(server.port, (photos / f"{name}.png").read_bytes(), "?k=3")
            assert status == 200 and len(answer["results"]) == 3
            assert answer["results"][0]["path"] == str(photos / f"{name}.png")
            assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        status, answer = _search(server.port, (photos / "coins.png").read_bytes())
        assert len(answer["results"]) == 6  # k=12 by default, six photos in the index
        for query, words in (("?k=0", "at least 1"), ("?k=101", "at most 100"),
                             ("?k=x", "not an integer")):  # fmt: skip
            status, answer = _search(server.port, (photos / "coins.png").read_bytes(), query)
            assert status == 400 and words in answer["error"], answer
        status, answer = _search(server.port, None, "?text=a%20rocket")
        assert status == 400 and "no text search" in answer["error"]
        status, answer = _search(server.port, b"not an image")
        assert status == 400

        status, headers, jpeg = _thumbnail(server.port, str(photos / "rocket.png"))
        assert status == 200 and headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.format == "JPEG" and max(im.size) == 256
        # nothing but the index's own files, by their exact path
        other = photos / "not_indexed.png"
        shutil.copyfile(photos / "rocket.png", other)
        for path in ("/etc/passwd", str(other), str(photos / ".." / "photos" / "rocket.png"),
                     "photos/rocket.png", ""):  # fmt: skip
            status, _, body = _thumbnail(server.port, path)
            assert status == 404 and b"not a photo of this server's index" in body, path
        # an indexed file changed, or swapped for a link to another file, since it was indexed
        copy, st = tmp_path / "coffee.png", os.stat(photos / "coffee.png")
        shutil.copyfile(photos / "coffee.png", copy)
        try:
            os.utime(photos / "coffee.png", ns=(time.time_ns(), time.time_ns() - 10**9))
            assert _thumbnail(server.port, str(photos / "coffee.png"))[0] == 410
            (photos / "coffee.png").unlink()
            (photos / "coffee.png").symlink_to("/etc/passwd")
            status, _, body = _thumbnail(server.port, str(photos / "coffee.png"))
            assert status == 410 and b"root:" not in body
        finally:
            (photos / "coffee.png").unlink()
            shutil.copyfile(copy, photos / "coffee.png")
            os.utime(photos / "coffee.png", ns=(st.st_atime_ns, st.st_mtime_ns))  # as indexed
            other.unlink()


def test_the_token_guards_search_and_thumbnails(indexed):
    model, photos, idx = indexed
    key = "a-test-token-of-enough-length"
    with Server(_settings(model, idx, api_key=key)) as server:
        server.wait_ready()
        assert _search(server.port, (photos / "rocket.png").read_bytes())[0] == 401
        assert _thumbnail(server.port, str(photos / "rocket.png"))[0] == 401
        status, answer = _search(server.port, (photos / "rocket.png").read_bytes(),
                                 Authorization=f"Bearer {key}")  # fmt: skip
        assert status == 200 and answer["results"][0]["path"] == str(photos / "rocket.png")


def test_a_server_without_an_index_and_an_index_of_another_model(indexed, tmp_path):
    from vitkit.serve.app import Settings

    model, photos, idx = indexed
    with Server(Settings(model=str(model), max_batch=2)) as server:
        server.wait_ready()
        status, answer = _search(server.port, (photos / "rocket.png").read_bytes())
        assert status == 404 and "--index" in answer["error"]
        assert _thumbnail(server.port, str(photos / "rocket.png"))[0] == 404
    other = _model(tmp_path / "other", seed=1)
    with Server(_settings(other, idx)) as server:
        deadline = time.monotonic() + TIMEOUT
        while (health := json.loads(http(server.port, "GET", "/healthz")[2]))["status"] != "failed":
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert "another model" in health["error"] and "weights differ" in health["error"]
    # the CLI checks the folder before it starts: one line, no traceback
    assert main(["serve", "--model", str(model), "--index", str(tmp_path / "nowhere")]) == 1


def test_text_search_ranks_as_the_search_command(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from test_zero_shot import _clip_folder

    clip = _clip_folder(tmp_path / "clip")
    photos = _photos(tmp_path / "photos", NAMES[:4])
    assert main(["index", str(photos), "-m", str(clip), "-o", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--text", "a rocket", "-k", "4", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["results"][0]["results"]
    with Server(_settings(clip, tmp_path / "idx")) as server:
        server.wait_ready()
        assert json.loads(http(server.port, "GET", "/healthz")[2])["search"]["text"] is True
        status, answer = _search(server.port, None, "?k=4&text=a%20rocket")
        assert status == 200
        assert [r["path"] for r in answer["results"]] == [r["path"] for r in expected]
        assert [r["score"] for r in answer["results"]] == pytest.approx(
            [r["score"] for r in expected], abs=1e-5
        )
        status, answer = _search(server.port, (photos / "rocket.png").read_bytes(), "?text=x")
        assert status == 400 and "not both" in answer["error"]


def test_the_page_searches_in_headless_chromium(indexed, tmp_path, headless):
    sync_api, chromium = headless
    model, photos, idx = indexed
    with Server(_settings(model, idx)) as server:
        server.wait_ready()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(f"http://127.0.0.1:{server.port}/")
                page.wait_for_selector("#search:not([hidden])", timeout=TIMEOUT * 1000)
                size = page.text_content("#search-size")
                text_form_hidden = page.eval_on_selector("#search-form", "f => f.hidden")
                page.set_input_files("#file", str(photos / "rocket.png"))
                page.wait_for_selector("body[data-state=done]", timeout=TIMEOUT * 1000)
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#results img')]"
                    ".every(i => i.complete && i.naturalWidth > 0)",
                    timeout=TIMEOUT * 1000,
                )
                shown = page.eval_on_selector_all(
                    "#results figure", "fs => fs.map(f => f.dataset.path)"
                )
                captions = page.locator("#results figcaption").all_inner_texts()
                widths = page.eval_on_selector_all(
                    "#results img", "is => is.map(i => Math.max(i.naturalWidth, i.naturalHeight))"
                )
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            finally:
                browser.close()
    if os.environ.get("VITKIT_SCREENSHOT"):
        shutil.copyfile(tmp_path / "page.png", os.environ["VITKIT_SCREENSHOT"])
    assert size == "(6 photos)" and text_form_hidden is True
    assert shown[0] == str(photos / "rocket.png") and sorted(shown) == sorted(
        str(photos / f"{n}.png") for n in NAMES
    )
    assert captions[0].startswith("rocket.png · 1.000") and widths == [256] * 6
