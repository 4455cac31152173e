"""Models bigger than one device: the recipe's `strategy: ddp | fsdp | auto` under torchrun.

    ddp    every process holds the whole model, gradients and optimizer state (16 bytes per
           trained parameter with AdamW); gradients are averaged (DistributedDataParallel)
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block is sharded,
           then the rest of the objective; a process holds 1/N of the parameters, gradients and
           optimizer state and gathers one block's parameters at a time
    auto   fsdp when DDP's training state and activations would not fit in 80% of one
           device's memory (a GPU's, or this machine's RAM shared by its processes), else ddp

Under FSDP the checkpoint `last/` is sharded (torch.distributed.checkpoint, DCP): every process
writes its shards at once into a temporary folder, rank 0 adds `trainer.pt` (epoch, step, RNG,
recipe, metrics) and then swaps the `last` link to it, so a process killed during a save leaves
the previous checkpoint as it was. A DCP checkpoint loads into any number of processes and
either strategy (and one process), and a DDP `state.pt` loads into FSDP: `--resume` crosses
both. `best/` and the final `last/` model folders are gathered parameter by parameter on rank 0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from vitkit import distributed as D
from vitkit._io import _fsync_dir, atomic_open, clean_stale_temps, current_umask
from vitkit.checkpoints.pretrained import STATE_FILE, torch_load
from vitkit.errors import CheckpointError, ConfigError
from vitkit.layers.block import Block
from vitkit.models.vit import VisionTransformer
from vitkit.train.lora import LoRALinear

META_FILE = "trainer.pt"  # beside the DCP shards: everything of a checkpoint but the tensors
DCP_INDEX = ".metadata"
FIT = 0.8  # auto: DDP must fit in this fraction of a device's memory


# ---------------------------------------------------------------------------------- choosing
def choose(recipe: Any, info: D.DistInfo, objective: nn.Module, micro_batch: int) -> str | None:
    """The strategy of this run: None in one process, else "ddp" or "fsdp"; one-line errors
    for what cannot run."""
    if recipe.strategy == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "strategy=fsdp shards the model over processes: launch with torchrun "
            "--nproc_per_node N -m vitkit ... (in one process use strategy: ddp or auto)"
        )
    if not info.enabled:
        return None
    strategy = recipe.strategy
    if strategy == "auto":
        state, acts = estimate(objective, micro_batch)
        budget = device_memory(info)
        strategy = "fsdp" if state + acts > FIT * budget else "ddp"
        if info.is_main:
            print(
                f"strategy auto: {strategy} (DDP would hold {_gib(state)} of training state + "
                f"~{_gib(acts)} of activations per process; {_gib(budget)} per process on "
                f"{info.device.type})",
                flush=True,
            )
    if strategy == "fsdp":
        if recipe.dtype == "fp16":
            raise ConfigError("strategy=fsdp runs fp32 or bf16; use dtype: bf16 (fp16 needs DDP)")
        if recipe.fsdp_cpu_offload and info.device.type != "cuda":
            raise ConfigError(
                f"fsdp_cpu_offload moves shards off a GPU; this run is on {info.device.type} "
                "(set fsdp_cpu_offload: false)"
            )
    return strategy


def estimate(objective: nn.Module, micro_batch: int) -> tuple[int, int]:
    """Bytes per process under DDP: (parameters, gradients and AdamW moments: 16 per trained
    parameter, 4 per frozen one; activations kept for backward, about 16 fp32 (B, T, D)
    tensors per block)."""
    state = sum((16 if p.requires_grad else 4) * p.numel() for p in objective.parameters())
    acts = 0
    for vit in (m for m in objective.modules() if isinstance(m, VisionTransformer)):
        if not any(p.requires_grad for p in vit.parameters()):
            continue
        c = vit.config
        tokens = c.num_patches + c.num_prefix_tokens
        acts += 4 * 16 * micro_batch * tokens * c.embed_dim * c.depth
    return state, acts


def device_memory(info: D.DistInfo) -> int:
    """Bytes one process may use: the GPU's memory, or the machine's RAM over its processes."""
    if info.device.type == "cuda":
        return torch.cuda.get_device_properties(info.device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ---------------------------------------------------------------------------------- sharding
def shard(module: nn.Module, recipe: Any) -> nn.Module:
    """`fully_shard` every transformer block inside `module` (encoders, decoders, teachers),
    then `module` itself, with bf16 parameters and fp32 gradient reduction when the recipe
    asks for bf16."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = dict(reshard_after_forward=recipe.fsdp_reshard_after_forward)
    if recipe.dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if recipe.fsdp_cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in [m for m in module.modules() if isinstance(m, Block)]:
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    return module


def checkpoint_blocks(module: nn.Module) -> int:
    """Activation checkpointing: every transformer block inside `module` (encoders, decoders)
    keeps only its input and recomputes the rest in backward (non-reentrant, RNG preserved, so
    the gradients are those of the plain run). Applied inside each block's own forward, below
    FSDP's hooks and DDP's, so it composes with both and with autocast. Returns the count."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = functools.partial(_recomputed, block, block.forward)
    return len(blocks)


def _recomputed(block: nn.Module, forward, *args: Any, **kwargs: Any) -> Any:
    if not (block.training and torch.is_grad_enabled()):  # evaluation, frozen teachers
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Accumulate gradients without reducing them (FSDP's `no_sync`)."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def gather(module: nn.Module, info: D.DistInfo) -> dict[str, torch.Tensor] | None:
    """`module`'s full state on rank 0's CPU (None elsewhere), one tensor at a time: rank 0
    holds its shards and one full copy, never two. Every process must call it."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if info.is_main:
            out[key] = value.detach().to("cpu", copy=True)
        del value
    return out if info.is_main else None


def plain(model: VisionTransformer, info: D.DistInfo) -> VisionTransformer | None:
    """A sharded `VisionTransformer` (LoRA adapters and all) as an ordinary one on rank 0
    (None elsewhere), for evaluation and model folders. Every process must call it."""
    if not is_sharded(model):
        return model
    state = gather(model, info)
    if state is None:
        return None
    with torch.device("meta"):
        copy = VisionTransformer(model.config)
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            parent, _, attr = name.rpartition(".")
            base = copy.get_submodule(name)
            setattr(copy.get_submodule(parent), attr,
                    LoRALinear(base, rank=layer.rank, alpha=layer.alpha))  # fmt: skip
    copy.load_state_dict(state, assign=True)
    copy.train(model.training)
    return copy.to(info.device)


# ---------------------------------------------------------------------------------- checkpoints
def find(path: str | Path) -> tuple[str, Path]:
    """The newest checkpoint of a run (a run directory, its last/ or a file in it): ("state",
    last/state.pt) or ("dcp", last/)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / "last").exists() or (path / ".last-prev").exists():
        path = path / "last" if (path / "last").exists() else path / ".last-prev"
    state, index = path / STATE_FILE, path / DCP_INDEX
    sharded = index.is_file() and (path / META_FILE).is_file()
    if sharded and (not state.is_file() or state.stat().st_mtime < index.stat().st_mtime):
        return "dcp", path
    if state.is_file():
        return "state", state
    raise CheckpointError(
        f"{path}: no training checkpoint ({STATE_FILE}, or a sharded {META_FILE} + {DCP_INDEX}); "
        "pass a run directory written by `vitkit train` / `pretrain`"
    )


def read_meta(folder: Path) -> dict[str, Any]:
    meta = torch_load(folder / META_FILE)
    if not isinstance(meta, dict) or "recipe" not in meta:
        raise CheckpointError(f"{folder / META_FILE}: not a vitkit training checkpoint")
    return {**meta, "dcp": str(folder)}


def _tensors(objective: nn.Module, optimizer, ema) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model, optim = get_state_dict(objective, optimizer)
    out = {"model": model, "optim": optim}
    if ema is not None:
        out["ema"] = get_model_state_dict(ema.module)
    return out


def save(run_dir: Path, objective: nn.Module, optimizer, ema, meta: dict[str, Any],
         info: D.DistInfo) -> Path:  # fmt: skip
    """Write a sharded checkpoint (every process) and make it `run_dir/last`."""
    import torch.distributed.checkpoint as dcp

    tmp = ""
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(run_dir)
        tmp = tempfile.mkdtemp(prefix=f".last.{os.getpid()}.", suffix=".tmp", dir=run_dir)
    tmp = D.broadcast_str(tmp, info)
    dcp.save(_tensors(objective, optimizer, ema), checkpoint_id=tmp)
    D.barrier(info)
    if info.is_main:
        with atomic_open(Path(tmp) / META_FILE, "wb") as f:
            torch.save(meta, f)
        _swap_in(run_dir, Path(tmp), meta["global_step"])
    D.barrier(info)
    return run_dir / "last"


def _swap_in(run_dir: Path, tmp: Path, step: int) -> None:
    """Make `tmp` the run's `last` with atomic renames: at every instant `last` (or, for an
    instant, `.last-prev`) is a whole checkpoint."""
    final = run_dir / f".last-{step:08d}"
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    os.chmod(final, 0o777 & ~current_umask())  # mkdtemp made it private
    last, prev = run_dir / "last", run_dir / ".last-prev"
    old = os.readlink(last) if last.is_symlink() else None
    if last.exists() and not last.is_symlink():  # a state.pt folder: kept until the link is in
        shutil.rmtree(prev, ignore_errors=True)
        os.rename(last, prev)
    link = run_dir / ".last-link"
    link.unlink(missing_ok=True)
    os.symlink(final.name, link)
    os.replace(link, last)
    _fsync_dir(run_dir)
    for stale in run_dir.glob(".last-*"):
        if stale.name not in (final.name,) and (stale.name == old or stale == prev
                                                or stale.name[6:].isdigit()):  # fmt: skip
            shutil.rmtree(stale, ignore_errors=True)


def drop_sharded(run_dir: Path) -> None:
    """After a `state.pt` was written into `last/` of a run that was sharded before: remove the
    shards there (the newer state.pt wins meanwhile, see `find`) and any orphaned by a kill."""
    last = run_dir / "last"
    if (last / DCP_INDEX).exists():
        (last / DCP_INDEX).unlink()
        for f in [*last.glob("*.distcp"), last / META_FILE]:
            f.unlink(missing_ok=True)
    kept = os.readlink(last) if last.is_symlink() else None
    for stale in run_dir.glob(".last-*"):
        if stale.name != kept and stale.is_dir() and stale.name[6:].isdigit():
            shutil.rmtree(stale, ignore_errors=True)


def load_sharded(folder: str | Path, objective: nn.Module, optimizer, ema) -> None:
    """Load a DCP checkpoint into the objective, optimizer and EMA of any strategy and world."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    tensors = _tensors(objective, optimizer, ema)
    with _mismatch(folder), warnings.catch_warnings():
        # one process reads the shards of several: what DCP warns about is what we ask for
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, checkpoint_id=str(folder))
        set_state_dict(objective, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optim"])  # fmt: skip
        if ema is not None and "ema" in tensors:
            set_model_state_dict(ema.module, tensors["ema"])


def load_full(state: dict[str, Any], objective: nn.Module, optimizer, ema) -> None:
    """Load a `state.pt` (full tensors, written by one process or DDP) into a sharded run."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    prefix = objective.encoder_key + "."
    model = {**{prefix + k: v for k, v in state["model"].items()}, **state.get("objective", {})}
    names, groups = {}, []
    for g in state["optimizer"]["param_groups"]:
        names.update(zip(g["params"], g["names"], strict=True))
        groups.append({**g, "params": list(g["names"])})
    optim = {"state": {names[i]: s for i, s in state["optimizer"]["state"].items()},
             "param_groups": groups}  # fmt: skip
    full = StateDictOptions(full_state_dict=True)
    with _mismatch(STATE_FILE):
        set_state_dict(objective, optimizer, model_state_dict=model, optim_state_dict=optim,
                       options=full)  # fmt: skip
        if ema is not None and state.get("ema"):
            set_model_state_dict(ema.module, state["ema"]["module"], options=full)


@contextlib.contextmanager
def _mismatch(source: Any) -> Iterator[None]:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # DCP wraps each rank's traceback: its last line is the cause
        why = (lines[-1] if isinstance(exc, CheckpointException) else lines[0]) if lines else ""
        raise CheckpointError(
            f"{source}: the checkpoint does not match this run's model "
            f"({why[:300] or type(exc).__name__}); resume with the recipe it was written with"
        ) from None
