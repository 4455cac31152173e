"""Position embeddings: resampling a learned table to a new grid, and fixed 2D sin-cos tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = False,
) -> Tensor:
    """Resample a (1, prefix + Ho*Wo, D) position table to (1, prefix + Hn*Wn, D).

    The patch part is reshaped to its 2D grid, interpolated (align_corners=False, as timm and
    transformers do), and flattened back row-major; the prefix rows ([CLS], [DIST]) are kept as
    they are. `old_grid` defaults to a square grid. The same function serves at load time (resize a
    checkpoint) and at run time (any input resolution); it has no branches on tensor values, so
    it traces and exports with dynamic sizes.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n_old = patches.shape[1]
    if old_grid is None:
        side = round(n_old**0.5)
        if side * side != n_old:
            raise ValueError(
                f"position table has {n_old} patch rows, which is not a square grid; "
                f"pass old_grid=(height, width)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_old:
        raise ValueError(f"old_grid {old_grid} does not match the {n_old} patch rows of the table")
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(), size=new_grid, mode=mode, align_corners=False, antialias=antialias
    )
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def sincos_2d_pos_embed(
    grid: tuple[int, int],
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2D sin-cos position table of shape (H*W, D), as in MAE and MoCo v3.

    The first half of the channels encodes the column (x), the second half the row (y); within
    each half, sines then cosines over `dim / 4` frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {dim}")
    h, w = grid
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    omega = torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4)
    omega = 1.0 / temperature**omega  # (D/4,)
    out_x = xs.reshape(-1, 1) * omega  # (H*W, D/4)
    out_y = ys.reshape(-1, 1) * omega
    table = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)
    return table.to(dtype)
