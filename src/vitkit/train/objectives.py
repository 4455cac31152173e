"""What a training run optimises. Each objective owns its model wrapper, its loss and what it
logs or draws; the trainer (train/trainer.py) owns everything else.

An objective is an `nn.Module` whose `forward(images, labels, rng)` returns the scalar loss, so
DistributedDataParallel wraps it whole. `rng` is a generator seeded by (seed, epoch, step,
micro-batch) that draws randomness for the *global* micro-batch; each process keeps its own rows
(`_shard`), so N processes draw exactly what one process with the same global batch draws.

    classify   cross-entropy (label smoothing, mixup / cutmix) on the model's logits
    distill    DeiT: the [CLS] head learns the labels, the [DIST] head a frozen teacher
    simmim     masked image modelling with a one-layer pixel decoder (Xie et al. 2022)
    mae        masked autoencoder (He et al. 2022)
    dino       self-distillation with no labels (Caron et al. 2021)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.data.augment import soft_target_cross_entropy
from vitkit.data.transforms import MultiCrop
from vitkit.explain import attention_map
from vitkit.models.dino import DINO, teacher_momentum
from vitkit.models.distill import DistillationLoss
from vitkit.models.mae import MaskedAutoencoder
from vitkit.models.mim import SimMIM, mask_block_for, simmim_mask
from vitkit.models.vit import VisionTransformer, ViTOutput, rebuild
from vitkit.train.ema import ModelEMA
from vitkit.train.lora import HEADS
from vitkit.viz import save_attention_maps, save_reconstruction


@dataclass
class Shard:
    """This process's rows of a global micro-batch."""

    rank: int = 0
    world: int = 1

    def take(self, t: Tensor, rows: int) -> Tensor:
        return t[self.rank * rows : (self.rank + 1) * rows]


class Objective(nn.Module):
    """Base: `encoder_key` names the `VisionTransformer` the run exports; `trained_key` the copy
    the optimizer updates, where that is another one (DINO's student)."""

    encoder_key = "model"
    trained_key: str | None = None
    uses_labels = True  # evaluated by accuracy on labelled validation data

    def __init__(self) -> None:
        super().__init__()
        self.shard = Shard()
        self.sums: dict[str, float] = {}  # the epoch's figures so far; checkpoints keep them

    @property
    def encoder(self) -> VisionTransformer:
        return self.get_submodule(self.encoder_key)

    def export(self, encoder: VisionTransformer | None = None) -> VisionTransformer:
        """The model a run writes to last/, from `encoder` (an ordinary copy of a sharded
        one) or the objective's own."""
        return encoder if encoder is not None else self.encoder

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called before optimizer step `step` (0-based) of `total_steps`."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (DINO's teacher update)."""

    def add_logs(self, figures: dict[str, float]) -> None:
        """Add one step's figures to the epoch's sums."""
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["n"] = self.sums.get("n", 0.0) + 1

    def logs(self) -> dict[str, float]:
        """Extra figures for the metrics row of an epoch: the means of what `add_logs` was
        given since the last call."""
        n = self.sums.pop("n", 0.0)
        out = {k: v / n for k, v in self.sums.items()} if n else {}
        self.sums = {}
        return out

    def draw(self, images: Tensor, run_dir: Path) -> Path | None:
        """A picture of what was learned, written into run_dir (None: nothing to draw)."""
        return None

    # the model's own protocol, seen through the wrapper
    def no_weight_decay(self) -> set[str]:
        key = self.trained_key or self.encoder_key
        return {f"{key}.{n}" for n in self.encoder.no_weight_decay()}

    def layer_id(self, name: str) -> int:
        prefix = (self.trained_key or self.encoder_key) + "."
        if name.startswith(prefix):
            return self.encoder.layer_id(name[len(prefix) :])
        return self.encoder.num_layers - 1  # decoders and heads: with the encoder's head

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def extra_state(self) -> dict[str, Tensor]:
        """Every tensor but the encoder's (saved beside it for resume)."""
        prefix = self.encoder_key + "."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def load(self, encoder: dict[str, Tensor], extra: dict[str, Tensor]) -> None:
        prefix = self.encoder_key + "."
        self.load_state_dict({**{prefix + k: v for k, v in encoder.items()}, **extra})


# ---------------------------------------------------------------------------------- supervised
class Classify(Objective):
    """Cross-entropy on the logits; soft targets from mixup / cutmix when a mixer is given.
    `finetune` (train/lora.py): with "linear" only the head(s) train, so the encoder runs in
    eval mode and without autograd; with "lora" the frozen model's BatchNorm statistics stay
    as they were too."""

    def __init__(self, model: VisionTransformer, *, label_smoothing: float = 0.0, mixer=None,
                 finetune: str = "full"):  # fmt: skip
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.mixer = mixer
        self.finetune = finetune

    def train(self, mode: bool = True) -> Classify:
        super().train(mode)
        if self.finetune == "linear":  # no dropout, drop-path or BatchNorm updates
            for name, child in self.model.named_children():
                if name not in HEADS:
                    child.eval()
        elif self.finetune == "lora":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def logits(self, images: Tensor) -> ViTOutput:
        if self.finetune != "linear":
            return self.model(images)
        with torch.no_grad():
            features = self.model.forward_features(images)
        return self.model.forward_head(features)

    def targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.mixer(images, labels) if self.mixer is not None else (images, labels)

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.ndim == 2:  # soft targets (smoothing already applied by the mixer)
            return soft_target_cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def forward(self, images: Tensor, labels: Tensor, rng: torch.Generator) -> Tensor:
        images, target = self.targets(images, labels)
        return self.criterion(self.logits(images).logits.float(), target)


