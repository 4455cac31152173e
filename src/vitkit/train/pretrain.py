"""Self-supervised pre-training loops: SimMIM, MAE and DINO on images without labels.

One loop for the three methods (they differ only in how a batch becomes a loss): AdamW with no
decay on norms, biases, tokens and positions; linear warm-up then cosine learning rate per step;
gradient clipping; a progress bar; one JSON line of metrics per epoch in `metrics.jsonl`; an
atomic checkpoint (`pretrain_state.pt`) after every epoch that `resume=True` continues from.
At the end the ENCODER alone is written to `out` as a vitkit folder (config.json +
model.safetensors, num_classes=0) that `vitkit train --init OUT` / `from_pretrained(OUT,
num_classes=K)` fine-tunes, next to a picture of what the method learned (reconstructions for
SimMIM and MAE, last-layer attention maps for DINO).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.config import ViTConfig
from vitkit.errors import ConfigError, VitkitError
from vitkit.train.optim import lr_at, param_groups, set_lr

METHODS = ("simmim", "mae", "dino")
DEFAULT_MODELS = {"digits": "vit_digits_patch2_8", "mnist": "vit_mnist_patch4_28"}


@dataclass
class PretrainConfig:
    """Every knob of a pre-training run (saved as pretrain_config.json in `out`)."""

    method: str = "mae"
    data: str = "digits"
    out: str = "runs/pretrain"
    model: str | None = None  # preset name; default per dataset (DEFAULT_MODELS)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # for folders of images (default: the model's size)
    all_data: bool = False  # built-in sets: False keeps the 20% test split unseen
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    clip_grad: float = 3.0
    seed: int = 0
    device: str = "cpu"
    # SimMIM
    mask_ratio: float | None = None  # default: 0.6 (SimMIM) / 0.75 (MAE)
    mask_patch_size: int | None = None
    # MAE
    decoder_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    # DINO
    out_dim: int = 1024
    local_crops: int = 4
    hflip: bool | None = None  # DINO crops; None: off for digits/mnist (flips change digits)
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    progress_bar: bool | None = None  # None: only on a terminal

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}; choose one of {METHODS}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if self.data not in DEFAULT_MODELS and not Path(self.data).is_dir():
            raise ConfigError(f"--data {self.data!r} is neither 'digits', 'mnist' nor a folder")


# ------------------------------------------------------------------------------------- data
def stratified_split(
    labels: Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Indices (train, test) of a stratified split (scikit-learn's, reproducible by seed)."""
    from sklearn.model_selection import train_test_split

    idx = torch.arange(len(labels)).numpy()
    tr, te = train_test_split(
        idx, test_size=test_fraction, stratify=labels.numpy(), random_state=seed
    )
    return torch.as_tensor(tr), torch.as_tensor(te)


