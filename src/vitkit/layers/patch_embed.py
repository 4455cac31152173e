"""Split an image into non-overlapping patches and project each one to the model width."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import ConfigError


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch size: the paper's linear projection of flattened patches.

    Input (B, C, H, W) -> tokens (B, N, D) with N = (H / P) * (W / P), row-major over the grid.
    With `pad=True`, H and W are zero-padded on the bottom/right up to a multiple of P.

    `stem_channels` puts 3x3 convolutions (BatchNorm, ReLU; one per entry, of that width, with
    the stride of its `stem_strides` entry, 1 by default) before the projection, which then
    reads their feature map instead of the pixels: the paper's hybrid input (section 3.1) with
    the convolutional stem of Xiao et al. 2021 ("Early Convolutions Help Transformers See
    Better"), for small images and datasets. The projection's kernel and stride shrink by the
    stem's total stride, so the grid, the tokens and everything after them are the same as
    without it. With `pad`, the image is padded before the stem.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        pad: bool = False,
        bias: bool = True,
        stem_channels: tuple[int, ...] = (),
        stem_strides: tuple[int, ...] = (),
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.pad = pad
        strides = stem_strides or (1,) * len(stem_channels)
        self.stem = _conv_stem(in_chans, stem_channels, strides) if stem_channels else None
        width = stem_channels[-1] if stem_channels else in_chans
        k = patch_size // math.prod(strides)  # the rest of the patch, on the stem's map
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=k, stride=k, bias=bias)

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
        if c != self.in_chans:
            raise ConfigError(f"model expects {self.in_chans} input channels, got {c}")
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
        if self.stem is not None:
            x = self.stem(x)  # (B, C', H / S, W / S), S the stem's stride
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def _conv_stem(in_chans: int, widths: tuple[int, ...], strides: tuple[int, ...]) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm -> ReLU per width; stride 1 keeps the size, 2 halves it
    (the sizes are multiples of the patch, which the strides' product divides)."""
    stem = nn.Sequential()
    for i, (width, stride) in enumerate(zip(widths, strides, strict=True)):
        conv = nn.Conv2d(in_chans, width, 3, stride=stride, padding=1, bias=False)
        stem.add_module(f"conv{i}", conv)
        stem.add_module(f"bn{i}", nn.BatchNorm2d(width))
        stem.add_module(f"act{i}", nn.ReLU(inplace=True))
        in_chans = width
    return stem


def refuse_stem_for_masking(stem_channels: tuple[int, ...], method: str) -> None:
    """Masked-image pre-training hides patches; a stem's 3x3 convolutions read across patch
    borders, so visible tokens would see the hidden pixels. Refuse in one line."""
    if stem_channels:
        raise ConfigError(
            f"{method} masks patches, and a convolutional stem (stem_channels="
            f"{list(stem_channels)}) reads across their borders; pre-train without stem_channels"
        )
