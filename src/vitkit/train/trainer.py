"""The training loop of `vitkit train`, top to bottom in `train()`.

One optimizer step = `accum_steps` micro-batches per process; gradients are averaged over
processes by DistributedDataParallel. Checkpoints (train/state.py) are written by rank 0 at every
epoch end and every `save_every_steps` steps; `resume=` continues a run so that its final weights
equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import ConfigError, VitkitError
from vitkit.train import distributed as D
from vitkit.train.ema import ModelEMA
from vitkit.train.optim import build_optimizer, lr_at, set_lr
from vitkit.train.recipe import Recipe
from vitkit.train.state import (
    STATE_FILE,
    capture_rng,
    export_model,
    load_native_weights,
    load_state,
    restore_rng,
    save_state,
)

_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(VitkitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished run reports. Accuracies are fractions in [0, 1]."""

    run_dir: Path
    val_acc: float | None = None
    val_top5: float | None = None
    val_loss: float | None = None
    ema_val_acc: float | None = None
    best_acc: float | None = None
    best_dir: Path | None = None
    seconds: float = 0.0
    steps: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


class _Logits(nn.Module):
    """Wraps a VisionTransformer so DDP sees a plain tensor output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


class _Heads(nn.Module):
    """A distilled student's two heads stacked, (2, B, K), so DDP sees one tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return torch.stack([out.cls_logits, out.distillation_logits])


def _distiller(recipe: Recipe, device: torch.device):
    """DeiT's `DistillationLoss` around the recipe's teacher, or None without one."""
    if not recipe.teacher:
        return None
    from vitkit.models.distill import DistillationLoss, load_teacher

    teacher = load_teacher(recipe.teacher, device=device)
    return DistillationLoss(
        teacher,
        _loss_fn(recipe),
        recipe.distillation,
        alpha=recipe.distillation_alpha,
        tau=recipe.distillation_tau,
    )


# ---------------------------------------------------------------------------------- model
def _resize_positions(model: nn.Module, image_size: int) -> nn.Module:
    """Rebuild `model` for `image_size`, resampling a learned position table (bicubic)."""
    from vitkit.layers import resample_pos_embed
    from vitkit.models.vit import VisionTransformer

    c = model.config
    if c.image_hw == (image_size, image_size):
        return model
    new = VisionTransformer(c.replace(image_size=image_size))
    state = model.state_dict()
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"],
            new.config.grid_size,
            old_grid=c.grid_size,
            num_prefix_tokens=c.num_pos_prefix_tokens,
            mode=c.pos_embed_interpolation,
        )
    new.load_state_dict(state)
    return new


def _load_init(source: str) -> nn.Module:
    """A pretrained model from a model folder, a `vitkit train` run directory (its best/, else
    last/, or its training state) or anything else `vitkit.from_pretrained` accepts."""
    from vitkit.checkpoints.pretrained import from_pretrained
    from vitkit.models.vit import VisionTransformer

    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        config, state = load_native_weights(path)  # a run directory
        model = VisionTransformer(config)
        model.load_state_dict(state)
        return model
    return from_pretrained(source)


def build_model(
    recipe: Recipe, num_classes: int | None = None, *, pretrained: nn.Module | None = None
) -> nn.Module:
    """The recipe's model: a preset (random init) or `recipe.init` weights with a new head for
    `num_classes` and positions resampled to `recipe.image_size`."""
    from vitkit.presets import create_model

    changes = dict(recipe.model_overrides)
    if recipe.teacher and not recipe.init:
        changes.setdefault("distilled", True)  # a [DIST] token for the teacher to train
    if recipe.drop_path is not None:
        changes["drop_path_rate"] = recipe.drop_path
    if recipe.dropout is not None:
        changes["drop_rate"] = recipe.dropout
    if not recipe.init:
        if num_classes is not None:
            changes["num_classes"] = num_classes
        if recipe.image_size is not None:
            changes["image_size"] = recipe.image_size
        return create_model(recipe.model, **changes)
    from vitkit.models.vit import rebuild

    pre = pretrained if pretrained is not None else _load_init(recipe.init)
    changes.pop("num_classes", None)
    if changes:  # regularisation knobs, pooling and the like; shapes must not change
        pre = rebuild(pre, **changes)
    if recipe.image_size is not None:
        pre = _resize_positions(pre, recipe.image_size)
    if num_classes is not None and num_classes != pre.config.num_classes:
        pre.reset_classifier(num_classes, zero_init=recipe.head_init_zero)
    return pre


