"""Split an image into non-overlapping patches and project each one to the model width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import ConfigError


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch size: the paper's linear projection of flattened patches.

    Input (B, C, H, W) -> tokens (B, N, D) with N = (H / P) * (W / P), row-major over the grid.
    With `pad=True`, H and W are zero-padded on the bottom/right up to a multiple of P.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        pad: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.pad = pad
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias
        )

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if self.pad:
            return (-(-height // p), -(-width // p))
        return (height // p, width // p)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ConfigError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        _, c, h, w = x.shape
        p = self.patch_size
        if c != self.proj.in_channels:
            raise ConfigError(f"model expects {self.proj.in_channels} input channels, got {c}")
        if self.pad:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        elif not (torch.compiler.is_compiling() or torch.compiler.is_exporting()) and (
            h % p or w % p
        ):
            raise ConfigError(
                f"image size {h}x{w} is not a multiple of the patch size {p}; resize to "
                f"{max(p, h // p * p)}x{max(p, w // p * p)} or build the model with "
                f"dynamic_img_pad=True"
            )
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
