"""transformers masked-image-modeling checkpoints <-> vitkit SimMIM / MAE.

`ViTForMaskedImageModeling` (SimMIM): the encoder is a ViT (mapped by `vitkit.checkpoints.hf`)
with `vit.embeddings.mask_token`; the decoder `decoder.0.{weight,bias}` is SimMIM's 1x1 conv and
keeps its name (`decoder.0`) in vitkit.

`ViTMAEForPreTraining` (MAE): encoder keys as ViT under `vit.`, whose fixed
`vit.embeddings.position_embeddings` becomes vitkit's computed sin-cos table (same layout);
decoder keys map as

    decoder.decoder_embed          decoder.embed
    decoder.mask_token             decoder.mask_token
    decoder.decoder_pos_embed      (computed sin-cos, dropped)
    decoder.decoder_layers.{i}.*   decoder.blocks.{i}.*  (q, k, v fused into qkv)
    decoder.decoder_norm           decoder.norm
    decoder.decoder_pred           decoder.pred
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkit.checkpoints._common import integer, number
from vitkit.checkpoints.hf import config_from_hf, config_to_hf, state_dict_from_hf
from vitkit.checkpoints.hf import state_dict_to_hf as _encoder_to_hf
from vitkit.checkpoints.pretrained import read_state_dict
from vitkit.config import ViTConfig, read_json
from vitkit.errors import CheckpointError, ConfigError

_DECODER_TOP = {
    "decoder.decoder_embed.weight": "decoder.embed.weight",
    "decoder.decoder_embed.bias": "decoder.embed.bias",
    "decoder.mask_token": "decoder.mask_token",
    "decoder.decoder_norm.weight": "decoder.norm.weight",
    "decoder.decoder_norm.bias": "decoder.norm.bias",
    "decoder.decoder_pred.weight": "decoder.pred.weight",
    "decoder.decoder_pred.bias": "decoder.pred.bias",
}


# ------------------------------------------------------------------------------------ SimMIM
def simmim_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """transformers `ViTForMaskedImageModeling` state dict -> vitkit `SimMIM` state dict."""
    enc = state_dict_from_hf(sd, config, prefix="vit.", ignore=("decoder.",), source=source)
    out = {f"encoder.{k}": v for k, v in enc.items()}
    for kind in ("weight", "bias"):
        key = f"decoder.0.{kind}"
        if key not in sd:
            raise CheckpointError(f"{source}: missing key {key} (SimMIM's 1x1 conv decoder)")
        out[key] = sd[key]
    return out


def simmim_state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """vitkit `SimMIM` state dict -> transformers v4 file names."""
    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    out = _encoder_to_hf(enc, config, prefix="vit.")
    out.update({k: v for k, v in sd.items() if k.startswith("decoder.")})
    return out


def save_simmim(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Write `model` (a `SimMIM`) as a transformers `ViTForMaskedImageModeling` folder."""
    from safetensors.torch import save_file

    from vitkit._io import atomic_path, atomic_write_text

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf = config_to_hf(config, "ViTForMaskedImageModeling")
    hf["encoder_stride"] = model.encoder_stride
    sd = simmim_state_dict_to_hf(model.state_dict(), config)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return folder


def load_simmim(directory: str | os.PathLike[str]) -> Any:
    """Read a transformers `ViTForMaskedImageModeling` folder into a vitkit `SimMIM`."""
    from vitkit.models.mim import SimMIM

    hf, sd, source = _read_folder(directory)
    config = config_from_hf({**hf, "architectures": ["ViTForMaskedImageModeling"]})
    model = SimMIM(config, encoder_stride=integer(hf, "encoder_stride", config.patch_size))
    model.load_state_dict(simmim_state_dict_from_hf(sd, config, source=source))
    return model.eval()


def _read_folder(directory: str | os.PathLike[str]) -> tuple[dict, dict[str, Tensor], str]:
    folder = Path(directory)
    cfg, weights = folder / "config.json", folder / "model.safetensors"
    for f in (cfg, weights):
        if not f.is_file():
            raise CheckpointError(f"{f} not found; expected a transformers checkpoint folder")
    try:
        hf = read_json(cfg, "config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg} must hold a JSON object")
    return hf, read_state_dict(weights), str(weights)


# --------------------------------------------------------------------------------------- MAE
def mae_config_from_hf(hf: Mapping[str, Any]) -> tuple[ViTConfig, dict[str, Any]]:
    """A `ViTMAEConfig` dict -> (encoder `ViTConfig`, keyword arguments of `MaskedAutoencoder`)."""
    if hf.get("model_type", "vit_mae") != "vit_mae":
        raise CheckpointError(f"model_type={hf.get('model_type')!r}, expected 'vit_mae'")
    vit = {**hf, "model_type": "vit", "architectures": ["ViTModel"]}
    config = config_from_hf(vit).replace(head="linear", head_hidden_dim=None, pos_embed="sincos2d")
    dim = integer(hf, "decoder_hidden_size", 512)
    kwargs = dict(
        decoder_dim=dim,
        decoder_depth=integer(hf, "decoder_num_hidden_layers", 8),
        decoder_heads=integer(hf, "decoder_num_attention_heads", 16),
        decoder_mlp_ratio=integer(hf, "decoder_intermediate_size", 2048) / dim,
        mask_ratio=number(hf, "mask_ratio", 0.75),
        norm_pix_loss=bool(hf.get("norm_pix_loss", False)),
    )
    return config, kwargs


