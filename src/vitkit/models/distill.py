"""DeiT distillation (Touvron et al. 2021): a teacher's predictions train the [DIST] token's head.

The student is a `VisionTransformer` with `distilled=True`: its `ViTOutput` has `cls_logits`
(trained on the labels) and `distillation_logits` (trained on the teacher); at eval time
`logits` is the mean of both, as in the paper. `DistillationLoss` combines the two terms:

    hard: (1 - alpha) * CE(cls, y) + alpha * CE(dist, argmax teacher)      (DeiT's choice, alpha=.5)
    soft: (1 - alpha) * CE(cls, y) + alpha * tau^2 * KL(softmax(t/tau) || softmax(s/tau))
    none: base_criterion(logits, y)

The trainer wires this as `vitkit train --teacher SOURCE --distillation hard|soft|none
--distillation-alpha A --distillation-tau T`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import ConfigError
from vitkit.models.vit import logits_of

_TYPES = ("hard", "soft", "none")


class DistillationLoss(nn.Module):
    """DeiT's loss. Call as `loss(images, outputs, targets)` where `outputs` is the student's
    `ViTOutput` (or a tensor of logits when distillation_type="none")."""

    def __init__(
        self,
        teacher: nn.Module | None,
        base_criterion: Callable[[Tensor, Any], Tensor],
        distillation_type: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
    ):
        super().__init__()
        if distillation_type not in _TYPES:
            raise ConfigError(f"distillation_type={distillation_type!r}; choose one of {_TYPES}")
        if distillation_type != "none" and teacher is None:
            raise ConfigError(f"distillation_type={distillation_type!r} needs a teacher")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha={alpha} must lie in [0, 1]")
        self.base_criterion = base_criterion
        self.distillation_type = distillation_type
        self.alpha, self.tau = alpha, tau
        # not a submodule: the teacher's weights stay out of the student's optimizer/state dict
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()  # the teacher is never in training mode
        return self

    def forward(self, images: Tensor, outputs: Any, targets: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            cls_logits, dist_logits = outputs, None
        elif outputs.distillation_logits is not None:
            cls_logits, dist_logits = outputs.cls_logits, outputs.distillation_logits
        else:
            cls_logits, dist_logits = outputs.logits, None
        if self.distillation_type == "none":
            return self.base_criterion(cls_logits, targets)
        if dist_logits is None:
            raise ConfigError(
                "distillation needs a student with a distillation token (config.distilled=True)"
            )
        base = self.base_criterion(cls_logits, targets)
        teacher = self.teacher
        assert teacher is not None
        teacher.eval()
        with torch.no_grad():
            t = logits_of(teacher(images)).float()
        if self.distillation_type == "hard":
            dist = F.cross_entropy(dist_logits, t.argmax(dim=1))
        else:
            T = self.tau
            dist = (
                F.kl_div(
                    F.log_softmax(dist_logits / T, dim=1),
                    F.log_softmax(t / T, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (T * T)
                / dist_logits.numel()
            )
        return base * (1 - self.alpha) + dist * self.alpha
