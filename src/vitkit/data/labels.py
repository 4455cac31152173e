"""Class names: the ImageNet-1k list shipped with vitkit, and the labels a model should print."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any


@functools.cache
def _imagenet_labels() -> tuple[str, ...]:
    text = resources.files("vitkit.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == 1000, f"imagenet_classes.txt has {len(names)} lines, expected 1000"
    return names


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order ("tench, Tinca tinca", ...).

    These are the WordNet lemmas of the standard synset order, the same strings as the
    `id2label` of transformers' ImageNet checkpoints.
    """
    return list(_imagenet_labels())


def id2label_for(config: Any) -> dict[int, str]:
    """Labels for a model's outputs: `config.id2label` when set; the ImageNet-1k names for a
    1000-class head without labels (timm checkpoints carry none); otherwise the class index."""
    id2label = getattr(config, "id2label", None)
    if id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    num_classes = int(getattr(config, "num_classes", 0) or 0)
    if num_classes == 1000:
        return dict(enumerate(_imagenet_labels()))
    return {i: str(i) for i in range(num_classes)}
