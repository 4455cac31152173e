"""Training augmentation: one settings object, `Augmentation` (built from a `Recipe`), drives
two paths with the same steps:

- `Augmentation.batch`: batch ops on in-memory tensors (built-in datasets), vectorised over the
  batch and driven by an explicit `torch.Generator`, so a run is reproducible step by step and
  resumable bit for bit;
- `Augmentation.per_image`: a torchvision.transforms.v2 pipeline for file datasets.

DINO's multi-crop views (`MultiCrop`) cut the batch path's random-resized-crop boxes.

Pixels stay in [0, 1]; the run's mean / std apply after (`TrainData.normalize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Translate each image (B, C, H, W) by up to `pad` pixels in x and y, filling with zeros."""
    if pad <= 0:
        return x
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (torch.arange(H)[None] + oy[:, None]).to(x.device)  # (B, H)
    cols = (torch.arange(W)[None] + ox[:, None]).to(x.device)  # (B, W)
    xp = xp.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))  # (B, C, H, W+2p)
    return xp.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror a random half of the batch left-right."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_boxes(
    n: int,
    scale: tuple[float, float],
    generator: torch.Generator | None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """(n, 4) crop boxes as torchvision's RandomResizedCrop draws them: an area fraction in
    `scale`, an aspect ratio in `ratio`, a uniform position; as (width, height, centre x,
    centre y) in the [-1, 1] coordinates of `resized_crop`."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    return torch.stack([w, h, cx, cy], dim=1)


def resized_crop(x: Tensor, boxes: Tensor, size: int | None = None) -> Tensor:
    """Cut box i of `boxes` (see `random_boxes`; a negative width mirrors it left-right) out of
    image i of (B, C, H, W) and resize it (bilinear) to `size` x `size`, or to (H, W): with
    `random_boxes`, torchvision's RandomResizedCrop for a batch."""
    out = (size, size) if size else tuple(x.shape[-2:])
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = boxes.unbind(1)
    grid = F.affine_grid(theta.to(x), [*x.shape[:2], *out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_affine(
    x: Tensor, degrees: float, scale: tuple[float, float], generator: torch.Generator
) -> Tensor:
    """Rotate each image by up to +-`degrees` and zoom by a factor in `scale` about its centre
    (bilinear, zero fill), as torchvision's RandomAffine does without translation."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=generator) * 2 - 1) * math.radians(degrees)
    zoom = torch.empty(B).uniform_(scale[0], scale[1], generator=generator)
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_elastic(x: Tensor, alpha: float, sigma: float, generator: torch.Generator) -> Tensor:
    """Elastic distortion (Simard et al. 2003) with torchvision's `ElasticTransform` parameters:
    each image gets its own displacement field, uniform noise in [-1, 1] smoothed by a Gaussian
    of `sigma` pixels and scaled so that `alpha` moves a pixel by alpha / 2 times the smoothed
    value (bilinear, zero fill)."""
    # lazy: torchvision loads torch._dynamo (~1.5 s)
    from torchvision.transforms.v2.functional import gaussian_blur

    B, _, H, W = x.shape
    noise = torch.rand(B, 2, H, W, generator=generator) * 2 - 1
    if sigma > 0:
        k = int(8 * sigma + 1) | 1  # odd, as torchvision's
        noise = gaussian_blur(noise, [min(k, 2 * H - 1) | 1, min(k, 2 * W - 1) | 1], [sigma])
    shift = noise.permute(0, 2, 3, 1) * (alpha / torch.tensor([W, H]))  # (B, H, W, 2), x then y
    theta = torch.eye(2, 3).expand(B, 2, 3)
    grid = F.affine_grid(theta, [B, 1, H, W], align_corners=False) + shift
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Augmentation:
    """A run's training augmentation, one object for both paths (`Recipe` fields of the same
    names; each step only when enabled): `batch` for in-memory tensors, `per_image` for files.

    random_shift: pixels of random translation (zero padded).  hflip: random left-right flips.
    rrc_scale: RandomResizedCrop's area range (instead of the shift).  rotate: +- degrees.
    zoom: scale range.  elastic: (alpha, sigma) of torchvision's ElasticTransform.
    auto_augment: "randaugment" | "trivialaugment" (the per-image path only).
    """

    random_shift: int = 0
    hflip: bool = False
    rrc_scale: tuple[float, float] | None = None
    rotate: float = 0.0
    zoom: tuple[float, float] | None = None
    elastic: tuple[float, float] | None = None
    auto_augment: str | None = None

    @classmethod
    def from_recipe(cls, recipe: Any) -> Augmentation:
        return cls(**{f.name: getattr(recipe, f.name) for f in fields(cls)})

    def batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> augmented: crop, rotate / zoom, elastic distortion,
        shift, flip, every random number from `generator`."""
        if self.rrc_scale is not None:
            x = resized_crop(x, random_boxes(len(x), self.rrc_scale, generator))
        if self.rotate or self.zoom is not None:
            x = random_affine(x, self.rotate, self.zoom or (1.0, 1.0), generator)
        if self.elastic is not None:
            x = random_elastic(x, self.elastic[0], self.elastic[1], generator)
        x = random_shift(x, self.random_shift, generator)
        return random_hflip(x, generator) if self.hflip else x

    def per_image(self, image_size: int, in_chans: int) -> Any:
        """A torchvision.transforms.v2 pipeline for one PIL image or tensor -> (C, S, S) float in
        [0, 1]: resize (or RandomResizedCrop, or resize then a padded random crop), then the
        enabled steps; `Augmentation()` only resizes (evaluation)."""
        # lazy: torchvision loads torch._dynamo (~1.5 s)
        from torchvision.transforms import v2

        ops: list = [v2.ToImage(), v2.Grayscale(1) if in_chans == 1 else v2.RGB()]
        size = (image_size, image_size)
        if self.rrc_scale is not None:
            ops.append(v2.RandomResizedCrop(size, scale=tuple(self.rrc_scale), antialias=True))
        else:
            ops.append(v2.Resize(size, antialias=True))
            if self.random_shift:
                ops.append(v2.RandomCrop(size, padding=self.random_shift))
        if self.rotate or self.zoom is not None:
            ops.append(v2.RandomAffine(degrees=self.rotate, scale=self.zoom))
        if self.elastic is not None:
            ops.append(v2.ElasticTransform(alpha=self.elastic[0], sigma=self.elastic[1]))
        if self.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if self.auto_augment == "randaugment":
            ops.append(v2.RandAugment())
        elif self.auto_augment == "trivialaugment":
            ops.append(v2.TrivialAugmentWide())
        ops.append(v2.ToDtype(torch.float32, scale=True))
        return v2.Compose(ops)


class MultiCrop:
    """DINO's multi-crop (Caron et al. 2021) of a batch: 2 global crops (area 0.4-1 of the
    image) and `n_local` local ones (0.05-0.4), each image its own boxes (`random_boxes`) and,
    unless `hflip=False` (digits), its own horizontal flips.

    Sizes default to the image size and 3/7 of it (224 -> 96 as in DINO), rounded to a multiple
    of `patch_size`, so tiny images (8x8 digits) get 8 and 4 pixel crops with patch 2.
    `draw(n, generator)` draws every random number of n images and `cut(images, draws)` applies
    them, so that each process draws for the global batch and cuts its own rows.
    """

    def __init__(
        self,
        image_size: int,
        *,
        patch_size: int = 1,
        n_local: int = 6,
        global_size: int | None = None,
        local_size: int | None = None,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        hflip: bool = True,
    ):
        def fit(size: float) -> int:
            return max(patch_size, round(size / patch_size) * patch_size)

        local = (local_size or fit(image_size * 3 / 7), local_scale)  # (size, scale) of a view
        self.views = [(global_size or fit(image_size), global_scale)] * 2 + [local] * n_local
        self.hflip = hflip

    def draw(self, n: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """Per view, the (n, 4) boxes of n images (`random_boxes`), negative widths mirrored."""
        draws = []
        for _, scale in self.views:
            boxes = random_boxes(n, scale, generator)
            if self.hflip:
                boxes[torch.rand(n, generator=generator) < 0.5, 0] *= -1
            draws.append(boxes)
        return draws

    def cut(self, images: Tensor, draws: list[Tensor]) -> list[Tensor]:
        """(B, C, H, W) and B rows of `draw` -> [(B, C, g, g) x 2, (B, C, l, l) x n_local]."""
        views = zip(self.views, draws, strict=True)
        return [resized_crop(images, boxes, size) for (size, _), boxes in views]

    def batch(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """The views of a batch (B, C, H, W), drawn for these B images."""
        return self.cut(images, self.draw(len(images), generator))