class Distill(Classify):
    """DeiT: the [CLS] head learns the labels, the [DIST] head the teacher's (hard or soft)."""

    def __init__(self, model: VisionTransformer, teacher: nn.Module, *, kind: str = "hard",
                 alpha: float = 0.5, tau: float = 1.0, **kwargs: Any):  # fmt: skip
        super().__init__(model, **kwargs)
        self.loss = DistillationLoss(teacher, self.criterion, kind, alpha=alpha, tau=tau)

    def forward(self, images: Tensor, labels: Tensor, rng: torch.Generator) -> Tensor:
        images, target = self.targets(images, labels)
        out = self.logits(images)
        out.cls_logits = out.cls_logits.float()
        out.distillation_logits = out.distillation_logits.float()
        return self.loss(images, out, target)


# ---------------------------------------------------------------------------------- SimMIM
class SimMIMObjective(Objective):
    encoder_key = "mim.encoder"
    uses_labels = False

    def __init__(self, config: ViTConfig, *, mask_ratio: float = 0.6, mask_patch_size=None):
        super().__init__()
        self.mim = SimMIM(config)
        self.mask_ratio = mask_ratio
        self.block = mask_block_for(self.mim.config, mask_patch_size)

    def mask(self, images: Tensor, rng: torch.Generator | None) -> Tensor:
        grid = self.encoder.patch_embed.grid_size(*images.shape[-2:])
        rows = len(images)
        full = simmim_mask(rows * self.shard.world, grid, mask_ratio=self.mask_ratio,
                           block=self.block, generator=rng)  # fmt: skip
        return self.shard.take(full, rows).to(images.device)

    def forward(self, images: Tensor, labels: Tensor, rng: torch.Generator) -> Tensor:
        return self.mim(images, bool_masked_pos=self.mask(images, rng)).loss

    def export(self, encoder: VisionTransformer | None = None) -> VisionTransformer:
        """The encoder without its mask token (fine-tuning never masks)."""
        return _without_mask_token(super().export(encoder))

    def draw(self, images: Tensor, run_dir: Path) -> Path:
        mask = self.mask(images, torch.Generator().manual_seed(0))
        recon = self.mim(images, bool_masked_pos=mask).reconstruction
        p = self.encoder.config.patch_size
        grid = self.encoder.patch_embed.grid_size(*images.shape[-2:])
        pix = mask.reshape(len(images), *grid).repeat_interleave(p, 1)
        pix = pix.repeat_interleave(p, 2).unsqueeze(1)
        masked = images.masked_fill(pix, 0.0)
        recon = torch.where(pix, recon, images)
        return save_reconstruction(images, masked, recon, run_dir / "reconstruction.png")


# ---------------------------------------------------------------------------------- MAE
class MAEObjective(Objective):
    encoder_key = "mae.encoder"
    uses_labels = False

    def __init__(self, config: ViTConfig, *, mask_ratio: float = 0.75, decoder_dim: int = 64,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):  # fmt: skip
        super().__init__()
        self.mae = MaskedAutoencoder(
            config,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            mask_ratio=mask_ratio,
            norm_pix_loss=norm_pix_loss,
        )

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mae.decoder.mask_token"}

    def noise(self, images: Tensor, rng: torch.Generator | None) -> Tensor:
        n = self.encoder.patch_embed.grid_size(*images.shape[-2:])
        rows = len(images)
        full = torch.rand(rows * self.shard.world, n[0] * n[1], generator=rng)
        return self.shard.take(full, rows).to(images.device)

    def forward(self, images: Tensor, labels: Tensor, rng: torch.Generator) -> Tensor:
        return self.mae(images, noise=self.noise(images, rng)).loss

    def export(self, encoder: VisionTransformer | None = None) -> VisionTransformer:
        """MAE fine-tunes on the mean of the patch tokens (He et al. 2022)."""
        return rebuild(super().export(encoder), global_pool="avg")

    def draw(self, images: Tensor, run_dir: Path) -> Path:
        masked, recon = self.mae.reconstruct(images, self.noise(images, torch.Generator()))
        return save_reconstruction(images, masked, recon, run_dir / "reconstruction.png")


