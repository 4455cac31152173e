"""`vitkit index` / `vitkit search` (vitkit.search): a query image finds its own file first, a
flipped or resized copy is a near-duplicate, updates embed only what changed, a run killed with
SIGKILL leaves the old index and its rerun equals an uninterrupted run, another model is refused,
a bad folder gets one line, and text queries rank as transformers' CLIP features do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps

import vitkit
from conftest import SRC, free_port
from vitkit.cli import main
from vitkit.search import SearchIndexError, exact_search, open_index

NAMES = ("astronaut", "rocket", "camera", "immunohistochemistry", "coffee", "coins")


def _photo(name: str) -> Image.Image:
    a = getattr(skimage.data, name)()
    return Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])


def _model(root, seed: int = 0):
    torch.manual_seed(seed)
    model = vitkit.create_model("vit_tiny_patch4_32", num_classes=0, embed_dim=32, depth=2,
                                num_heads=2, global_pool="avg")  # fmt: skip
    vitkit.save_pretrained(model, root)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("tiny"))


def _photos(folder, names=NAMES):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        _photo(name).save(folder / f"{name}.png")
    return folder


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_query_image_finds_its_own_file_first(capsys, tiny, tmp_path):
    photos = _photos(tmp_path / "photos")
    (photos / "zz_bad.png").write_bytes(b"not an image")
    code, out, err = _run(capsys, "index", photos, "--model", tiny, "--output", tmp_path / "idx",
                          "--batch-size", "4")  # fmt: skip
    assert code == 1 and "zz_bad.png" in err  # reported and skipped, never fatal
    assert "6 images, exact search; added 6, changed 0, unchanged 0, removed 0" in out
    code, out, _ = _run(capsys, "search", tmp_path / "idx", *(photos / f"{n}.png" for n in NAMES),
                        "-k", "3", "--json")  # fmt: skip
    results = json.loads(out)["results"]
    assert code == 0 and [r["results"][0]["path"] for r in results] == [
        str(photos / f"{n}.png") for n in NAMES
    ]
    assert all(abs(r["results"][0]["score"] - 1) < 1e-5 for r in results)
    # the folder is plain numpy: rows are the model's L2-normalised embeddings, in paths.txt order
    index = open_index(tmp_path / "idx")
    rows = np.load(tmp_path / "idx" / index.manifest["generation"] / "embeddings.npy")
    r = vitkit.resolve(tiny)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(r.model(r.processor(index.paths)).pooler_output)
    np.testing.assert_allclose(rows, expected.numpy(), rtol=1e-5, atol=1e-6)
    # a query image that cannot be read is reported; the others are answered
    code, out, err = _run(capsys, "search", tmp_path / "idx", photos / "zz_bad.png",
                          photos / "rocket.png", "-k", "1")  # fmt: skip
    assert code == 1 and "zz_bad.png" in err and out.strip().endswith(str(photos / "rocket.png"))


def test_flipped_and_resized_copies_are_near_duplicates(capsys, tiny, tmp_path):
    photos = _photos(tmp_path / "photos", NAMES[:4])
    ImageOps.mirror(_photo("astronaut")).save(photos / "astronaut_flipped.png")
    rocket = _photo("rocket")
    rocket.resize((rocket.width // 2, rocket.height // 2)).save(photos / "rocket_half.png")
    assert _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "idx")[0] == 0
    code, out, _ = _run(capsys, "search", tmp_path / "idx", "--duplicates", "--threshold", "0.95",
                        "--json")  # fmt: skip
    groups = [sorted(os.path.basename(p) for p in g) for g in json.loads(out)["groups"]]
    assert code == 0 and sorted(groups) == [["astronaut.png", "astronaut_flipped.png"],
                                            ["rocket.png", "rocket_half.png"]]  # fmt: skip
    code, out, _ = _run(capsys, "search", tmp_path / "idx", photos / "astronaut_flipped.png",
                        "-k", "2")  # fmt: skip
    assert [line.split()[1] for line in out.splitlines()] == [
        str(photos / "astronaut_flipped.png"), str(photos / "astronaut.png")]  # fmt: skip


def test_an_update_embeds_only_new_and_changed_files(capsys, tiny, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos")
    idx = tmp_path / "idx"
    assert _run(capsys, "index", photos, "-m", tiny, "-o", idx)[0] == 0
    first = open_index(idx)
    _photo("chelsea").save(photos / "chelsea.png")  # added
    _photo("coins").rotate(90).save(photos / "coffee.png")  # changed (content and size)
    (photos / "camera.png").unlink()  # removed
    import vitkit.infer.embed as embed

    embedded: list[str] = []
    real = embed.expand_inputs
    monkeypatch.setattr(embed, "expand_inputs", lambda xs: (embedded.extend(xs), real(xs))[1])
    code, out, _ = _run(capsys, "index", "-m", tiny, "-o", idx)  # the folders of the last run
    assert code == 0 and "added 1, changed 1, unchanged 4, removed 1" in out
    assert sorted(os.path.basename(p) for p in embedded) == ["chelsea.png", "coffee.png"]
    index = open_index(idx)
    assert sorted(os.path.basename(p) for p in index.paths) == sorted(
        ["astronaut.png", "rocket.png", "immunohistochemistry.png", "coffee.png", "coins.png",
         "chelsea.png"])  # fmt: skip
    same = index.row(str(photos / "rocket.png"))
    np.testing.assert_array_equal(index.embeddings[same],
                                  first.embeddings[first.row(str(photos / "rocket.png"))])  # fmt: skip
    assert index.row(str(photos / "camera.png")) is None  # dropped: the server may not show it
    swept = sorted(p.name for p in idx.iterdir())  # the old generation is gone
    assert swept == [".lock", index.manifest["generation"], "manifest.json"]
    embedded.clear()
    code, out, _ = _run(capsys, "index", photos, "-m", tiny, "-o", idx)
    assert "added 0, changed 0, unchanged 6, removed 0" in out and embedded == []


_SLOW_INDEX = """
import sys, time
from vitkit import resolve
from vitkit.search import update_index
update_index(sys.argv[1], [sys.argv[2]], resolve(sys.argv[3]),
             chunk_size=2, batch_size=2, on_chunk=lambda n: time.sleep(0.5))
