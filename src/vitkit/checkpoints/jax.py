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

import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitkit._io import atomic_open
from vitkit.checkpoints._common import (
    Hook,
    Rule,
    build_config,
    check_state_dict,
    expected_shapes,
    rename_from,
    rename_to,
    same,
)
from vitkit.checkpoints._safety import check_float_dtypes, check_zip_sizes
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

_PREFIXES = ("params/img/", "params/", "opt/target/", "")
_OFFICIAL = dict(attn="MultiHeadDotProductAttention_1", ln2="LayerNorm_2", mlp="MlpBlock_3",
                 pos="Transformer/posembed_input/pos_embedding")  # fmt: skip
_BIG_VISION = dict(attn="MultiHeadDotProductAttention_0", ln2="LayerNorm_1", mlp="MlpBlock_0",
                   pos="pos_embedding")  # no row for [CLS]  # fmt: skip
_STACKED = "Transformer/encoderblock/"  # big_vision: every block's arrays, depth first
_MAP = "MAPHead_0/"


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
    count = math.prod(shape)
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


def _arrays(w: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The model's arrays (an optimizer's integer counters beside them are left out), each
    floating point as the file holds it, with stacked blocks split into one per block."""
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in w), None)
    if prefix is None and any("conv_root" in k or "block1/unit1" in k for k in w):
        raise CheckpointError(
            f"{source} is a hybrid (ResNet + ViT) checkpoint; vitkit builds pure ViTs only"
        )
    if prefix is None:
        raise CheckpointError(
            f"{source} has no 'embedding/kernel'; is it a ViT .npz? first keys: {sorted(w)[:6]}"
        )
    out = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
    check_float_dtypes(out, source)
    for key in [k for k in out if k.startswith(_STACKED)]:
        stacked = out.pop(key)
        for i in range(len(stacked) if stacked.ndim else 0):
            out[f"Transformer/encoderblock_{i}/{key[len(_STACKED) :]}"] = stacked[i]
    return out


def _layout(w: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Sublayer and position-table names of a file (their layouts may mix)."""
    official = f"Transformer/encoderblock_0/{_OFFICIAL['attn']}/query/kernel" in w
    names = _OFFICIAL if official else _BIG_VISION
    return {**names, "pos": _OFFICIAL["pos"] if _OFFICIAL["pos"] in w else _BIG_VISION["pos"]}


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
    w = _arrays(weights, source)
    n = _layout(w)
    P, Pw, C, D = w["embedding/kernel"].shape
    if Pw != P:
        raise CheckpointError(f"{source}: non-square patches {P}x{Pw} are not supported")
    blocks = (re.match(r"Transformer/encoderblock_(\d+)/", k) for k in w)
    depth = 1 + max(int(m.group(1)) for m in blocks if m)
    heads = w[f"Transformer/encoderblock_0/{n['attn']}/query/kernel"].shape[1]
    mlp = w[f"Transformer/encoderblock_0/{n['mlp']}/Dense_0/kernel"].shape[-1]
    class_token = "cls" in w
    if n["pos"] not in w:
        raise CheckpointError(
            f"{source} has no position embedding (Transformer/posembed_input/"
            f"pos_embedding or pos_embedding)"
        )
    rows = w[n["pos"]].reshape(-1, D).shape[0]
    patches = rows - int(class_token) if n["pos"] == _OFFICIAL["pos"] else rows
    side = round(patches**0.5)
    if side * side != patches:
        raise CheckpointError(
            f"{source}: position table with {patches} patch rows is not a square "
            f"grid; pass config=ViTConfig(image_size=(h, w), ...)"
        )
    num_classes = w["head/kernel"].shape[-1] if "head/kernel" in w else 0
    pre_logits = w["pre_logits/kernel"].shape[-1] if "pre_logits/kernel" in w else None
    map_head = any(k.startswith(_MAP) for k in w)
    if map_head:
        _check_map_head(w, class_token, heads, mlp, source)
    return build_config(
        ViTConfig,
        source,
        image_size=side * P,
        patch_size=P,
        in_chans=C,
        num_classes=num_classes,
        embed_dim=D,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp / D,
        qkv_bias=f"Transformer/encoderblock_0/{n['attn']}/query/bias" in w,
        layer_norm_eps=1e-6,
        act=act,
        global_pool="map" if map_head else "token" if class_token else "avg",
        fc_norm=False,
        class_token=class_token,
        head="linear" if pre_logits is None else "mlp",
        head_hidden_dim=pre_logits if pre_logits != D else None,
    )


