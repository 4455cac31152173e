"""Every picture vitkit draws: training curves, confusion matrices, attention and relevance maps,
masked-image reconstructions; written as PNG files.

Curves and confusion matrices need matplotlib, an optional dependency (`pip install
vitkit[plot]`) imported on use and driven through its object API (no pyplot), so they work on
headless machines and leave a notebook's backend alone. Heat maps over images
(`heatmap_overlay`, used by `vitkit explain`, `vitkit serve` and `save_attention_maps`) need
only PIL and numpy. Every PNG is written atomically.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vitkit._io import atomic_open, atomic_path
from vitkit.errors import VitkitError
from vitkit.limits import is_finite

__all__ = [
    "colorize",
    "heatmap_overlay",
    "plot_confusion_matrix",
    "plot_curves",
    "png_bytes",
    "read_metrics",
    "save_attention_maps",
    "save_png",
    "save_reconstruction",
]

PathLike = str | os.PathLike[str]


def _figure(**kwargs: Any) -> Any:
    """A standalone matplotlib Figure: no pyplot state, no backend switch, safe in notebooks."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise VitkitError("plotting needs matplotlib: pip install 'vitkit[plot]'") from None
    return Figure(**kwargs)


def _save(fig: Any, out_png: PathLike) -> Path:
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return out


def read_metrics(metrics_jsonl: PathLike) -> list[dict[str, Any]]:
    """Read a metrics JSON-lines file; blank and malformed lines (a run killed mid-write) are skipped."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise VitkitError(
            f"{path}: no such metrics file (training writes metrics.jsonl in its output folder)"
        )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _x_values(rows: list[dict[str, Any]]) -> list[float]:
    """The x of each row: its epoch; a row with only a step is placed at step / steps-per-epoch
    (estimated from rows that have both), or at its step when no row has an epoch."""
    both = [
        (r["step"], r["epoch"])
        for r in rows
        if is_finite(r.get("step")) and is_finite(r.get("epoch"))
    ]
    per_epoch = max(s for s, _ in both) / max(e for _, e in both) if both else None
    if per_epoch is not None and per_epoch <= 0:
        per_epoch = None
    has_epoch = any(is_finite(r.get("epoch")) for r in rows)
    xs = []
    for i, r in enumerate(rows):
        if is_finite(r.get("epoch")):
            xs.append(float(r["epoch"]))
        elif is_finite(r.get("step")):
            step = float(r["step"])
            xs.append(step / per_epoch if per_epoch and has_epoch else step)
        else:
            xs.append(float(i))
    return xs


def _series(
    rows: list[dict[str, Any]], xs: list[float], key: str
) -> tuple[list[float], list[float]]:
    """(x, y) of the rows that have a finite number under `key`."""
    pairs = [(x, float(r[key])) for r, x in zip(rows, xs) if is_finite(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# losses and, for DINO, the teacher's entropies (nats, as its cross-entropy loss): collapse shows
_LOSS_KEYS = ("train_loss", "val_loss", "ema_val_loss", "teacher_entropy", "teacher_batch_entropy")
_ACC_KEYS = ("train_acc", "val_acc", "val_top5", "ema_val_acc", "ema_val_top5", "knn_acc")


def plot_curves(metrics_jsonl: PathLike, out_png: PathLike, title: str | None = None) -> Path:
    """Draw loss, accuracy and learning-rate curves against the epoch from training metrics.

    Reads rows like {"epoch": 3, "train_loss": .., "val_acc": .., "lr": ..}; any key may be
    missing. Accuracies in [0, 1] are shown as percentages. Returns the PNG path.
    """
    rows = read_metrics(metrics_jsonl)
    if not rows:
        raise VitkitError(f"{metrics_jsonl}: no metrics to plot (the file is empty)")
    xs = _x_values(rows)
    has_lr = any("lr" in r for r in rows)
    panels = 3 if has_lr else 2
    fig = _figure(figsize=(4.6 * panels, 3.6))
    axes = fig.subplots(1, panels)
    loss_ax, acc_ax = axes[0], axes[1]

    for key in _LOSS_KEYS:
        x, y = _series(rows, xs, key)
        if x:
            loss_ax.plot(x, y, label=key, marker="o" if len(x) < 30 else None, markersize=3)
    loss_ax.set_title("loss")

    best_note = ""
    for key in _ACC_KEYS:
        x, y = _series(rows, xs, key)
        if not x:
            continue
        scale = 100.0 if max(y) <= 1.0 else 1.0
        y = [v * scale for v in y]
        acc_ax.plot(x, y, label=key, marker="o" if len(x) < 30 else None, markersize=3)
        if key == "val_acc":
            best = int(np.argmax(y))
            best_note = f"best val_acc {y[best]:.2f}% @ {x[best]:g}"
            acc_ax.annotate(
                f"{y[best]:.2f}",
                (x[best], y[best]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    acc_ax.set_title("accuracy (%)" + (f"\n{best_note}" if best_note else ""))

    if has_lr:
        x, y = _series(rows, xs, "lr")
        axes[2].plot(x, y, color="tab:gray")
        axes[2].set_title("learning rate")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    xlabel = "epoch" if any("epoch" in r for r in rows) else "step"
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_confusion_matrix(
    matrix: Any,
    class_names: Sequence[str] | None,
    out_png: PathLike,
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Draw a K x K confusion matrix (rows: true class, columns: predicted) as a heat map.

    With `normalize`, colours are row fractions (per-class recall) and cells show counts; cell
    text is omitted above 30 classes, tick labels above 60.
    """
    m = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise VitkitError(f"confusion matrix must be square K x K, got shape {m.shape}")
    k = m.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise VitkitError(f"{len(names)} class names for a {k} x {k} confusion matrix")
    rows = m.sum(axis=1, keepdims=True)
    shown = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) if normalize else m
    size = min(max(4.0, 0.45 * k + 2.0), 24.0)
    fig = _figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="fraction of true class" if normalize else "count",
    )
    if k <= 60:
        longest = max(len(n) for n in names)
        rotation = 0 if longest <= 3 and k <= 20 else (45 if k <= 10 else 90)
        ax.set_xticks(
            range(k),
            labels=names,
            rotation=rotation,
            ha="right" if rotation == 45 else "center",
            fontsize=8,
        )
        ax.set_yticks(range(k), labels=names, fontsize=8)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = m.sum()
    acc = np.trace(m) / total if total else 0.0
    ax.set_title(title or f"confusion matrix (accuracy {100 * acc:.2f}%, n={int(total)})")
    fig.tight_layout()
    return _save(fig, out_png)