"""


def test_a_killed_run_keeps_the_old_index_and_its_rerun_equals_a_clean_run(capsys, tiny, tmp_path):
    names = (*NAMES, "chelsea", "clock", "brick", "grass")
    photos = _photos(tmp_path / "photos", names[:2])
    idx, clean = tmp_path / "idx", tmp_path / "clean"
    assert _run(capsys, "index", photos, "-m", tiny, "-o", idx)[0] == 0
    _photos(photos, names[2:])
    shutil.copytree(idx, clean)  # the same start, for the uninterrupted run
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INDEX, str(idx), str(photos), str(tiny)],
                            env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    deadline = time.time() + 120
    staged = lambda: list((idx / "staging").glob("chunk-*.npz"))  # noqa: E731
    while len(staged()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(staged()) in (2, 3)  # killed mid-run: 4 of 8 new images embedded (or 6)
    old = open_index(idx)  # the previous index, whole and searchable
    assert len(old) == 2 and old.search(old.embeddings[1:2], 1)[1][0, 0] == 1
    code, out, _ = _run(capsys, "index", photos, "-m", tiny, "-o", idx, "--chunk-size", "2")
    counts = out.split("; ", 1)[1]
    assert code == 0 and "added 8, changed 0, unchanged 2, removed 0" in counts
    reused = int(counts.split("(")[1].split()[0])
    assert reused in (4, 6) and not (idx / "staging").exists()
    assert _run(capsys, "index", photos, "-m", tiny, "-o", clean)[0] == 0
    a, b = open_index(idx), open_index(clean)
    assert a.paths == b.paths and np.array_equal(a.stats, b.stats)
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)
    assert a.identity == b.identity and a.kind == b.kind == "exact"


def test_torchrun_processes_index_what_one_process_indexes(capsys, tiny, tmp_path):
    """Two torchrun processes each embed their share of the list; rank 0 writes one index,
    equal to a one-process run's (an odd count: the shares differ in size)."""
    photos = _photos(tmp_path / "photos", NAMES[:5])

    def torchrun(model):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "vitkit",
             "index", str(photos), "-m", str(model), "-o", str(tmp_path / "two"),
             "--chunk-size", "2"],
            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    p = torchrun(tiny)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("added 5, changed 0") == 1  # rank 0 alone reports
    assert _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "one")[0] == 0
    a, b = open_index(tmp_path / "two"), open_index(tmp_path / "one")
    assert a.paths == b.paths and np.array_equal(a.stats, b.stats)
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-6)
    assert a.identity == b.identity
    # rank 0 refuses another model's update; the other rank, waiting for the plan, is told
    # (within the timeout: it does not hang) and the index is left as it was
    p = torchrun(_model(tmp_path / "other", seed=1))
    assert p.returncode != 0 and "another model" in p.stderr
    assert p.stderr.count("another model") == 1, p.stderr[-3000:]
    assert open_index(tmp_path / "two").paths == a.paths