def load_builtin(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A built-in set (`vitkit.data.builtin`: stratified 80/20, seed 0) normalised as every
    vitkit recipe trains: (train images, train labels, test images, test labels), images in
    [-1, 1]."""
    from vitkit.data.builtin import load_builtin as _load
    from vitkit.data.transforms import normalize

    train, test = _load(name)
    return normalize(train.images), train.labels, normalize(test.images), test.labels


def load_folder(path: str | Path, image_size: int, channels: int = 3) -> Tensor:
    """Every image file under `path` (recursively), resized to a square, in [-1, 1]."""
    import numpy as np
    from PIL import Image

    from vitkit.data.images import IMAGE_EXTENSIONS, is_image_file, load_image
    from vitkit.errors import ImageError

    files = sorted(p for p in Path(path).rglob("*") if is_image_file(p))
    if not files:
        raise ImageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    mode = "L" if channels == 1 else "RGB"
    out = []
    for f in files:
        im = load_image(f).convert(mode).resize((image_size, image_size), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 255.0
        out.append(torch.from_numpy(a).reshape(image_size, image_size, channels))
    images = torch.stack(out).permute(0, 3, 1, 2)
    return (images - 0.5) / 0.5


def pretrain_images(cfg: PretrainConfig, model_config: ViTConfig) -> Tensor:
    """The unlabeled training images: a built-in set's stratified 80% split (seed 0, unless
    `all_data`) or every image in a folder."""
    if cfg.data in DEFAULT_MODELS:
        train, _, test, _ = load_builtin(cfg.data)
        return torch.cat([train, test]) if cfg.all_data else train
    path = Path(cfg.data)
    if not path.is_dir():
        raise ConfigError(f"--data {cfg.data!r} is neither 'digits', 'mnist' nor a folder")
    return load_folder(path, cfg.image_size or model_config.image_hw[0], model_config.in_chans)


# ------------------------------------------------------------------------------------ model
def model_config_for(cfg: PretrainConfig) -> ViTConfig:
    from vitkit import get_config

    name = cfg.model or DEFAULT_MODELS.get(cfg.data)
    if name is None:
        raise ConfigError("pass --model PRESET for a folder of images (see `vitkit models`)")
    overrides = dict(cfg.model_overrides)
    if cfg.image_size:
        overrides["image_size"] = cfg.image_size
    return get_config(name, **overrides).replace(num_classes=0, id2label=None)


def build_method(cfg: PretrainConfig, config: ViTConfig) -> nn.Module:
    """The pre-training model for `cfg.method` around an encoder of `config`."""
    if cfg.method == "simmim":
        from vitkit.models.mim import SimMIM

        return SimMIM(config)
    if cfg.method == "mae":
        from vitkit.models.mae import MaskedAutoencoder

        return MaskedAutoencoder(
            config,
            decoder_dim=cfg.decoder_dim,
            decoder_depth=cfg.decoder_depth,
            decoder_heads=cfg.decoder_heads,
            mask_ratio=cfg.mask_ratio or 0.75,
            norm_pix_loss=cfg.norm_pix_loss,
        )
    from vitkit.models.dino import DINO

    return DINO(
        config,
        out_dim=cfg.out_dim,
        hidden_dim=max(256, 4 * config.embed_dim),
        bottleneck_dim=min(256, max(64, config.embed_dim)),
        n_local_crops=cfg.local_crops,
        teacher_temp=cfg.teacher_temp,
        warmup_teacher_temp=cfg.warmup_teacher_temp,
    )


def encoder_of(model: nn.Module, method: str) -> nn.Module:
    """The `VisionTransformer` to keep: SimMIM/MAE encoder, DINO teacher backbone."""
    if method == "dino":
        return model.teacher.backbone
    return model.encoder


def export_encoder(model: nn.Module, method: str, out: str | Path) -> Path:
    """Write the encoder as a vitkit folder with num_classes=0 (a SimMIM mask token is
    dropped: fine-tuning never masks)."""
    from vitkit.checkpoints.pretrained import save_pretrained
    from vitkit.models.vit import VisionTransformer, rebuild

    enc = encoder_of(model, method)
    config = enc.config.replace(num_classes=0, use_mask_token=False)
    plain = VisionTransformer(config)
    sd = {k: v for k, v in enc.state_dict().items() if k != "mask_token"}
    plain.load_state_dict(sd)
    if method == "mae":  # MAE fine-tunes on the mean of the patch tokens (He et al. 2021)
        plain = rebuild(plain, global_pool="avg")
    return save_pretrained(plain, out, format="vitkit")


# ------------------------------------------------------------------------------------- loop
def _batch_loss(
    model: nn.Module, cfg: PretrainConfig, x: Tensor, progress: float, crops: Any, mask_block: int
) -> Tensor:
    if cfg.method == "simmim":
        from vitkit.models.mim import simmim_mask

        grid = model.encoder.patch_embed.grid_size(*x.shape[-2:])
        mask = simmim_mask(
            x.shape[0], grid, mask_ratio=cfg.mask_ratio or 0.6, block=mask_block, device=x.device
        )
        return model(x, bool_masked_pos=mask).loss
    if cfg.method == "mae":
        return model(x).loss
    views = [v.to(x.device) for v in crops.batch(x.cpu())]
    return model(views, progress=progress)


def pretrain(
    cfg: PretrainConfig, *, resume: bool = False, images: Tensor | None = None
) -> dict[str, Any]:
    """Run a pre-training and write `cfg.out`; returns the last epoch's metrics.

    `images` (N, C, H, W) replaces the dataset named by `cfg.data` (tests, notebooks).
    """
    from tqdm.auto import tqdm

    from vitkit._io import atomic_path, atomic_write_text

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    config = model_config_for(cfg)
    if images is None:
        images = pretrain_images(cfg, config)
    if images.shape[1] != config.in_chans:
        raise ConfigError(
            f"images have {images.shape[1]} channels, the model expects "
            f"{config.in_chans}; pick another --model"
        )
    if tuple(images.shape[-2:]) != config.image_hw:
        config = config.replace(image_size=tuple(images.shape[-2:]))
    device = torch.device(cfg.device)
    model = build_method(cfg, config).to(device)
    groups = param_groups(model, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    crops = mask_block = None
    if cfg.method == "dino":
        from vitkit.models.dino import MultiCrop

        crops = MultiCrop(config.image_hw[0], patch_size=config.patch_size, n_local=cfg.local_crops)
    if cfg.method == "simmim":
        from vitkit.models.mim import mask_block_for

        mask_block = mask_block_for(config, cfg.mask_patch_size)

    state_file, metrics_file = out / "pretrain_state.pt", out / "metrics.jsonl"
    start_epoch, step, lines = 0, 0, []
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        torch.set_rng_state(state["rng"])
        if metrics_file.is_file():
            lines = metrics_file.read_text().splitlines()[:start_epoch]
    atomic_write_text(
        out / "pretrain_config.json", json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n"
    )

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        order = torch.randperm(len(images))
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress_bar if cfg.progress_bar is not None else None,
            leave=False,
        )
        for i in bar:
            x = images[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]].to(device)
            lr = lr_at(
                step, total_steps=total, warmup_steps=warmup, base_lr=cfg.lr, min_lr=cfg.min_lr
            )
            set_lr(opt, lr)
            loss = _batch_loss(model, cfg, x, step / max(1, total - 1), crops, mask_block)
            if not torch.isfinite(loss):
                raise VitkitError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                    f"lower --lr or raise --warmup-epochs"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            if cfg.method == "dino":
                from vitkit.models.dino import teacher_momentum

                model.update_teacher(teacher_momentum(step, total, cfg.momentum_teacher))
            step += 1
            seen += len(x)
            loss_sum += loss.item() * len(x)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "loss": loss_sum / seen,
            "lr": lr,
            "images_per_s": seen / (time.perf_counter() - t0),
        }
        lines.append(json.dumps(metrics))
        with atomic_path(state_file) as tmp:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "rng": torch.get_rng_state(),
                },
                tmp,
            )
        atomic_write_text(metrics_file, "\n".join(lines) + "\n")

    export_encoder(model, cfg.method, out)
    _save_picture(model, cfg.method, images[:8].to(device), out)
    return metrics


def _save_picture(model: nn.Module, method: str, images: Tensor, out: Path) -> None:
    model.eval()
    with torch.no_grad():
        if method == "dino":
            from vitkit.models.dino import save_attention_maps

            save_attention_maps(model.teacher.backbone, images, str(out / "attention.png"))
            return
        from vitkit.models.mae import save_reconstruction

        if method == "mae":
            masked, recon = model.reconstruct(images)
        else:
            from vitkit.models.mim import mask_block_for, simmim_mask

            grid = model.encoder.patch_embed.grid_size(*images.shape[-2:])
            mask = simmim_mask(
                len(images), grid, block=mask_block_for(model.config), device=images.device
            )
            recon = model(images, bool_masked_pos=mask).reconstruction
            p = model.config.patch_size
            pix = mask.reshape(len(images), *grid).repeat_interleave(p, 1)
            pix = pix.repeat_interleave(p, 2).unsqueeze(1)
            masked = images.masked_fill(pix, 0.0)
            recon = torch.where(pix, recon, images)
        save_reconstruction(images, masked, recon, str(out / "reconstruction.png"))
