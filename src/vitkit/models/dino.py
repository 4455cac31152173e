"""DINO: self-distillation with no labels (Caron et al. 2021).

A student and a teacher ViT of the same architecture each carry a projection head. The teacher
is never trained by gradients: it is an exponential moving average of the student (momentum
0.996 -> 1 along a cosine). The teacher sees the 2 global crops of an image, the student all
crops (2 global + N local); the loss is the cross-entropy between the teacher's centred,
sharpened distribution (temperature 0.04 -> 0.07) and the student's (temperature 0.1) over
every pair of different views. Centering (an EMA of the teacher's mean output) and sharpening
together keep the teacher from collapsing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.models.vit import VisionTransformer


class DINOHead(nn.Module):
    """MLP (3 layers, GELU) -> bottleneck -> L2 normalisation -> weight-normalised linear layer
    to `out_dim` prototypes (its norm fixed to 1 when `norm_last_layer`).

    `use_bn` puts a BatchNorm after each hidden layer (DINO's option, used there for ResNets):
    it removes what all images of a batch share, which on tiny images (8x8 digits) is nearly
    all of a freshly initialised encoder's output, and would otherwise leave the centred
    teacher uniform from the first steps.
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
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
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
        """center <- m * center + (1 - m) * mean of this batch's teacher outputs."""
        batch_center = teacher_out.mean(dim=0, keepdim=True)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)


def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine schedule of the EMA momentum from `base` (step 0) to `final` (last step)."""
    if total_steps <= 1:
        return final
    return final - (final - base) * (math.cos(math.pi * step / (total_steps - 1)) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


class DINO(nn.Module):
    """Student and teacher (backbone + DINO head) and the loss. `student.backbone` is a plain
    `VisionTransformer` (num_classes=0); the teacher's backbone is usually the better encoder
    to keep (DINO's paper evaluates the teacher)."""

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

    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)


class MultiCrop:
    """DINO's multi-crop: 2 global crops (scale 0.4-1) and `n_local` local crops (scale
        0.05-0.4) of one image (C, H, W), with random horizontal flips unless `hflip=False` (digits),
    via torchvision.transforms.v2 (`batch` draws the same crops for a whole batch at once).

        Sizes default to the image size and 3/7 of it (224 -> 96 as in DINO), rounded to a multiple
        of `patch_size`, so tiny images (8x8 digits) get 8 and 4 pixel crops with patch 2.
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
        from torchvision.transforms import v2

        def fit(size: float) -> int:
            return max(patch_size, round(size / patch_size) * patch_size)

        g = global_size or fit(image_size)
        loc = local_size or fit(image_size * 3 / 7)
        self.n_local = n_local
        self.hflip = hflip

        def crop(size: int, scale: tuple[float, float]):
            return v2.Compose(
                [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
            )

        self.global_crop = crop(g, global_scale)
        self.local_crop = crop(loc, local_scale)
        self.global_size, self.local_size = g, loc
        self.global_scale, self.local_scale = global_scale, local_scale

    def __call__(self, image: Tensor) -> list[Tensor]:
        crops = [self.global_crop(image), self.global_crop(image)]
        return crops + [self.local_crop(image) for _ in range(self.n_local)]

    def batch(self, images: Tensor) -> list[Tensor]:
        """(B, C, H, W) -> [(B, C, g, g) x 2, (B, C, l, l) x n_local], every image with its own
        random crops. Batched: boxes drawn as RandomResizedCrop does (area fraction in `scale`,
        aspect ratio in [3/4, 4/3]), cut and resized bilinearly in one `roi_align` call."""
        specs = [(self.global_size, self.global_scale)] * 2
        specs += [(self.local_size, self.local_scale)] * self.n_local
        return [_random_resized_crops(images, size, scale, self.hflip) for size, scale in specs]


def _random_resized_crops(
    images: Tensor, size: int, scale: tuple[float, float], hflip: bool
) -> Tensor:
    from torchvision.ops import roi_align

    B, _, H, W = images.shape
    area = H * W * torch.empty(B).uniform_(*scale)
    log_ratio = torch.empty(B).uniform_(math.log(3 / 4), math.log(4 / 3))
    w = (area * log_ratio.exp()).sqrt().clamp(1, W)
    h = (area / log_ratio.exp()).sqrt().clamp(1, H)
    x0 = torch.rand(B) * (W - w)
    y0 = torch.rand(B) * (H - h)
    boxes = torch.stack([torch.arange(B, dtype=torch.float), x0, y0, x0 + w, y0 + h], dim=1)
    crops = roi_align(
        images.float(),
        boxes.to(images.device),
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=2,
        aligned=True,
    )
    flip = torch.rand(B, device=images.device) < (0.5 if hflip else 0.0)
    crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
    return crops.to(images.dtype)
