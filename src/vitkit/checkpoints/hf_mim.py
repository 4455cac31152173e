"""transformers masked-image-modeling checkpoints <-> vitkit SimMIM / MAE.

`ViTForMaskedImageModeling` (SimMIM): the encoder is a ViT (mapped by `vitkit.checkpoints.hf_vit`)
with `vit.embeddings.mask_token`; the decoder `decoder.0.{weight,bias}` is SimMIM's 1x1 conv and
keeps its name (`decoder.0`) in vitkit.

`ViTMAEForPreTraining` (MAE): encoder keys as ViT under `vit.`, decoder layers as ViT layers
under `decoder.decoder_layers.` (table: `mae_rules`); the fixed position tables
(`vit.embeddings.position_embeddings`, `decoder.decoder_pos_embed`) are vitkit's computed
sin-cos tables, checked at load and written out at save.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitkit.checkpoints import hf_vit
from vitkit.checkpoints._common import (
    Rule,
    block_rules,
    expected_shapes,
    integer,
    number,
    rename_from,
    rename_to,
    same,
    under,
    weight_and_bias,
)
from vitkit.checkpoints.hf_vit import config_from_hf, config_to_hf
from vitkit.checkpoints.pretrained import read_state_dict, write_folder
from vitkit.config import ViTConfig, read_json
from vitkit.errors import CheckpointError, ConfigError
from vitkit.layers.pos_embed import sincos_2d_pos_embed
from vitkit.models.mim import SimMIM


def _encoder(config: ViTConfig, names: dict) -> list[Rule]:
    """The encoder: a ViT under `vit.` in the file and `encoder.` in vitkit."""
    return under(hf_vit.rules(config, "vit.", names), ours="encoder.")


def _encoder_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    return {f"encoder.{k}": v for k, v in expected_shapes(config).items()}


# ------------------------------------------------------------------------------------ SimMIM
def simmim_rules(config: ViTConfig, names: dict = hf_vit.V4) -> list[Rule]:
    """vitkit `SimMIM` <-> `ViTForMaskedImageModeling`: its 1x1 conv decoder keeps its name."""
    return [*_encoder(config, names), *weight_and_bias("decoder.0", "decoder.0")]


def simmim_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """transformers `ViTForMaskedImageModeling` state dict -> vitkit `SimMIM` state dict."""
    rules = simmim_rules(config, hf_vit.names_of(sd))
    return rename_from(sd, rules, _encoder_shapes(config), source=source)


def simmim_state_dict_to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """vitkit `SimMIM` state dict -> transformers v4 file names."""
    return rename_to(sd, simmim_rules(config))


def save_simmim(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Write `model` (a `SimMIM`) as a transformers `ViTForMaskedImageModeling` folder."""
    config = model.config
    hf = config_to_hf(config, "ViTForMaskedImageModeling")
    hf["encoder_stride"] = model.encoder_stride
    sd = simmim_state_dict_to_hf(model.state_dict(), config)
    return write_folder(directory, hf, {k: v.detach().contiguous().cpu() for k, v in sd.items()})


def load_simmim(directory: str | os.PathLike[str]) -> Any:
    """Read a transformers `ViTForMaskedImageModeling` folder into a vitkit `SimMIM`."""
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


def mae_rules(config: ViTConfig, dim: int, depth: int, names: dict = hf_vit.V4) -> list[Rule]:
    """vitkit `MaskedAutoencoder` <-> `ViTMAEForPreTraining` for a decoder of `depth` layers
    of width `dim`; the fixed sin-cos tables are computed, not mapped."""
    out = _encoder(config.replace(pos_embed="sincos2d"), names)
    out += weight_and_bias("decoder.embed", "decoder.decoder_embed")
    out.append(same("decoder.mask_token", "decoder.mask_token"))
    for i in range(depth):
        theirs = f"decoder.decoder_layers.{i}."
        out += block_rules(f"decoder.blocks.{i}.", theirs, names, dim, config.qkv_bias)
    return [
        *out,
        *weight_and_bias("decoder.norm", "decoder.decoder_norm"),
        *weight_and_bias("decoder.pred", "decoder.decoder_pred"),
    ]


def _depth(sd: Mapping[str, Tensor], layers: str) -> int:
    return len({k[len(layers) :].split(".")[0] for k in sd if k.startswith(layers)})


def mae_state_dict_from_hf(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict"
) -> dict[str, Tensor]:
    """transformers `ViTMAEForPreTraining` state dict (v4 file or v5 in-memory names) -> vitkit
    `MaskedAutoencoder` state dict. The fixed position tables are dropped (vitkit computes the
    same sin-cos values); the decoder's shapes are the file's."""
    sd = dict(sd)
    embed = sd.get("decoder.decoder_embed.weight")
    dim = embed.shape[0] if embed is not None and embed.ndim else 0
    for name, width in (
        ("vit.embeddings.position_embeddings", config.embed_dim),
        ("decoder.decoder_pos_embed", dim),
    ):
        if name in sd:
            _check_sincos(sd.pop(name), config.grid_size, width, name, source)
    rules = mae_rules(config, dim, _depth(sd, "decoder.decoder_layers."), hf_vit.names_of(sd))
    shapes = _encoder_shapes(config.replace(pos_embed="sincos2d"))
    return rename_from(sd, rules, shapes, source=source)


def _check_sincos(table: Tensor, grid: tuple[int, int], dim: int, name: str, source: str) -> None:
    """vitkit computes MAE's fixed tables; refuse a file whose table is something else."""
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
    dim = sd["decoder.embed.weight"].shape[0]
    out = rename_to(sd, mae_rules(config, dim, _depth(sd, "decoder.blocks.")))
    for name, width in (
        ("vit.embeddings.position_embeddings", config.embed_dim),
        ("decoder.decoder_pos_embed", dim),
    ):
        table = sincos_2d_pos_embed(config.grid_size, width)
        out[name] = torch.cat([table.new_zeros(1, width), table]).unsqueeze(0)
    return out
