"""Reading checkpoint files into vitkit's names, and `save_pretrained` writing them back.

`vitkit.checkpoints.resolve` decides what a source is; this module reads what it finds:

    folder with config.json + model.safetensors (or pytorch_model.bin, or a sharded index):
        model_type "vit"/"deit"/... (transformers), "vitkit" or "vitkit_image_text" (ours), or
        a timm hub config ({"architecture": "vit_base_patch16_224", ...})
    hub id "google/vit-base-patch16-224"   resolved through the huggingface_hub cache
    file.safetensors / .pth / .bin         a timm state dict (needs model_name or config)
    file.npz                               Google JAX (vision_transformer or big_vision)

Files are untrusted: safetensors is preferred, pickles are read with `weights_only=True` only,
and a mismatch is reported once with every missing/unexpected key and shape conflict.

`text=True` reads a checkpoint with both towers (CLIPModel, SiglipModel, open_clip, vitkit's
image-text folders) as an `ImageTextConfig` and `ImageTextModel` weights (`vision.*`, `text.*`,
`logit_scale`, `logit_bias`); "auto" does so when the checkpoint has a text tower.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from vitkit._io import atomic_path, atomic_write_text
from vitkit.checkpoints import hf, jax, open_clip, timm
from vitkit.checkpoints._common import AnyConfig, check_state_dict, model_class, with_text
from vitkit.checkpoints._local import STATE_FILE
from vitkit.checkpoints._safety import (
    check_finite,
    check_float_dtypes,
    check_torch_archive,
    confine,
)
from vitkit.checkpoints.hf import state_dict_from_hf
from vitkit.checkpoints.hub import shard_names
from vitkit.checkpoints.timm import unwrap_state_dict
from vitkit.config import ViTConfig, read_json
from vitkit.errors import CheckpointError, ConfigError
from vitkit.layers.pos_embed import resample_pos_embed
from vitkit.models.image_text import MODEL_TYPE as IMAGE_TEXT_TYPE
from vitkit.models.image_text import ImageTextConfig
from vitkit.models.text import TextConfig

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


# ------------------------------------------------------------------------------ reading files
def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file or a weights-only PyTorch pickle, on the CPU, each
    floating point as the file holds it (`check_float_dtypes`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}); it may be "
                f"truncated or corrupt: download it again"
            ) from exc
    elif path.suffix in PICKLE_SUFFIXES:
        sd = unwrap_state_dict(torch_load(path), source=str(path))
    else:
        raise CheckpointError(
            f"{path}: unknown weights format {path.suffix!r}; vitkit reads "
            f".safetensors, .npz and weights-only .bin/.pth/.pt files"
        )
    check_float_dtypes(sd, str(path))
    return sd


def torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` of a file whose archive passed `check_torch_archive`."""
    check_torch_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle that holds more than tensors and plain "
            f"containers, and unpickling it could run arbitrary code (torch.load with "
            f"weights_only=True rejected it: {str(exc).splitlines()[0]}). If you trust its "
            f"origin, convert it once in a sandbox to safetensors, e.g. `safetensors.torch."
            f"save_file(torch.load(path, weights_only=False)['model'], 'model.safetensors')`, "
            f"and load that"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({exc}); it may "
            f"be truncated or corrupt: download it again"
        ) from exc


