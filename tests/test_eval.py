import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from vitkit import VisionTransformer, ViTConfig
from vitkit.errors import VitkitError
from vitkit.eval import evaluate
from vitkit.models.vit import ViTOutput

# 6 samples, 3 classes; hand-worked ranks below
LOGITS = torch.tensor([
    [3.0, 1.0, 0.0],  # true 0: top1 hit
    [0.0, 2.0, 1.0],  # true 2: predicted 1, 2 is second -> top2 hit
    [1.0, 0.0, 5.0],  # true 2: hit
    [0.5, 0.2, 0.1],  # true 1: predicted 0, 1 second
    [1.0, 0.0, 9.0],  # true 0: predicted 2, 0 second
    [1.0, 4.0, 2.0],  # true 1: hit
])  # fmt: skip
LABELS = torch.tensor([0, 2, 2, 1, 0, 1])


class FixedModel(nn.Module):
    """Returns the precomputed logits of the samples whose indices it is fed."""

    def __init__(self, wrap=True):
        super().__init__()
        self.wrap = wrap
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        logits = LOGITS[idx.long()]
        if not self.wrap:
            return logits
        return ViTOutput(logits=logits, last_hidden_state=logits[:, None], pooler_output=logits)


def _loader(batch_size=4):
    idx = torch.arange(6)
    return [(idx[i : i + batch_size], LABELS[i : i + batch_size]) for i in range(0, 6, batch_size)]


@pytest.mark.parametrize("wrap", [True, False])
def test_hand_computed_metrics(wrap):
    model = FixedModel(wrap).train()
    r = evaluate(model, _loader(), topk=(1, 2, 5))
    assert model.training  # restored
    assert r.num_samples == 6
    assert r.top1 == pytest.approx(3 / 6)
    assert r.topk[2] == 1.0  # every miss has the true class second
    assert r.top5 == 1.0  # k > K counts as K
    expected_conf = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    assert np.array_equal(r.confusion, expected_conf)
    assert r.per_class_accuracy == pytest.approx([0.5, 0.5, 0.5])
    ce = float(nn.functional.cross_entropy(LOGITS, LABELS))
    assert r.loss == pytest.approx(ce, rel=1e-6)


def test_topk_only_requested():
    idx = torch.tensor([0, 1, 2, 3, 5])
    r = evaluate(FixedModel(), [(idx, LABELS[idx])], topk=(2,))
    assert r.top1 == pytest.approx(3 / 5) and r.topk[2] == 1.0 and r.top5 is None


def test_to_dict_is_json_and_nan_safe():
    idx = torch.tensor([0, 3])  # classes 0 and 1 only: class 2 has no samples
    r = evaluate(FixedModel(), [(idx, LABELS[idx])], class_names=["a", "b", "c"])
    d = json.loads(json.dumps(r.to_dict()))
    assert d["per_class_accuracy"] == [1.0, 0.0, None]
    assert d["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert d["class_names"] == ["a", "b", "c"]
    assert d["mean_class_accuracy"] == 0.5
    assert math.isnan(r.per_class_accuracy[2])


def test_distilled_model_uses_mean_of_heads_and_dict_batches():
    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        in_chans=3,
        num_classes=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        distilled=True,
    )
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.head_dist.weight)
    x = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    y = torch.arange(10) % 4
    r = evaluate(
        model, [{"pixel_values": x[:5], "labels": y[:5]}, {"pixel_values": x[5:], "labels": y[5:]}]
    )
    expected = (out.logits.argmax(1) == y).float().mean().item()
    assert r.top1 == pytest.approx(expected)
    assert r.loss == pytest.approx(float(nn.functional.cross_entropy(out.logits, y)), rel=1e-5)
    assert r.confusion.sum() == 10


def test_errors():
    with pytest.raises(VitkitError, match="no samples"):
        evaluate(FixedModel(), [])
    with pytest.raises(VitkitError, match="outside"):
        evaluate(FixedModel(), [(torch.tensor([0]), torch.tensor([7]))])
