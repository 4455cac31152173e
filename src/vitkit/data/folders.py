"""Image classification datasets read from local files: folder trees, CIFAR pickles, list files.

Every dataset yields `(image, label)`: a PIL image (RGB, or L when `mode="L"`) passed through the
optional `transform`, and an int label. Each has `.classes` (index -> name), `.targets` (one label
per sample), `.skipped` (`(path, reason)` pairs) and `.num_skipped`.

Bad files: a dataset never raises because one image is broken.
- At construction each file gets a cheap check (`verify="header"`, the default): it must exist and
  PIL must recognise its header and a size within the decompression-bomb limit. This reads only
  the first bytes of each file, so it is fast even for large trees; files that fail are left out
  and listed in `.skipped`.
  `verify="full"` decodes every image once (slow, catches truncated data); `verify="none"` trusts
  the listing.
- A file that passes the check but fails to decode later (truncated data) is replaced by the next
  good sample, recorded in `.skipped` and reported once with a warning, so training goes on. With
  DataLoader workers that record lives in the worker's copy; the warning is what you see.
  Evaluation must not count the replacement twice: `on_error="none"` returns None for such a
  sample instead, for the collate function to drop (and count once).

CIFAR pickles are untrusted: they are read with a restricted unpickler that can only rebuild
builtin containers, strings, numbers and numpy arrays; anything else is refused before it runs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitkit import limits
from vitkit._unpickle import restricted_loads
from vitkit.data.images import IMAGE_EXTENSIONS, load_image, quiet_bomb_warning, size_problem
from vitkit.errors import VitkitError
from vitkit.limits import is_int

__all__ = [
    "IMAGE_EXTENSIONS",
    "CIFARDataset",
    "ImageFilesDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "read_cifar_pickle",
]

PathLike = str | os.PathLike[str]
Transform = Callable[[Image.Image], Any]

_VERIFY = ("none", "header", "full")


def _open_image(path: Path, mode: str) -> Image.Image:
    """Decode `path` upright in `mode` ("RGB" or "L"); raise on any failure."""
    image = load_image(path)  # RGB, EXIF-upright, alpha on white, bombs refused
    return image if mode == "RGB" else image.convert(mode)


def _check_file(path: Path, verify: str, mode: str) -> str | None:
    """Why `path` is unusable, or None if it passes the `verify` level."""
    try:
        if not path.is_file():
            return "missing"
        if verify == "none":
            return None
        if path.stat().st_size == 0:
            return "empty file"
        if verify == "full":
            _open_image(path, mode)
            return None
        with quiet_bomb_warning(), Image.open(path) as im:  # the header only
            return size_problem(*im.size)
    except Exception as exc:  # any decoder failure is a reason to skip, never a crash
        return f"{type(exc).__name__}: {exc}".strip()
    return None


class _FileDataset:
    """Shared machinery: a list of (path, label) with checking, lazy decoding (`_decode`, which
    a dataset held in memory overrides) and fallback."""

    classes: list[str]

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        transform: Transform | None,
        mode: str,
        verify: str,
        skipped: list[tuple[Path, str]] | None = None,
        on_error: str = "next",
    ):
        if mode not in ("RGB", "L"):
            raise VitkitError(f"image mode must be 'RGB' or 'L', got {mode!r}")
        if verify not in _VERIFY:
            raise VitkitError(f"verify must be one of {_VERIFY}, got {verify!r}")
        if on_error not in ("next", "none"):
            raise VitkitError(f"on_error must be 'next' or 'none', got {on_error!r}")
        self.on_error = on_error
        self.transform = transform
        self.mode = mode
        self.skipped: list[tuple[Path, str]] = list(skipped or [])
        good = []
        for path, label in samples:
            reason = _check_file(path, verify, mode)
            if reason is None:
                good.append((path, label))
            else:
                self.skipped.append((path, reason))
        self.samples = good
        self.targets = [label for _, label in good]
        self._failed: set[int] = set()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.targets)

    def _decode(self, i: int) -> Image.Image:
        return _open_image(self.samples[i][0], self.mode)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for offset in range(n):
            i = (index + offset) % n
            if i in self._failed:
                if self.on_error == "none":
                    return None  # type: ignore[return-value]
                continue
            try:
                image = self._decode(i)
            except Exception as exc:
                if i not in self._failed:  # each bad file is recorded once
                    self._failed.add(i)
                    path = self.samples[i][0]
                    self.skipped.append((path, f"{type(exc).__name__}: {exc}".strip()))
                    warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
                if self.on_error == "none":
                    return None  # type: ignore[return-value]
                continue
            return (self.transform(image) if self.transform else image), self.targets[i]
        raise VitkitError(
            f"none of the {n} images of this dataset could be decoded; "
            f"first failure: {self.skipped[-1] if self.skipped else '?'}"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes, "
            f"{self.num_skipped} skipped)"
        )


def _is_image(path: Path, extensions: Sequence[str]) -> bool:
    return path.suffix.lower() in extensions and not path.name.startswith(".")


class ImageFolderDataset(_FileDataset):
    """`root/<class>/<image>` (the torchvision layout); classes are the sorted folder names.

    Images may sit in nested folders below their class folder. Pass `classes` to fix the
    label order (e.g. a model's id2label); class folders not in it are skipped.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Transform | None = None,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        mode: str = "RGB",
        classes: Sequence[str] | None = None,
        verify: str = "header",
        on_error: str = "next",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise VitkitError(f"{self.root}: not a directory (expected root/<class>/<image>)")
        found = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not found:
            raise VitkitError(f"{self.root}: no class folders (expected root/<class>/<image>)")
        self.classes = list(classes) if classes is not None else found
        index = {name: i for i, name in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        samples, skipped = [], []
        for name in found:
            files = sorted(p for p in (self.root / name).rglob("*") if p.is_file())
            if name not in index:
                skipped.extend((p, f"class folder {name!r} not in classes") for p in files)
                continue
            samples.extend((p, index[name]) for p in files if _is_image(p, exts))
        if not samples:
            raise VitkitError(
                f"{self.root}: no image files with extensions {exts} in the class folders"
            )
        super().__init__(samples, transform, mode, verify, skipped, on_error)


class ImageFilesDataset(_FileDataset):
    """Every image under `root` (recursively, sorted), unlabelled (label 0): pre-training data."""

    def __init__(
        self,
        root: PathLike,
        transform: Transform | None = None,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        mode: str = "RGB",
        verify: str = "header",
        on_error: str = "next",
    ):
        self.root = Path(root)
        exts = tuple(e.lower() for e in extensions)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and _is_image(p, exts))
        if not files:
            raise VitkitError(f"{self.root}: no image files ({', '.join(exts)}) under it")
        self.classes = []
        super().__init__([(p, 0) for p in files], transform, mode, verify, on_error=on_error)


class ImageListDataset(_FileDataset):
    """Images listed in a CSV (header `path,label`), a JSON list of {"path", "label"} or JSON lines.

    Labels are class names (mapped to sorted names) or ints (used as they are). Relative paths
    are resolved against `root`, or the list file's folder. `classes` fixes the name order.
    """

    def __init__(
        self,
        list_file: PathLike,
        root: PathLike | None = None,
        transform: Transform | None = None,
        *,
        mode: str = "RGB",
        classes: Sequence[str] | None = None,
        verify: str = "header",
        on_error: str = "next",
    ):
        self.list_file = Path(list_file)
        self.root = Path(root) if root is not None else self.list_file.parent
        rows = _read_list(self.list_file)
        labels = [r[1] for r in rows]
        if classes is not None:
            self.classes = list(classes)
        elif all(_as_int(v) is not None for v in labels):
            top = max(_as_int(v) for v in labels)  # type: ignore[type-var]
            try:  # a label of 2e7 would otherwise make 2e7 class names
                limits.check(top + 1, "CLASSES", "number of classes (largest label + 1)")
            except VitkitError as exc:
                raise VitkitError(f"{self.list_file}: {exc}") from None
            if top < 0:
                raise VitkitError(f"{self.list_file}: labels must be class indices >= 0")
            self.classes = [str(i) for i in range(top + 1)]
        else:
            self.classes = sorted({str(v) for v in labels})
        index = {name: i for i, name in enumerate(self.classes)}
        samples, skipped = [], []
        for path_str, label in rows:
            path = Path(path_str)
            path = path if path.is_absolute() else self.root / path
            if str(label) in index:
                target = index[str(label)]
            elif (i := _as_int(label)) is not None and 0 <= i < len(self.classes):
                target = i
            else:
                skipped.append((path, f"label {label!r} not among {len(self.classes)} classes"))
                continue
            samples.append((path, target))
        super().__init__(samples, transform, mode, verify, skipped, on_error)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    return None


def _read_list(path: Path) -> list[tuple[str, Any]]:
    """[(path, label)] from a CSV / JSON / JSON-lines list file."""
    if not path.is_file():
        raise VitkitError(f"{path}: no such list file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise VitkitError(f"{path}: cannot read the list as UTF-8 text ({exc})") from None
    entries: list[Any]
    if path.suffix.lower() == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "path" not in fields or "label" not in fields:
                raise VitkitError(
                    f"{path}: a CSV list needs a header row with 'path' and 'label' "
                    f"columns, got {reader.fieldnames}"
                )
            entries = [
                {k.strip().lower(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
                for row in reader
            ]
        except csv.Error as exc:
            raise VitkitError(f"{path}: not a valid CSV list ({exc})") from None
    else:
        stripped = text.strip()
        try:
            if stripped.startswith("["):
                entries = json.loads(stripped)
            else:
                entries = [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except (json.JSONDecodeError, RecursionError) as exc:
            raise VitkitError(f"{path}: not valid JSON or JSON lines ({exc})") from None
        if not isinstance(entries, list):
            raise VitkitError(f"{path}: a JSON list must be a list of {{path, label}} objects")
    rows = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry or "label" not in entry:
            raise VitkitError(f"{path}: entry {n} must have 'path' and 'label', got {entry!r}")
        if entry["path"] in ("", None) or entry["label"] in ("", None):
            raise VitkitError(f"{path}: entry {n} has an empty path or label: {entry!r}")
        rows.append((str(entry["path"]), entry["label"]))
    if not rows:
        raise VitkitError(f"{path}: the list is empty")
    return rows


# ---------------------------------------------------------------------------------------------
# CIFAR (python pickle version, https://www.cs.toronto.edu/~kriz/cifar.html)


class _NdarrayType:
    """Stands for `numpy.ndarray` inside a pickle: `_reconstruct` takes it, calling it fails."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("calling numpy.ndarray is not allowed")


_NDARRAY = _NdarrayType()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct` for an empty array only (what `ndarray.__reduce__` writes); the
    data arrive with `__setstate__`, which checks their length against the shape."""
    if subtype is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed for an empty ndarray")
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct(np.ndarray, shape, dtype)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """What CIFAR's pickles need of numpy, for `restricted_loads`."""
    core = getattr(np, "_core", None) or np.core
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[module, "_reconstruct"] = _reconstruct
        out[module, "scalar"] = core.multiarray.scalar
    return out


def read_cifar_pickle(path: PathLike) -> dict[bytes, Any]:
    """Load one CIFAR python-pickle file safely (keys stay bytes, as published).

    The file must be under the DATA_FILE_BYTES limit; its opcodes are walked once without
    building anything, so a length field that claims more bytes than the file holds is refused
    before the unpickler would allocate it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limits.limit("DATA_FILE_BYTES"):
            limits.check(size, "DATA_FILE_BYTES", "file size in bytes", str(path))
        data = restricted_loads(path.read_bytes(), _numpy_globals(), encoding="bytes")
    except FileNotFoundError:
        raise VitkitError(f"{path}: no such CIFAR file") from None
    except (
        pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
        IndexError, MemoryError, RecursionError, OverflowError, UnicodeError,
    ) as exc:  # fmt: skip
        if isinstance(exc, VitkitError):
            raise
        raise VitkitError(
            f"{path}: refused or unreadable CIFAR pickle ({type(exc).__name__}: {exc}); only "
            f"the published python version of CIFAR-10/100 is accepted"
        ) from None
    except OSError as exc:
        raise VitkitError(f"{path}: cannot read CIFAR file ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise VitkitError(f"{path}: expected a dict in a CIFAR pickle, got {type(data).__name__}")
    return data


def is_cifar_dir(root: Path) -> bool:
    """Whether `root` (or its cifar-10-batches-py / cifar-100-python child) holds CIFAR batches."""
    try:
        _find_cifar_dir(root)
    except VitkitError:
        return False
    return True


def _find_cifar_dir(root: Path) -> tuple[Path, int]:
    """The folder holding the batches and whether it is CIFAR-10 or CIFAR-100."""
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (folder / "data_batch_1").is_file() and (folder / "batches.meta").is_file():
            return folder, 10
        if (folder / "train").is_file() and (folder / "meta").is_file():
            return folder, 100
    raise VitkitError(
        f"{root}: no CIFAR batches found (expected data_batch_1..5, test_batch, "
        f"batches.meta for CIFAR-10, or train, test, meta for CIFAR-100, in this "
        f"folder or its cifar-10-batches-py / cifar-100-python child)"
    )


def _names(values: Any) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


class CIFARDataset(_FileDataset):
    """CIFAR-10 or CIFAR-100 (fine labels) from the published python pickles in a local folder,
    held in memory (no file to fail later).

    `root` may be the batches folder itself or its parent. Images are 32x32 PIL RGB.
    """

    def __init__(
        self,
        root: PathLike,
        train: bool = True,
        transform: Transform | None = None,
        *,
        mode: str = "RGB",
    ):
        super().__init__([], transform, mode, "none")
        self.root, kind = _find_cifar_dir(Path(root))
        self.train = train
        if kind == 10:
            files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            meta_file, meta_key, label_key = "batches.meta", b"label_names", b"labels"
        else:
            files = ["train" if train else "test"]
            meta_file, meta_key, label_key = "meta", b"fine_label_names", b"fine_labels"
        meta_path = self.root / meta_file
        meta = read_cifar_pickle(meta_path)
        names = meta.get(meta_key)
        if not isinstance(names, (list, tuple)) or not names:
            raise VitkitError(f"{meta_path}: {meta_key!r} must be a list of class names")
        limits.check(len(names), "CLASSES", "number of classes", str(meta_path))
        self.classes = _names(names)
        arrays, targets = [], []
        for name in files:
            path = self.root / name
            batch = read_cifar_pickle(path)
            data, labels = batch.get(b"data"), batch.get(label_key)
            if not isinstance(data, np.ndarray) or not isinstance(labels, (list, np.ndarray)):
                raise VitkitError(f"{path}: needs b'data' (an array) and {label_key!r} (a list)")
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise VitkitError(
                    f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
                )
            if len(labels) != data.shape[0]:
                raise VitkitError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
            labels = [v.item() if isinstance(v, np.generic) else v for v in labels]
            bad = [v for v in labels if not (is_int(v) and 0 <= v < len(self.classes))]
            if bad:  # checked per file, before any copy
                raise VitkitError(
                    f"{path}: label {bad[0]!r} is not a class index 0..{len(self.classes) - 1}"
                )
            arrays.append(data)
            targets.extend(int(v) for v in labels)
        # rows are R, G, B planes of 32x32, each row-major -> (N, 32, 32, 3)
        self.data = np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        self.targets = targets

    def _decode(self, i: int) -> Image.Image:
        image = Image.fromarray(self.data[i])
        return image if self.mode == "RGB" else image.convert(self.mode)