# ---------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_model(
    model: nn.Module, batches, device: torch.device, amp: torch.dtype | None = None
) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy of `model` over (images, labels) batches."""
    was_training = model.training
    model.eval()
    loss = correct1 = correct5 = n = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x).logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        n += len(y)
    model.train(was_training)
    n = max(n, 1)
    return {"val_loss": loss / n, "val_acc": correct1 / n, "val_top5": correct5 / n}


# ---------------------------------------------------------------------------------- logging
class _Log:
    """metrics.jsonl + metrics.csv (rewritten atomically) and optional TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]], enabled: bool, tensorboard: bool):
        self.run_dir, self.rows, self.enabled = run_dir, rows, enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package: pip install 'vitkit[tensorboard]'"
                ) from exc
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        if not self.enabled:
            return
        from vitkit._io import atomic_write_text

        atomic_write_text(
            self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows)
        )
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        lines = [",".join(keys)] + [
            ",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in self.rows
        ]
        atomic_write_text(self.run_dir / "metrics.csv", "\n".join(lines) + "\n")
        if self.tb is not None:
            self.tb.flush()


def _loss_fn(recipe: Recipe) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        if target.ndim == 2:  # soft targets from mixup / cutmix (smoothing already applied)
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=recipe.label_smoothing)

    return loss


