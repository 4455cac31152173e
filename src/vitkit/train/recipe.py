"""`Recipe`: every knob of a training run in one dataclass, read from YAML and overridden from
the command line (`--set key=value`). Validation lives here, with messages that say what to change."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from vitkit._fields import AT_LEAST_0, POSITIVE, RATE, In, known, problems
from vitkit.errors import ConfigError

Objective = Literal["classify", "simmim", "mae", "dino"]  # each built by objectives.OBJECTIVES
Dtype = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "linear", "constant"]
AutoAugment = Literal["randaugment", "trivialaugment"]
Distillation = Literal["hard", "soft", "none"]
Finetune = Literal["full", "linear", "lora"]
LoRATarget = Literal["qkv", "proj", "fc1", "fc2"]
Strategy = Literal["ddp", "fsdp", "auto"]
UNIT, FRACTION = In("[0, 1]"), In("(0, 1]")
SCALE = In("(0, 1]", ordered=True)  # [low, high] fractions of an image
ZOOM = In("(0, inf)", ordered=True)

# `vitkit pretrain` starts from these instead of the classification defaults
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    epochs=100,
    batch_size=128,
    lr=1.5e-3,
    min_lr=1e-5,
    betas=(0.9, 0.95),
    clip_grad=3.0,
    drop_path=0.0,
    random_shift=0,
    label_smoothing=0.0,
    ema_decay=None,
    knn_every_epochs=10,
)
# DINO on top of those: more and smaller steps, a sharper teacher, more local views (measured on
# digits: validation k-NN 0.22 with the MAE-style defaults, 0.93 with these; benchmarks/RESULTS.md)
DINO_DEFAULTS: dict[str, Any] = dict(
    epochs=150, batch_size=32, lr=5e-4, teacher_temp=0.04, local_crops=6
)
# DINO crops of tiny images (8x8 digits, 28x28 MNIST): the paper's scales for 224 px photos
# (global 0.4-1, local 0.05-0.4) leave a few pixels of a digit
SMALL_IMAGE_CROPS: dict[str, Any] = dict(global_crop_scale=(0.7, 1.0), local_crop_scale=(0.3, 0.7))


def pretrain_defaults(method: str, *, small_images: bool = False) -> dict[str, Any]:
    """The recipe fields `vitkit pretrain --method METHOD` starts from."""
    out = dict(PRETRAIN_DEFAULTS)
    if method == "dino":
        out.update(DINO_DEFAULTS, **(SMALL_IMAGE_CROPS if small_images else {}))
    return out


@dataclass
class Recipe:
    """A training run. Defaults are the digits recipe (`configs/digits.yaml`)."""

    objective: Objective = "classify"
    # model
    model: str = "vit_digits_convstem_patch2_8"  # preset name (`vitkit models`)
    # any ViTConfig field on top of the preset (or of the `init` checkpoint's config)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # pretrained weights: vitkit dir, or what from_pretrained accepts
    head_init_zero: bool = True  # zero the new head when `init` changes num_classes
    # what trains (train/lora.py): every parameter, the head(s) on a frozen backbone, or
    # low-rank adapters on the blocks' Linear layers (`lora_targets`) plus the head(s)
    finetune: Finetune = "full"
    lora_rank: Annotated[int, POSITIVE] = 8
    lora_alpha: Annotated[float, POSITIVE] = 16.0  # the update is scaled by alpha / rank
    lora_dropout: Annotated[float, RATE] = 0.0  # on the adapter's input
    lora_targets: tuple[LoRATarget, ...] = ("qkv", "proj", "fc1", "fc2")
    drop_path: Annotated[float | None, RATE] = 0.1  # stochastic depth rate (None: the preset's)
    dropout: Annotated[float | None, RATE] = None  # dropout rate (None: the preset's)
    # data
    data: str = "digits"  # digits | mnist | a folder (train/ val/), a CIFAR dir or a list file
    val_data: str | None = None  # validation folder or list (None: val/ inside data, or carved)
    test_data: str | None = None  # test folder or list (None: test/ inside data, built-in test)
    # carved, stratified, from the training part when there is no val
    val_fraction: Annotated[float, RATE] = 0.1
    # classify with a stratified fraction of the training and validation labels (seed 0),
    # e.g. 0.1 to measure what pre-training is worth with few labels
    label_fraction: Annotated[float, FRACTION] = 1.0
    all_data: bool = False  # self-supervised: also pre-train on validation and test images
    mean: tuple[float, ...] | None = None  # normalisation (None: the init checkpoint's, else 0.5)
    std: Annotated[tuple[float, ...] | None, POSITIVE] = None
    image_size: Annotated[int | None, POSITIVE] = None  # training resolution (None: the model's)
    num_workers: Annotated[int, AT_LEAST_0] = 0  # DataLoader workers for file datasets
    # schedule
    epochs: Annotated[int, POSITIVE] = 160
    # global batch (summed over processes and accumulation steps)
    batch_size: Annotated[int, POSITIVE] = 64
    # gradient accumulation: micro-batch = batch_size / accum_steps / world
    accum_steps: Annotated[int, POSITIVE] = 1
    optimizer: Optimizer = "adamw"
    lr: Annotated[float, POSITIVE] = 2e-3
    min_lr: Annotated[float, AT_LEAST_0] = 1e-6
    weight_decay: Annotated[float, AT_LEAST_0] = 0.05
    momentum: Annotated[float, AT_LEAST_0] = 0.9  # SGD only
    betas: Annotated[tuple[float, float], RATE] = (0.9, 0.999)  # AdamW only
    schedule: Schedule = "cosine"
    warmup_epochs: Annotated[float, AT_LEAST_0] = 5.0
    # layer-wise lr decay for fine-tuning
    layer_decay: Annotated[float | None, In("(0, 1]", "e.g. 0.75")] = None
    # max global gradient norm
    clip_grad: Annotated[float | None, In("(0, inf)", "or null for no clipping")] = None
    label_smoothing: Annotated[float, RATE] = 0.1
    # augmentation
    random_shift: Annotated[int, AT_LEAST_0] = 1  # pixels of random translation (zero padded)
    hflip: bool = False  # horizontal flips (never for digits)
    # random rotation, +- degrees (digits: 10 under-trains in 100 epochs)
    rotate: Annotated[float, In("[0, 180]", "in degrees")] = 0.0
    zoom: Annotated[tuple[float, float] | None, ZOOM] = None  # factor range, e.g. [0.9, 1.1]
    # elastic distortion [alpha, sigma] as torchvision's ElasticTransform (Simard et al. 2003)
    elastic: Annotated[tuple[float, float] | None, AT_LEAST_0] = None
    rrc_scale: Annotated[tuple[float, float] | None, SCALE] = None  # RandomResizedCrop; None: off
    auto_augment: AutoAugment | None = None  # file datasets
    mixup_alpha: Annotated[float, AT_LEAST_0] = 0.0
    cutmix_alpha: Annotated[float, AT_LEAST_0] = 0.0
    mix_prob: Annotated[float, UNIT] = 1.0
    # DeiT distillation: a teacher (vitkit dir, hub id, ...) trains the student's [DIST] head
    teacher: str | None = None
    distillation: Distillation = "hard"
    distillation_alpha: Annotated[float, UNIT] = 0.5
    distillation_tau: Annotated[float, POSITIVE] = 1.0
    # self-supervised pre-training (objective simmim | mae | dino)
    mask_ratio: Annotated[float | None, In("(0, 1)")] = None  # SimMIM 0.6, MAE 0.75
    mask_patch_size: int | None = None  # SimMIM mask block in pixels
    decoder_dim: int = 64  # MAE decoder
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    out_dim: int = 1024  # DINO prototypes
    local_crops: int = 4
    # DINO crop areas (fraction of image)
    global_crop_scale: Annotated[tuple[float, float], SCALE] = (0.4, 1.0)
    local_crop_scale: Annotated[tuple[float, float], SCALE] = (0.05, 0.4)
    head_bn: bool = True  # DINO head with BatchNorm (keeps the teacher from a uniform start)
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    # self-supervised on labelled data: log validation k-NN top-1
    knn_every_epochs: Annotated[int, AT_LEAST_0] = 0
    # numerics and bookkeeping
    # EMA of weights (evaluated too); null: off
    ema_decay: Annotated[float | None, In("(0, 1)", "e.g. 0.999")] = 0.999
    dtype: Dtype = "fp32"  # autocast (fp32 is fastest for tiny CPU models)
    # under torchrun (train/sharding.py): DDP, FSDP2 sharding, or FSDP when DDP would not fit
    strategy: Strategy = "auto"
    fsdp_reshard_after_forward: bool = True  # free gathered parameters after each forward
    fsdp_cpu_offload: bool = False  # keep shards, gradients and optimizer state on the CPU (GPU)
    # recompute each transformer block's activations in backward instead of keeping them
    grad_checkpointing: bool = False
    seed: int = 0
    output: str | None = None  # run directory (None: a fresh runs/<data>-<model>[-N])
    overwrite: bool = False  # reuse an existing run directory (never done unless asked)
    # also checkpoint every N optimizer steps (0: epoch ends only)
    save_every_steps: Annotated[int, AT_LEAST_0] = 0
    log_every_steps: Annotated[int, POSITIVE] = 50
    eval_every_epochs: Annotated[int, POSITIVE] = 1
    threads: int | None = None  # torch.set_num_threads (None: torch's default, every core)
    tensorboard: bool = False
    plot: bool = True  # PNG of loss / accuracy curves at the end
    progress: bool = True  # tqdm bars

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        """A validated recipe from a mapping of field: value (YAML, JSON, `--set`); what is wrong
        is one `ConfigError` naming `source` and every bad key."""
        recipe = cls(**known(cls, data, "recipe", source=source, noun="key"))
        recipe.validate(source)
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Recipe:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of key: value")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def replace(self, **changes: Any) -> Recipe:
        return Recipe.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, pairs: list[str]) -> Recipe:
        """Apply `key=value` strings; values are parsed as YAML (`lr=1e-3`, `betas=[0.9,0.95]`,
        `model_overrides.depth=6`)."""
        d = self.to_dict()
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise ConfigError(f"--set {pair!r}: expected key=value (e.g. --set lr=1e-3)")
            value = yaml.safe_load(text) if text.strip() else None
            if key.startswith("model_overrides."):
                d["model_overrides"] = {**d["model_overrides"], key.split(".", 1)[1]: value}
            else:
                d[key] = value
        return Recipe.from_dict(d, source="--set")

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "recipe") -> None:
        """Raise one `ConfigError` naming every bad key and the fix: each against its
        declaration (values are refused, never cast), then the rules between keys."""
        errors = problems(self, numeric_strings=True)
        if not errors:
            rules = [
                (self.batch_size % self.accum_steps,
                 f"batch_size={self.batch_size} must be divisible by "
                 f"accum_steps={self.accum_steps}"),
                ((self.mean is None) != (self.std is None),
                 "mean and std go together: set both or neither"),
                (self.teacher and self.objective != "classify",
                 f"teacher= distils a classifier; objective={self.objective!r} takes none"),
                (self.finetune != "full" and self.objective != "classify",
                 f"finetune={self.finetune!r} fine-tunes a classifier; objective="
                 f"{self.objective!r} trains the whole encoder (finetune: full)"),
                (self.finetune == "lora" and not self.lora_targets,
                 "lora_targets is empty; name some of qkv, proj, fc1, fc2"),
            ]  # fmt: skip
            errors = [message for broken, message in rules if broken]
        if errors:
            raise ConfigError(f"{source}: " + "; ".join(errors))

    def run_dir(self) -> Path:
        """`output`, or a fresh runs/<data>-<model>[-<objective>][-N] that does not exist yet."""
        if self.output:
            return Path(self.output)
        data = Path(self.data).name or "data"
        tag = "" if self.objective == "classify" else f"-{self.objective}"
        base = Path("runs") / f"{data}-{self.model}{tag}"
        n = 1
        path = base
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path
