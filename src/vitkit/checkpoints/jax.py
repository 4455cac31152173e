"""Google JAX/Flax `.npz` checkpoints (google-research/vision_transformer and big_vision).

Two layouts are read, keys joined with "/":

    vision_transformer  cls, embedding/{kernel (P,P,C,D), bias},
                        Transformer/posembed_input/pos_embedding (1, 1+N, D),
                        Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1,
                        LayerNorm_2, MlpBlock_3/Dense_{0,1}; Transformer/encoder_norm;
                        pre_logits (in21k files only: dense + tanh), head
    big_vision          optional "params/" prefix, pos_embedding at the top level without a
                        [CLS] row, sublayers MultiHeadDotProductAttention_0, LayerNorm_1,
                        MlpBlock_0, optionally all blocks stacked under Transformer/encoderblock
                        with a leading depth axis; mean pooling when there is no cls, or
                        attention pooling with MAPHead_0/{probe, MultiHeadDotProductAttention_0,
                        LayerNorm_0, MlpBlock_0} (SigLIP's image tower, "params/img/")

Kernels are (in, out) and attention kernels (D, H, Dh) / (H, Dh, D); PyTorch wants (out, in).
The architecture is read from the shapes: width and patch from the embedding kernel, depth from
the blocks, heads from the query kernel, grid from the position table, classes from the head.
The original code uses the tanh approximation of GELU, so loads default to act="gelu_tanh".
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitkit.checkpoints._common import check_state_dict, mismatch_error
from vitkit.checkpoints._safety import check_float_dtypes, check_zip_sizes
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

_PREFIXES = ("params/img/", "params/", "opt/target/", "")
_OFFICIAL = {"attn": "MultiHeadDotProductAttention_1", "ln2": "LayerNorm_2", "mlp": "MlpBlock_3"}
_BIG_VISION = {"attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1", "mlp": "MlpBlock_0"}


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` (never unpickling objects).

    Sizes are checked from the zip directory before anything is decompressed (each member and
    the total against CHECKPOINT_BYTES, the total against ZIP_RATIO times the compressed size),
    and each `.npy` header's shape and dtype must account for exactly its member's size, so a
    header that lies about its shape is refused before numpy would allocate for it.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if not i.is_dir()]
            check_zip_sizes(members, path)
            out = {}
            for info in members:
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with z.open(info) as f:
                    out[key] = _read_npy(f, info, path)
            return out
    except CheckpointError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
        raise CheckpointError(f"cannot read {path} as a JAX .npz checkpoint: {exc}") from exc


def _read_npy(f: Any, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One `.npy` member whose header must match the member's size; no object arrays."""
    fmt = np.lib.format
    where = f"{path}: member {info.filename!r}"
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{where}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise CheckpointError(f"{where}: object arrays are refused (they need unpickling)")
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if f.tell() + nbytes != info.file_size:  # f.tell(): the end of the header
        raise CheckpointError(
            f"{where}: the header says {shape} {dtype} ({nbytes:,d} bytes) but the member holds "
            f"{info.file_size - f.tell():,d}; the file is corrupt or hostile"
        )
    array = np.empty(count, dtype=dtype)  # proven to fit the member, which fits the limits
    view = memoryview(array.view(np.uint8)) if nbytes else memoryview(bytearray())
    done = 0
    while done < nbytes:
        got = f.readinto(view[done : done + (16 << 20)])
        if not got:
            raise CheckpointError(f"{where}: truncated ({done:,d} of {nbytes:,d} bytes)")
        done += got
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def _strip_prefix(w: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The model's arrays (an optimizer's integer counters beside them are left out), each
    floating point as the file holds it."""
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in w:
            out = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
            check_float_dtypes(out, source)
            return out
    if any("conv_root" in k or "block1/unit1" in k for k in w):
        raise CheckpointError(
            f"{source} is a hybrid (ResNet + ViT) checkpoint; vitkit builds pure ViTs only"
        )
    raise CheckpointError(
        f"{source} has no 'embedding/kernel'; is it a ViT .npz? first keys: {sorted(w)[:6]}"
    )


def _layout(w: Mapping[str, np.ndarray]) -> tuple[dict[str, str], bool]:
    """Sublayer names and whether the blocks are stacked along a leading depth axis."""
    stacked = "Transformer/encoderblock/LayerNorm_0/scale" in w
    block = "Transformer/encoderblock/" if stacked else "Transformer/encoderblock_0/"
    names = _OFFICIAL if f"{block}{_OFFICIAL['attn']}/query/kernel" in w else _BIG_VISION
    return names, stacked


def config_from_npz(
    weights: Mapping[str, np.ndarray], *, act: str = "gelu_tanh", source: str = "checkpoint"
) -> ViTConfig:
    """The `ViTConfig` a JAX ViT checkpoint describes (see the module docstring)."""
    try:
        return _config_from_npz(weights, act, source)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        missing = f"no array {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(
            f"{source} does not have the arrays of a ViT .npz ({missing}); is it a "
            f"vision_transformer or big_vision ViT checkpoint?"
        ) from None


def _config_from_npz(weights: Mapping[str, np.ndarray], act: str, source: str) -> ViTConfig:
    w = _strip_prefix(weights, source)
    names, stacked = _layout(w)
    P, Pw, C, D = w["embedding/kernel"].shape
    if Pw != P:
        raise CheckpointError(f"{source}: non-square patches {P}x{Pw} are not supported")
    if stacked:
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = 1 + max(
            int(m.group(1)) for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))
        )
    q = w[_block_key(0, names["attn"] + "/query/kernel", stacked)]
    q = q[0] if stacked else q
    heads = q.shape[1]
    mlp = w[_block_key(0, names["mlp"] + "/Dense_0/kernel", stacked)].shape[-1]
    class_token = "cls" in w
    pos = w.get("Transformer/posembed_input/pos_embedding", w.get("pos_embedding"))
    if pos is None:
        raise CheckpointError(
            f"{source} has no position embedding (Transformer/posembed_input/"
            f"pos_embedding or pos_embedding)"
        )
    rows = pos.reshape(-1, D).shape[0]
    n = rows - int(class_token) if "pos_embedding" not in w else rows
    side = round(n**0.5)
    if side * side != n:
        raise CheckpointError(
            f"{source}: position table with {n} patch rows is not a square "
            f"grid; pass config=ViTConfig(image_size=(h, w), ...)"
        )
    num_classes = w["head/kernel"].shape[-1] if "head/kernel" in w else 0
    has_pre_logits = "pre_logits/kernel" in w
    map_head = any(k.startswith(_MAP) for k in w)
    if map_head:
        _check_map_head(w, class_token, heads, mlp, source)
    try:
        return ViTConfig(
            image_size=side * P,
            patch_size=P,
            in_chans=C,
            num_classes=num_classes,
            embed_dim=D,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp / D,
            qkv_bias=_block_key(0, names["attn"] + "/query/bias", stacked) in w,
            layer_norm_eps=1e-6,
            act=act,  # type: ignore[arg-type]
            global_pool="map" if map_head else "token" if class_token else "avg",
            fc_norm=False,
            class_token=class_token,
            head="mlp" if has_pre_logits else "linear",
            head_hidden_dim=(
                w["pre_logits/kernel"].shape[-1]
                if has_pre_logits and w["pre_logits/kernel"].shape[-1] != D
                else None
            ),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source} does not describe a vitkit ViT: {exc}") from exc


_MAP = "MAPHead_0/"
_MAP_ATTN = _MAP + "MultiHeadDotProductAttention_0/"


def _check_map_head(
    w: Mapping[str, np.ndarray], class_token: bool, heads: int, mlp: int, source: str
) -> None:
    """vitkit's attention pool (`global_pool="map"`) has the blocks' heads and MLP width and
    reads the patch tokens only; refuse a MAP head that differs."""
    map_heads = w[_MAP_ATTN + "query/kernel"].shape[1]
    map_mlp = w[_MAP + "MlpBlock_0/Dense_0/kernel"].shape[-1]
    if class_token:
        raise CheckpointError(f"{source}: a MAP head beside a [CLS] token is not supported")
    if (map_heads, map_mlp) != (heads, mlp):
        raise CheckpointError(
            f"{source}: the MAP head has {map_heads} heads and an MLP of {map_mlp}; vitkit's "
            f"attention pool uses the blocks' ({heads} heads, MLP {mlp})"
        )


def _block_key(i: int, name: str, stacked: bool) -> str:
    return f"Transformer/encoderblock/{name}" if stacked else f"Transformer/encoderblock_{i}/{name}"


def state_dict_from_npz(
    weights: Mapping[str, np.ndarray], config: ViTConfig, *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """vitkit state dict from a JAX checkpoint; every array must be used (else one error)."""
    w = _strip_prefix(weights, source)
    names, stacked = _layout(w)
    required = set(_required_keys(w, config, names, stacked))
    missing, unused = sorted(required - set(w)), sorted(set(w) - required)
    if missing or unused:
        raise mismatch_error(
            source,
            missing=missing,
            unexpected=unused,
            hint="the arrays do not fit the config read from / given for them",
        )

    q = w[_block_key(0, names["attn"] + "/query/kernel", stacked)]
    if q.ndim >= 3 and q.shape[-2] != config.num_heads:  # (D, H, Dh): heads are in the file
        raise CheckpointError(
            f"{source} has {q.shape[-2]} attention heads but the config says "
            f"num_heads={config.num_heads}"
        )

    for key in sorted(required):
        kind = w[key].dtype.kind
        if kind != "f":  # an integer array would be cast silently
            raise CheckpointError(
                f"{source}: array {key!r} is {w[key].dtype}, not floating point; vitkit does "
                f"not cast integer weights (the file is not a ViT checkpoint or is corrupt)"
            )

    def get(key: str, i: int | None = None) -> Tensor:
        value = w[key] if i is None or not stacked else w[key][i]
        return torch.from_numpy(np.asarray(value, dtype=np.float32).copy())

    try:
        sd = _convert(w, config, names, stacked, get)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"{source}: arrays have shapes that do not fit the config "
            f"({config.embed_dim=}, {config.num_heads=}): {exc}"
        ) from exc
    check_state_dict(sd, config, source=source)
    return sd


def _required_keys(
    w: Mapping[str, np.ndarray], config: ViTConfig, names: dict[str, str], stacked: bool
) -> list[str]:
    """Every array a model of `config` reads from the file (all of them must be used)."""
    keys = [
        "embedding/kernel",
        "embedding/bias",
        "Transformer/encoder_norm/scale",
        "Transformer/encoder_norm/bias",
    ]
    keys.append(
        "Transformer/posembed_input/pos_embedding"
        if "Transformer/posembed_input/pos_embedding" in w
        else "pos_embedding"
    )
    if config.class_token:
        keys.append("cls")
    a, m = names["attn"], names["mlp"]
    per_block = [
        "LayerNorm_0/scale",
        "LayerNorm_0/bias",
        f"{a}/out/kernel",
        f"{a}/out/bias",
        f"{names['ln2']}/scale",
        f"{names['ln2']}/bias",
    ]
    per_block += [f"{a}/{n}/kernel" for n in ("query", "key", "value")]
    if config.qkv_bias:
        per_block += [f"{a}/{n}/bias" for n in ("query", "key", "value")]
    per_block += [f"{m}/Dense_{j}/{p}" for j in range(2) for p in ("kernel", "bias")]
    for i in range(1 if stacked else config.depth):
        keys += [_block_key(i, name, stacked) for name in per_block]
    if config.global_pool == "map":
        keys += [_MAP + "probe", _MAP + "LayerNorm_0/scale", _MAP + "LayerNorm_0/bias"]
        keys += [f"{_MAP_ATTN}{n}/{p}" for n in ("query", "key", "value", "out")
                 for p in ("kernel", "bias")]  # fmt: skip
        keys += [f"{_MAP}MlpBlock_0/Dense_{j}/{p}" for j in range(2) for p in ("kernel", "bias")]
    if config.head == "mlp":
        keys += ["pre_logits/kernel", "pre_logits/bias"]
    if config.num_classes:
        keys += ["head/kernel", "head/bias"]
    return keys


def _convert(
    w: Mapping[str, np.ndarray], config: ViTConfig, names: dict[str, str], stacked: bool, get: Any
) -> dict[str, Tensor]:

    D = config.embed_dim
    sd: dict[str, Tensor] = {
        "patch_embed.proj.weight": get("embedding/kernel").permute(3, 2, 0, 1),
        "patch_embed.proj.bias": get("embedding/bias"),
    }
    if "cls" in w:
        sd["cls_token"] = get("cls").reshape(1, 1, D)
    if "Transformer/posembed_input/pos_embedding" in w:
        sd["pos_embed"] = get("Transformer/posembed_input/pos_embedding").reshape(1, -1, D)
    else:  # big_vision: no row for [CLS]; it is added after the positions -> a zero row
        pos = get("pos_embedding").reshape(1, -1, D)
        prefix = config.num_pos_prefix_tokens
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, prefix, D), pos], dim=1)
    for i in range(config.depth):

        def blk(name: str, i: int = i) -> Tensor:
            return get(_block_key(i, name, stacked), i)

        a, m, ours = names["attn"], names["mlp"], f"blocks.{i}."
        sd[ours + "norm1.weight"] = blk("LayerNorm_0/scale")
        sd[ours + "norm1.bias"] = blk("LayerNorm_0/bias")
        sd[ours + "attn.qkv.weight"] = torch.cat(
            [blk(f"{a}/{n}/kernel").reshape(D, -1).T for n in ("query", "key", "value")]
        )
        if config.qkv_bias:
            sd[ours + "attn.qkv.bias"] = torch.cat(
                [blk(f"{a}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
            )
        sd[ours + "attn.proj.weight"] = blk(f"{a}/out/kernel").reshape(-1, D).T
        sd[ours + "attn.proj.bias"] = blk(f"{a}/out/bias")
        sd[ours + "norm2.weight"] = blk(f"{names['ln2']}/scale")
        sd[ours + "norm2.bias"] = blk(f"{names['ln2']}/bias")
        for j in range(2):
            sd[ours + f"mlp.fc{j + 1}.weight"] = blk(f"{m}/Dense_{j}/kernel").T
            sd[ours + f"mlp.fc{j + 1}.bias"] = blk(f"{m}/Dense_{j}/bias")
    sd["norm.weight"] = get("Transformer/encoder_norm/scale")
    sd["norm.bias"] = get("Transformer/encoder_norm/bias")
    if config.global_pool == "map":  # Flax (D, H, Dh) / (H, Dh, D) kernels, as in the blocks
        sd["attn_pool.latent"] = get(_MAP + "probe").reshape(1, 1, D)
        sd["attn_pool.q.weight"] = get(_MAP_ATTN + "query/kernel").reshape(D, -1).T
        sd["attn_pool.q.bias"] = get(_MAP_ATTN + "query/bias").reshape(-1)
        sd["attn_pool.kv.weight"] = torch.cat(
            [get(f"{_MAP_ATTN}{n}/kernel").reshape(D, -1).T for n in ("key", "value")]
        )
        sd["attn_pool.kv.bias"] = torch.cat(
            [get(f"{_MAP_ATTN}{n}/bias").reshape(-1) for n in ("key", "value")]
        )
        sd["attn_pool.proj.weight"] = get(_MAP_ATTN + "out/kernel").reshape(-1, D).T
        sd["attn_pool.proj.bias"] = get(_MAP_ATTN + "out/bias")
        sd["attn_pool.norm.weight"] = get(_MAP + "LayerNorm_0/scale")
        sd["attn_pool.norm.bias"] = get(_MAP + "LayerNorm_0/bias")
        for j in range(2):
            sd[f"attn_pool.mlp.fc{j + 1}.weight"] = get(f"{_MAP}MlpBlock_0/Dense_{j}/kernel").T
            sd[f"attn_pool.mlp.fc{j + 1}.bias"] = get(f"{_MAP}MlpBlock_0/Dense_{j}/bias")
    if config.head == "mlp":
        sd["pre_logits.fc.weight"] = get("pre_logits/kernel").T
        sd["pre_logits.fc.bias"] = get("pre_logits/bias")
    if config.num_classes:
        sd["head.weight"] = get("head/kernel").T
        sd["head.bias"] = get("head/bias")
    return {k: v.contiguous() for k, v in sd.items()}


def npz_from_state_dict(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, np.ndarray]:
    """JAX arrays: the vision_transformer layout (the paper's released files) for a model that
    reads [CLS], big_vision's (unstacked blocks, `pos_embedding` with no [CLS] row) for one
    without [CLS] that pools the patch mean or with a MAP head (SigLIP)."""
    c = config
    big_vision = not c.class_token
    problems = []
    if c.class_token and c.global_pool != "token":
        problems.append("a [CLS] model to read [CLS] (global_pool='token')")
    if c.use_fc_norm:
        problems.append("the final norm before pooling (fc_norm off)")
    if c.distilled or c.num_register_tokens or c.use_mask_token:
        problems.append("no [DIST], register or mask tokens")
    if c.pos_embed != "learned":
        problems.append("a learned position table")
    if c.stem_channels:
        problems.append("patches projected from the pixels (no convolutional stem)")
    if problems:
        raise CheckpointError("cannot write this model as a JAX .npz: needs " + "; ".join(problems))
    check_state_dict(sd, c, source="model state dict")
    D, H, Dh = c.embed_dim, c.num_heads, c.head_dim
    names = _BIG_VISION if big_vision else _OFFICIAL

    def a(t: Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy().copy()

    w: dict[str, np.ndarray] = {
        "embedding/kernel": a(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
        "embedding/bias": a(sd["patch_embed.proj.bias"]),
        "Transformer/encoder_norm/scale": a(sd["norm.weight"]),
        "Transformer/encoder_norm/bias": a(sd["norm.bias"]),
    }
    if big_vision:
        w["pos_embedding"] = a(sd["pos_embed"])
    else:
        w["cls"] = a(sd["cls_token"])
        w["Transformer/posembed_input/pos_embedding"] = a(sd["pos_embed"])
    for i in range(c.depth):
        ours, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = b + names["attn"]
        w[b + "LayerNorm_0/scale"] = a(sd[ours + "norm1.weight"])
        w[b + "LayerNorm_0/bias"] = a(sd[ours + "norm1.bias"])
        for n, part in zip(("query", "key", "value"), sd[ours + "attn.qkv.weight"].chunk(3)):
            w[f"{att}/{n}/kernel"] = a(part.T.reshape(D, H, Dh))
        if c.qkv_bias:
            for n, part in zip(("query", "key", "value"), sd[ours + "attn.qkv.bias"].chunk(3)):
                w[f"{att}/{n}/bias"] = a(part.reshape(H, Dh))
        w[f"{att}/out/kernel"] = a(sd[ours + "attn.proj.weight"].T.reshape(H, Dh, D))
        w[f"{att}/out/bias"] = a(sd[ours + "attn.proj.bias"])
        w[f"{b}{names['ln2']}/scale"] = a(sd[ours + "norm2.weight"])
        w[f"{b}{names['ln2']}/bias"] = a(sd[ours + "norm2.bias"])
        for j in range(2):
            w[f"{b}{names['mlp']}/Dense_{j}/kernel"] = a(sd[ours + f"mlp.fc{j + 1}.weight"].T)
            w[f"{b}{names['mlp']}/Dense_{j}/bias"] = a(sd[ours + f"mlp.fc{j + 1}.bias"])
    if c.global_pool == "map":
        w[_MAP + "probe"] = a(sd["attn_pool.latent"])
        q, kv = sd["attn_pool.q.weight"], sd["attn_pool.kv.weight"].chunk(2)
        for n, part in zip(("query", "key", "value"), (q, *kv)):
            w[f"{_MAP_ATTN}{n}/kernel"] = a(part.T.reshape(D, H, Dh))
        biases = (sd["attn_pool.q.bias"], *sd["attn_pool.kv.bias"].chunk(2))
        for n, part in zip(("query", "key", "value"), biases):
            w[f"{_MAP_ATTN}{n}/bias"] = a(part.reshape(H, Dh))
        w[_MAP_ATTN + "out/kernel"] = a(sd["attn_pool.proj.weight"].T.reshape(H, Dh, D))
        w[_MAP_ATTN + "out/bias"] = a(sd["attn_pool.proj.bias"])
        w[_MAP + "LayerNorm_0/scale"] = a(sd["attn_pool.norm.weight"])
        w[_MAP + "LayerNorm_0/bias"] = a(sd["attn_pool.norm.bias"])
        for j in range(2):
            w[f"{_MAP}MlpBlock_0/Dense_{j}/kernel"] = a(sd[f"attn_pool.mlp.fc{j + 1}.weight"].T)
            w[f"{_MAP}MlpBlock_0/Dense_{j}/bias"] = a(sd[f"attn_pool.mlp.fc{j + 1}.bias"])
    if c.head == "mlp":
        w["pre_logits/kernel"] = a(sd["pre_logits.fc.weight"].T)
        w["pre_logits/bias"] = a(sd["pre_logits.fc.bias"])
    if c.num_classes:
        w["head/kernel"] = a(sd["head.weight"].T)
        w["head/bias"] = a(sd["head.bias"])
    return w


def save_npz(model: Any, path: str | os.PathLike[str]) -> None:
    """Write a vitkit model as a JAX `.npz` atomically, in the layout `npz_from_state_dict`
    picks (timm's `_load_weights` and the original JAX code read it)."""
    from vitkit._io import atomic_open

    arrays = npz_from_state_dict(model.state_dict(), model.config)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
