import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit import VisionTransformer, ViTConfig
from vitkit.errors import VitkitError
from vitkit.explain import attention_map
from vitkit.viz import (
    plot_confusion_matrix,
    plot_curves,
    read_metrics,
    save_attention_maps,
)

pytest.importorskip("matplotlib")


def _is_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot_curves_tolerates_missing_keys_and_bad_lines(tmp_path):
    rows = []
    for epoch in range(1, 11):
        row = {"epoch": epoch, "step": epoch * 10, "train_loss": 2.0 / epoch, "lr": 1e-3 * epoch}
        if epoch % 2 == 0:
            row.update(val_loss=2.2 / epoch, val_acc=0.5 + epoch / 40, val_top5=0.9)
        if epoch > 5:
            row["ema_val_acc"] = 0.6 + epoch / 50
        rows.append(json.dumps(row))
    rows.insert(3, "")
    rows.append('{"epoch": 11, "train_lo')  # killed mid-write
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(rows))
    assert len(read_metrics(path)) == 10
    out = plot_curves(path, tmp_path / "plots" / "curves.png")
    w, h = _is_png(out)
    assert w > 2 * h  # three panels side by side
    assert not list((tmp_path / "plots").glob(".*.tmp"))


def test_plot_curves_errors(tmp_path):
    with pytest.raises(VitkitError, match="no such metrics file"):
        plot_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(VitkitError, match="empty"):
        plot_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_confusion_matrix_png(tmp_path):
    m = np.array([[5, 1, 0], [0, 4, 2], [1, 0, 7]])
    out = plot_confusion_matrix(m, ["cat", "dog", "bird"], tmp_path / "cm.png")
    _is_png(out)
    with pytest.raises(VitkitError, match="class names"):
        plot_confusion_matrix(m, ["a"], tmp_path / "bad.png")
    with pytest.raises(VitkitError, match="square"):
        plot_confusion_matrix(np.zeros((2, 3)), None, tmp_path / "bad.png")


def test_save_attention_maps_from_a_model(tmp_path):
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        in_chans=3,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_register_tokens=2,
    )
    model = VisionTransformer(cfg).eval()
    x = torch.rand(3, 3, 32, 32)
    maps = attention_map(model, x)
    png = save_attention_maps(x, maps, tmp_path / "att.png", titles=["a", "b", "c"], per_head=True)
    # three rows of image | mean | 2 heads, 32 px enlarged x3 to 96, 14 px title bands
    assert _is_png(png) == (4 * 96 + 3 * 4 * 3, 3 * (96 + 14) + 2 * 4)
    with Image.open(png) as im:
        row = np.asarray(im.convert("RGB"), dtype=np.float64)[14 : 14 + 96]  # below the title
    image, head = row[:, :96], row[:, 2 * 108 : 2 * 108 + 96]  # panels 96 px, 12 px apart
    colour = (head - 0.45 * image) / 0.55  # the map's colour under alpha 0.55
    m = maps.head_maps[0, 0]  # (4, 4) patches of 24 px each
    for value, rgb in ((m.max(), [252, 255, 164]), (m.min(), [0, 0, 4])):  # inferno's ends
        i, j = (m == value).nonzero()[0].tolist()
        assert np.abs(colour[24 * i + 12, 24 * j + 12] - rgb).max() < 2


def test_step_rows_are_placed_by_steps_per_epoch():
    from vitkit.viz import _series, _x_values

    rows = [
        {"step": 5, "train_loss": 1.0},
        {"step": 10, "epoch": 1, "val_acc": 0.5},
        {"step": 15, "train_loss": 0.5},
        {"step": 20, "epoch": 2, "val_acc": 0.7},
    ]
    xs = _x_values(rows)
    assert xs == [0.5, 1.0, 1.5, 2.0]
    assert _series(rows, xs, "train_loss") == ([0.5, 1.5], [1.0, 0.5])
    assert _x_values([{"step": 3}, {"step": 7}]) == [3.0, 7.0]


def test_heatmap_overlay_places_the_map_over_the_image():
    from vitkit.viz import colorize, heatmap_overlay

    assert colorize(0.0).tolist() == [0, 0, 4] and colorize(1.0).tolist() == [252, 255, 164]
    image = Image.new("RGB", (80, 40), (0, 0, 0))
    heat = np.zeros((2, 4), dtype=np.float32)
    heat[1, 2] = 5.0  # bottom row, third column: pixels x 40..59, y 20..39
    out = np.asarray(heatmap_overlay(image, heat, alpha=1.0, smooth=False))
    assert out.shape == (40, 80, 3)
    bright = np.argwhere(out.sum(-1) == out.sum(-1).max())
    assert bright[:, 0].min() == 20 and bright[:, 1].min() == 40 and bright[:, 1].max() == 59
    assert out[0, 0].tolist() == [0, 0, 4]  # the lowest value: the darkest colour
    panels = heatmap_overlay(image, np.stack([heat, heat, heat]), with_image=True, max_side=40)
    assert panels.size == (4 * 40 + 3 * 4, 20)  # shrunk to 40 x 20, four panels, 4 px gaps
    with pytest.raises(VitkitError, match="heat map must be"):
        heatmap_overlay(image, np.zeros(5))
