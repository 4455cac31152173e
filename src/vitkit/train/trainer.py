"""The one training loop of vitkit, for every objective (train/objectives.py).

`train(recipe)` = `setup` (data, model, objective, optimizer, checkpoint to resume from), then per
epoch `train_one_epoch` (a short loop a newcomer can follow) and `end_epoch` (validation, best/,
checkpoint), then `finish` (the test split, once, on the checkpoint chosen on validation).

One optimizer step = `accum_steps` micro-batches per process; DistributedDataParallel averages
gradients over processes, or FSDP2 shards the model over them (`strategy`, train/sharding.py).
Rank 0 writes a checkpoint (train/state.py; every rank a sharded one under FSDP) at every epoch
end and every `save_every_steps` steps; `resume=` continues a run so that its final weights equal
those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vitkit import distributed as D
from vitkit._io import atomic_write_text
from vitkit.checkpoints.resolve import resolve
from vitkit.data.augment import MixupCutmix
from vitkit.data.datasets import TrainData, _mix, build_data
from vitkit.data.processor import ImageProcessor
from vitkit.data.transforms import Augmentation
from vitkit.errors import CheckpointError, ConfigError, VitkitError
from vitkit.eval import evaluate
from vitkit.features import extract, knn_accuracy
from vitkit.models.vit import VisionTransformer, rebuild
from vitkit.presets import create_model, get_config
from vitkit.train import sharding
from vitkit.train.ema import ModelEMA
from vitkit.train.lora import apply_finetune
from vitkit.train.objectives import Objective, build_objective
from vitkit.train.optim import build_optimizer, lr_at, set_lr
from vitkit.train.recipe import Recipe
from vitkit.train.state import (
    STATE_FILE,
    RunLock,
    capture_rng,
    claim_run_dir,
    export_model,
    load_state,
    restore_rng,
    save_state,
)
from vitkit.viz import plot_curves

_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(VitkitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished run reports. Accuracies are fractions in [0, 1]; `val_*` are the last
    epoch's, `best_acc` the validation accuracy of best/, `test_*` best/ on the test split."""

    run_dir: Path
    val_acc: float | None = None
    val_top5: float | None = None
    val_loss: float | None = None
    ema_val_acc: float | None = None
    best_acc: float | None = None
    best_dir: Path | None = None
    test_acc: float | None = None
    test_top5: float | None = None
    model_dir: Path | None = None  # the folder to fine-tune or deploy (best/, else last/)
    seconds: float = 0.0
    steps: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """Everything `setup` builds; the loop's state lives in the last five fields."""

    recipe: Recipe
    info: D.DistInfo
    run_dir: Path
    data: TrainData
    objective: Objective
    net: nn.Module  # the objective, wrapped in DDP across processes (sharded in place by FSDP)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    processor: ImageProcessor
    log: _Log
    lock: RunLock | None
    total_steps: int
    warmup_steps: int
    strategy: str | None = None  # "ddp" or "fsdp" under torchrun, None in one process
    epoch: int = 0
    start_step: int = 0
    global_step: int = 0
    best_acc: float | None = None
    best_loss: float = float("inf")  # validation loss of best/ (breaks accuracy ties)
    epoch_loss: tuple[float, int] = (0.0, 0)  # loss sum and steps of the epoch so far

    @property
    def amp(self) -> torch.dtype | None:
        return _AMP[self.recipe.dtype]

    def lr(self, step: int) -> float:
        r = self.recipe
        return lr_at(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                     base_lr=r.lr, min_lr=r.min_lr, schedule=r.schedule)  # fmt: skip

    def autocast(self):
        return torch.autocast(
            self.info.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        )


def train(
    recipe: Recipe | None,
    *,
    resume: str | Path | None = None,
    on_step: Callable[[int], None] | None = None,
    device: str | None = None,
    strategy: str | None = None,
) -> TrainResult:
    """Train as `recipe` says (or continue the run in `resume`, with its saved recipe and, if
    given, another `strategy`); return the final metrics. `on_step(global_step)` is called after
    every optimizer step."""
    run = setup(recipe, resume=resume, device=device, strategy=strategy)
    try:
        t_start = time.perf_counter() - (run.log.rows[-1].get("time_s", 0.0) if run.log.rows else 0)
        with _memory_advice(run):
            while run.epoch < run.recipe.epochs:
                loss_sum, steps = train_one_epoch(run, on_step)
                run.epoch, run.start_step = run.epoch + 1, 0
                end_epoch(run, loss_sum / max(steps, 1), time.perf_counter() - t_start)
                D.barrier(run.info)
        return finish(run, time.perf_counter() - t_start)
    finally:
        if run.lock is not None:
            run.lock.release()
        if run.log.tb is not None:
            run.log.tb.close()
        D.cleanup(run.info)


