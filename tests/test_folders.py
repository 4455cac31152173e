import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from conftest import cifar_batch, dump_pickle, png_header
from vitkit.data.folders import (
    CIFARDataset,
    ImageFolderDataset,
    ImageListDataset,
    read_cifar_pickle,
)
from vitkit.errors import VitkitError


def _png(path, color, size=(6, 5), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    _png(root / "dog" / "a.png", (0, 255, 0))
    _png(root / "dog" / "nested" / "b.jpg", (0, 250, 0))
    _png(root / "cat" / "c.png", (255, 0, 0))
    _png(root / "cat" / "d.png", (200, 0, 0, 0), mode="RGBA")  # fully transparent -> white
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "cat" / "empty.png").write_bytes(b"")
    return root


def test_image_folder_classes_targets_and_skips(tree):
    ds = ImageFolderDataset(tree)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 4 and sorted(ds.targets) == [0, 0, 1, 1]
    assert ds.num_skipped == 2
    assert {p.name for p, _ in ds.skipped} == {"broken.png", "empty.png"}
    images = {p.name: ds[i] for i, (p, _) in enumerate(ds.samples)}
    img, label = images["c.png"]
    assert label == 0 and img.mode == "RGB" and img.size == (6, 5)
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert images["d.png"][0].getpixel((0, 0)) == (255, 255, 255)
    assert images["b.jpg"][1] == 1


def test_image_folder_gray_transform_and_class_order(tree):
    ds = ImageFolderDataset(
        tree, transform=lambda im: np.asarray(im), mode="L", classes=["dog", "cat", "bird"]
    )
    arr, label = ds[0]
    assert arr.shape == (5, 6)
    assert ds.classes[label] in ("dog", "cat")
    assert sorted(set(ds.targets)) == [0, 1]
    # only dog images carry label 0
    assert all(
        (p.parent.name == "dog" or p.parent.parent.name == "dog") == (t == 0)
        for (p, t) in ds.samples
    )


def test_image_folder_only_classes_given(tree):
    ds = ImageFolderDataset(tree, classes=["dog"])
    assert len(ds) == 2 and set(ds.targets) == {0}
    assert any("not in classes" in r for _, r in ds.skipped)


def test_truncated_image_is_skipped_at_iteration(tmp_path):
    root = tmp_path / "t"
    _png(root / "a" / "good.png", (1, 2, 3))
    good = _png(root / "a" / "trunc.png", (9, 9, 9), size=(64, 64))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # header intact, data cut
    ds = ImageFolderDataset(root)
    assert len(ds) == 2  # passes the header check
    with pytest.warns(UserWarning, match="trunc.png"):
        items = [ds[i] for i in range(len(ds))]
    assert all(img.getpixel((0, 0)) == (1, 2, 3) for img, _ in items)
    assert ds.num_skipped == 1
    # verify="full" catches it at construction
    assert ImageFolderDataset(root, verify="full").num_skipped == 1


def test_decompression_bomb_is_skipped_at_the_header_check(tmp_path, recwarn):
    root = tmp_path / "t"
    _png(root / "a" / "good.png", (1, 2, 3))
    (root / "a" / "bomb.png").write_bytes(png_header(12_000, 12_000))  # 144 M pixels
    ds = ImageFolderDataset(root)
    assert len(ds) == 1 and [p.name for p, _ in ds.skipped] == ["bomb.png"]
    assert "decompression bomb: 12000x12000" in ds.skipped[0][1]
    assert not recwarn.list  # PIL's DecompressionBombWarning stays inside the check


def test_image_folder_errors(tmp_path):
    with pytest.raises(VitkitError, match="not a directory"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitkitError, match="no class folders"):
        ImageFolderDataset(tmp_path / "empty")


def test_image_list_csv_names_and_relative_paths(tree, tmp_path):
    lst = tree / "list.csv"
    lst.write_text(
        "path,label\ndog/a.png,dog\ncat/c.png,cat\ncat/missing.png,cat\n"
        f"{tree / 'cat' / 'd.png'},cat\n"
    )
    ds = ImageListDataset(lst)
    assert ds.classes == ["cat", "dog"]
    assert ds.targets == [1, 0, 0]
    assert [r for _, r in ds.skipped] == ["missing"]
    assert ds[0][0].getpixel((0, 0)) == (0, 255, 0)