def _array(x: Any) -> np.ndarray:
    """A tensor (any device or dtype) or array-like -> float32 numpy."""
    return np.asarray(x.detach().float().cpu() if hasattr(x, "detach") else x, dtype=np.float32)


def _to_hwc(image: Any) -> np.ndarray:
    """A PIL image, (C, H, W) / (H, W, C) / (H, W) array or tensor -> float (H, W, 3) in [0, 1]."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    a = _array(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:  # normalised tensor or 0..255: stretch for display
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


# The "inferno" colour map of matplotlib, sampled at 9 evenly spaced stops (dark -> bright).
_INFERNO = np.array(
    [
        (0, 0, 4), (33, 12, 74), (87, 16, 110), (138, 34, 106), (188, 55, 84),
        (228, 90, 49), (249, 142, 9), (249, 203, 53), (252, 255, 164),
    ],
    dtype=np.float32,
)  # fmt: skip
_PANEL_GAP = 4  # white pixels between panels


def colorize(values: Any) -> np.ndarray:
    """Values in [0, 1] of any shape -> uint8 RGB (..., 3) on the inferno colour map."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    pos = v * (len(_INFERNO) - 1)
    lo = np.minimum(pos.astype(np.int64), len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    rgb = _INFERNO[lo] * (1.0 - frac) + _INFERNO[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def heatmap_overlay(
    image: Any,
    heatmap: Any,
    *,
    alpha: float = 0.5,
    smooth: bool = True,
    max_side: int | None = None,
    with_image: bool = False,
) -> Any:
    """Draw relevance map(s) over an image: every heat map vitkit shows comes from here.

    image: a PIL image, or a (C, H, W) / (H, W, C) array or tensor.
    heatmap: (gh, gw) for one panel, or (n, gh, gw) for n panels side by side; each map is
        min-max scaled, upsampled to the image (bilinear when `smooth`, else nearest, which
        keeps the patch grid visible), coloured with inferno and blended with weight `alpha`.
    max_side: shrink the image first so its longer side is at most this many pixels.
    with_image: put the plain image before the panels.
    Returns an RGB PIL image (save it with `save_png`, or `png_bytes` for HTTP).
    """
    base = image.convert("RGB") if hasattr(image, "convert") else _pil_from_hwc(_to_hwc(image))
    if max_side and max(base.size) > max_side:
        scale = max_side / max(base.size)
        size = (max(1, round(base.width * scale)), max(1, round(base.height * scale)))
        base = base.resize(size, Image.Resampling.BILINEAR)
    maps = _array(heatmap)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or 0 in maps.shape:
        raise VitkitError(f"heat map must be (gh, gw) or (n, gh, gw), got shape {maps.shape}")
    pixels = np.asarray(base, dtype=np.float32)
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    panels = [base] if with_image else []
    for m in maps:
        lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        up = np.asarray(
            Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize(base.size, resample)
        )
        blend = (1.0 - alpha) * pixels + alpha * colorize(up).astype(np.float32)
        panels.append(Image.fromarray(np.rint(blend).astype(np.uint8)))
    return _tile(panels)


def _tile(images: list[Any], *, vertical: bool = False) -> Any:
    """PIL images side by side (or one above the other), `_PANEL_GAP` white pixels apart."""
    if len(images) == 1:
        return images[0]
    along = [im.height if vertical else im.width for im in images]
    across = max(im.width if vertical else im.height for im in images)
    size = (sum(along) + _PANEL_GAP * (len(images) - 1), across)
    canvas = Image.new("RGB", size[::-1] if vertical else size, (255, 255, 255))
    at = 0
    for im, n in zip(images, along):
        canvas.paste(im, (0, at) if vertical else (at, 0))
        at += n + _PANEL_GAP
    return canvas


def _pil_from_hwc(a: np.ndarray) -> Any:
    return Image.fromarray(np.rint(a * 255.0).astype(np.uint8))


def save_png(image: Any, out_png: PathLike) -> Path:
    """Write a PIL image as PNG atomically; returns the path."""
    out = Path(out_png)
    with atomic_open(out, "wb") as f:
        image.save(f, format="PNG")
    return out


def png_bytes(image: Any) -> bytes:
    """A PIL image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_attention_maps(
    images: Any,
    explanation: Any,
    out_png: PathLike,
    *,
    titles: Sequence[str] | None = None,
    max_images: int = 8,
    alpha: float = 0.55,
    per_head: bool = False,
    max_side: int | None = 224,
) -> Path:
    """One row per image: the image, its relevance map drawn over it, and with `per_head` each
    head's map after that (nearest upsampling: one block per patch).

    `images`: the batch (B, C, H, W) the maps were computed on, or a list of PIL images.
    `explanation`: a `vitkit.explain.Explanation` of them (its `maps` and `head_maps`; viz sits
    below explain and does not import it), e.g. `attention_map(model, images)` for the last
    layer's attention from the readout token ([CLS]) to the patches.
    """
    n = min(len(images), len(explanation.maps), max_images)
    if n == 0:
        raise VitkitError("save_attention_maps: no images given")
    heads = explanation.head_maps if per_head else None
    rows = []
    for i in range(n):
        maps = [explanation.maps[i], *(heads[i] if heads is not None else ())]  # (gh, gw) each
        row = heatmap_overlay(images[i], np.stack([_array(m) for m in maps]), alpha=alpha,
                              smooth=False, max_side=max_side, with_image=True)  # fmt: skip
        if max_side and max(row.height, 1) < 96:  # tiny images: enlarge so the maps are visible
            k = -(-96 // row.height)
            row = row.resize((row.width * k, row.height * k), Image.Resampling.NEAREST)
        if titles is not None and i < len(titles):
            band = Image.new("RGB", (row.width, row.height + 14), (255, 255, 255))
            band.paste(row, (0, 14))
            ImageDraw.Draw(band).text((2, 1), str(titles[i]), fill=(0, 0, 0))
            row = band
        rows.append(row)
    return save_png(_tile(rows, vertical=True), out_png)


def save_reconstruction(
    images: Any,
    masked: Any,
    recon: Any,
    out_png: PathLike,
    *,
    max_images: int = 8,
    scale: int = 8,
) -> Path:
    """One row per image: original | masked | reconstructed (SimMIM, MAE), without matplotlib.

    Each image is min-max scaled (from the original's range) to 0..255 and enlarged by `scale`
    (nearest neighbour) so that 8x8 digits stay visible.
    """
    rows = []
    for i in range(min(max_images, images.shape[0])):
        lo, hi = images[i].min(), images[i].max()
        cells = []
        for t in (images[i], masked[i], recon[i]):
            a = ((t - lo) / (hi - lo + 1e-8)).clamp(0, 1).mul(255).byte().cpu()
            a = a.permute(1, 2, 0).numpy()
            a = np.repeat(np.repeat(a, scale, 0), scale, 1)
            if a.shape[2] == 1:
                a = np.repeat(a, 3, 2)
            cells += [a, np.full((a.shape[0], 2, 3), 128, np.uint8)]
        rows.append(np.concatenate(cells[:-1], axis=1))
    return save_png(Image.fromarray(np.concatenate(rows, axis=0)), out_png)