def _check_map_head(
    w: Mapping[str, np.ndarray], class_token: bool, heads: int, mlp: int, source: str
) -> None:
    """vitkit's attention pool (`global_pool="map"`) has the blocks' heads and MLP width and
    reads the patch tokens only; refuse a MAP head that differs."""
    map_heads = w[_MAP + "MultiHeadDotProductAttention_0/query/kernel"].shape[1]
    map_mlp = w[_MAP + "MlpBlock_0/Dense_0/kernel"].shape[-1]
    if class_token:
        raise CheckpointError(f"{source}: a MAP head beside a [CLS] token is not supported")
    if (map_heads, map_mlp) != (heads, mlp):
        raise CheckpointError(
            f"{source}: the MAP head has {map_heads} heads and an MLP of {map_mlp}; vitkit's "
            f"attention pool uses the blocks' ({heads} heads, MLP {mlp})"
        )


# ----------------------------------------------------------------------------- the mapping
def _kernel(n_in: int) -> Hook:
    """Flax kernels (in..., out...) with `n_in` input axes <-> PyTorch weights (out, in)."""
    return (
        lambda t: t.reshape(math.prod(t.shape[:n_in]), -1).T,
        lambda t, shape: t.reshape(-1, math.prod(shape[:n_in])).T.reshape(shape),
    )


def _zero_rows(n: int) -> Hook:
    """A position table without rows for [CLS]/[DIST]: vitkit's has `n` zero rows there."""
    return (
        lambda t: torch.cat([t.new_zeros(1, n, t.shape[-1]), t], dim=1),
        lambda t, shape: t.reshape(1, -1, shape[-1])[:, n:].reshape(shape),
    )


_CONV: Hook = (  # (P, P, C, D) <-> (D, C, P, P)
    lambda t: t.permute(3, 2, 0, 1),
    lambda t, s: t.reshape(s[3], s[2], s[0], s[1]).permute(2, 3, 1, 0),
)


