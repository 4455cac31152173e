"""DINO: self-distillation with no labels (Caron et al. 2021).

A student and a teacher ViT of the same architecture each carry a projection head. The teacher
is never trained by gradients: it is an exponential moving average of the student (momentum
0.996 -> 1 along a cosine). The teacher sees the 2 global crops of an image, the student all
crops (2 global + N local); the loss is the cross-entropy between the teacher's centred,
sharpened distribution (temperature 0.04 -> 0.07) and the student's (temperature 0.1) over
every pair of different views. Centering (an EMA of the teacher's mean output) and sharpening
together keep the teacher from collapsing.

Training lives elsewhere: the crops are `vitkit.data.transforms.MultiCrop`'s, the teacher's
average is `vitkit.train.ema.ModelEMA`'s (both driven by `train/objectives.py:DINOObjective`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.models.vit import VisionTransformer


def _world() -> int:
    """How many processes train together (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """The sum over processes of a tensor; its gradient is the sum of the processes' gradients
    (what torch.distributed.nn.functional.all_reduce did before its deprecation)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad)


class _GlobalBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics are those of the global batch when several
    processes train, as DINO's SyncBatchNorm (torch's refuses CPU tensors). The all-reduces
    carry gradients, so each process's backward accounts for the rows of the others. Parameters
    and buffers are BatchNorm1d's; in one process it is BatchNorm1d."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        xf = x.float()  # (B, C)
        sums = _AllReduceSum.apply(torch.cat([xf.sum(0), xf.new_tensor([len(xf)])]))
        n = sums[-1].detach()  # rows over all processes
        mean = sums[:-1] / n
        var = _AllReduceSum.apply(((xf - mean) ** 2).sum(0)) / n  # biased, as for normalising
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * n / (n - 1), m)
        return y.to(x.dtype)


class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> bottleneck -> L2 normalisation -> weight-normalised linear layer
    to `out_dim` prototypes (its norm fixed to 1 when `norm_last_layer`).

    `use_bn` puts a BatchNorm after each hidden layer (DINO's option, used there for ResNets):
    it removes what all images of a batch share, which on tiny images (8x8 digits) is nearly
    all of a freshly initialised encoder's output, and would otherwise leave the centred
    teacher uniform from the first steps. Its statistics are the global batch's under torchrun.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(_GlobalBatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0  # (out_dim, 1) norms
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)  # (B, bottleneck) on the unit sphere
        return self.last_layer(x)  # (B, out_dim)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: crops of one resolution go through the backbone
    together; the [CLS] features of all crops are concatenated before the head."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(
                self.backbone.forward_features(torch.cat(list(crops[start:end]))).pooler_output
            )
            start = end
        return self.head(torch.cat(feats))  # (n_crops * B, out_dim)


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax over the global crops and
    the student's softmax over every other crop; updates the center after each call."""

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_fraction: float = 0.3,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_fraction = warmup_fraction
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.stats: dict[str, float] = {}

    def teacher_temperature(self, progress: float) -> float:
        """Linear warm-up from warmup_teacher_temp to teacher_temp over the first
        `warmup_fraction` of training (progress in [0, 1]), constant after."""
        if self.warmup_fraction <= 0 or progress >= self.warmup_fraction:
            return self.teacher_temp
        t = progress / self.warmup_fraction
        return self.warmup_teacher_temp + t * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(
        self, student_out: Tensor, teacher_out: Tensor, n_crops: int, progress: float = 1.0
    ) -> Tensor:
        """student_out (n_crops*B, K), teacher_out (2*B, K) -> scalar loss."""
        student = (student_out / self.student_temp).chunk(n_crops)
        temp = self.teacher_temperature(progress)
        probs = F.softmax((teacher_out - self.center) / temp, dim=-1).detach()
        self._watch(probs)
        teacher = probs.chunk(2)
        total, terms = student_out.new_zeros(()), 0
        for iq, q in enumerate(teacher):
            for v in range(n_crops):
                if v == iq:
                    continue  # the same view for student and teacher
                total = total + (-q * F.log_softmax(student[v], dim=-1)).sum(dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def _watch(self, probs: Tensor) -> None:
        """Collapse shows in two entropies of the teacher's outputs (Caron et al. 2021, fig. 7):
        per image near log K means uniform outputs; of the batch mean near 0, one prototype."""
        per_image = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        mean = probs.mean(0)
        batch = -(mean * mean.clamp_min(1e-12).log()).sum()
        self.stats = {"teacher_entropy": float(per_image), "teacher_batch_entropy": float(batch)}

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of this batch's teacher outputs, over every
        process as in DINO's code (each process holds an equal share of the batch)."""
        batch_center = teacher_out.mean(dim=0, keepdim=True)
        if _world() > 1:
            dist.all_reduce(batch_center)
            batch_center /= _world()
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)


def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine schedule of the EMA momentum from `base` (step 0) to `final` (last step)."""
    if total_steps <= 1:
        return final
    return final - (final - base) * (math.cos(math.pi * step / (total_steps - 1)) + 1) / 2


class DINO(nn.Module):
    """Student and teacher (backbone + DINO head) and the loss. `student.backbone` is a plain
    `VisionTransformer` (num_classes=0); the teacher's backbone is usually the better encoder
    to keep (DINO's paper evaluates the teacher). The teacher starts as a copy of the student;
    whoever trains averages the student into it after each step."""

    def __init__(
        self,
        config: ViTConfig,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn: bool = False,
        n_local_crops: int = 6,
        **loss_kwargs: float,
    ):
        super().__init__()
        backbone = VisionTransformer(config.replace(num_classes=0))
        head = DINOHead(
            backbone.num_features,
            out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            norm_last_layer=norm_last_layer,
            use_bn=use_bn,
        )
        self.student = MultiCropWrapper(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.loss = DINOLoss(out_dim, **loss_kwargs)
        self.n_crops = 2 + n_local_crops

    @property
    def config(self) -> ViTConfig:
        return self.student.backbone.config

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher
        for m in self.teacher.modules():  # but batch statistics, as in DINO's code
            if isinstance(m, nn.BatchNorm1d):
                m.train(mode)
        return self

    def forward(self, crops: Sequence[Tensor], progress: float = 1.0) -> Tensor:
        """crops: 2 global crops then the local ones, each (B, C, h, w) -> the DINO loss."""
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        student_out = self.student(crops)
        return self.loss(student_out, teacher_out, len(crops), progress)
