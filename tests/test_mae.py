"""MAE: loss and reconstruction parity with transformers' ViTMAEForPreTraining, HF mapping round
trip, masking, the encoder as a plain ViT, reconstruction PNG."""

from __future__ import annotations

import pytest
import torch

from vitkit import CheckpointError, VisionTransformer, ViTConfig
from vitkit.checkpoints.hf_mim import (
    mae_config_from_hf,
    mae_state_dict_from_hf,
    mae_state_dict_to_hf,
)
from vitkit.layers.pos_embed import sincos_2d_pos_embed
from vitkit.models.mae import (
    MaskedAutoencoder,
    patchify,
    random_masking,
    unpatchify,
)
from vitkit.viz import save_reconstruction

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_intermediate_size=48,
    image_size=16,
    patch_size=4,
    num_channels=3,
)


def _set_sincos_tables(hf) -> None:
    for table in (hf.vit.embeddings.position_embeddings, hf.decoder.decoder_pos_embed):
        dim = table.shape[-1]
        with torch.no_grad():
            table[0, 1:] = sincos_2d_pos_embed((4, 4), dim)
            table[0, 0] = 0


def test_a_table_that_is_not_sincos_is_refused():
    hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**SMALL))
    with torch.no_grad():
        hf.vit.embeddings.position_embeddings.normal_()
    config, _ = mae_config_from_hf(hf.config.to_dict())
    with pytest.raises(CheckpointError, match="position_embeddings"):
        mae_state_dict_from_hf(hf.state_dict(), config)


@pytest.mark.parity
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_and_logits_match_transformers(norm_pix_loss, tmp_path):
    from safetensors.torch import save_file

    hf = transformers.ViTMAEForPreTraining(
        transformers.ViTMAEConfig(**SMALL, norm_pix_loss=norm_pix_loss)
    ).eval()
    _set_sincos_tables(hf)  # as in real checkpoints; transformers 5 random init leaves zeros
    config, kwargs = mae_config_from_hf(hf.config.to_dict())
    ours = MaskedAutoencoder(config, **kwargs).eval()
    ours.load_state_dict(mae_state_dict_from_hf(hf.state_dict(), config))
    x = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        a, b = hf(x, noise=noise), ours(x, noise=noise)
    assert torch.equal(a.mask, b.mask)
    assert (a.logits - b.logits).abs().max().item() <= 1e-5
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5
    # written back with transformers' file names, transformers loads the same model
    back = mae_state_dict_to_hf(ours.state_dict(), config)
    save_file({k: v.contiguous() for k, v in back.items()}, str(tmp_path / "model.safetensors"))
    hf.config.save_pretrained(tmp_path)
    reloaded = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (reloaded(x, noise=noise).logits - b.logits).abs().max().item() <= 1e-5


def test_masking_keeps_a_quarter_and_restores_order():
    tokens = torch.arange(2 * 8, dtype=torch.float).reshape(2, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]] * 2)
    kept, mask, restore = random_masking(tokens, 0.75, noise)
    assert kept[0, :, 0].tolist() == [1.0, 3.0]  # the two smallest noise values
    assert mask[0].tolist() == [1, 0, 1, 0, 1, 1, 1, 1]
    assert torch.equal(noise.argsort(1).gather(1, restore), torch.arange(8).expand(2, 8))


def test_patchify_round_trip():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (2, 3), 3), x)


def test_encoder_is_a_plain_vit_and_reconstruction_png(tmp_path):
    cfg = ViTConfig(image_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    mae = MaskedAutoencoder(cfg, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    plain = VisionTransformer(mae.encoder.config.replace(num_classes=10))
    missing, unexpected = plain.load_state_dict(mae.encoder.state_dict(), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    x = torch.rand(3, 1, 8, 8)
    masked, recon = mae.reconstruct(x)
    keep = masked != 0
    assert torch.allclose(recon[keep], x[keep])  # visible pixels are pasted from the input
    out = tmp_path / "rec.png"
    save_reconstruction(x, masked, recon, str(out), scale=4)
    from PIL import Image

    assert Image.open(out).size == (3 * 32 + 2 * 2, 3 * 32)  # 3 panels, 2 px separators