def rules(config: ViTConfig, layout: Mapping[str, str] = _OFFICIAL) -> list[Rule]:
    """vitkit <-> JAX names in `layout` (`_OFFICIAL`, `_BIG_VISION` or what a file mixes)."""
    c, n, D = config, layout, config.embed_dim
    shapes = expected_shapes(c)

    def ln(ours: str, theirs: str) -> list[Rule]:
        return [same(f"{ours}.weight", f"{theirs}/scale"), same(f"{ours}.bias", f"{theirs}/bias")]

    def dense(ours: str, theirs: str) -> list[Rule]:
        kernel = shapes[f"{ours}.weight"][::-1]
        return [same(f"{ours}.weight", f"{theirs}/kernel", kernel, _kernel(1)),
                same(f"{ours}.bias", f"{theirs}/bias")]  # fmt: skip

    def attention(theirs: str, groups: dict[str, str], proj: str, bias: bool) -> list[Rule]:
        """Flax's query/key/value (D, H, Dh) and out (H, Dh, D) -> `groups` of vitkit Linears."""
        H, Dh, out = c.num_heads, c.head_dim, []
        for ours, parts in groups.items():
            kernels = tuple((f"{theirs}/{p}/kernel", (D, H, Dh)) for p in parts.split())
            out.append(Rule((f"{ours}.weight",), kernels, _kernel(1)))
            if bias:
                biases = tuple((f"{theirs}/{p}/bias", (H, Dh)) for p in parts.split())
                out.append(Rule((f"{ours}.bias",), biases))
        return [*out, same(f"{proj}.weight", f"{theirs}/out/kernel", (H, Dh, D), _kernel(2)),
                same(f"{proj}.bias", f"{theirs}/out/bias")]  # fmt: skip

    P = c.patch_size
    out = [
        same("patch_embed.proj.weight", "embedding/kernel", (P, P, c.in_chans, D), _CONV),
        same("patch_embed.proj.bias", "embedding/bias"),
    ]
    if c.class_token:
        out.append(same("cls_token", "cls"))
    if n["pos"] == _BIG_VISION["pos"]:
        prefix = _zero_rows(c.num_pos_prefix_tokens)
        out.append(same("pos_embed", n["pos"], (1, c.num_patches, D), prefix))
    else:
        out.append(same("pos_embed", n["pos"]))
    for i in range(c.depth):
        ours, theirs = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out += ln(f"{ours}norm1", f"{theirs}LayerNorm_0")
        qkv = {f"{ours}attn.qkv": "query key value"}
        out += attention(theirs + n["attn"], qkv, f"{ours}attn.proj", c.qkv_bias)
        out += ln(f"{ours}norm2", theirs + n["ln2"])
        out += dense(f"{ours}mlp.fc1", f"{theirs}{n['mlp']}/Dense_0")
        out += dense(f"{ours}mlp.fc2", f"{theirs}{n['mlp']}/Dense_1")
    out += ln("norm", "Transformer/encoder_norm")
    if c.global_pool == "map":
        out.append(same("attn_pool.latent", f"{_MAP}probe"))
        groups = {"attn_pool.q": "query", "attn_pool.kv": "key value"}
        out += attention(f"{_MAP}MultiHeadDotProductAttention_0", groups, "attn_pool.proj", True)
        out += ln("attn_pool.norm", f"{_MAP}LayerNorm_0")
        out += dense("attn_pool.mlp.fc1", f"{_MAP}MlpBlock_0/Dense_0")
        out += dense("attn_pool.mlp.fc2", f"{_MAP}MlpBlock_0/Dense_1")
    if c.head == "mlp":
        out += dense("pre_logits.fc", "pre_logits")
    if c.num_classes:
        out += dense("head", "head")
    return out


def state_dict_from_npz(
    weights: Mapping[str, np.ndarray], config: ViTConfig, *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """vitkit state dict from a JAX checkpoint; every array must be used (else one error)."""
    w = _arrays(weights, source)
    layout = _layout(w)
    q = w.get(f"Transformer/encoderblock_0/{layout['attn']}/query/kernel")
    if q is not None and q.ndim == 3 and q.shape[1] != config.num_heads:  # (D, H, Dh)
        raise CheckpointError(
            f"{source} has {q.shape[1]} attention heads but the config says "
            f"num_heads={config.num_heads}"
        )
    for key, array in w.items():
        if array.dtype.kind != "f":  # bfloat16 as raw bytes would be cast silently
            raise CheckpointError(
                f"{source}: array {key!r} is {array.dtype}, not floating point; vitkit does "
                f"not cast integer weights (the file is not a ViT checkpoint or is corrupt)"
            )
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in w.items()}
    return rename_from(sd, rules(config, layout), config, source=source)


def npz_from_state_dict(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, np.ndarray]:
    """JAX arrays: the vision_transformer layout (the paper's released files) for a model that
    reads [CLS], big_vision's (unstacked blocks, `pos_embedding` with no [CLS] row) for one
    without [CLS] that pools the patch mean or with a MAP head (SigLIP)."""
    c = config
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
    arrays = rename_to(sd, rules(c, _OFFICIAL if c.class_token else _BIG_VISION))
    return {k: v.detach().float().cpu().numpy().copy() for k, v in arrays.items()}


def save_npz(model: Any, path: str | os.PathLike[str]) -> None:
    """Write a vitkit model as a JAX `.npz` atomically, in the layout `npz_from_state_dict`
    picks (timm's `_load_weights` and the original JAX code read it)."""
    arrays = npz_from_state_dict(model.state_dict(), model.config)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
