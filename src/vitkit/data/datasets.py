"""Where data comes from (`open_splits`, the one data resolver of training and evaluation),
and how training cuts it into batches (`TrainData`).

A data source is a built-in name (`digits`, `mnist`), a folder with `train/` and optionally
`val/` (`validation/`, `valid/`) and `test/` class subfolders, a CIFAR-10/100 python directory, a
list file (.csv / .json / .jsonl), or, for self-supervised objectives, any folder of images.
Every run has three splits: where a source has no validation part it is carved, stratified by
class, from the training part (`val_fraction`, seed 0), so the test part is touched only once,
at the end, on the checkpoint chosen on validation.

Batches are reproducible and resumable: epoch `e` shuffles with a generator seeded by
`(seed, e)`, each global batch of `batch_size` images is cut into `accum_steps` micro-batches and
each micro-batch into `world` equal shards (one per process), and augmentation is seeded by
`(seed, epoch, step)`. So a run restarted at step `s` of epoch `e` sees exactly the same images,
and N processes see exactly what one process with the same global batch sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkit.data import folders
from vitkit.data.builtin import BUILTIN, TensorData, load_builtin
from vitkit.data.processor import match_channels
from vitkit.data.transforms import Augmentation
from vitkit.errors import ConfigError

SPLITS = ("train", "val", "test")
_VAL_NAMES = ("val", "validation", "valid")

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
    val: Any  # None when the objective needs no validation (self-supervised)
    test: Any
    classes: list[str]
    image_size: int
    in_chans: int
    batch_size: int
    accum_steps: int
    rank: int = 0
    world: int = 1
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)  # of the training images
    num_workers: int = 0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    eval_transform: Any = None  # PIL image -> normalised (C, S, S): the run's processor
    # self-supervised runs on labelled data: k-NN memory (training part) and queries (validation)
    knn_memory: Any = None
    knn_queries: Any = None

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

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] pixels -> the run's normalisation (the init checkpoint's mean / std)."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

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
            x = self.augmentation.batch(self._resize(data.images[idx]), gen)
            x, y = self.normalize(x), data.labels[idx]
            los = [a * micro + self.rank * share for a in range(self.accum_steps)]
            yield step, [(x[lo : lo + share], y[lo : lo + share]) for lo in los]

    def _file_batches(self, order: Tensor, epoch: int, start: int):
        tf = self.augmentation.per_image(self.image_size, self.in_chans)
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
            micros = [next(it) for _ in range(self.accum_steps)]
            yield step, [(self.normalize(x), y) for x, y in micros]

    def eval_batches(self, split: str | Any = "val", batch_size: int = 256) -> Iterator[Micro]:
        """A whole split ("val", "test", or a dataset) in order, normalised, no augmentation."""
        data = (
            {"val": self.val, "test": self.test}.get(split, split)
            if isinstance(split, str)
            else split
        )
        if isinstance(data, TensorData):
            for i in range(0, len(data), batch_size):
                x = self._resize(data.images[i : i + batch_size])
                yield self.normalize(x), data.labels[i : i + batch_size]
            return
        tf = self.eval_transform or Augmentation().per_image(self.image_size, self.in_chans)
        ds = _SeededDataset(data, tf, 0)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=self.num_workers
        )
        for x, y in loader:
            yield (x if self.eval_transform is not None else self.normalize(x)), y


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


@dataclass
class Splits:
    """The three parts of a data source; `val` / `test` are None where a source has none."""

    train: Any
    val: Any
    test: Any
    classes: list[str]

    def get(self, split: str) -> Any:
        if split not in SPLITS:
            raise ConfigError(f"split {split!r}; choose one of {SPLITS}")
        return getattr(self, split)


def open_splits(
    data: str,
    *,
    val_data: str | None = None,
    test_data: str | None = None,
    val_fraction: float = 0.1,
    mode: str = "RGB",
    labelled: bool = True,
    on_error: str = "next",
) -> Splits:
    """The train / validation / test parts of a data source (see the module docstring).

    With `labelled=False` a folder without train/ is read as one unlabelled split of every image
    under it (self-supervised pre-training). `on_error` is what an image that fails to decode
    gives: the next good one ("next", training keeps its batch size) or None ("none",
    evaluation counts each image once).
    """
    if data in BUILTIN:  # in memory, grayscale: in `mode`'s channels, as files are read
        train, test = (_in_mode(part, mode) for part in load_builtin(data))
        train, val = carve(train, val_fraction)
        return Splits(train, val, test, list(train.classes))
    root = Path(data).expanduser()
    if not root.exists():
        raise ConfigError(
            f"--data {data}: no such file or folder (built-in datasets: {', '.join(BUILTIN)})"
        )
    extra = {"mode": mode, "on_error": on_error}
    if root.is_file():
        train = folders.ImageListDataset(root, **extra)
        val = test = None
    elif folders.is_cifar_dir(root):
        train = folders.CIFARDataset(root, train=True, mode=mode)  # in memory: never fails
        val, test = None, folders.CIFARDataset(root, train=False, mode=mode)
    elif (root / "train").is_dir():
        train = folders.ImageFolderDataset(root / "train", **extra)
        val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
        val = _open_part(val_dir, train.classes, mode, on_error) if val_dir else None
        test_dir = root / "test"
        test = _open_part(test_dir, train.classes, mode, on_error) if test_dir.is_dir() else None
    elif not labelled:
        return Splits(folders.ImageFilesDataset(root, **extra), None, None, [])
    elif val_data:
        train, val, test = folders.ImageFolderDataset(root, **extra), None, None
    else:
        raise ConfigError(
            f"--data {data}: expected train/ (and val/, test/) class folders inside, a CIFAR "
            "python directory, a .csv/.json list, or --val-data with a validation folder"
        )
    classes = list(train.classes)
    if val_data:
        val = _open_part(val_data, classes, mode, on_error)
    if test_data:
        test = _open_part(test_data, classes, mode, on_error)
    if val is None:
        train, val = carve(train, val_fraction)
    return Splits(train, val, test, classes)


def _open_part(spec: str | Path, classes: list[str], mode: str, on_error: str) -> Any:
    path = Path(spec).expanduser()
    extra = {"classes": classes, "mode": mode, "on_error": on_error}
    if path.is_file():
        return folders.ImageListDataset(path, **extra)
    if path.is_dir():
        return folders.ImageFolderDataset(path, **extra)
    raise ConfigError(f"{spec}: no such file or folder")


def carve(data: Any, fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """(rest, held-out) of a labelled dataset: round(`fraction` x n) images of each class,
    chosen by `seed` (where every class rounds to nothing: that fraction of all images, at
    random); the held-out part is None for a single image."""
    if fraction <= 0:
        return data, None
    labels = torch.as_tensor(data.labels if isinstance(data, TensorData) else data.targets)
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        out[idx[: round(fraction * len(idx))]] = True
    if not out.any() and len(labels) > 1:  # too few per class: hold out some at random
        out[torch.randperm(len(labels), generator=gen)[: max(1, round(fraction * len(labels)))]] = (
            True
        )
    keep, hold = (~out).nonzero().flatten(), out.nonzero().flatten()
    if len(hold) == 0:
        return data, None
    return _subset(data, keep), _subset(data, hold)


def _subset(data: Any, idx: Tensor) -> Any:
    if isinstance(data, TensorData):
        return TensorData(data.images[idx], data.labels[idx], data.classes)
    return _Subset(data, idx.tolist())


class _Subset:
    """Some items of a file dataset, keeping its classes and targets."""

    def __init__(self, base: Any, indices: list[int]):
        self.base, self.indices = base, indices
        self.classes = base.classes
        self.targets = [base.targets[i] for i in indices]

    @property
    def skipped(self) -> list:
        return getattr(self.base, "skipped", [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def build_data(
    recipe: Any,
    *,
    augmentation: Augmentation,
    in_chans: int,
    image_size: int,
    rank: int = 0,
    world: int = 1,
    mean: tuple[float, ...] = (0.5,),
    std: tuple[float, ...] = (0.5,),
    eval_transform: Any = None,
) -> TrainData:
    """The `TrainData` of a recipe: its splits (`open_splits`) and batching, with the run's
    `augmentation` (the trainer's `Augmentation.from_recipe(recipe)`).

    Self-supervised objectives train on the whole training part (validation included; test too
    with `recipe.all_data`) without labels; where the source has labels, the validation part
    also serves as k-NN queries against the rest, to watch the features form."""
    labelled = recipe.objective == "classify"
    splits = open_splits(
        recipe.data,
        val_data=recipe.val_data,
        test_data=recipe.test_data,
        val_fraction=recipe.val_fraction,
        mode="L" if in_chans == 1 else "RGB",
        labelled=labelled,
    )
    train, val = splits.train, splits.val
    if labelled and recipe.label_fraction < 1 and val is not None:
        # few-label training: the same stratified fraction (seed 0) of the training and of the
        # validation labels, so nothing beyond that fraction guides the run
        _, train = carve(train, recipe.label_fraction)
        _, val = carve(val, recipe.label_fraction)
        if train is None or val is None:
            raise ConfigError(
                f"label_fraction={recipe.label_fraction} leaves no training or validation "
                f"image of --data {recipe.data}; raise it"
            )
    memory = queries = None
    if not labelled:  # pre-training sees every training image; labels serve k-NN monitoring
        memory, queries = (train, val) if splits.classes else (None, None)
        train = _concat([train, val, *([splits.test] if recipe.all_data else [])])
    if isinstance(train, TensorData) and train.images.shape[1] != in_chans:  # not 1 or 3
        raise ConfigError(
            f"--data {recipe.data} has {train.images.shape[1]} channel(s) but "
            f"the model expects in_chans={in_chans}"
        )
    if labelled and val is None:
        raise ConfigError(
            f"--data {recipe.data}: no validation images (too few to carve "
            f"val_fraction={recipe.val_fraction} of each class); give --val-data or raise "
            "--set val_fraction=..."
        )
    return TrainData(
        train=train,
        val=val,
        test=splits.test,
        classes=splits.classes,
        image_size=image_size,
        in_chans=in_chans,
        batch_size=recipe.batch_size,
        accum_steps=recipe.accum_steps,
        rank=rank,
        world=world,
        seed=recipe.seed,
        augmentation=augmentation,
        num_workers=recipe.num_workers,
        mean=tuple(mean),
        std=tuple(std),
        eval_transform=eval_transform,
        knn_memory=memory,
        knn_queries=queries,
    )


def _in_mode(data: TensorData, mode: str) -> TensorData:
    """An in-memory set with 3 channels for mode "RGB" and 1 for "L" (`match_channels`), so an
    RGB checkpoint fine-tunes on digits or MNIST as it would on a folder of grayscale files."""
    images = match_channels(data.images, 1 if mode == "L" else 3).contiguous()
    return data if images is data.images else TensorData(images, data.labels, data.classes)


def _concat(parts: list[Any]) -> Any:
    parts = [p for p in parts if p is not None]
    if all(isinstance(p, TensorData) for p in parts):
        return TensorData(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
            parts[0].classes,
        )  # fmt: skip
    return torch.utils.data.ConcatDataset(parts)
