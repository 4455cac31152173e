"""Where training data comes from, and how it is cut into batches.

`build_data(recipe, in_chans, image_size, rank, world)` accepts a built-in name (`digits`,
`mnist`), a folder with `train/` and `val/` (or `test/`) class subfolders, a CIFAR-10 python
directory, or a list file, and returns `TrainData`.

Batches are reproducible and resumable: epoch `e` shuffles with a generator seeded by
`(seed, e)`, each global batch of `batch_size` images is cut into `accum_steps` micro-batches and
each micro-batch into `world` equal shards (one per process), and augmentation is seeded by
`(seed, epoch, step)`. So a run restarted at step `s` of epoch `e` sees exactly the same images,
and N processes see exactly what one process with the same global batch sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkit.data.builtin import BUILTIN, TensorData, load_builtin
from vitkit.data.transforms import augment_batch, normalize, sample_transform
from vitkit.errors import ConfigError

Micro = tuple[Tensor, Tensor]  # (images (b, C, S, S) normalised, labels (b,))


def _mix(*ints: int) -> int:
    """A seed from several integers (stable across processes and Python runs)."""
    h = 0x9E3779B9
    for i in ints:
        h = (h * 1_000_003 ^ (int(i) & 0xFFFFFFFF)) & 0x7FFFFFFFFFFFFFFF
    return h


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled sample order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))


def shard_indices(
    order: Tensor, step: int, batch_size: int, accum_steps: int, rank: int, world: int
) -> list[Tensor]:
    """This process's indices for each micro-batch of optimizer step `step`."""
    batch = order[step * batch_size : (step + 1) * batch_size]
    micro = batch_size // accum_steps
    share = micro // world
    return [
        batch[a * micro + rank * share : a * micro + (rank + 1) * share] for a in range(accum_steps)
    ]


@dataclass
class TrainData:
    """Training batches and evaluation batches of one run."""

    train: Any  # TensorData or a map-style dataset of (image, label)
    val: Any
    classes: list[str]
    image_size: int
    in_chans: int
    batch_size: int
    accum_steps: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    random_shift: int = 0
    hflip: bool = False
    rrc_scale: tuple[float, float] | None = None
    auto_augment: str | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        micro = self.batch_size // self.accum_steps
        if micro % self.world:
            raise ConfigError(
                f"batch_size={self.batch_size} / accum_steps={self.accum_steps} = "
                f"{micro} images per micro-batch cannot be split over {self.world} "
                "processes; make it a multiple of the process count"
            )
        if len(self.train) < self.batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is larger than the training set "
                f"({len(self.train)} images); lower --batch-size"
            )

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorData)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train) // self.batch_size  # the last partial batch is dropped

    def _resize(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return x

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[Micro]]]:
        """(step, micro-batches of this process) for steps `start_step..` of `epoch`."""
        order = epoch_order(len(self.train), self.seed, epoch)
        if self.in_memory:
            yield from self._tensor_batches(order, epoch, start_step)
        else:
            yield from self._file_batches(order, epoch, start_step)

    def _tensor_batches(self, order: Tensor, epoch: int, start: int):
        data: TensorData = self.train
        micro = self.batch_size // self.accum_steps
        share = micro // self.world
        for step in range(start, self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch, step))
            # augment the whole global batch, then take this process's shares: the same pixels
            # whatever the number of processes and accumulation steps
            x = augment_batch(
                self._resize(data.images[idx]),
                generator=gen,
                random_shift_px=self.random_shift,
                hflip=self.hflip,
                rrc_scale=self.rrc_scale,
            )
            x, y = normalize(x), data.labels[idx]
            los = [a * micro + self.rank * share for a in range(self.accum_steps)]
            yield step, [(x[lo : lo + share], y[lo : lo + share]) for lo in los]

    def _file_batches(self, order: Tensor, epoch: int, start: int):
        tf = sample_transform(
            self.image_size,
            self.in_chans,
            train=True,
            random_shift_px=self.random_shift,
            hflip=self.hflip,
            rrc_scale=self.rrc_scale,
            auto_augment=self.auto_augment,
        )
        ds = _SeededDataset(self.train, tf, _mix(self.seed, epoch))
        sampler = [
            idx.tolist()
            for step in range(start, self.steps_per_epoch)
            for idx in shard_indices(
                order, step, self.batch_size, self.accum_steps, self.rank, self.world
            )
        ]
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, num_workers=self.num_workers
        )
        it = iter(loader)
        for step in range(start, self.steps_per_epoch):
            yield step, [(normalize(x), y) for x, y in (next(it) for _ in range(self.accum_steps))]

    def eval_batches(self, batch_size: int = 256) -> Iterator[Micro]:
        """The whole validation set in order, normalised, no augmentation."""
        if isinstance(self.val, TensorData):
            for i in range(0, len(self.val), batch_size):
                yield (
                    normalize(self._resize(self.val.images[i : i + batch_size])),
                    self.val.labels[i : i + batch_size],
                )
            return
        tf = sample_transform(self.image_size, self.in_chans, train=False)
        ds = _SeededDataset(self.val, tf, 0)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=self.num_workers
        )
        for x, y in loader:
            yield normalize(x), y


