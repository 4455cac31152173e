"""Batch-level mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) with soft targets.

One mixing coefficient is drawn per batch (timm's default "batch" mode): every image is blended
with the batch reversed (`images.flip(0)`), which is a fixed permutation pairing i with B-1-i.
Cutmix pastes one box from the partner image; its lambda is then corrected to the exact fraction
of the image the box leaves untouched, so the targets match the pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vitkit.errors import ConfigError

__all__ = ["MixupCutmix", "one_hot_smooth", "soft_target_cross_entropy"]


def one_hot_smooth(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """(B,) int labels -> (B, K) float targets: 1 - s + s/K on the label, s/K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -sum_k targets_k * log_softmax(logits)_k, for (B, K) soft targets."""
    return torch.sum(-targets * logits.float().log_softmax(dim=-1), dim=-1).mean()


class MixupCutmix:
    """Mix a batch of images and return soft targets.

        mix = MixupCutmix(num_classes=10)
        images, targets = mix(images, labels)   # (B, C, H, W), (B, K); targets rows sum to 1
        loss = soft_target_cross_entropy(logits, targets)

    `mixup_alpha` / `cutmix_alpha` are the Beta(a, a) parameters; 0 disables that kind. With both
    enabled, cutmix is chosen with probability `switch_prob`. `prob` is the chance a batch is mixed
    at all (otherwise only label smoothing applies). Pass a `torch.Generator` for reproducibility.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        if num_classes < 1:
            raise ConfigError(f"MixupCutmix: num_classes must be >= 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError("MixupCutmix: mixup_alpha and cutmix_alpha must be >= 0 (0 disables)")
        for name, value in (
            ("prob", prob),
            ("switch_prob", switch_prob),
            ("label_smoothing", label_smoothing),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"MixupCutmix: {name} must be in [0, 1], got {value}")
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.generator = generator
        self.last_lam: float = 1.0
        self.last_box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1) of a cutmix

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) images and (B,) int labels -> mixed images and (B, K) soft targets."""
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"MixupCutmix expects (B, C, H, W) images and (B,) labels, got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        lam, use_cutmix = self._draw()
        self.last_box = None
        if lam < 1.0:
            images = images.clone()
            if use_cutmix:
                (y0, y1, x0, x1), lam = self._box(images.shape[-2:], lam)
                self.last_box = (y0, y1, x0, x1)
                images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        self.last_lam = lam
        targets = one_hot_smooth(labels, self.num_classes, self.label_smoothing)
        targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return images, targets.to(images.dtype if images.is_floating_point() else torch.float32)

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _beta(self, alpha: float) -> float:
        # Beta(a, a) from two Gammas, on the generator so runs are reproducible
        g = torch._standard_gamma(
            torch.full((2,), alpha, dtype=torch.float64), generator=self.generator
        )
        return float(g[0] / g.sum())

    def _draw(self) -> tuple[float, bool]:
        if not self.enabled or self._uniform() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self._uniform() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        return self._beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha), use_cutmix

    def _box(self, hw: torch.Size, lam: float) -> tuple[tuple[int, int, int, int], float]:
        """A box of area ~(1 - lam) * H * W at a uniform centre, clipped; lam corrected to match."""
        H, W = int(hw[0]), int(hw[1])
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(H * ratio), int(W * ratio)
        cy = int(torch.randint(0, H, (), generator=self.generator))
        cx = int(torch.randint(0, W, (), generator=self.generator))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
        return (y0, y1, x0, x1), lam
