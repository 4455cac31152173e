"""Embeddings of many images: one row per image, batched and pipelined like `vitkit predict`.

    rows, paths, failures = embed_paths(model, processor, ["a.jpg", "photos/"], pool="model")
    write_embeddings("emb.npy", rows, paths)       # + emb.npy.paths.txt, one path per row

Rows are the model's pooled output by default (its image embedding when it has a projection,
e.g. CLIP), or the [CLS] token, or the mean of the patch tokens (`vitkit.features.pool_output`);
with `layers`, the (D, Hp, Wp) feature maps of those blocks (`forward_intermediates`). Under
`torchrun --nproc_per_node N` each process embeds every N-th image and rank 0 writes one file in
input order: the same rows as one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import Tensor, nn

from vitkit import distributed as D
from vitkit._io import atomic_path, atomic_write_text
from vitkit.errors import ConfigError
from vitkit.features import Embedder
from vitkit.infer.precision import is_plain, prepare
from vitkit.infer.predictor import expand_inputs, load_or_reason, pipelined

FORMATS = (".npy", ".safetensors")


@torch.inference_mode()
def feature_maps(
    model: nn.Module, pixels: Tensor, layers: Sequence[int], *, normalize: bool = False
) -> Tensor:
    """(B, C, H, W) preprocessed pixels -> (B, L, D, Hp, Wp) maps of the blocks in `layers`."""
    maps = model.forward_intermediates(pixels, list(layers), intermediates_only=True)
    out = torch.stack(maps, dim=1).float()
    return F.normalize(out, dim=2) if normalize else out


def embed_paths(
    model: nn.Module,
    processor: Any,
    inputs: Sequence[str],
    *,
    pool: str = "model",
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    backend: str | None = None,
    info: Any = None,
    log: Any = None,
    cache: bool = True,
    runner: Any = None,
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(rows float32, the path of each row, [(input, reason)] that failed) for image files and
    folders, in input order; a bad image is reported, never fatal. Shards across torchrun
    processes (rank 0 returns everything; other ranks return empty results).

    `precision` / `backend` run the pooled rows on a precision path (`vitkit.infer.prepare`;
    `auto` checks its pick by the rows' cosine similarity to fp32); feature maps (`layers`) are
    fp32 only. `runner`: a precision path already prepared for these rows
    (`prepare(Embedder(model, pool), ...)`), reused by callers that embed in chunks."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if layers and not is_plain(precision, backend):
        raise ConfigError("--layers feature maps are computed in fp32 on torch; drop --precision")
    info = info or D.setup(str(device))
    paths, failures = expand_inputs(list(inputs))
    mine = list(enumerate(paths))[info.rank :: info.world]  # (input position, path)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    rows: list[tuple[int, np.ndarray]] = []
    errors: list[tuple[int, str]] = []

    def load(item: tuple[int, str]) -> Tensor | str:
        return load_or_reason(item[1], processor)

    model = model.eval()
    # pooled rows run on the precision runner (fp32 on torch is the model as it is)
    if layers:
        runner = None
    elif runner is None:
        runner = prepare(Embedder(model, pool), precision, backend=backend,
                         device=device, log=log, cache=cache)  # fmt: skip
    for batch in pipelined(mine, load, batch_size, workers):
        good = [(item, x) for item, x in batch if isinstance(x, Tensor)]
        errors += [(item[0], x) for item, x in batch if not isinstance(x, Tensor)]
        if good:
            pixels = torch.stack([x for _, x in good]).to(device)
            if runner is not None:
                out = runner(pixels).float()
                out = F.normalize(out, dim=-1) if normalize else out
            else:
                out = feature_maps(model, pixels, layers, normalize=normalize)
            rows += [(item[0], r) for (item, _), r in zip(good, out.cpu().numpy())]
    gathered = D.gather_to_main((rows, errors), info)
    if gathered is None:  # not rank 0
        return np.zeros((0,), np.float32), [], []
    all_rows = sorted((r for part, _ in gathered for r in part), key=lambda t: t[0])
    all_errors = sorted((e for _, part in gathered for e in part), key=lambda t: t[0])
    failures += [(paths[i], reason) for i, reason in all_errors]
    if not all_rows:
        return np.zeros((0,), np.float32), [], failures
    return np.stack([r for _, r in all_rows]), [paths[i] for i, _ in all_rows], failures


def write_embeddings(
    output: str | os.PathLike[str], rows: np.ndarray, paths: list[str], *, listing: str = "paths"
) -> Path:
    """`rows` as .npy or .safetensors (key "embeddings"), atomically, and beside it
    `<output>.paths.txt` with the path of each row, in row order (`listing="texts"`:
    `<output>.texts.txt`, the text of each row on one line)."""
    output = Path(output)
    if output.suffix not in FORMATS:
        raise ConfigError(f"--output {output}: write {' or '.join(FORMATS)}")
    with atomic_path(output) as tmp:
        if output.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(rows, dtype=np.float32))
        else:
            save_file({"embeddings": np.ascontiguousarray(rows, dtype=np.float32)}, str(tmp))
    lines = (" ".join(p.splitlines()) for p in paths)  # a text with line breaks: one line
    atomic_write_text(paths_file(output, listing), "".join(f"{p}\n" for p in lines))
    return output


def paths_file(output: str | os.PathLike[str], listing: str = "paths") -> Path:
    return Path(f"{output}.{listing}.txt")