class _SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` to item i with torch's RNG seeded by (seed, i): the same augmentation
    in any worker, after any restart."""

    def __init__(self, base: Any, transform: Any, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        info = torch.utils.data.get_worker_info()
        saved = torch.get_rng_state() if info is None else None
        torch.manual_seed(_mix(self.seed, i))
        x = self.transform(image)
        if saved is not None:
            torch.set_rng_state(saved)
        return x, int(label)


def _file_datasets(data: str, val_data: str | None) -> tuple[Any, Any]:
    """(train, val) datasets of a path, using vitkit.data.folders."""
    from vitkit.data import folders

    root = Path(data)
    if not root.exists():
        raise ConfigError(
            f"--data {data}: no such file or folder (built-in datasets: {', '.join(BUILTIN)})"
        )
    if root.is_file():
        if not val_data:
            raise ConfigError(f"--data {data}: a list file needs --val-data with a second list")
        train = folders.ImageListDataset(root)
        return train, folders.ImageListDataset(Path(val_data), classes=train.classes)
    cifar = root / "cifar-10-batches-py"
    if (root / "data_batch_1").exists() or cifar.exists():
        croot = cifar if cifar.exists() else root
        return folders.CIFARDataset(croot, train=True), folders.CIFARDataset(croot, train=False)
    if val_data:
        return folders.ImageFolderDataset(root), folders.ImageFolderDataset(Path(val_data))
    for name in ("val", "test", "validation"):
        if (root / "train").is_dir() and (root / name).is_dir():
            return (
                folders.ImageFolderDataset(root / "train"),
                folders.ImageFolderDataset(root / name),
            )
    raise ConfigError(
        f"--data {data}: expected train/ and val/ (or test/) class folders inside, "
        "a CIFAR-10 python directory, or --val-data with a validation folder"
    )


def build_data(
    recipe: Any, *, in_chans: int, image_size: int, rank: int = 0, world: int = 1
) -> TrainData:
    """The `TrainData` of a recipe (see the module docstring for accepted sources)."""
    if recipe.data in BUILTIN:
        train, val = load_builtin(recipe.data)
        classes = train.classes
        if train.images.shape[1] != in_chans:
            raise ConfigError(
                f"--data {recipe.data} has {train.images.shape[1]} channel(s) but "
                f"the model expects in_chans={in_chans}; pick a 1-channel model "
                "or --set model_overrides.in_chans=1"
            )
    else:
        train, val = _file_datasets(recipe.data, recipe.val_data)
        classes = list(getattr(train, "classes", None) or [])
    return TrainData(
        train=train,
        val=val,
        classes=classes,
        image_size=image_size,
        in_chans=in_chans,
        batch_size=recipe.batch_size,
        accum_steps=recipe.accum_steps,
        rank=rank,
        world=world,
        seed=recipe.seed,
        random_shift=recipe.random_shift,
        hflip=recipe.hflip,
        rrc_scale=recipe.rrc_scale,
        auto_augment=recipe.auto_augment,
        num_workers=recipe.num_workers,
    )