@contextlib.contextmanager
def _memory_advice(run: Run):
    """An allocation that fails (torch's OutOfMemoryError, or the CPU allocator's error) ends
    the run with one line: where, and what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in why:
            raise
        raise ConfigError(
            f"out of memory at global step {run.global_step + 1} on {run.info.device.type} "
            f"({why[:200]}). {sharding.advice(run.recipe, run.strategy)}"
        ) from None


# ---------------------------------------------------------------------------------- setup
def setup(recipe: Recipe | None, *, resume: str | Path | None = None, device=None,
          strategy: str | None = None) -> Run:  # fmt: skip
    """Data, model, objective, optimizer and (with `resume`) the state to continue from."""
    info = D.setup(device)
    state = None
    if resume is not None:
        kind, found = sharding.find(resume)
        state = load_state(found) if kind == "state" else sharding.read_meta(found)
        saved = {**state["recipe"], **({"strategy": strategy} if strategy else {})}
        recipe = Recipe.from_dict(saved, source=f"{resume} (saved recipe)")
        run_dir = Path(resume)
        if run_dir.is_file() or run_dir.name in ("last", "best"):
            run_dir = run_dir.parent if run_dir.is_dir() else run_dir.parent.parent
    elif recipe is None:
        raise ConfigError("train() needs a recipe or resume=")
    else:
        run_dir = Path(D.broadcast_str(str(recipe.run_dir()), info))
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    created = not run_dir.exists()
    lock = claim_run_dir(run_dir, resume=state is not None, overwrite=recipe.overwrite) if (
        info.is_main
    ) else None  # fmt: skip
    try:
        return _build(recipe, info, run_dir, state, lock)
    except BaseException:
        if lock is not None:
            lock.release()
            if created:  # a run that never started leaves no empty directory behind
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
        raise


def _build(recipe: Recipe, info: D.DistInfo, run_dir: Path, state, lock) -> Run:
    # before this process allocates anything; rank 0's reading, so every process decides alike
    memory = D.broadcast_object(sharding.device_memory(info), info)
    _seed_everything(recipe.seed)
    # under torchrun ranks > 0 build on the meta device and receive rank 0's weights
    device = torch.device("meta") if sharding.lazy(info) else info.device
    resolved = _resolve(recipe.init, recipe, device) if recipe.init else None
    if resolved is not None:
        cfg0 = resolved.model.config
    else:
        cfg0 = get_config(recipe.model, **recipe.model_overrides)
        if recipe.image_size is not None:
            cfg0 = cfg0.replace(image_size=recipe.image_size)
    processor = _run_processor(recipe, cfg0, resolved.processor if resolved else None)
    image_size = cfg0.image_hw[0]
    data = build_data(
        recipe,
        augmentation=Augmentation.from_recipe(recipe),
        in_chans=cfg0.in_chans,
        image_size=image_size,
        rank=info.rank,
        world=info.world,
        mean=processor.mean or (0.0,),
        std=processor.std or (1.0,),
        eval_transform=processor.preprocess_pil,
    )
    _seed_everything(recipe.seed)
    micro_batch = recipe.batch_size // recipe.accum_steps // info.world
    objective, ema, strategy = sharding.build(
        recipe, info, lambda: _objective(recipe, info, device, cfg0, resolved, data),
        micro_batch, memory,
    )  # fmt: skip
    optimizer = build_optimizer(objective, recipe)
    scaler = torch.amp.GradScaler(info.device.type, enabled=recipe.dtype == "fp16")
    steps = data.steps_per_epoch
    run = Run(
        recipe=recipe,
        info=info,
        run_dir=run_dir,
        data=data,
        objective=objective,
        net=objective,
        optimizer=optimizer,
        scaler=scaler,
        ema=ema,
        processor=processor,
        log=_Log(run_dir, [], info.is_main, recipe.tensorboard),
        lock=lock,
        total_steps=steps * recipe.epochs,
        warmup_steps=round(recipe.warmup_epochs * steps),
        strategy=strategy,
    )
    if state is not None:
        _restore(run, state)
    if strategy == "ddp":
        run.net = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if info.is_main:
        atomic_write_text(run_dir / "recipe.json", json.dumps(recipe.to_dict(), indent=2) + "\n")
    return run


def _objective(recipe: Recipe, info: D.DistInfo, device: torch.device, cfg0, resolved,
               data: TrainData) -> tuple[Objective, nn.Module | None]:  # fmt: skip
    """The model (a preset with the recipe's seed, or the init checkpoint) inside its objective,
    and DeiT's teacher if any; on the CPU, or on the meta device (`device`) in the ranks > 0 of
    a sharded run."""
    teacher = None
    if recipe.objective != "classify":
        if resolved is not None:
            raise ConfigError(
                f"objective={recipe.objective} pre-trains from a preset (--model); --init "
                "is for fine-tuning"
            )
        objective = build_objective(recipe, cfg0)
    else:
        model = _classifier(recipe, len(data.classes) or cfg0.num_classes, resolved)
        if data.classes:
            model.config = model.config.replace(id2label=dict(enumerate(data.classes)))
        apply_finetune(model, recipe)
        teacher = _teacher(recipe, device) if recipe.teacher else None
        if teacher is not None and not model.config.distilled:
            raise ConfigError(
                f"--teacher needs a student with a distillation token; {recipe.init} has none "
                "(start from a preset, or a distilled checkpoint)"
            )
        objective = build_objective(recipe, model, teacher, mixer=_mixer(recipe, len(data.classes)))
    objective.shard.rank, objective.shard.world = info.rank, info.world
    return objective, teacher


def _resolve(source: str, recipe: Recipe, device: torch.device):
    return resolve(source, image_size=recipe.image_size, device=device)


def _classifier(recipe: Recipe, num_classes: int, resolved) -> VisionTransformer:
    """A preset (random init) or the init checkpoint with a new head for `num_classes`."""
    changes = dict(recipe.model_overrides)
    if recipe.teacher and not recipe.init:
        changes.setdefault("distilled", True)  # a [DIST] token for the teacher to train
    if recipe.drop_path is not None:
        changes["drop_path_rate"] = recipe.drop_path
    if recipe.dropout is not None:
        changes["drop_rate"] = recipe.dropout
    if resolved is None:
        if recipe.image_size is not None:
            changes["image_size"] = recipe.image_size
        return create_model(recipe.model, num_classes=num_classes, **changes)
    model = resolved.model
    changes.pop("num_classes", None)
    if changes:  # regularisation knobs, pooling and the like; shapes must not change
        model = rebuild(model, **changes)
    if num_classes != model.config.num_classes:
        model.reset_classifier(num_classes, zero_init=recipe.head_init_zero)
    return model


def _teacher(recipe: Recipe, device: torch.device) -> nn.Module:
    teacher = resolve(recipe.teacher, allow_preset=True, device=device).model
    return teacher.eval().requires_grad_(False)


def _run_processor(recipe: Recipe, config, found: ImageProcessor | None) -> ImageProcessor:
    """The preprocessing of the run: the init checkpoint's (mean / std and resize rule), else
    transformers' defaults at the model's size; the recipe's mean / std win."""
    base = found if found is not None else ImageProcessor.for_model(config)
    base = base.at_size(config.image_hw)
    if recipe.mean is not None:
        base = dataclasses.replace(base, mean=tuple(recipe.mean), std=tuple(recipe.std))
    return base.with_channels(config.in_chans)


def _mixer(recipe: Recipe, num_classes: int):
    if recipe.mixup_alpha <= 0 and recipe.cutmix_alpha <= 0:
        return None
    return MixupCutmix(
        num_classes,
        mixup_alpha=recipe.mixup_alpha,
        cutmix_alpha=recipe.cutmix_alpha,
        prob=recipe.mix_prob,
        label_smoothing=recipe.label_smoothing,
    )


# ---------------------------------------------------------------------------------- the loop
def train_one_epoch(run: Run, on_step: Callable[[int], None] | None = None) -> tuple[float, int]:
    """One epoch from `run.start_step`: per optimizer step, the micro-batches' losses are
    back-propagated (gradients synchronised on the last), clipped, applied, averaged into the
    EMA. Returns (loss sum, steps) of the whole epoch, resumed part included."""
    r, info, objective = run.recipe, run.info, run.objective
    objective.train()
    loss_sum, steps = run.epoch_loss
    run.epoch_loss = (0.0, 0)
    window = _Window()
    bar = _bar(run)
    for step, micros in run.data.batches(run.epoch, run.start_step):
        lr = run.lr(run.global_step)
        set_lr(run.optimizer, lr)
        objective.begin_step(run.global_step, run.total_steps)
        step_loss = torch.zeros((), device=info.device)
        for a, (x, y) in enumerate(micros):
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            rng = torch.Generator().manual_seed(_mix(r.seed, run.epoch, step, a))
            sync = not info.enabled or a == len(micros) - 1
            with contextlib.nullcontext() if sync else _no_sync(run), run.autocast():
                loss = run.net(x, y, rng)
            run.scaler.scale(loss / len(micros)).backward()
            step_loss += loss.detach() / len(micros)
            window.seen += len(x) * info.world
        value = float(D.all_reduce_sum(step_loss, info)) / info.world
        if not math.isfinite(value):
            bar.close()
            raise TrainingDiverged(
                f"loss is {value} at epoch {run.epoch + 1}, step {step + 1} (global step "
                f"{run.global_step + 1}); stopped without applying it. The last good checkpoint "
                f"is {run.run_dir / 'last'}; lower --lr, add --set clip_grad=1.0 or use fp32"
            )
        if r.clip_grad:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(objective.parameters(), r.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        objective.after_step(run.global_step, run.total_steps)
        if run.ema is not None:
            run.ema.update(objective.encoder)
        run.global_step += 1
        loss_sum, steps = loss_sum + value, steps + 1
        window.add(value)
        if info.is_main and run.global_step % r.log_every_steps == 0:
            row = {"epoch": run.epoch + 1, "step": run.global_step, **window.pop(), "lr": lr}
            run.log.add(row)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        if r.save_every_steps and run.global_step % r.save_every_steps == 0:
            run.epoch_loss = (loss_sum, steps)
            checkpoint(run, next_step=step + 1)
            run.epoch_loss = (0.0, 0)
        if on_step is not None:
            on_step(run.global_step)
    bar.close()
    return loss_sum, steps


def _no_sync(run: Run):
    return sharding.no_sync(run.objective) if run.strategy == "fsdp" else run.net.no_sync()


def end_epoch(run: Run, train_loss: float, elapsed: float) -> None:
    """Validation (supervised objectives), best/ on validation accuracy (then loss), the
    checkpoint."""
    r = run.recipe
    evaluate_now = run.objective.uses_labels and (
        run.epoch % r.eval_every_epochs == 0 or run.epoch == r.epochs
    )
    models = _evaluated(run) if evaluate_now or _knn_due(run) else (None, None)
    if run.info.is_main and (evaluate_now or not run.objective.uses_labels):
        row: dict[str, Any] = {"epoch": run.epoch, "step": run.global_step,
                               "train_loss": train_loss, "lr": run.lr(run.global_step - 1),
                               "time_s": elapsed, **run.objective.logs()}  # fmt: skip
        if evaluate_now:
            acc, loss, weights = _validate(run, row, *models)
            # higher accuracy wins; on a tie (a small validation split) the lower loss
            if run.best_acc is None or (acc, -loss) > (run.best_acc, -run.best_loss):
                run.best_acc, run.best_loss = acc, loss
                export_model(run.run_dir / "best", weights, run.processor)
        elif _knn_due(run):
            row["knn_acc"] = _knn(run, models[0])
        run.log.add(row)
        _tqdm_write(_epoch_line(r, row))  # also without bars: a log's one line per epoch
    checkpoint(run, next_step=0)


def _evaluated(run: Run) -> tuple[nn.Module | None, nn.Module | None]:
    """The encoder and its EMA as rank 0 evaluates them: the modules themselves, or under FSDP
    ordinary copies gathered from the shards (every process takes part; None elsewhere)."""
    ema = run.ema.module if run.ema is not None else None
    if run.strategy != "fsdp":
        return run.objective.encoder, ema
    model = sharding.plain(run.objective.encoder, run.info)
    return model, sharding.plain(ema, run.info) if ema is not None else None


def _validate(run: Run, row: dict[str, Any], model: nn.Module,
              ema: nn.Module | None) -> tuple[float, float, nn.Module]:  # fmt: skip
    """Accuracy and loss of the model (and its EMA) on the validation split, into `row`;
    returns the better one's (accuracy, loss, weights)."""
    _score(run, model, "val", row, "val_")
    best = (row["val_acc"], -row["val_loss"]), model
    if ema is not None:
        _score(run, ema, "val", row, "ema_val_")
        best = max(best, ((row["ema_val_acc"], -row["ema_val_loss"]), ema),
                   key=lambda t: t[0])  # fmt: skip
    (acc, neg_loss), weights = best
    return acc, -neg_loss, weights


def _knn_due(run: Run) -> bool:
    every = run.recipe.knn_every_epochs
    return bool(every and run.data.knn_queries is not None) and (
        run.epoch % every == 0 or run.epoch == run.recipe.epochs
    )


def _knn(run: Run, encoder: nn.Module) -> float:
    """Weighted k-NN top-1 (k = 20) of the encoder's features: validation images against the
    rest of the training part; labels are used by the vote only."""

    def feats(data: Any):
        batches = run.data.eval_batches(data)
        return extract(encoder, batches, device=run.info.device)

    return knn_accuracy(*feats(run.data.knn_memory), *feats(run.data.knn_queries), k=20)


def _score(run: Run, model: nn.Module, split: str, row: dict[str, Any], prefix: str) -> float:
    result = evaluate(model, run.data.eval_batches(split), device=run.info.device,
                      amp_dtype=run.amp)  # fmt: skip
    row.update({f"{prefix}loss": result.loss, f"{prefix}acc": result.top1,
                f"{prefix}top5": result.top5})  # fmt: skip
    return result.top1


def checkpoint(run: Run, *, next_step: int) -> None:
    """Write last/state.pt (rank 0), or under FSDP a sharded last/ (every rank): everything
    `resume` needs to continue bit for bit."""
    finite = all(bool(torch.isfinite(sharding.local(p)).all()) for p in run.objective.parameters())
    if run.strategy == "fsdp":
        finite = bool(D.all_reduce_sum(torch.tensor(float(not finite)), run.info) == 0)
    if not finite:
        raise TrainingDiverged(
            f"weights became NaN/inf by step {run.global_step}; kept the last good checkpoint "
            f"in {run.run_dir / 'last'}; lower the lr"
        )
    loss_sum, steps = run.epoch_loss if next_step else (0.0, 0)
    sums = dict(run.objective.sums) if next_step else {}  # the objective's figures (DINO's)
    meta = {
        "model_config": run.objective.encoder.config.to_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "ema_updates": run.ema.updates if run.ema is not None else 0,
        "rng": capture_rng(),
        "epoch": run.epoch,
        "step": next_step,
        "global_step": run.global_step,
        "recipe": run.recipe.to_dict(),
        "metrics": run.log.rows,
        "best_acc": run.best_acc,
        "best_loss": run.best_loss,
        "epoch_loss": float(loss_sum),
        "epoch_steps": steps,
        "objective_sums": sums,
        "preprocessor": run.processor.to_hf_dict(),
    }
    if run.strategy == "fsdp":
        sharding.save(run.run_dir, run.objective, run.optimizer, run.ema, meta, run.info)
        run.log.flush()
        return
    if not run.info.is_main:
        return
    state = {
        "model": run.objective.encoder.state_dict(),
        "objective": run.objective.extra_state(),
        "optimizer": run.optimizer.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else {},
        **meta,
    }
    save_state(run.run_dir / "last" / STATE_FILE, state)
    sharding.drop_sharded(run.run_dir)  # shards from the run's FSDP past
    run.log.flush()


def _restore(run: Run, state: dict[str, Any]) -> None:
    if "dcp" in state:
        sharding.load_sharded(state["dcp"], run.objective, run.optimizer, run.ema)
    elif run.strategy == "fsdp":
        sharding.load_full(state, run.objective, run.optimizer, run.ema)
    else:
        try:
            run.objective.load(state["model"], state.get("objective", {}))
        except RuntimeError as exc:
            raise CheckpointError(
                f"{run.run_dir / 'last'}: the checkpoint does not match this run's model "
                f"({str(exc).strip().splitlines()[0][:300]}); resume with the recipe it was "
                "written with"
            ) from None
        run.optimizer.load_state_dict(state["optimizer"])
        if run.ema is not None and state.get("ema"):
            run.ema.load_state_dict(state["ema"])
    if run.ema is not None:
        run.ema.updates = int(state.get("ema_updates", run.ema.updates))
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    run.epoch, run.start_step = state["epoch"], state["step"]
    run.global_step = state["global_step"]
    run.best_acc = state.get("best_acc")
    run.best_loss = float(state.get("best_loss", float("inf")))
    run.log.rows = list(state.get("metrics", []))
    run.epoch_loss = (float(state.get("epoch_loss", 0.0)), int(state.get("epoch_steps", 0)))
    sums = state.get("objective_sums")
    run.objective.sums = (
        {str(k): float(v) for k, v in sums.items()} if isinstance(sums, dict) else {}
    )


def finish(run: Run, seconds: float) -> TrainResult:
    """The final model folder, the test split once on best/, curves and pictures."""
    result = TrainResult(run_dir=run.run_dir, seconds=seconds, steps=run.global_step)
    result.metrics = run.log.rows
    last_eval = next((row for row in reversed(run.log.rows) if "val_acc" in row), None)
    if last_eval is not None:
        result.val_acc, result.val_top5 = last_eval["val_acc"], last_eval["val_top5"]
        result.val_loss = last_eval["val_loss"]
        result.ema_val_acc = last_eval.get("ema_val_acc")
    result.best_acc = run.best_acc
    best = run.run_dir / "best"
    if (best / "config.json").is_file():
        result.best_dir = best
    encoder = sharding.plain(run.objective.encoder, run.info) if run.strategy == "fsdp" else None
    if not run.info.is_main:
        return result
    export_model(run.run_dir / "last", run.objective.export(encoder), run.processor)
    result.model_dir = result.best_dir or run.run_dir / "last"
    if result.best_dir is not None and run.data.test is not None:
        chosen = resolve(best, device=run.info.device).model
        row: dict[str, Any] = {}
        _score(run, chosen, "test", row, "test_")
        result.test_acc, result.test_top5 = row["test_acc"], row["test_top5"]
        summary = {"best_val_acc": run.best_acc, "test_acc": result.test_acc,
                   "test_top5": result.test_top5, "test_loss": row["test_loss"]}  # fmt: skip
        atomic_write_text(run.run_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    if run.recipe.plot:
        _plot(run.run_dir)
    if run.strategy != "fsdp":  # a sharded objective draws only with every process
        run.objective.eval()
        with torch.no_grad():
            _draw(run)
    return result


def _draw(run: Run) -> None:
    if run.objective.uses_labels:
        return  # classifiers draw curves and confusion matrices instead
    images = next(iter(run.data.batches(0)), None)
    if images is None:
        return
    x = images[1][0][0][:8].to(run.info.device)
    try:
        run.objective.draw(x, run.run_dir)
    except Exception as exc:  # a picture must never fail a finished run
        print(f"vitkit: could not draw {run.recipe.objective}'s picture: {exc}")


# ---------------------------------------------------------------------------------- logging
class _Window:
    """Training loss and throughput since the last log row."""

    def __init__(self) -> None:
        self.seen, self.t0, self.total, self.n = 0, time.perf_counter(), 0.0, 0

    def add(self, loss: float) -> None:
        self.total, self.n = self.total + loss, self.n + 1

    def pop(self) -> dict[str, float]:
        dt = time.perf_counter() - self.t0
        row = {"train_loss": self.total / max(self.n, 1), "img_per_s": self.seen / dt if dt else 0}
        self.__init__()
        return row


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


def _epoch_line(r: Recipe, row: dict[str, Any]) -> str:
    msg = f"epoch {row['epoch']}/{r.epochs}  loss {row['train_loss']:.4f}"
    if "val_acc" in row:
        msg += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
    if "ema_val_acc" in row:
        msg += f"  ema_val_acc {row['ema_val_acc']:.4f}"
    if "knn_acc" in row:
        msg += f"  knn_acc {row['knn_acc']:.4f}"
    return msg + f"  {row['time_s']:.0f} s"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plot(run_dir: Path) -> None:
    try:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    except Exception as exc:  # a plot must never fail a finished run
        print(f"vitkit train: could not plot curves: {exc}")


def _bar(run: Run):
    """The epoch's progress bar, on stderr and only when it is a terminal (as `vitkit predict`
    does): a redirected log gets the one line per epoch, not carriage-return frames."""
    on = run.info.is_main and run.recipe.progress
    return tqdm(total=run.data.steps_per_epoch, initial=run.start_step, leave=False,
                desc=f"epoch {run.epoch + 1}/{run.recipe.epochs}", dynamic_ncols=True,
                file=sys.stderr, disable=None if on else True)  # fmt: skip


def _tqdm_write(msg: str) -> None:
    """A line above any bar; flushed, so a log file followed with `tail -f` shows it now."""
    tqdm.write(msg)
    sys.stdout.flush()
