"""Embeddings of a frozen encoder, and the two standard ways to judge them without fine-tuning:
a weighted k-nearest-neighbour vote (DINO, Caron et al. 2021) and a linear probe (logistic
regression on the frozen features, its L2 strength chosen on the validation split).

    feats, labels = extract(model, loader, pool="model")
    acc = knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import VitkitError

POOLS = ("model", "cls", "mean")


def pool_output(out: Any, config: Any, pool: str = "model") -> Tensor:
    """(B, D) features of a forward pass: the model's own pooled output (its image embedding
    when it has a projection, e.g. CLIP), the [CLS] token, or the mean of the patch tokens; all
    after the final norm."""
    if pool == "model":
        embeds = getattr(out, "image_embeds", None)
        return embeds if embeds is not None else out.pooler_output
    if pool == "cls":
        if not config.class_token:
            raise VitkitError("--pool cls: this model has no [CLS] token; use mean or model")
        return out.last_hidden_state[:, 0]
    if pool == "mean":
        return out.last_hidden_state[:, config.num_prefix_tokens :].mean(dim=1)
    raise VitkitError(f"pool={pool!r}; choose one of {POOLS}")


class Embedder(nn.Module):
    """A model as (B, C, H, W) pixels -> (B, D) rows (`pool_output`), a plain module that the
    precision paths (`vitkit.infer.prepare`) and exports can run like any classifier."""

    produces = "embeddings"  # precision checks compare rows by cosine, not by top-1

    def __init__(self, model: nn.Module, pool: str = "model") -> None:
        super().__init__()
        if pool not in POOLS:
            raise VitkitError(f"pool={pool!r}; choose one of {POOLS}")
        self.model, self.pool = model, pool

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, pixel_values: Tensor) -> Tensor:
        return pool_output(self.model.forward_features(pixel_values), self.config, self.pool)


@torch.no_grad()
def extract(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    pool: str = "model",
    normalize: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """(features (N, D) float32 on the CPU, labels (N,)) of every (images, labels) batch."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            out = model.forward_features(x.to(device))
            f = pool_output(out, model.config, pool).float()
            feats.append((F.normalize(f, dim=-1) if normalize else f).cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    if not feats:
        raise VitkitError("no images to embed")
    return torch.cat(feats), torch.cat(labels).long()


def knn_accuracy(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, *, k: int = 20,
    temperature: float = 0.07, chunk: int = 1024,
) -> float:  # fmt: skip
    """Top-1 of DINO's weighted k-NN: cosine similarity to the k nearest training features,
    each neighbour votes for its class with weight exp(similarity / temperature)."""
    if k < 1:
        raise VitkitError(f"k={k} must be at least 1")
    k = min(k, len(train))
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for i in range(0, len(test), chunk):
        sim, idx = (test[i : i + chunk] @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(sim), classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[i : i + chunk]).sum())
    return correct / len(test)


def linear_probe(
    train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, test: Tensor,
    test_labels: Tensor, *, l2: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    steps: int = 200,
) -> dict[str, float]:  # fmt: skip
    """Multinomial logistic regression on standardised frozen features (L-BFGS, full batch),
    the L2 strength chosen on the validation split; returns val and test top-1 and the l2."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)

    def z(x: Tensor) -> Tensor:
        return (x.float() - mean) / std

    xtr, xva, xte = z(train), z(val), z(test)
    classes = int(max(train_labels.max(), val_labels.max(), test_labels.max())) + 1
    best: dict[str, float] | None = None
    for lam in l2:
        w, b = _fit_logistic(xtr, train_labels, classes, lam, steps)
        with torch.no_grad():
            val_acc = float(((xva @ w + b).argmax(1) == val_labels).float().mean())
            test_acc = float(((xte @ w + b).argmax(1) == test_labels).float().mean())
        if best is None or val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "test_acc": test_acc, "l2": lam}
    assert best is not None
    return best


def _fit_logistic(
    x: Tensor, y: Tensor, classes: int, l2: float, steps: int
) -> tuple[Tensor, Tensor]:
    """Weights (D, K) and bias (K,) minimising cross-entropy + l2 * |W|^2 (L-BFGS, full batch)."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()