# ---------------------------------------------------------------------------------- DINO
class DINOObjective(Objective):
    """Student and EMA teacher (`ModelEMA` on DINO's momentum schedule); the teacher's backbone
    is the encoder kept (DINO evaluates it). Crops and flips are drawn for the global batch."""

    encoder_key = "dino.teacher.backbone"
    trained_key = "dino.student.backbone"
    uses_labels = False

    def __init__(self, config: ViTConfig, *, out_dim: int = 1024, local_crops: int = 4,
                 hflip: bool = False, head_bn: bool = True, momentum_teacher: float = 0.996,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4),
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04):  # fmt: skip
        super().__init__()
        self.dino = DINO(
            config,
            out_dim=out_dim,
            hidden_dim=max(256, 4 * config.embed_dim),
            bottleneck_dim=min(256, max(64, config.embed_dim)),
            use_bn=head_bn,
            n_local_crops=local_crops,
            teacher_temp=teacher_temp,
            warmup_teacher_temp=warmup_teacher_temp,
        )
        self.crops = MultiCrop(config.image_hw[0], patch_size=config.patch_size, n_local=local_crops,
                               hflip=hflip, global_scale=global_scale, local_scale=local_scale)  # fmt: skip
        self.momentum_teacher = momentum_teacher
        self.teacher_ema = ModelEMA(self.dino.student, momentum_teacher, module=self.dino.teacher,
                                    params_only=True)  # fmt: skip
        self.progress = 0.0

    def views(self, images: Tensor, rng: torch.Generator | None) -> list[Tensor]:
        rows = len(images)
        draws = self.crops.draw(rows * self.shard.world, rng)
        return self.crops.cut(images, [self.shard.take(d, rows) for d in draws])

    def forward(self, images: Tensor, labels: Tensor, rng: torch.Generator) -> Tensor:
        loss = self.dino(self.views(images, rng), progress=self.progress)
        self.add_logs(self.dino.loss.stats)  # the teacher's entropies: collapse shows there first
        return loss

    def after_step(self, step: int, total_steps: int) -> None:
        m = teacher_momentum(step, total_steps, self.momentum_teacher)
        self.teacher_ema.update(self.dino.student, m)

    def begin_step(self, step: int, total_steps: int) -> None:
        self.progress = step / max(1, total_steps - 1)  # the teacher temperature's schedule

    def draw(self, images: Tensor, run_dir: Path) -> Path:
        maps = attention_map(self.encoder, images)  # the teacher's last-layer [CLS] attention
        return save_attention_maps(images, maps, run_dir / "attention.png")


def _without_mask_token(encoder: VisionTransformer) -> VisionTransformer:
    if not encoder.config.use_mask_token:
        return encoder
    plain = VisionTransformer(encoder.config.replace(use_mask_token=False))
    plain.load_state_dict({k: v for k, v in encoder.state_dict().items() if k != "mask_token"})
    return plain.to(next(encoder.parameters()).device)


def _classify(recipe: Any, model: VisionTransformer, teacher: nn.Module | None,
              mixer: Any) -> Objective:  # fmt: skip
    kw = dict(label_smoothing=recipe.label_smoothing, mixer=mixer, finetune=recipe.finetune)
    if teacher is not None:
        return Distill(model, teacher, kind=recipe.distillation, alpha=recipe.distillation_alpha,
                       tau=recipe.distillation_tau, **kw)  # fmt: skip
    return Classify(model, **kw)


def _simmim(recipe: Any, config: ViTConfig, *_: Any) -> Objective:
    return SimMIMObjective(config, mask_ratio=recipe.mask_ratio or 0.6,
                           mask_patch_size=recipe.mask_patch_size)  # fmt: skip


def _mae(recipe: Any, config: ViTConfig, *_: Any) -> Objective:
    return MAEObjective(config, mask_ratio=recipe.mask_ratio or 0.75,
                        decoder_dim=recipe.decoder_dim, decoder_depth=recipe.decoder_depth,
                        decoder_heads=recipe.decoder_heads,
                        norm_pix_loss=recipe.norm_pix_loss)  # fmt: skip


def _dino(recipe: Any, config: ViTConfig, *_: Any) -> Objective:
    return DINOObjective(config, out_dim=recipe.out_dim, local_crops=recipe.local_crops,
                         hflip=recipe.hflip, head_bn=recipe.head_bn,
                         global_scale=recipe.global_crop_scale,
                         local_scale=recipe.local_crop_scale,
                         momentum_teacher=recipe.momentum_teacher,
                         teacher_temp=recipe.teacher_temp,
                         warmup_teacher_temp=recipe.warmup_teacher_temp)  # fmt: skip


# A builder for each name of `recipe.Objective` (the names `Recipe.validate` accepts):
# (recipe, model or encoder config, teacher, mixer) -> Objective
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "classify": _classify, "simmim": _simmim, "mae": _mae, "dino": _dino,
}  # fmt: skip


def build_objective(recipe: Any, model_or_config: VisionTransformer | ViTConfig,
                    teacher: nn.Module | None = None, mixer: Any = None) -> Objective:  # fmt: skip
    """The recipe's objective around a model (classify) or an encoder config (pre-training,
    always headless)."""
    target = model_or_config
    if recipe.objective != "classify":
        config = target if isinstance(target, ViTConfig) else target.config
        target = config.replace(num_classes=0, id2label=None)
    return OBJECTIVES[recipe.objective](recipe, target, teacher, mixer)
