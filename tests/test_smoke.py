import torch

import vitkit


def test_base_forward_shapes():
    model = vitkit.create_model("vit_tiny_patch16_224", num_classes=7).eval()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.logits.shape == (2, 7)
    assert out.last_hidden_state.shape == (2, 197, 192)