def mae_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """transformers `ViTMAEForPreTraining` state dict (v4 file or v5 in-memory names) -> vitkit
    `MaskedAutoencoder` state dict. The fixed position tables are dropped (vitkit computes the
    same sin-cos values)."""
    sd = dict(sd)
    dec_dim = (
        sd["decoder.decoder_embed.weight"].shape[0] if "decoder.decoder_embed.weight" in sd else 0
    )
    for name, dim in (
        ("vit.embeddings.position_embeddings", config.embed_dim),
        ("decoder.decoder_pos_embed", dec_dim),
    ):
        if name in sd:
            _check_sincos(sd.pop(name), config.grid_size, dim, name, source)
    enc_cfg = config.replace(pos_embed="sincos2d")
    enc = state_dict_from_hf(sd, enc_cfg, prefix="vit.", ignore=("decoder.",), source=source)
    out = {f"encoder.{k}": v for k, v in enc.items()}
    layers: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith("decoder."):
            continue
        if key in _DECODER_TOP:
            out[_DECODER_TOP[key]] = value
        elif key.startswith("decoder.decoder_layers."):
            layers["encoder.layer." + key[len("decoder.decoder_layers.") :]] = value
        else:
            raise CheckpointError(f"{source}: unexpected MAE decoder key {key}")
    for key, value in _map_layers(layers).items():
        out[f"decoder.{key}"] = value
    return out


def _check_sincos(table: Tensor, grid: tuple[int, int], dim: int, name: str, source: str) -> None:
    """vitkit computes MAE's fixed tables; refuse a file whose table is something else."""
    from vitkit.layers.pos_embed import sincos_2d_pos_embed

    want = sincos_2d_pos_embed(grid, dim)
    got = table.reshape(-1, table.shape[-1]).float()
    if (
        got.shape != (want.shape[0] + 1, dim)
        or (got[1:] - want).abs().max() > 1e-4
        or got[0].abs().max() > 1e-6
    ):
        raise CheckpointError(
            f"{source}: {name} {list(table.shape)} is not MAE's fixed 2D sin-cos table for a "
            f"{grid[0]}x{grid[1]} grid (an untrained transformers model has zeros there); "
            f"vitkit computes that table, so only checkpoints that store it can be read"
        )


def mae_state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """vitkit `MaskedAutoencoder` state dict -> transformers v4 names, with the sin-cos
    tables written out as transformers stores them."""
    from vitkit.layers.pos_embed import sincos_2d_pos_embed

    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    out = _encoder_to_hf(enc, config.replace(pos_embed="sincos2d"), prefix="vit.")
    inverse = {v: k for k, v in _DECODER_TOP.items()}
    blocks = {}
    for key, value in sd.items():
        if key in inverse:
            out[inverse[key]] = value
        elif key.startswith("decoder.blocks."):
            blocks[key[len("decoder.") :]] = value
    for key, value in _blocks_to_hf(blocks).items():
        out["decoder.decoder_layers." + key[len("encoder.layer.") :]] = value
    for name, dim in (
        ("vit.embeddings.position_embeddings", config.embed_dim),
        ("decoder.decoder_pos_embed", sd["decoder.embed.weight"].shape[0]),
    ):
        table = sincos_2d_pos_embed(config.grid_size, dim)
        out[name] = torch.cat([table.new_zeros(1, dim), table]).unsqueeze(0)
    return out


def _map_layers(layers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-layer transformers names ("encoder.layer.{i}.*") -> vitkit "blocks.{i}.*"."""
    from vitkit.checkpoints import hf as _hf

    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key, value in layers.items():
        m = _hf._LAYER_RE.match(key)
        if m is None:
            raise CheckpointError(f"unexpected decoder layer key {key}")
        i, name, kind = m.groups()
        for names in (_hf._QKV_V4, _hf._QKV_V5):
            if name in names:
                qkv.setdefault((i, kind), {})[names.index(name)] = value
                break
        else:
            for v4, v5, ours in _hf._LAYER_MAP:
                if name in (v4, v5):
                    out[f"blocks.{i}.{ours}.{kind}"] = value
                    break
            else:
                raise CheckpointError(f"unexpected decoder layer key {key}")
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:
            raise CheckpointError(f"decoder layer {i}: query/key/value {kind} incomplete")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]])
    return out


def _blocks_to_hf(blocks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    from vitkit.checkpoints import hf as _hf

    names = {ours: v4 for v4, _, ours in _hf._LAYER_MAP}
    out: dict[str, Tensor] = {}
    for key, value in blocks.items():
        _, i, rest = key.split(".", 2)
        name, kind = rest.rsplit(".", 1)
        base = f"encoder.layer.{i}."
        if name == "attn.qkv":
            for part, theirs in zip(value.chunk(3), _hf._QKV_V4, strict=True):
                out[f"{base}{theirs}.{kind}"] = part.clone()
        else:
            out[f"{base}{names[name]}.{kind}"] = value
    return out
