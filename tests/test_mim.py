"""SimMIM: parity with transformers' ViTForMaskedImageModeling, HF round trip, block masks."""

from __future__ import annotations

import pytest
import torch

from vitkit import ViTConfig, from_pretrained
from vitkit.checkpoints.hf import config_from_hf
from vitkit.checkpoints.hf_mim import load_simmim, save_simmim, simmim_state_dict_from_hf
from vitkit.models.mim import SimMIM, mask_block_for, simmim_mask

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    encoder_stride=4,
    num_channels=2,
)


def _hf_pair():
    hf = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**SMALL)).eval()
    config = config_from_hf({**hf.config.to_dict(), "architectures": ["ViTForMaskedImageModeling"]})
    ours = SimMIM(config).eval()
    ours.load_state_dict(simmim_state_dict_from_hf(hf.state_dict(), config))
    return hf, ours


@pytest.mark.parity
def test_reconstruction_and_loss_match_transformers():
    hf, ours = _hf_pair()
    x = torch.randn(3, 2, 16, 16)
    mask = simmim_mask(3, (4, 4), mask_ratio=0.5, block=2)
    with torch.no_grad():
        a, b = hf(x, bool_masked_pos=mask), ours(x, bool_masked_pos=mask)
    assert (a.reconstruction - b.reconstruction).abs().max().item() <= 1e-5
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    assert b.reconstruction.shape == x.shape


@pytest.mark.parity
def test_save_then_transformers_loads_it(tmp_path):
    _, ours = _hf_pair()
    save_simmim(ours, tmp_path)
    hf = transformers.ViTForMaskedImageModeling.from_pretrained(tmp_path).eval()
    back = load_simmim(tmp_path)
    x = torch.randn(2, 2, 16, 16)
    mask = simmim_mask(2, (4, 4), mask_ratio=0.6)
    with torch.no_grad():
        ref = ours(x, bool_masked_pos=mask)
        assert (hf(x, bool_masked_pos=mask).reconstruction - ref.reconstruction).abs().max() <= 1e-5
        assert torch.equal(back(x, bool_masked_pos=mask).reconstruction, ref.reconstruction)
    # the folder is also an encoder checkpoint for fine-tuning (the decoder is skipped)
    encoder = from_pretrained(tmp_path, num_classes=3)
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, ours.encoder.blocks[0].attn.qkv.weight)


def test_loss_is_l1_on_masked_pixels_only():
    model = SimMIM(
        ViTConfig(image_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    ).eval()
    x = torch.randn(1, 1, 8, 8)
    mask = torch.tensor([[True, False, False, False]])
    out = model(x, bool_masked_pos=mask)
    err = (x - out.reconstruction).abs()[0, 0, :4, :4]
    assert torch.allclose(out.loss, err.sum() / (16 + 1e-5), atol=1e-6)


def test_block_mask_shape_ratio_and_blocks():
    g = torch.Generator().manual_seed(0)
    mask = simmim_mask(5, (8, 8), mask_ratio=0.6, block=4, generator=g)
    assert mask.shape == (5, 64) and mask.dtype == torch.bool
    assert (mask.sum(1) == 3 * 16).all()  # ceil(0.6 * 4) blocks of 4x4 patches
    grid = mask.reshape(5, 2, 4, 2, 4)
    assert (grid.all(dim=(2, 4)) | ~grid.any(dim=(2, 4))).all()  # whole blocks only
    cfg = ViTConfig(image_size=192, patch_size=4, num_classes=0)
    assert mask_block_for(cfg, 32) == 8
