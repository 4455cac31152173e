"""MAE: masked autoencoders (He et al. 2022).

The encoder sees only the visible 25% of the patches (per-sample random shuffle by argsort of
noise); a narrow decoder gets the encoded tokens back in place among [MASK] tokens, adds fixed
2D sin-cos positions, and predicts each patch's (optionally per-patch normalised) pixels. The
loss is the MSE on the masked patches only. Numerically equal to transformers'
`ViTMAEForPreTraining` given the same weights and noise (see `vitkit.checkpoints.hf_mim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.layers.block import Block
from vitkit.layers.patch_embed import refuse_stem_for_masking
from vitkit.layers.pos_embed import sincos_2d_pos_embed
from vitkit.models.vit import VisionTransformer


@dataclass
class MAEOutput:
    """loss: MSE on masked patches; logits: (B, N, p*p*C) predicted patches (normalised space
    when norm_pix_loss); mask: (B, N) 1 = removed, 0 = kept; ids_restore: (B, N)."""

    loss: Tensor
    logits: Tensor
    mask: Tensor
    ids_restore: Tensor


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), pixels of a patch in (row, col, channel) order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(patches: Tensor, patch: int, grid: tuple[int, int], channels: int) -> Tensor:
    """The inverse of `patchify`: (B, N, p*p*C) -> (B, C, gh*p, gw*p)."""
    B = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(B, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, gh * patch, gw * patch)


def random_masking(
    tokens: Tensor, mask_ratio: float, noise: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the (1 - ratio) tokens with the smallest noise, per sample.

    Returns kept tokens (B, K, D), the mask (B, N) with 1 for removed tokens, and ids_restore
    (B, N) that puts a shuffled sequence back in order.
    """
    B, N, D = tokens.shape
    keep = int(N * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=tokens.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return kept, mask, ids_restore


class MAEDecoder(nn.Module):
    """Linear embed -> [MASK] fill-in and unshuffle -> sin-cos positions -> blocks -> norm ->
    linear prediction of p*p*C pixels per patch."""

    def __init__(
        self,
        *,
        embed_dim: int,
        patch_size: int,
        in_chans: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        act: str = "gelu",
    ):
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                num_heads=num_heads,
                mlp_hidden_dim=int(dim * mlp_ratio),
                qkv_bias=qkv_bias,
                eps=eps,
                act=act,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pred = nn.Linear(dim, patch_size**2 * in_chans)

    def forward(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """latent (B, 1+K, D) from the encoder -> predicted patches (B, N, p*p*C)."""
        x = self.embed(latent)  # (B, 1+K, d)
        B, N = ids_restore.shape
        fill = self.mask_token.expand(B, N + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)  # shuffled order
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        pos = sincos_2d_pos_embed(grid, self.dim, device=x.device, dtype=x.dtype)
        x = torch.cat([x[:, :1], patches + pos], dim=1)  # the [CLS] slot has a zero position
        for block in self.blocks:
            x, _ = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MaskedAutoencoder(nn.Module):
    """MAE pre-training model. `encoder` is a plain `VisionTransformer` with fixed sin-cos
    positions and no head: save it and fine-tune it with `vitkit train --init`."""

    def __init__(
        self,
        config: ViTConfig,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        refuse_stem_for_masking(config.stem_channels, "MAE")
        config = config.replace(
            num_classes=0,
            pos_embed="sincos2d",
            head="linear",
            class_token=True,
            global_pool="token",
            fc_norm=None,
        )
        self.encoder = VisionTransformer(config)
        self.decoder = MAEDecoder(
            embed_dim=config.embed_dim,
            patch_size=config.patch_size,
            in_chans=config.in_chans,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
            qkv_bias=config.qkv_bias,
            eps=config.layer_norm_eps,
            act=config.act,
        )
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    @property
    def config(self) -> ViTConfig:
        return self.encoder.config

    def encode(
        self, pixel_values: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches: (latent (B, 1+K, D), mask (B, N), ids_restore (B, N))."""
        enc = self.encoder
        B, _, H, W = pixel_values.shape
        grid = enc.patch_embed.grid_size(H, W)
        x = enc.patch_embed(pixel_values)  # (B, N, D)
        pos = enc.position_table(grid, x.device, x.dtype)  # (1, 1+N, D), zero [CLS] row
        x = x + pos[:, 1:]
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        cls = (enc.cls_token + pos[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in enc.blocks:
            x, _ = block(x)
        return enc.norm(x), mask, ids_restore

    def target(self, pixel_values: Tensor) -> Tensor:
        """Per-patch pixels (B, N, p*p*C), normalised per patch when norm_pix_loss."""
        t = patchify(pixel_values, self.config.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def forward(self, pixel_values: Tensor, noise: Tensor | None = None) -> MAEOutput:
        """Images (B, C, H, W) -> loss, predicted patches, mask. `noise` (B, N) fixes the mask."""
        H, W = pixel_values.shape[-2:]
        latent, mask, ids_restore = self.encode(pixel_values, noise)
        logits = self.decoder(latent, ids_restore, self.encoder.patch_embed.grid_size(H, W))
        per_patch = ((logits - self.target(pixel_values)) ** 2).mean(dim=-1)  # (B, N)
        loss = (per_patch * mask).sum() / mask.sum()
        return MAEOutput(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore)

    @torch.no_grad()
    def reconstruct(
        self, pixel_values: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(masked input, reconstruction) as images (B, C, H, W); visible patches are pasted
        from the input, predicted ones are de-normalised with the true patch statistics."""
        p, C = self.config.patch_size, self.config.in_chans
        H, W = pixel_values.shape[-2:]
        grid = self.encoder.patch_embed.grid_size(H, W)
        out = self.forward(pixel_values, noise)
        pred = out.logits
        true = patchify(pixel_values, p)
        if self.norm_pix_loss:
            mean, var = true.mean(dim=-1, keepdim=True), true.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = out.mask.unsqueeze(-1)
        masked = unpatchify(true * (1 - m), p, grid, C)
        recon = unpatchify(true * (1 - m) + pred * m, p, grid, C)
        return masked, recon