def test_another_model_is_refused_saying_which(capsys, tiny, tmp_path):
    photos = _photos(tmp_path / "photos", NAMES[:2])
    other = _model(tmp_path / "other", seed=1)
    assert _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "idx")[0] == 0
    for args in (["index", photos, "-m", other, "-o", tmp_path / "idx"],
                 ["search", tmp_path / "idx", photos / "rocket.png", "-m", other]):  # fmt: skip
        code, _, err = _run(capsys, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert str(tiny) in err and str(other) in err and "another model" in err
    code, _, err = _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "idx", "--pool",
                        "cls")  # fmt: skip
    assert code == 1 and "pool" in err  # the same weights, pooled otherwise: other rows too
    # a folder of the user's that is not an index is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "mine")
    assert code == 1 and "not a vitkit index" in err
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]


def test_a_bad_index_folder_gets_one_line(capsys, tiny, tmp_path):
    photos = _photos(tmp_path / "photos", NAMES[:2])
    good = tmp_path / "good"
    assert _run(capsys, "index", photos, "-m", tiny, "-o", good)[0] == 0

    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder, folder / open_index(good).manifest["generation"])
        code, out, err = _run(capsys, "search", folder, photos / "rocket.png")
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        with pytest.raises(SearchIndexError):
            open_index(folder)
        return err

    def manifest(**changes):
        def change(folder, _):
            m = json.loads((folder / "manifest.json").read_text())
            (folder / "manifest.json").write_text(json.dumps({**m, **changes}))

        return change

    def truncate(name, keep):
        def change(_, gen):
            data = (gen / name).read_bytes()
            (gen / name).write_bytes(data[:keep])

        return change

    assert "newer than this vitkit" in broken("v99", manifest(version=99))
    assert "unknown format version" in broken("vx", manifest(version="1"))
    assert "truncated" in broken("rows", truncate("embeddings.npy", -8))
    assert "truncated" in broken("manifest", lambda f, _: (f / "manifest.json").write_text('{"fo'))
    assert "generation" in broken("escape", manifest(generation="../photos"))
    assert "not a vitkit search index" in broken(
        "empty", lambda f, _: (f / "manifest.json").unlink()
    )
    nan = broken("nan", lambda _, g: _write_rows(g, np.full((2, 32), np.nan, np.float32)))
    assert "not finite" in nan


def _write_rows(gen, rows):
    with open(gen / "embeddings.npy", "wb") as f:
        np.save(f, rows)  # same size: only the values are bad