def test_image_list_json_and_jsonl_int_labels(tree, tmp_path):
    entries = [{"path": "dog/a.png", "label": 2}, {"path": "cat/c.png", "label": 0}]
    js = tmp_path / "l.json"
    js.write_text(json.dumps(entries))
    ds = ImageListDataset(js, root=tree)
    assert ds.classes == ["0", "1", "2"] and ds.targets == [2, 0]
    jl = tmp_path / "l.jsonl"
    jl.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    assert ImageListDataset(jl, root=tree).targets == [2, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,cls\na.png,1\n")
    with pytest.raises(VitkitError, match="header"):
        ImageListDataset(bad)


# --- CIFAR --------------------------------------------------------------------------------------


def test_cifar10_pixel_layout(cifar10):
    parent, batches = cifar10
    train = CIFARDataset(parent)  # the parent of cifar-10-batches-py works too
    assert len(train) == 15 and train.classes[0] == "airplane" and train.num_skipped == 0
    assert train.targets[3:6] == batches[1][b"labels"]
    row = batches[1][b"data"][2]  # sample 5 overall
    img, label = train[5]
    assert img.mode == "RGB" and img.size == (32, 32)
    # pixel (x=7, y=4): R at 4*32+7, G 1024 further, B 2048 further
    y, x = 4, 7
    expected = tuple(int(row[c * 1024 + y * 32 + x]) for c in range(3))
    assert img.getpixel((x, y)) == expected
    assert label == batches[1][b"labels"][2]
    test = CIFARDataset(parent / "cifar-10-batches-py", train=False)
    assert len(test) == 3
    assert np.array_equal(
        np.asarray(test[0][0]).transpose(2, 0, 1).reshape(-1), batches[5][b"data"][0]
    )


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    tr = cifar_batch(4, 0, b"fine_labels", k=100)
    tr[b"coarse_labels"] = [0] * 4
    te = cifar_batch(2, 1, b"fine_labels", k=100)
    dump_pickle(tr, d / "train")
    dump_pickle(te, d / "test")
    dump_pickle(
        {
            b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [b"x"] * 20,
        },
        d / "meta",
    )
    ds = CIFARDataset(tmp_path, train=True)
    assert len(ds.classes) == 100 and ds.targets == tr[b"fine_labels"]
    assert CIFARDataset(d, train=False).targets == te[b"fine_labels"]
    gray, _ = CIFARDataset(d, mode="L")[0]
    assert gray.mode == "L"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused_without_running(cifar10, tmp_path):
    parent, _ = cifar10
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = parent / "cifar-10-batches-py" / "data_batch_1"
    dump_pickle({b"data": evil, b"labels": []}, path)
    with pytest.raises(VitkitError, match="not allowed"):
        CIFARDataset(parent)
    assert not marker.exists()
    with pytest.raises(VitkitError, match="not allowed"):
        read_cifar_pickle(path)
    # a pickle that only uses builtins.eval is refused too
    path.write_bytes(b"cbuiltins\neval\n(V__import__('os')\ntR.")
    with pytest.raises(VitkitError, match="not allowed"):
        read_cifar_pickle(path)


def test_cifar_missing(tmp_path):
    with pytest.raises(VitkitError, match="no CIFAR batches"):
        CIFARDataset(tmp_path)


def test_cifar_pickle_with_published_numpy_spelling(tmp_path):
    # the published files (Python 2, numpy 1) name numpy.core.multiarray; numpy 2 writes _core
    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [np.int64(1), 2]}
    raw = pickle.dumps(obj, protocol=2)
    raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / "batch"
    path.write_bytes(raw)
    loaded = read_cifar_pickle(path)
    assert np.array_equal(loaded[b"data"], obj[b"data"])
    assert [int(v) for v in loaded[b"labels"]] == [1, 2]
