"""Builders of hostile files (each test makes its own, in its tmp_path)."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buf = io.BytesIO()  # the magic string, the version and the padded header dict
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def npz_lying_header(path: Path, shape: tuple[int, ...] = (100_000, 100_000)) -> Path:
    """A stored (uncompressed) .npz whose one .npy header claims `shape` over 16 bytes of data."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("embedding/kernel.npy", npy_header(shape) + bytes(16))
    return path


def npz_bomb(path: Path, claimed: int = 3 << 30) -> Path:
    """A deflated .npz whose zip directory says its member holds `claimed` bytes (a header for
    that many float32 values and a little data): a zip bomb as the directory describes it."""
    count = (claimed - 128) // 4
    payload = npy_header((count,)) + bytes(1 << 16)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("embedding/kernel.npy", payload)
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    real = struct.unpack_from("<I", data, central + 24)[0]
    assert real == len(payload)
    total = len(npy_header((count,))) + 4 * count
    struct.pack_into("<I", data, central + 24, total)  # uncompressed size in the directory
    path.write_bytes(bytes(data))
    return path


def small_npz(path: Path) -> Path:
    np.savez(path, **{"embedding/kernel": np.zeros((8, 8, 3, 16), np.float32)})
    return path


# CIFAR pickles ----------------------------------------------------------------------------
def _pickle_dict_data(value_ops: bytes) -> bytes:
    """Protocol-3 pickle of {b'data': <value_ops>, b'labels': []}."""
    return (
        b"\x80\x03}(C\x04data" + value_ops + b"C\x06labels]u."
    )  # EMPTY_DICT MARK key value key value SETITEMS STOP


GIANT = (1 << 40).to_bytes(6, "little")


def pickle_giant_bytearray() -> bytes:
    return _pickle_dict_data(b"cbuiltins\nbytearray\n\x8a\x06" + GIANT + b"\x85R")


def pickle_giant_bytes_length() -> bytes:
    """BINBYTES8 claiming 2**40 bytes (the C unpickler allocates before reading)."""
    return _pickle_dict_data(b"\x8e" + (1 << 40).to_bytes(8, "little") + b"abc")


def pickle_giant_reconstruct() -> bytes:
    return _pickle_dict_data(
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x06"
        + GIANT
        + b"\x85C\x01b\x87R"
    )


def pickle_ndarray_call() -> bytes:
    return _pickle_dict_data(b"cnumpy\nndarray\n\x8a\x06" + GIANT + b"\x85\x85R")


def pickle_code_execution(marker: Path) -> bytes:
    """A pickle that would run `touch MARKER` through os.system."""
    command = f"touch {marker}".encode()
    return _pickle_dict_data(
        b"cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R"
    )


def write_cifar(root: Path, batch_1: bytes | None = None, labels_1=None) -> Path:
    """A CIFAR-10 python folder with 2 images per batch; `batch_1` replaces data_batch_1's bytes."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = [f"c{i}".encode() for i in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [0, 1] if labels_1 is None or name != "data_batch_1" else labels_1
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    if batch_1 is not None:
        (d / "data_batch_1").write_bytes(batch_1)
    return d


# PyTorch archives (.pth / pytorch_model.bin) -----------------------------------------------
def _rezip(src: bytes, path: Path, *, change=None, compression=zipfile.ZIP_STORED) -> Path:
    """Copy the zip archive `src` to `path`, passing each member through `change(name, data)`."""
    import io as _io

    with zipfile.ZipFile(_io.BytesIO(src)) as z, zipfile.ZipFile(path, "w", compression) as out:
        for info in z.infolist():
            data = z.read(info)
            out.writestr(info.filename, change(info.filename, data) if change else data)
    return path


def _torch_bytes(state: dict) -> bytes:
    import io as _io

    import torch

    buf = _io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def pth_zip_bomb(path: Path, claimed: int = 3 << 30) -> Path:
    """A torch archive whose deflated storage record says (in the zip directory) it holds
    `claimed` bytes: torch.load would allocate that much for it."""
    import torch

    _rezip(_torch_bytes({"w": torch.zeros(4096)}), path, compression=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at + 1)) != -1:  # each central-directory entry
        size = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + size].endswith(b"/data/0"):
            struct.pack_into("<I", data, at + 24, min(claimed, 0xFFFF_FFFF))
    path.write_bytes(bytes(data))
    return path


def pth_lying_storage(path: Path, numel: int = 1 << 30) -> Path:
    """A stored torch archive whose pickle declares a storage of `numel` floats over a record of
    48 bytes (12 floats)."""
    import torch

    def change(name: str, data: bytes) -> bytes:
        if not name.endswith("data.pkl"):
            return data
        assert data.count(b"K\x0ct") == 1  # BININT1 12, TUPLE: the storage's element count
        return data.replace(b"K\x0ct", b"J" + numel.to_bytes(4, "little") + b"t")

    return _rezip(_torch_bytes({"w": torch.zeros(3, 4)}), path, change=change)
