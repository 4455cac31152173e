"""SimMIM: masked image modeling with a linear pixel decoder (Xie et al. 2022).

A fraction of the patches is replaced by a learned [MASK] token before positions are added (the
core `VisionTransformer.embed` does this when given `bool_masked_pos`); a 1x1 convolution maps
each patch token to stride^2 * C values that PixelShuffle spreads back to pixels; the loss is the
L1 error on the masked pixels only. The layout equals transformers' `ViTForMaskedImageModeling`
(`vitkit.checkpoints.hf_mim` reads and writes its files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.layers.patch_embed import refuse_stem_for_masking
from vitkit.models.vit import VisionTransformer


@dataclass
class MIMOutput:
    """loss: masked-pixel L1 (None without a mask); reconstruction: (B, C, H, W);
    mask: the (B, N) boolean patch mask that was used."""

    loss: Tensor | None
    reconstruction: Tensor
    mask: Tensor | None


class SimMIM(nn.Module):
    """A ViT encoder with a mask token and SimMIM's one-layer pixel decoder.

    `encoder` is a plain `VisionTransformer` (num_classes=0, use_mask_token=True); keep it after
    pre-training and drop the decoder. `encoder_stride` is the decoder's upsampling factor and
    must equal the patch size for the reconstruction to have the input's size.
    """

    def __init__(self, config: ViTConfig, *, encoder_stride: int | None = None):
        super().__init__()
        refuse_stem_for_masking(config.stem_channels, "SimMIM")
        config = config.replace(use_mask_token=True, num_classes=0, head="linear")
        self.encoder = VisionTransformer(config)
        self.encoder_stride = stride = encoder_stride or config.patch_size
        self.decoder = nn.Sequential(
            nn.Conv2d(config.embed_dim, stride**2 * config.in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    @property
    def config(self) -> ViTConfig:
        return self.encoder.config

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> MIMOutput:
        """Images (B, C, H, W) and a (B, N) patch mask -> reconstruction and masked L1 loss."""
        c = self.config
        B, C, H, W = pixel_values.shape
        out = self.encoder.forward_features(pixel_values, bool_masked_pos=bool_masked_pos)
        gh, gw = self.encoder.patch_embed.grid_size(H, W)
        tokens = out.last_hidden_state[:, c.num_prefix_tokens :]  # (B, N, D)
        grid = tokens.transpose(1, 2).reshape(B, -1, gh, gw)  # (B, D, gh, gw)
        recon = self.decoder(grid)  # (B, C, gh*s, gw*s)
        loss = None
        if bool_masked_pos is not None:
            p = c.patch_size
            mask = bool_masked_pos.reshape(B, gh, gw)
            mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
            mask = mask.to(pixel_values.dtype)  # (B, 1, H, W)
            l1 = (pixel_values - recon).abs()
            loss = (l1 * mask).sum() / (mask.sum() + 1e-5) / C
        return MIMOutput(loss=loss, reconstruction=recon, mask=bool_masked_pos)


ViTForMaskedImageModeling = SimMIM


def simmim_mask(
    batch_size: int,
    grid: tuple[int, int],
    *,
    mask_ratio: float = 0.6,
    block: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """SimMIM's random block mask: (B, gh*gw) booleans at model-patch resolution.

    The grid is cut into blocks of `block` x `block` patches (SimMIM: a 32 px mask patch over
    4 px model patches gives block=8); ceil(ratio * blocks) blocks per image are masked at random.
    """
    gh, gw = grid
    if gh % block or gw % block:
        raise ValueError(f"mask block {block} does not divide the patch grid {grid}")
    bh, bw = gh // block, gw // block
    count = math.ceil(bh * bw * mask_ratio)
    noise = torch.rand(batch_size, bh * bw, generator=generator)
    chosen = noise.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch_size, bh * bw, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    mask = mask.reshape(batch_size, bh, bw)
    mask = mask.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return mask.reshape(batch_size, gh * gw).to(device)


def mask_block_for(config: ViTConfig, mask_patch_size: int | None = None) -> int:
    """Patches per mask block side for a mask patch of `mask_patch_size` pixels (default: 32 px
    or, for small images, a quarter of the shorter side, never below one patch)."""
    p = config.patch_size
    if mask_patch_size is None:
        mask_patch_size = min(32, max(p, min(config.image_hw) // 4))
    if mask_patch_size % p:
        raise ValueError(f"mask patch size {mask_patch_size} is not a multiple of patch {p}")
    return mask_patch_size // p