def _read_weights(files: Mapping[str, Path]) -> tuple[dict[str, Tensor], str]:
    """The state dict of a folder's weights (safetensors first) and the file name used."""
    if "model.safetensors" in files:
        return read_state_dict(files["model.safetensors"]), str(files["model.safetensors"])
    if "model.safetensors.index.json" in files:
        index = files["model.safetensors.index.json"]
        sd: dict[str, Tensor] = {}
        for shard in shard_names(index):  # plain relative names, checked
            # a hub snapshot's shards were resolved by the hub; a folder's stay inside it
            path = files.get(shard) or confine(shard, index.parent, source=str(index))
            sd.update(read_state_dict(path))
        return sd, str(index)
    if "pytorch_model.bin" in files:
        return read_state_dict(files["pytorch_model.bin"]), str(files["pytorch_model.bin"])
    raise CheckpointError(
        "no weights found (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


# ------------------------------------------------------------------------------ loading


def read_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A `state.pt` written by `vitkit train` / `pretrain` (a run directory, its last/ or best/
    folder, or the file itself), read with `torch.load(weights_only=True)`."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / STATE_FILE, path / "last" / STATE_FILE):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise CheckpointError(
                f"{path}: no {STATE_FILE} here or in {path}/last; pass a run "
                "directory written by `vitkit train`"
            )
    state = torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a vitkit training state")
    missing = {"model", "model_config", "optimizer", "epoch", "step", "recipe"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: not a vitkit training state (missing {sorted(missing)})")
    return state


def load_folder(
    folder: Path | Mapping[str, Path],
    model_name: str | None = None,
    config: ViTConfig | ImageTextConfig | None = None,
    *,
    where: Path | None = None,
    text: bool | str = False,
) -> tuple[ViTConfig | ImageTextConfig, dict[str, Tensor], str, dict[str, Path]]:
    """(config, vitkit state dict, weights file name, the folder's files) of a checkpoint folder
    (or of the files a hub snapshot resolved to). `text`: see the module docstring."""
    if isinstance(folder, Path):
        where, files = folder, {p.name: p for p in folder.iterdir() if p.is_file()}
    else:
        files = dict(folder)
    where = where or Path(".")
    if "config.json" not in files and open_clip.CONFIG_FILE in files:  # an open_clip snapshot
        weights = next((files[n] for n in open_clip.WEIGHTS_FILES if n in files), None)
        if weights is None:
            raise CheckpointError(f"{where}: no {' or '.join(open_clip.WEIGHTS_FILES)}")
        raw = read_state_dict(weights)
        cfg, sd = _load_open_clip(raw, files[open_clip.CONFIG_FILE], config, str(weights), text)
        return cfg, sd, str(weights), files
    if "config.json" not in files:
        raise CheckpointError(
            f"{where} has no config.json; pass the weights file itself with "
            f"model_name=... for a timm state dict"
        )
    try:
        data = read_json(files["config.json"], "config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{files['config.json']} must hold a JSON object")
    try:
        raw, name = _read_weights(files)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    model_type = data.get("model_type")
    if model_type in hf.MODEL_TYPES or model_type in tuple(hf.TEXT_ONLY):
        return (*hf.load_hf(data, raw, name, config=config, text=text), name, files)
    if model_type in ("vitkit", IMAGE_TEXT_TYPE):
        joint = with_text(text, model_type == IMAGE_TEXT_TYPE, source=str(where),
                          what="a vitkit VisionTransformer")  # fmt: skip
        try:
            if model_type == "vitkit":
                return config or ViTConfig.from_dict(data), raw, name, files
            found = ImageTextConfig.from_dict(data)
        except ConfigError as exc:
            raise CheckpointError(f"{files['config.json']}: {exc}") from exc
        if joint:
            return config or found, raw, name, files
        # its image tower alone, as a CLIP / SigLIP folder loads without text=True
        vision = {k.removeprefix("vision."): v for k, v in raw.items() if k.startswith("vision.")}
        return config or found.vision, vision, name, files
    if "architecture" in data:  # timm hub layout
        with_text(text, False, source=str(where), what=f"a timm {data['architecture']!r} model")
        arch = model_name or data["architecture"]
        sd = timm.unwrap_state_dict(raw, source=name)
        cfg = timm.config_from_timm(sd, model_name=arch, config=config, source=name)
        labels = data.get("label_names") or (data.get("pretrained_cfg") or {}).get("label_names")
        if labels and len(labels) == cfg.num_classes and config is None:
            cfg = cfg.replace(id2label=dict(enumerate(labels)))
        return cfg, timm.state_dict_from_timm(sd, cfg, source=name), name, files
    raise CheckpointError(
        f"{files['config.json']}: model_type {model_type!r} is not one vitkit "
        f"reads ({', '.join(hf.MODEL_TYPES)}, 'vitkit', or a timm config with 'architecture')"
    )


def load_path(
    path: Path,
    model_name: str | None = None,
    config: ViTConfig | ImageTextConfig | None = None,
    *,
    text: bool | str = False,
) -> tuple[ViTConfig | ImageTextConfig, dict[str, Tensor], str]:
    """(config, vitkit state dict, file name) of a single weights file. `text`: see the module
    docstring (only open_clip files hold a text tower)."""
    name = str(path)
    if path.suffix == ".npz":
        with_text(text, False, source=name, what="a JAX .npz (vitkit reads its image tower)")
        weights = jax.load_npz(path)
        cfg = config or jax.config_from_npz(weights, source=name)
        return cfg, jax.state_dict_from_npz(weights, cfg, source=name), name
    raw = read_state_dict(path)
    if open_clip.is_open_clip(raw):
        beside = path.parent / open_clip.CONFIG_FILE
        config_file = beside if beside.is_file() else None
        return (*_load_open_clip(raw, config_file, config, name, text), name)
    with_text(text, False, source=name, what="an image model's state dict (timm or transformers)")
    if any("embeddings.patch_embeddings.projection" in k for k in raw):
        if config is None:
            raise CheckpointError(
                f"{path} holds transformers (HF) weights; pass the folder with "
                f"its config.json, or config=ViTConfig(...)"
            )
        return config, state_dict_from_hf(raw, config, source=name), name
    cfg = timm.config_from_timm(raw, model_name=model_name, config=config, source=name)
    return cfg, timm.state_dict_from_timm(raw, cfg, source=name), name


def _load_open_clip(
    raw: dict[str, Tensor],
    config_file: Path | None,
    config: ViTConfig | ImageTextConfig | None,
    source: str,
    text: bool | str,
) -> tuple[ViTConfig | ImageTextConfig, dict[str, Tensor]]:
    """An open_clip state dict as its image tower, or with `text` both towers."""
    has_text = open_clip.has_text_tower(raw)
    if with_text(text, has_text, source=source, what="an open_clip image tower alone"):
        joint = config if isinstance(config, ImageTextConfig) else None
        return open_clip.load_image_text(raw, config_file=config_file, config=joint, source=source)
    vision = config if isinstance(config, ViTConfig) else None
    return open_clip.load(raw, config_file=config_file, config=vision, source=source)


def build_model(
    config: AnyConfig,
    sd: dict[str, Tensor],
    *,
    source: str,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    overrides: Mapping[str, Any] | None = None,
    antialias: bool = False,
) -> Any:
    """The model of `config` holding `sd` (vitkit names): a `VisionTransformer` with an
    optional new head and resampled positions, an `ImageTextModel` (both towers; `image_size`
    resamples the image tower's positions, `overrides` reach the towers that have the field,
    no new head) or a `TextTransformer`; every key and shape is checked first. In eval mode."""
    vision_key = "vision.pos_embed" if isinstance(config, ImageTextConfig) else "pos_embed"
    try:
        if overrides:
            config = config.replace(**overrides)
        if image_size is not None:
            if isinstance(config, TextConfig):
                raise ConfigError("image_size: a text tower has no image size")
            vision = config.vision if isinstance(config, ImageTextConfig) else config
            new = vision.replace(image_size=image_size)
            pos = sd.get(vision_key)
            if new.grid_size != vision.grid_size and pos is not None and pos.ndim == 3:
                sd[vision_key] = resample_pos_embed(
                    pos,
                    new.grid_size,
                    old_grid=vision.grid_size,
                    num_prefix_tokens=vision.num_pos_prefix_tokens,
                    antialias=antialias,
                )
            config = config.replace(image_size=image_size)
        if num_classes is not None and not isinstance(config, ViTConfig):
            raise ConfigError(f"num_classes={num_classes}: only an image model takes a new head "
                              f"(this checkpoint holds a text tower)")  # fmt: skip
        new_head = num_classes is not None and num_classes != config.num_classes
        if new_head:
            sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
            config = config.replace(num_classes=num_classes)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from exc

    fresh = ("head.", "head_dist.") if new_head else ()
    meta = check_state_dict(sd, config, source=source, strict=strict, fresh=fresh)
    # never cast integer weights silently; integer buffers of the model itself (BatchNorm's step
    # count in a convolutional stem) load as integers
    check_float_dtypes(sd, source, allow=[k for k, v in meta.items() if not v.is_floating_point()])
    check_finite(sd, source)  # NaN weights would give NaN logits and a silent "nan%"
    missing = any(k not in sd for k in meta if not k.startswith(fresh))
    sd = {k: v for k, v in sd.items() if k in meta}
    cls = model_class(config)
    if missing:  # strict=False: what the file lacks keeps its fresh initialisation
        model = cls(config)
        model.load_state_dict(sd, strict=False)
    else:  # skip the random initialisation of parameters the file overwrites anyway
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(sd, strict=False, assign=True)
    if new_head:
        model.reset_classifier(num_classes, zero_init=True)
    model.to(device=device, dtype=dtype or torch.get_default_dtype())
    return model.eval()


# ------------------------------------------------------------------------------ save_pretrained
def save_pretrained(model: Any, directory: str | os.PathLike[str], format: str = "auto") -> Path:
    """Write `model` into `directory` as config.json + model.safetensors.

    format "hf": transformers names and config of the class that holds the model
    (`ViTForImageClassification`, `ViTModel` for a headless model with pooler,
    `DeiTForImageClassificationWithTeacher`, `Dinov2[WithRegisters]Model`,
    `Dinov2[WithRegisters]ForImageClassification`, `CLIPVisionModel[WithProjection]`,
    `SiglipVisionModel`; for an `ImageTextModel` `CLIPModel` or `SiglipModel`; for a
    `TextTransformer` `CLIPTextModel[WithProjection]` or `SiglipTextModel`; see `hf.save_hf`);
    "vitkit": our config (model_type "vitkit", or "vitkit_image_text" for both towers) and
    parameter names, for every variant (a text tower alone has no vitkit format);
    "auto": "hf" when transformers can express the model, else "vitkit".
    Each file is written atomically, weights first, so config.json appears only when the
    weights are complete.
    """
    config: AnyConfig = model.config
    if format not in ("auto", "hf", "vitkit"):
        raise ValueError(f"format must be 'auto', 'hf' or 'vitkit', got {format!r}")
    if format == "auto":
        format = "vitkit" if hf.hf_unsupported(config) else "hf"
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(sd.values())).dtype
    if format == "hf":
        meta, weights = hf.save_hf(config, sd)
        meta["dtype"] = str(dtype).removeprefix("torch.")
    elif isinstance(config, TextConfig):
        raise CheckpointError(
            "a text tower alone is written in transformers' format only (format='hf', where "
            "CLIPTextModel or SiglipTextModel can hold it); save the ImageTextModel it belongs "
            "to in vitkit's format"
        )
    else:
        meta = config.to_dict() if isinstance(config, ImageTextConfig) else json.loads(
            config.to_json())  # fmt: skip
        weights = sd
    return write_folder(directory, meta, weights)


def write_folder(directory: str | os.PathLike[str], meta: dict, weights: dict[str, Tensor]) -> Path:
    """config.json (`meta`) and model.safetensors, each atomically and weights first, so
    config.json appears only when the weights are complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory
