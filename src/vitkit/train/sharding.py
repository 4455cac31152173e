"""Models bigger than one device: the recipe's `strategy: ddp | fsdp | auto` under torchrun.

    ddp    every process holds the whole model, gradients and optimizer state (16 bytes per
           trained parameter with AdamW); gradients are averaged (DistributedDataParallel)
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block is sharded,
           then the rest of the objective; a process holds 1/N of the parameters, gradients and
           optimizer state and gathers one block's parameters at a time
    auto   fsdp when DDP's training state and activations would not fit in 80% of one
           device's memory (a GPU's, or this machine's RAM shared by its processes), else ddp

Under torchrun only rank 0 builds the model (`build`): the other processes build it on the meta
device and receive their shards (or under DDP the whole model) from rank 0, so they never hold
a whole copy, and the run still starts from one process's weights. Before the training state is
allocated, `choose` compares its estimate with the memory available and stops a run that cannot
fit with one line saying what to change.

Under FSDP the checkpoint `last/` is sharded (torch.distributed.checkpoint, DCP): every process
writes its shards at once into a temporary folder, rank 0 adds `trainer.pt` (epoch, step, RNG,
recipe, metrics) and then swaps the `last` link to it, so a process killed during a save leaves
the previous checkpoint as it was. A DCP checkpoint loads into any number of processes and
either strategy (and one process), and a DDP `state.pt` loads into FSDP: `--resume` crosses
both. `best/` and the final `last/` model folders are gathered parameter by parameter on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from vitkit import distributed as D
from vitkit._io import _fsync_dir, atomic_open, current_umask, temp_folder
from vitkit.checkpoints.pretrained import STATE_FILE, torch_load
from vitkit.errors import CheckpointError, ConfigError
from vitkit.layers.block import Block
from vitkit.models.vit import VisionTransformer
from vitkit.train.ema import ModelEMA
from vitkit.train.lora import LoRALinear

META_FILE = "trainer.pt"  # beside the DCP shards: everything of a checkpoint but the tensors
DCP_INDEX = ".metadata"
FIT = 0.8  # auto: DDP must fit in this fraction of a device's memory
HEADROOM = 1.15  # a run needs its estimate times this: the optimizer step's temporaries, the
# blocks FSDP gathers, the allocator's slack. Measured growth of peak RSS past the memory read
# at start over the estimate (benchmarks/memory.py, CPU): 1.04-1.08 for ViT-B, ViT-L and
# dinov2_giant (FSDP x 2 + checkpointing: 9.1 GiB against 8.65)


# ---------------------------------------------------------------------------------- choosing
def choose(recipe: Any, info: D.DistInfo, objective: nn.Module, micro_batch: int,
           memory: int | None = None) -> str | None:  # fmt: skip
    """The strategy of this run: None in one process, else "ddp" or "fsdp"; one-line errors
    for what cannot run, among them a training state that clearly cannot fit in `memory` (bytes
    one process may use, `device_memory`; read now if None)."""
    if recipe.strategy == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "strategy=fsdp shards the model over processes: launch with torchrun "
            "--nproc_per_node N -m vitkit ... (in one process use strategy: ddp or auto)"
        )
    state, acts, budget = _needs(recipe, objective, micro_batch, memory, info)
    strategy = recipe.strategy if info.enabled else None
    if strategy == "auto":
        strategy = "ddp" if state + acts <= FIT * budget else "fsdp"  # `ddp_fits`
        if info.is_main:
            print(
                f"strategy auto: {strategy} (DDP would hold {_size(state)} of training state + "
                f"~{_size(acts)} of activations per process; {_size(budget)} per process on "
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
        state //= info.world
    if (state + acts) * HEADROOM > budget:
        raise ConfigError(
            f"too little memory: {strategy or 'one process'} would hold {_size(state)} of "
            f"parameters, gradients, optimizer state{' and EMA' * bool(recipe.ema_decay)} + "
            f"~{_size(acts)} of activations per "
            f"process, and needs {HEADROOM:g}x that for the step; {_size(budget)} is available "
            f"per process on {info.device.type}. " + advice(recipe, strategy)
        )
    return strategy


def _needs(recipe: Any, objective: nn.Module, micro_batch: int, memory: int | None,
           info: D.DistInfo) -> tuple[int, int, int]:  # fmt: skip
    """(DDP's state bytes, activation bytes, bytes one process may use) of this run."""
    state, acts = estimate(objective, micro_batch, recipe.grad_checkpointing,
                           ema=bool(recipe.ema_decay))  # fmt: skip
    return state, acts, device_memory(info) if memory is None else memory


def ddp_fits(recipe: Any, info: D.DistInfo, objective: nn.Module, micro_batch: int,
             memory: int | None = None) -> bool:  # fmt: skip
    """Whether DDP's whole training state and activations fit in FIT of a process's memory:
    `auto` shards when not, and FSDP then also hands freed memory back (`shard`)."""
    state, acts, budget = _needs(recipe, objective, micro_batch, memory, info)
    return state + acts <= FIT * budget


def advice(recipe: Any, strategy: str | None) -> str:
    """What to change when a run (under `strategy`, None in one process) does not fit: the
    one-line tail of every memory error."""
    ways = []
    if strategy != "fsdp":
        ways.append("shard it (strategy: fsdp under torchrun)")
    ways.append("use more processes (more devices or machines)")
    if recipe.finetune == "full":
        ways.append("train fewer parameters (finetune: lora or linear)")
    ways.append(f"a smaller batch (batch_size {recipe.batch_size}, or more accum_steps)")
    if not recipe.grad_checkpointing:
        ways.append("grad_checkpointing: true")
    if recipe.ema_decay:
        ways.append("no EMA of the weights (ema_decay: null)")
    return "To fit: " + "; ".join(ways)


def estimate(objective: nn.Module, micro_batch: int, checkpointing: bool = False,
             ema: bool = False) -> tuple[int, int]:  # fmt: skip
    """Bytes per process under DDP: (parameters, gradients and AdamW moments: 16 per trained
    parameter, 4 per frozen one, 4 more per encoder parameter with an `ema` of the weights;
    activations kept for backward, about 16 fp32 (B, T, D) tensors per block, or with
    activation checkpointing each block's input and one block's 16). Works on a model still
    on the meta device."""
    state = sum((16 if p.requires_grad else 4) * p.numel() for p in objective.parameters())
    if ema:  # the EMA copy (`ModelEMA`), sharded alike under FSDP
        state += 4 * sum(p.numel() for p in objective.encoder.parameters())
    acts = 0
    for vit in (m for m in objective.modules() if isinstance(m, VisionTransformer)):
        if not any(p.requires_grad for p in vit.parameters()):
            continue
        c = vit.config
        tokens = c.num_patches + c.num_prefix_tokens
        kept = c.depth + 16 if checkpointing else 16 * c.depth
        acts += 4 * micro_batch * tokens * c.embed_dim * kept
    return state, acts


def device_memory(info: D.DistInfo) -> int:
    """Bytes one process may use now: the GPU's free memory, or the machine's available RAM
    (MemAvailable) over the processes on it. The trainer takes rank 0's reading (see
    `D.broadcast_object`), so every process decides alike."""
    if info.device.type == "cuda":
        return torch.cuda.mem_get_info(info.device)[0]
    return _mem_available() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (all RAM where there is no /proc)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(n: float) -> str:
    unit = next(u for u in (3, 2, 1, 0) if n >= 1024**u or u == 0)
    return f"{n / 1024**unit:.{1 if unit == 3 else 0}f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


# ---------------------------------------------------------------------------------- building
def lazy(info: D.DistInfo) -> bool:
    """Whether this process builds its model on the meta device: the ranks > 0 of a run under
    torchrun hold no weights until `materialise` gives them rank 0's (their shards under FSDP)."""
    return info.enabled and not info.is_main


def build(
    recipe: Any,
    info: D.DistInfo,
    make: Callable[[], tuple[nn.Module, nn.Module | None]],
    micro_batch: int,
    memory: int | None = None,
) -> tuple[Any, ModelEMA | None, str | None]:
    """The objective `make()` builds (with DeiT's teacher or None), its EMA, activation
    checkpointing and strategy (`choose`), sharded under FSDP: (objective, EMA, strategy).

    Under torchrun, ranks > 0 call `make` on the meta device and rank 0 alone draws or reads
    the weights; the memory check (`choose`) runs before any process allocates more; after
    sharding each process receives only its shards (`materialise`), so under FSDP no process
    but rank 0 ever holds the whole model, and rank 0 only until its shards are sent. Every
    process ends with the values of one process's run, RNG state included."""
    meta = lazy(info)
    with torch.device("meta") if meta else contextlib.nullcontext():
        objective, teacher = make()
    if not meta:
        objective.to(info.device)
    strategy = choose(recipe, info, objective, micro_batch, memory)
    light = info.enabled  # rank 0 alone holds weights
    ema = None
    if recipe.ema_decay:
        average = meta_copy(objective.encoder) if light else None
        ema = ModelEMA(objective.encoder, recipe.ema_decay, module=average)
    if recipe.grad_checkpointing:
        checkpoint_blocks(objective)
    full = tensors(objective) if light and info.is_main else None
    if strategy == "fsdp":  # before the optimizer: sharding replaces the parameters
        release = not ddp_fits(recipe, info, objective, micro_batch, memory)
        shard(objective, recipe, release)
        if ema is not None:
            shard(ema.module, recipe, release)
    if light:
        materialise(objective, full, info)
        del full
        if ema is not None:
            copy_into(ema.module, objective.encoder, info)
        if teacher is not None:  # DeiT's teacher: outside the objective's state, whole on each
            materialise(teacher, None, info)
    return objective, ema, strategy


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (in eval mode, frozen) whose tensors are on the meta device: an EMA
    that costs nothing until `materialise` fills it."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo).eval()


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s parameters and buffers by name (the tensors themselves, no copies)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@torch.no_grad()
def materialise(module: nn.Module, full: dict[str, torch.Tensor] | None,
                info: D.DistInfo) -> None:  # fmt: skip
    """Give `module` (sharded or not; on the meta device in ranks > 0) rank 0's values, one
    tensor at a time: rank 0 scatters each sharded tensor from `full` (its tensors as built,
    `tensors` taken before sharding) and broadcasts the rest. Every process must call it; no
    process but rank 0 ever holds a whole copy. Rank 0's RNG state follows, as if every process
    had drawn the same initialisation."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not info.is_main:
        module.to_empty(device=info.device)
    for name, t in tensors(module).items():
        if isinstance(t, DTensor):
            src = full[name] if full is not None else torch.empty(t.shape, dtype=t.dtype)
            shard = distribute_tensor(src.to(info.device), t.device_mesh, t.placements,
                                      src_data_rank=0)  # fmt: skip
            t.to_local().copy_(shard.to_local())
            del shard
        else:
            dist.broadcast(t.data, src=0)
    torch.set_rng_state(D.broadcast_object(torch.get_rng_state(), info))


@torch.no_grad()
def copy_into(target: nn.Module, source: nn.Module, info: D.DistInfo) -> None:
    """Fill `target` (a `meta_copy` of `source`, sharded alike or not at all) with `source`'s
    local values: an EMA starts as the model."""
    target.to_empty(device=info.device)
    values = tensors(source)
    for name, t in tensors(target).items():
        local(t).copy_(local(values[name]))


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of `t` (a DTensor under FSDP), or `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---------------------------------------------------------------------------------- sharding
def shard(module: nn.Module, recipe: Any, release: bool = True) -> nn.Module:
    """`fully_shard` every transformer block inside `module` (encoders, decoders, teachers),
    then `module` itself, with bf16 parameters and fp32 gradient reduction when the recipe
    asks for bf16. `release`: on the CPU, hand the blocks FSDP frees back to the system
    (`_return_freed_memory`): what makes FSDP's peak RSS smaller than DDP's, at the price of
    page faults every step (ViT-B, FSDP x 2: 2.0x DDP's step time with it, 1.3x without, where
    its RSS then equals DDP's); `build` asks for it when DDP would not fit."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = dict(reshard_after_forward=recipe.fsdp_reshard_after_forward)
    if recipe.dtype == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if recipe.fsdp_cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    trained = [b for b in blocks if any(p.requires_grad for p in b.parameters())]
    # the last trained block's backward starts right after its forward: resharding it in
    # between would only gather it again (torchtitan keeps its last layer so)
    last = trained[-1] if trained else None
    for block in blocks:
        reshard = kw["reshard_after_forward"] and block is not last
        fully_shard(block, **{**kw, "reshard_after_forward": reshard})
    fully_shard(module, **kw)
    if release and not any(p.is_cuda for p in module.parameters()):
        _return_freed_memory()
    return module


def _return_freed_memory() -> None:
    """On the CPU, FSDP gathers and frees each block's parameters and gradients every step;
    glibc keeps freed blocks under its adaptive mmap threshold (up to 32 MiB) in the heap, and
    the process's RSS grows back to DDP's. A fixed 128 KiB threshold (M_MMAP_THRESHOLD)
    returns them to the system."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)


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
        tmp = str(temp_folder(run_dir / "last"))
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
    """Load a DCP checkpoint into the objective, optimizer and EMA of any strategy and world;
    its files are read as untrusted input (`vitkit.train._dcp`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    from vitkit.train import _dcp

    tensors = _tensors(objective, optimizer, ema)
    reader = _dcp.Reader(str(folder))
    reader.read_metadata()  # refuses a hostile or broken .metadata in one line
    with _mismatch(folder), warnings.catch_warnings():
        # one process reads the shards of several: what DCP warns about is what we ask for
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, storage_reader=reader, planner=_dcp.Planner())
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
    except CheckpointError:
        raise
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        for failure in getattr(exc, "failures", {}).values():  # DCP wraps each rank's error
            if isinstance(getattr(failure, "exception", None), CheckpointError):
                raise failure.exception from None  # a refused file, not a mismatch
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # DCP wraps each rank's traceback: its last line is the cause
        why = (lines[-1] if isinstance(exc, CheckpointException) else lines[0]) if lines else ""
        raise CheckpointError(
            f"{source}: the checkpoint does not match this run's model "
            f"({why[:300] or type(exc).__name__}); resume with the recipe it was written with"
        ) from None
