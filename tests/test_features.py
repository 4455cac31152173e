"""Frozen-encoder evaluation: pooled features, weighted k-NN, linear probe, `vitkit eval --knn`."""

from __future__ import annotations

import json

import pytest
import torch

import vitkit
from vitkit import VitkitError
from vitkit.cli import main
from vitkit.features import extract, knn_accuracy, linear_probe, pool_output


def _clusters(n: int, seed: int, noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(4, 16) * 3
    y = torch.arange(n) % 4
    return centers[y] + noise * torch.randn(n, 16, generator=g), y


def test_knn_on_separated_clusters_and_a_hand_computed_vote():
    x, y = _clusters(200, 0)
    q, qy = _clusters(40, 1)
    assert knn_accuracy(x, y, q, qy, k=10) == 1.0
    # one query between a near class-0 point and two farther class-1 points: weights decide
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.95, 0.31]])
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(train).T
    w0, w1 = (sims[0, 0] / 0.07).exp(), 2 * (sims[0, 1] / 0.07).exp()
    expected = 0 if w0 > w1 else 1
    assert knn_accuracy(train, labels, query, torch.tensor([expected]), k=3) == 1.0
    assert knn_accuracy(train, labels, query, torch.tensor([1 - expected]), k=3) == 0.0


def test_linear_probe_separates_and_picks_l2_on_validation():
    x, y = _clusters(200, 0, noise=0.6)
    v, vy = _clusters(100, 1, noise=0.6)
    t, ty = _clusters(100, 2, noise=0.6)
    out = linear_probe(x, y, v, vy, t, ty, l2=(1e-4, 10.0))
    assert out["test_acc"] > 0.95 and out["l2"] == 1e-4  # 10.0 shrinks the weights to chance
    shuffled = linear_probe(x, y[torch.randperm(200)], v, vy, t, ty, l2=(1e-4,))
    assert shuffled["test_acc"] < 0.5  # labels carry the signal, not the probe


def test_pools():
    model = vitkit.create_model("vit_digits_patch2_8", num_classes=0, global_pool="token",
                                pos_embed="learned").eval()  # fmt: skip
    x = torch.rand(3, 1, 8, 8)
    out = model.forward_features(x)
    assert torch.equal(pool_output(out, model.config, "model"), out.pooler_output)
    assert torch.equal(pool_output(out, model.config, "cls"), out.last_hidden_state[:, 0])
    mean = out.last_hidden_state[:, 1:].mean(1)
    assert torch.allclose(pool_output(out, model.config, "mean"), mean)
    avg = vitkit.create_model("vit_digits_patch2_8", num_classes=0, class_token=False,
                              global_pool="avg")  # fmt: skip
    with pytest.raises(VitkitError, match="no \\[CLS\\]"):
        pool_output(avg.forward_features(x), avg.config, "cls")
    feats, labels = extract(model, [(x, torch.tensor([1, 2, 3]))], normalize=True)
    assert feats.shape == (3, model.config.embed_dim) and labels.tolist() == [1, 2, 3]
    assert torch.allclose(feats.norm(dim=1), torch.ones(3))


def test_cli_knn_and_linear_probe_on_a_headless_encoder(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitkit.data.datasets import open_splits

    torch.manual_seed(0)
    encoder = vitkit.create_model("vit_digits_patch2_8", num_classes=0, embed_dim=32, depth=1,
                                  num_heads=2)  # fmt: skip
    vitkit.save_pretrained(encoder, tmp_path / "enc")
    args = ["eval", "--model", str(tmp_path / "enc"), "--data", "digits", "--knn", "20",
            "--linear-probe", "--output", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "k-NN (k=20) top-1" in text and "linear probe top-1" in text
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    splits = open_splits("digits", mode="L")
    model = vitkit.from_pretrained(tmp_path / "enc")

    def f(part):
        return extract(model, [((part.images - 0.5) / 0.5, part.labels)])

    train, val, test = f(splits.train), f(splits.val), f(splits.test)
    assert metrics["knn_top1"] == pytest.approx(knn_accuracy(*train, *test, k=20))
    probe = linear_probe(*train, *val, *test)
    assert metrics["linear_test_acc"] == pytest.approx(probe["test_acc"])
    assert metrics["images"] == 360 and metrics["train_images"] == 1295
    assert metrics["linear_test_acc"] > 0.4  # random features, 10 classes: well above chance
