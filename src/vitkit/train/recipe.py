"""`Recipe`: every knob of a training run in one dataclass, read from YAML and overridden from
the command line (`--set key=value`). Validation lives here, with messages that say what to change."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitkit._fields import checked
from vitkit.errors import ConfigError

_DTYPES = ("fp32", "bf16", "fp16")
_OPTIMIZERS = ("adamw", "sgd")
_SCHEDULES = ("cosine", "linear", "constant")
_AUTO_AUGMENT = (None, "randaugment", "trivialaugment")
OBJECTIVES = ("classify", "simmim", "mae", "dino")
_TUPLES = (
    "betas", "rrc_scale", "mean", "std", "global_crop_scale", "local_crop_scale", "zoom", "elastic"
)  # fmt: skip

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
# digits: validation k-NN 0.22 with the MAE-style defaults, 0.92 with these; benchmarks/RESULTS.md)
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

    objective: str = "classify"  # classify | simmim | mae | dino (train/objectives.py)
    # model
    model: str = "vit_digits_convstem_patch2_8"  # preset name (`vitkit models`)
    # any ViTConfig field on top of the preset (or of the `init` checkpoint's config)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # pretrained weights: vitkit dir, or what from_pretrained accepts
    head_init_zero: bool = True  # zero the new head when `init` changes num_classes
    drop_path: float | None = 0.1  # stochastic depth rate (None: the preset's)
    dropout: float | None = None  # dropout rate (None: the preset's)
    # data
    data: str = "digits"  # digits | mnist | a folder (train/ val/), a CIFAR dir or a list file
    val_data: str | None = None  # validation folder or list (None: val/ inside data, or carved)
    test_data: str | None = None  # test folder or list (None: test/ inside data, built-in test)
    val_fraction: float = 0.1  # carved, stratified, from the training part when there is no val
    label_fraction: float = 1.0  # classify with a stratified fraction of the training and
    # validation labels (seed 0), e.g. 0.1 to measure what pre-training is worth with few labels
    all_data: bool = False  # self-supervised: also pre-train on validation and test images
    mean: tuple[float, ...] | None = None  # normalisation (None: the init checkpoint's, else 0.5)
    std: tuple[float, ...] | None = None
    image_size: int | None = None  # training resolution (None: the model's)
    num_workers: int = 0  # DataLoader workers for file datasets
    # schedule
    epochs: int = 160
    batch_size: int = 64  # global batch (summed over processes and accumulation steps)
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / accum_steps / world
    optimizer: str = "adamw"
    lr: float = 2e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    schedule: str = "cosine"
    warmup_epochs: float = 5.0
    layer_decay: float | None = None  # layer-wise lr decay for fine-tuning (e.g. 0.75)
    clip_grad: float | None = None  # max global gradient norm
    label_smoothing: float = 0.1
    # augmentation
    random_shift: int = 1  # pixels of random translation (zero padded)
    hflip: bool = False  # horizontal flips (never for digits)
    rotate: float = 0.0  # random rotation, +- degrees (digits: 10 under-trains in 100 epochs)
    zoom: tuple[float, float] | None = None  # random zoom factor range, e.g. [0.9, 1.1]
    # elastic distortion [alpha, sigma] as torchvision's ElasticTransform (Simard et al. 2003)
    elastic: tuple[float, float] | None = None
    rrc_scale: tuple[float, float] | None = None  # RandomResizedCrop scale range (None: off)
    auto_augment: str | None = None  # randaugment | trivialaugment (file datasets)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    # DeiT distillation: a teacher (vitkit dir, hub id, ...) trains the student's [DIST] head
    teacher: str | None = None
    distillation: str = "hard"  # hard | soft | none
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    # self-supervised pre-training (objective simmim | mae | dino)
    mask_ratio: float | None = None  # SimMIM 0.6, MAE 0.75
    mask_patch_size: int | None = None  # SimMIM mask block in pixels
    decoder_dim: int = 64  # MAE decoder
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    out_dim: int = 1024  # DINO prototypes
    local_crops: int = 4
    global_crop_scale: tuple[float, float] = (0.4, 1.0)  # DINO crop areas (fraction of image)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    head_bn: bool = True  # DINO head with BatchNorm (keeps the teacher from a uniform start)
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    knn_every_epochs: int = 0  # self-supervised on labelled data: log validation k-NN top-1
    # numerics and bookkeeping
    ema_decay: float | None = 0.999  # EMA of weights (evaluated too); null: off
    dtype: str = "fp32"  # fp32 | bf16 | fp16 autocast (fp32 is fastest for tiny CPU models)
    seed: int = 0
    output: str | None = None  # run directory (None: a fresh runs/<data>-<model>[-N])
    overwrite: bool = False  # reuse an existing run directory (never done unless asked)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0: epoch ends only)
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    threads: int | None = None  # torch.set_num_threads (None: torch's default, every core)
    tensorboard: bool = False
    plot: bool = True  # PNG of loss / accuracy curves at the end
    progress: bool = True  # tqdm bars

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe") -> Recipe:
        """A validated recipe from a mapping of field: value (YAML, JSON, `--set`); every value is
        type-checked first, so a wrong one is one `ConfigError` naming it."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source} must be a mapping of key: value, got {type(data).__name__}"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown recipe key(s) {unknown}; known keys: {', '.join(sorted(known))}"
            )
        values = {}
        for key, value in data.items():
            try:
                values[key] = checked(value, str(known[key].type), numeric_strings=True)
            except ValueError as exc:
                raise ConfigError(f"{source}: {key}={value!r} {exc}") from None
        recipe = cls(**values)
        recipe.validate(source)
        return recipe

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Recipe:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of key: value")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in _TUPLES:
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    def replace(self, **changes: Any) -> Recipe:
        return Recipe.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, pairs: list[str]) -> Recipe:
        """Apply `key=value` strings; values are parsed as YAML (`lr=1e-3`, `betas=[0.9,0.95]`,
        `model_overrides.depth=6`)."""
        import yaml

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
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        choices = (
            ("dtype", _DTYPES),
            ("optimizer", _OPTIMIZERS),
            ("schedule", _SCHEDULES),
            ("auto_augment", _AUTO_AUGMENT),
            ("distillation", ("hard", "soft", "none")),
            ("objective", OBJECTIVES),
        )
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise bad(f"{key}={getattr(self, key)!r}; choose one of {list(allowed)}")
        for key in ("epochs", "batch_size", "accum_steps", "log_every_steps", "eval_every_epochs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{key}={value!r} must be a positive integer")
        if self.batch_size % self.accum_steps:
            raise bad(
                f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps}"
            )
        for key in (
            "lr",
            "min_lr",
            "weight_decay",
            "warmup_epochs",
            "label_smoothing",
            "mixup_alpha",
            "cutmix_alpha",
            "momentum",
        ):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise bad(f"{key}={value!r} must be a number >= 0")
        for key in ("lr", "min_lr", "weight_decay", "warmup_epochs", "momentum"):
            if not math.isfinite(getattr(self, key)):
                raise bad(f"{key}={getattr(self, key)} must be a finite number")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0 < self.label_fraction <= 1:
            raise bad(f"label_fraction={self.label_fraction} must be in (0, 1]")
        if (self.mean is None) != (self.std is None):
            raise bad("mean and std go together: set both or neither")
        if self.std is not None and not all(math.isfinite(v) and v > 0 for v in self.std):
            raise bad(f"std={list(self.std)} must be positive finite numbers")
        if self.mean is not None and not all(math.isfinite(v) for v in self.mean):
            raise bad(f"mean={list(self.mean)} must be finite numbers")
        if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
            raise bad(f"mask_ratio={self.mask_ratio} must be in (0, 1)")
        if self.teacher and self.objective != "classify":
            raise bad(f"teacher= distils a classifier; objective={self.objective!r} takes none")
        if self.lr <= 0:
            raise bad(f"lr={self.lr} must be > 0")
        if not 0 <= self.label_smoothing < 1:
            raise bad(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0 <= self.mix_prob <= 1:
            raise bad(f"mix_prob={self.mix_prob} must be in [0, 1]")
        if not 0 <= self.distillation_alpha <= 1:
            raise bad(f"distillation_alpha={self.distillation_alpha} must be in [0, 1]")
        if self.distillation_tau <= 0:
            raise bad(f"distillation_tau={self.distillation_tau} must be > 0")
        for key in ("drop_path", "dropout"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise bad(f"{key}={value} must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise bad(f"ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.999")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise bad(f"layer_decay={self.layer_decay} must be in (0, 1], e.g. 0.75")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise bad(f"clip_grad={self.clip_grad} must be > 0 (or null to disable)")
        if not 0 <= self.rotate <= 180:
            raise bad(f"rotate={self.rotate} must be in [0, 180] degrees")
        if self.zoom is not None and not (len(self.zoom) == 2 and 0 < self.zoom[0] <= self.zoom[1]):
            raise bad(f"zoom={self.zoom} must be [low, high] with 0 < low <= high")
        if self.elastic is not None and not (
            len(self.elastic) == 2 and self.elastic[0] >= 0 and self.elastic[1] >= 0
        ):
            raise bad(f"elastic={list(self.elastic)} must be [alpha, sigma], both >= 0")
        if self.random_shift < 0:
            raise bad(f"random_shift={self.random_shift} must be >= 0")
        for key in ("rrc_scale", "global_crop_scale", "local_crop_scale"):
            v = getattr(self, key)
            if v is not None and not (len(v) == 2 and 0 < v[0] <= v[1] <= 1):
                raise bad(f"{key}={v} must be [low, high] with 0 < low <= high <= 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.knn_every_epochs < 0:
            raise bad(f"knn_every_epochs={self.knn_every_epochs} must be >= 0")
        if self.save_every_steps < 0:
            raise bad(f"save_every_steps={self.save_every_steps} must be >= 0")
        if not isinstance(self.model_overrides, dict):
            raise bad("model_overrides must be a mapping of ViTConfig fields")

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