def _mixer(recipe: Recipe, num_classes: int):
    if recipe.mixup_alpha <= 0 and recipe.cutmix_alpha <= 0:
        return None
    from vitkit.data.augment import MixupCutmix

    return MixupCutmix(
        num_classes,
        mixup_alpha=recipe.mixup_alpha,
        cutmix_alpha=recipe.cutmix_alpha,
        prob=recipe.mix_prob,
        label_smoothing=recipe.label_smoothing,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------- train
def train(
    recipe: Recipe,
    *,
    resume: str | Path | None = None,
    on_step: Callable[[int], None] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train as `recipe` says (or continue the run in `resume`); return the final metrics.

    `on_step(global_step)` is called after every optimizer step (progress hooks, tests).
    """
    info = D.setup(device)
    state = None
    if resume is not None:
        state = load_state(resume)
        recipe = Recipe.from_dict(state["recipe"], source=f"{resume} (saved recipe)")
    run_dir = Path(resume) if resume is not None and Path(resume).is_dir() else recipe.run_dir()
    if run_dir.name in ("last", "best"):
        run_dir = run_dir.parent
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    _seed_everything(recipe.seed)
    main = info.is_main

    # data first: it fixes the number of classes
    pretrained = None
    if recipe.init:
        pretrained = _load_init(recipe.init)
        cfg0 = pretrained.config
    else:
        from vitkit.presets import get_config

        cfg0 = get_config(recipe.model, **recipe.model_overrides)
    image_size = recipe.image_size or cfg0.image_hw[0]
    from vitkit.data.datasets import build_data

    data = build_data(
        recipe, in_chans=cfg0.in_chans, image_size=image_size, rank=info.rank, world=info.world
    )
    num_classes = len(data.classes) or cfg0.num_classes
    _seed_everything(recipe.seed)
    model = build_model(recipe, num_classes, pretrained=pretrained)
    if data.classes:
        model.config = model.config.replace(id2label=dict(enumerate(data.classes)))
    model.to(info.device)
    optimizer = build_optimizer(model, recipe)
    amp = _AMP[recipe.dtype]
    scaler = torch.amp.GradScaler(info.device.type, enabled=recipe.dtype == "fp16")
    ema = ModelEMA(model, recipe.ema_decay) if recipe.ema_decay else None

    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * recipe.epochs
    warmup_steps = round(recipe.warmup_epochs * steps_per_epoch)
    epoch, start_step, global_step = 0, 0, 0
    best_acc: float | None = None
    rows: list[dict[str, Any]] = []
    ep_partial = (0.0, 0)  # training-loss sum and step count of the epoch so far (for resume)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        best_acc = state.get("best_acc")
        rows = list(state.get("metrics", []))
        ep_partial = (float(state.get("epoch_loss", 0.0)), int(state.get("epoch_steps", 0)))

    distill = _distiller(recipe, info.device)
    if distill is not None and not model.config.distilled:
        raise ConfigError(
            f"--teacher needs a student with a distillation token; {recipe.init} "
            "has none (start from a preset, or a distilled checkpoint)"
        )
    net: nn.Module = _Heads(model) if distill is not None else _Logits(model)
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    loss_fn = _loss_fn(recipe)
    mixer = _mixer(recipe, num_classes)
    log = _Log(run_dir, rows, main, recipe.tensorboard)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        from vitkit._io import atomic_write_text

        atomic_write_text(run_dir / "recipe.json", json.dumps(recipe.to_dict(), indent=2) + "\n")

    def schedule(step: int) -> float:
        return lr_at(
            step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            base_lr=recipe.lr,
            min_lr=recipe.min_lr,
            schedule=recipe.schedule,
        )

    def checkpoint(next_epoch: int, next_step: int, *, best: bool = False) -> None:
        if not main:
            return
        if not _all_finite(model):
            raise TrainingDiverged(
                f"weights became NaN/inf by step {global_step}; kept the last "
                f"good checkpoint in {run_dir / 'last'}; lower the lr"
            )
        st = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "ema": ema.state_dict() if ema is not None else {},
            "rng": capture_rng(),
            "epoch": next_epoch,
            "step": next_step,
            "global_step": global_step,
            "recipe": recipe.to_dict(),
            "model_config": model.config.to_dict(),
            "metrics": log.rows,
            "best_acc": best_acc,
            "epoch_loss": float(ep_loss) if next_step else 0.0,
            "epoch_steps": ep_steps if next_step else 0,
        }
        save_state(run_dir / "last" / STATE_FILE, st)
        if best:
            save_state(run_dir / "best" / STATE_FILE, st)
        log.flush()

    t_start = time.perf_counter()
    result = TrainResult(run_dir=run_dir)
    tqdm = _tqdm(main and recipe.progress)
    while epoch < recipe.epochs:
        model.train()
        bar = tqdm(
            total=steps_per_epoch,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{recipe.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
        ep_loss, ep_steps = ep_partial
        ep_partial = (0.0, 0)
        lr = schedule(global_step)
        seen, t_win, loss_win, n_win = 0, time.perf_counter(), 0.0, 0
        for step, micros in data.batches(epoch, start_step):
            lr = schedule(global_step)
            set_lr(optimizer, lr)
            step_loss = torch.zeros((), device=info.device)
            for a, (x, y) in enumerate(micros):
                x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                target = y
                if mixer is not None:
                    x, target = mixer(x, y)
                sync = info.enabled and a < len(micros) - 1
                with (
                    net.no_sync() if sync else contextlib.nullcontext(),
                    torch.autocast(
                        info.device.type, dtype=amp or torch.float32, enabled=amp is not None
                    ),
                ):
                    out = net(x).float()
                    if distill is None:
                        loss = loss_fn(out, target)
                    else:
                        heads = SimpleNamespace(cls_logits=out[0], distillation_logits=out[1])
                        loss = distill(x, heads, target)
                    scaler.scale(loss / len(micros)).backward()
                step_loss += loss.detach() / len(micros)
                seen += len(y) * info.world
            step_loss = D.all_reduce_sum(step_loss, info) / info.world
            value = float(step_loss)
            if not math.isfinite(value):
                bar.close()
                raise TrainingDiverged(
                    f"loss is {value} at epoch {epoch + 1}, step {step + 1} (global step "
                    f"{global_step + 1}); stopped without applying it. The last good checkpoint "
                    f"is {run_dir / 'last'}; lower --lr, add --set clip_grad=1.0 or use fp32"
                )
            if recipe.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            global_step += 1
            ep_loss += value
            ep_steps += 1
            loss_win += value
            n_win += 1
            if main and (global_step % recipe.log_every_steps == 0):
                dt = time.perf_counter() - t_win
                ips = seen / dt if dt > 0 else 0.0
                log.add(
                    {
                        "epoch": epoch + 1,
                        "step": global_step,
                        "train_loss": loss_win / n_win,
                        "lr": lr,
                        "img_per_s": ips,
                    }
                )
                bar.set_postfix(loss=f"{loss_win / n_win:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                seen, t_win, loss_win, n_win = 0, time.perf_counter(), 0.0, 0
            bar.update(1)
            if recipe.save_every_steps and global_step % recipe.save_every_steps == 0:
                checkpoint(epoch, step + 1)
            if on_step is not None:
                on_step(global_step)
        bar.close()
        start_step = 0
        epoch += 1
        is_best = False
        if main and (epoch % recipe.eval_every_epochs == 0 or epoch == recipe.epochs):
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": global_step,
                "train_loss": float(ep_loss) / max(ep_steps, 1),
                "lr": lr,
                "time_s": time.perf_counter() - t_start,
            }
            row.update(evaluate_model(model, data.eval_batches(), info.device, amp))
            acc = row["val_acc"]
            weights = model
            if ema is not None:
                e = evaluate_model(ema.module, data.eval_batches(), info.device, amp)
                row.update({f"ema_{k}": v for k, v in e.items()})
                if e["val_acc"] > acc:
                    acc, weights = e["val_acc"], ema.module
            log.add(row)
            if best_acc is None or acc > best_acc:
                best_acc, is_best = acc, True
                export_model(run_dir / "best", weights)
                result.best_dir = run_dir / "best"
            msg = (
                f"epoch {epoch}/{recipe.epochs}  loss {row['train_loss']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
            )
            if ema is not None:
                msg += f"  ema_val_acc {row['ema_val_acc']:.4f}"
            if recipe.progress:
                tqdm.write(msg)
        checkpoint(epoch, 0, best=is_best)
        D.barrier(info)

    result.seconds = time.perf_counter() - t_start
    result.steps = global_step
    result.metrics = log.rows
    last_eval = next((r for r in reversed(log.rows) if "val_acc" in r), None)
    if last_eval is not None:
        result.val_acc, result.val_top5 = last_eval["val_acc"], last_eval["val_top5"]
        result.val_loss = last_eval["val_loss"]
        result.ema_val_acc = last_eval.get("ema_val_acc")
    result.best_acc = best_acc
    if (run_dir / "best" / "model.safetensors").exists():
        result.best_dir = run_dir / "best"
    if main and recipe.plot:
        _plot(run_dir)
    if log.tb is not None:
        log.tb.close()
    D.cleanup(info)
    return result


def _plot(run_dir: Path) -> None:
    from vitkit.viz import plot_curves

    try:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    except Exception as exc:  # a plot must never fail a finished run
        print(f"vitkit train: could not plot curves: {exc}")


def _tqdm(enabled: bool):
    from tqdm.auto import tqdm

    if enabled:
        return tqdm

    class _Off(tqdm):
        def __init__(self, *a: Any, **k: Any):
            super().__init__(*a, **{**k, "disable": True})

    return _Off