def test_hnsw_above_the_size_threshold_agrees_with_exact_search(capsys, tiny, tmp_path):
    pytest.importorskip("faiss")
    photos = _photos(tmp_path / "photos")
    code, out, _ = _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "idx",
                        "--exact-below", "4")  # fmt: skip
    assert code == 0 and "6 images, HNSW graph (FAISS)" in out
    index = open_index(tmp_path / "idx")
    assert (
        index.kind == "hnsw"
        and (tmp_path / "idx" / index.manifest["generation"] / "index.faiss").is_file()
    )
    scores, rows = index.search(index.embeddings, 6)
    want_s, want_r = exact_search(index.embeddings, np.asarray(index.embeddings), 6)
    np.testing.assert_array_equal(rows, want_r)  # 6 rows: the graph visits them all
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    _, r = index.search(index.embeddings[:1], 10)  # k beyond the index: padded with -1
    assert list(r[0, 6:]) == [-1] * 4 and r[0, 0] == 0
    # an update that only adds files extends the graph: the old rows keep their numbers
    _photos(photos, ["chelsea"])
    assert _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "idx")[0] == 0
    bigger = open_index(tmp_path / "idx")
    assert bigger.paths == [*index.paths, str(photos / "chelsea.png")]
    assert bigger.search(bigger.embeddings[-1:], 1)[1][0, 0] == 6


def test_text_queries_rank_as_transformers_clip_features(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_zero_shot import _clip_folder

    clip = _clip_folder(tmp_path / "clip")
    photos = _photos(tmp_path / "photos", NAMES[:4])
    assert _run(capsys, "index", photos, "-m", clip, "-o", tmp_path / "idx")[0] == 0
    code, out, _ = _run(capsys, "search", tmp_path / "idx", "--text", "a rocket", "-k", "4",
                        "--json")  # fmt: skip
    hits = json.loads(out)["results"][0]["results"]
    peer = transformers.CLIPModel.from_pretrained(clip).eval()
    tokens = transformers.CLIPTokenizer.from_pretrained(clip)(["a rocket"], return_tensors="pt")
    pixels = transformers.CLIPImageProcessor.from_pretrained(clip)(
        [Image.open(h["path"]) for h in hits], return_tensors="pt").pixel_values  # fmt: skip
    with torch.no_grad():
        t = _features(peer.get_text_features(**tokens))
        i = _features(peer.get_image_features(pixel_values=pixels))
    expected = (i @ t.T)[:, 0]
    assert code == 0 and len(hits) == 4
    np.testing.assert_allclose([h["score"] for h in hits], expected.numpy(), atol=1e-4)
    assert list(expected) == sorted(expected, reverse=True)  # best first
    code, _, err = _run(capsys, "search", tmp_path / "idx", photos / "rocket.png", "--text", "x")
    assert code == 1 and "one of them" in err


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object, 4 a tensor: the normalised features either way."""
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


@pytest.mark.parametrize(
    "argv",
    [
        ["index", "--help"],
        ["search", "--help"],
        ["index", "photos/", "-o", "idx/"],
        ["search", "idx/", "q.jpg", "--duplicates"],
    ],
)
def test_the_commands_answer_help_and_argument_errors_without_torch_or_faiss(argv):
    code = (
        "import sys\nfrom vitkit.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'faiss') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "[]", (done.stdout[-300:], done.stderr[-300:])


def test_without_faiss_search_is_exact_with_a_note(capsys, tiny, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos", NAMES[:3])
    hnsw = tmp_path / "hnsw"
    if pytest.importorskip("faiss"):
        assert _run(capsys, "index", photos, "-m", tiny, "-o", hnsw, "--exact-below", "2")[0] == 0
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
    code, out, err = _run(capsys, "index", photos, "-m", tiny, "-o", tmp_path / "idx",
                          "--exact-below", "2")  # fmt: skip
    assert code == 0 and "3 images, exact search" in out and "faiss is not installed" in err
    code, out, err = _run(capsys, "search", hnsw, photos / "rocket.png", "-k", "1")
    assert code == 0 and out.split()[1] == str(photos / "rocket.png")
    assert "faiss is not installed: searching all rows exactly" in err
