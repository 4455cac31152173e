"""Zero-shot classification with CLIP and SigLIP folders made by transformers (random weights,
real tokenizers): `vitkit predict --labels` equals transformers' zero-shot pipeline, and
`eval --zero-shot`, `embed --text` and `serve` answer from the same text embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from conftest import train_spiece
from vitkit.checkpoints.resolve import resolve
from vitkit.cli import main
from vitkit.infer.zero_shot import ZeroShotClassifier, encode_texts, text_tower
from vitkit.tokenizer import write_clip_vocab

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

LABELS = ["astronaut", "cat", "cup of coffee", "rocket", "red car"]
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _clip_folder(root):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(TEXT, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407),
        vision_config=VISION, projection_dim=16,
    )  # fmt: skip
    transformers.CLIPModel(config).eval().save_pretrained(root)
    transformers.CLIPTokenizer.from_pretrained(write_clip_vocab(root / "vocab")).save_pretrained(
        root
    )
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(root)
    return root


def _siglip_folder(root):
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(TEXT, vocab_size=800, max_position_embeddings=64),
        vision_config=VISION,
    )  # fmt: skip
    transformers.SiglipModel(config).eval().save_pretrained(root)
    (root / "spiece.model").write_bytes(train_spiece())
    transformers.SiglipTokenizer(vocab_file=str(root / "spiece.model")).save_pretrained(root)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.fixture(scope="module", params=["clip", "siglip"])
def folder(request, tmp_path_factory):
    make = _clip_folder if request.param == "clip" else _siglip_folder
    return make(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _clip_folder(tmp_path_factory.mktemp("clip_only"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(root / f"{name}.png")
    return root


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ predict
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_predict_equals_the_transformers_pipeline(capsys, folder, photos):
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    paths = sorted(photos.iterdir())
    want = [{d["label"]: d["score"] for d in pipe(str(p), candidate_labels=LABELS)} for p in paths]
    code, out, err = _run(capsys, "predict", photos, "--model", folder, "--labels", *LABELS, "--json",
                          "--top-k", len(LABELS), "--batch-size", 3)  # fmt: skip
    assert code == 0, err
    got = [{t["label"]: t["probability"] for t in json.loads(line)["top_k"]}
           for line in out.splitlines()]  # fmt: skip
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert max(abs(g[k] - w[k]) for k in w) < 1e-4
    sums = [sum(g.values()) for g in got]  # softmax over the labels, or a sigmoid each
    if "siglip" in folder.name:
        assert not all(abs(s - 1) < 1e-3 for s in sums)
    else:
        assert all(abs(s - 1) < 1e-5 for s in sums)


def test_text_embeddings_are_computed_once_per_run(capsys, clip, photos, monkeypatch):
    from vitkit.models.text import TextTransformer

    calls = []
    forward = TextTransformer.forward
    monkeypatch.setattr(TextTransformer, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))  # fmt: skip
    code, _, err = _run(
        capsys, "predict", photos, "--model", clip, "--labels", *LABELS, "--batch-size", 1
    )
    assert code == 0, err
    assert len(calls) == 1  # one pass for the 5 prompts, not one per batch of images


def test_a_prompt_ensemble_is_the_normalised_mean(clip):
    resolved = resolve(clip, text=True)
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    classifier = ZeroShotClassifier(resolved.image_text, resolved.tokenizer, LABELS, templates)
    each = [encode_texts(resolved.image_text.text, resolved.tokenizer,
                         [t.format(label) for label in LABELS]) for t in templates]  # fmt: skip
    want = torch.nn.functional.normalize(torch.stack(each).mean(0), dim=-1)
    torch.testing.assert_close(classifier.text_embeds, want, rtol=0, atol=1e-6)
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # the templates do differ
    assert classifier.config.id2label == dict(enumerate(LABELS))


def test_bf16_text_tower_stays_close_to_fp32(clip):
    resolved = resolve(clip, text=True)
    texts = [f"This is a photo of {label}." for label in LABELS]
    fp32 = encode_texts(text_tower(resolved.image_text), resolved.tokenizer, texts)
    bf16 = encode_texts(text_tower(resolved.image_text, torch.bfloat16), resolved.tokenizer, texts)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.99
    assert next(resolved.image_text.text.parameters()).dtype == torch.float32  # a copy ran


# ------------------------------------------------------------------------------ eval, embed
def test_eval_zero_shot_scores_the_class_names(capsys, clip, tmp_path):
    root = tmp_path / "data"
    names = {"astronaut": "astronaut", "coffee": "cup_of_coffee", "rocket": "rocket"}
    for photo, cls in names.items():
        (root / cls).mkdir(parents=True)
        image = Image.fromarray(getattr(skimage.data, photo)()[..., :3])
        for i in range(2):
            image.rotate(90 * i).save(root / cls / f"{i}.png")
    code, out, err = _run(capsys, "eval", "--zero-shot", "--model", clip, "--data", root,
                          "--output", tmp_path / "report")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    # the same answer from the pipeline, whose labels read the folder names with spaces
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(clip), device="cpu")
    labels = [n.replace("_", " ") for n in sorted(names.values())]
    right = 0
    for cls in sorted(names.values()):
        for path in sorted((root / cls).iterdir()):
            best = pipe(str(path), candidate_labels=labels)[0]["label"]
            right += best == cls.replace("_", " ")
    assert metrics["top1"] == pytest.approx(right / 6)
    assert "cup_of_coffee" in out and "top-1" in out


def test_embed_text_writes_the_text_features(capsys, clip, tmp_path):
    out_file = tmp_path / "text.npy"
    texts = ["a cat", "a red car\non two lines"]
    code, _out, err = _run(capsys, "embed", "--text", *texts, "--model", clip, "-o", out_file)
    assert code == 0, err
    rows = np.load(out_file)
    model = transformers.CLIPModel.from_pretrained(clip).eval()
    tok = transformers.AutoTokenizer.from_pretrained(clip)
    with torch.no_grad():
        want = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    want = getattr(want, "pooler_output", want)
    np.testing.assert_allclose(rows, want.numpy(), atol=1e-5)
    assert (tmp_path / "text.npy.texts.txt").read_text().splitlines() == [
        "a cat", "a red car on two lines"]  # fmt: skip
    # images and texts share the space: an image row has the same width
    code, _, err = _run(capsys, "embed", tmp_path.parent, "--text", "x", "--model", clip,
                        "-o", tmp_path / "both.npy")  # fmt: skip
    assert code != 0 and "one kind per run" in err


# ------------------------------------------------------------------------------ errors
def test_clear_errors(capsys, clip, photos, tmp_path):
    import vitkit

    vit = tmp_path / "vit"
    vitkit.save_pretrained(vitkit.create_model("vit_tiny_patch16_224", num_classes=3, depth=1,
                                               image_size=32), vit)  # fmt: skip
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (bare / name).write_bytes((clip / name).read_bytes())
    cases = [
        (["--model", vit, "--labels", "cat"], "text tower"),
        (["--model", bare, "--labels", "cat"], "tokenizer"),
        (["--model", clip, "--labels", "cat", " "], "empty"),
        (["--model", clip, "--labels", "cat", "cat"], "twice"),
        (["--model", clip, "--labels", "cat", "--labels-file", tmp_path / "x"], "not both"),
        (["--model", clip, "--labels", "cat", "--template", "a photo"], "{}"),
    ]
    for args, words in cases:
        code, _out, err = _run(capsys, "predict", photos, *args)
        assert code != 0 and words in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_more_labels_than_the_limit(capsys, clip, photos, monkeypatch):
    monkeypatch.setenv("VITKIT_MAX_CLASSES", "3")
    code, _, err = _run(capsys, "predict", photos, "--model", clip, "--labels", "a", "b", "c", "d")
    assert code != 0 and "number of labels=4" in err and "VITKIT_MAX_CLASSES" in err


# ------------------------------------------------------------------------------ serve
def _form(fields: list[tuple[str, str]], image: bytes | None = None):
    """A multipart body with text fields (and the image as `file`)."""
    boundary = "vitkit-zero-shot"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields]  # fmt: skip
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     'filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + image + b"\r\n")  # fmt: skip
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def clip_server(clip):
    pytest.importorskip("uvicorn")
    pytest.importorskip("multipart")
    from conftest import Server
    from vitkit.serve.app import Settings

    with Server(Settings(model=str(clip), max_labels=4, max_text_chars=40)) as s:
        s.wait_ready()
        yield s


def test_serve_classifies_by_labels_and_embeds_text(capsys, clip, clip_server, photos):
    from urllib.parse import urlencode

    from conftest import post_json

    port, photo = clip_server.port, (photos / "coffee.png").read_bytes()
    _, out, _ = _run(capsys, "predict", photos / "coffee.png", "--model", clip, "--json",
                     "--labels", *LABELS[:4], "--top-k", 4)  # fmt: skip
    want = {t["label"]: t["probability"] for t in json.loads(out)["top_k"]}
    query = urlencode([("labels", label) for label in LABELS[:4]] + [("top_k", 4)])
    for path, body, headers in [
        (f"/v1/classify?{query}", photo, {}),
        ("/v1/classify?top_k=4", *_form([("labels", label) for label in LABELS[:4]], photo)),
    ]:
        status, answer = post_json(port, path, body, **headers)
        assert status == 200, answer
        got = {t["label"]: t["probability"] for t in answer["top_k"]}
        assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in got) < 1e-5

    out_file = photos.parent / "serve_text.npy"
    _run(capsys, "embed", "--text", "a red car", "--model", clip, "-o", out_file, "--overwrite")
    status, answer = post_json(port, "/v1/embed?text=a%20red%20car", b"")
    assert status == 200 and answer["dim"] == 16
    np.testing.assert_allclose(answer["embedding"], np.load(out_file)[0], atol=1e-6)
    status, image = post_json(port, "/v1/embed", photo)
    assert status == 200 and image["dim"] == 16  # images and texts in one space

    too_many = urlencode([("labels", f"l{i}") for i in range(5)])
    for path, body, words in [
        (f"/v1/classify?{too_many}", photo, "5 labels, over the limit of 4"),
        ("/v1/classify?labels=cat&labels=", photo, "empty"),
        ("/v1/classify?labels=cat&labels=cat", photo, "twice"),
        ("/v1/classify?labels=" + "x" * 41, photo, "over the limit of 40"),
        ("/v1/classify", photo, "send labels"),
        ("/v1/embed?text=" + "y" * 41, b"", "41 characters"),
        ("/v1/embed?text=hi", photo, "not both"),
    ]:
        status, answer = post_json(port, path, body)
        assert status == 400 and words in answer["error"], (path, answer)
    status, _ = post_json(port, f"/v1/classify?{query}", photo)
    assert status == 200  # still serving


def test_serve_labels_on_a_model_without_text_tower(tmp_path, photos):
    pytest.importorskip("uvicorn")
    import vitkit
    from conftest import Server, post_json
    from vitkit.serve.app import Settings

    vit = tmp_path / "vit"
    vitkit.save_pretrained(vitkit.create_model("vit_tiny_patch16_224", num_classes=3, depth=1,
                                               image_size=32), vit)  # fmt: skip
    with Server(Settings(model=str(vit))) as s:
        s.wait_ready()
        photo = (photos / "rocket.png").read_bytes()
        status, answer = post_json(s.port, "/v1/classify?labels=cat", photo)
        assert status == 400 and "no text tower" in answer["error"]
        status, answer = post_json(s.port, "/v1/embed?text=cat", b"")
        assert status == 400 and "no text tower" in answer["error"]
        status, answer = post_json(s.port, "/v1/classify", photo)
        assert status == 200 and len(answer["top_k"]) == 3


def test_web_page_labels_box_in_headless_chromium(clip_server, photos, tmp_path):
    import os
    import shutil

    from conftest import TIMEOUT

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    origin = f"http://127.0.0.1:{clip_server.port}"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(origin + "/")
            page.wait_for_selector("#zero-shot:not([hidden])", timeout=TIMEOUT * 1000)
            page.set_input_files("#file", str(photos / "astronaut.png"))
            page.wait_for_selector("body[data-state=done]", timeout=TIMEOUT * 1000)
            before = page.locator("#labels li").all_inner_texts()
            page.fill("#labels-input", "astronaut, cat\nrocket")
            page.evaluate("document.body.dataset.state = 'idle'")
            page.click("#classify")
            page.wait_for_selector("body[data-state=done]", timeout=TIMEOUT * 1000)
            labels = page.locator("#labels .label").all_inner_texts()
            shown = page.locator("#labels .prob").all_inner_texts()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("VITKIT_SCREENSHOT"):
        shutil.copyfile(tmp_path / "page.png", os.environ["VITKIT_SCREENSHOT"])
    assert before == ["Type labels to classify this image zero-shot."]
    assert sorted(labels) == ["astronaut", "cat", "rocket"]
    assert sum(float(t.rstrip("%")) for t in shown) == pytest.approx(100, abs=0.02)
