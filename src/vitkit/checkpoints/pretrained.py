"""`from_pretrained` / `save_pretrained`: checkpoints in the wild -> vitkit and back.

Sources `from_pretrained` understands:

    folder with config.json + model.safetensors (or pytorch_model.bin, or a sharded index):
        model_type "vit"/"deit" (transformers), "vitkit" (ours), or a timm hub config
        ({"architecture": "vit_base_patch16_224", ...})
    hub id "google/vit-base-patch16-224"   resolved through the huggingface_hub cache
    file.safetensors / .pth / .bin         a timm state dict (needs model_name or config)
    file.npz                               Google JAX (vision_transformer or big_vision)

Files are untrusted: safetensors is preferred, pickles are read with `weights_only=True` only,
and a mismatch is reported once with every missing/unexpected key and shape conflict.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vitkit.checkpoints._common import expected_shapes, mismatch_error
from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from vitkit.models.vit import VisionTransformer

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


# ------------------------------------------------------------------------------ reading files
def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file or a weights-only PyTorch pickle, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}); it may be "
                f"truncated or corrupt: download it again"
            ) from exc
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(
        f"{path}: unknown weights format {path.suffix!r}; vitkit reads "
        f".safetensors, .npz and weights-only .bin/.pth/.pt files"
    )


def _read_pickle(path: Path) -> dict[str, Tensor]:
    from vitkit.checkpoints.timm import unwrap_state_dict

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    return unwrap_state_dict(obj, source=str(path))


def _read_weights(files: Mapping[str, Path]) -> tuple[dict[str, Tensor], str]:
    """The state dict of a folder's weights (safetensors first) and the file name used."""
    if "model.safetensors" in files:
        return read_state_dict(files["model.safetensors"]), str(files["model.safetensors"])
    if "model.safetensors.index.json" in files:
        index = files["model.safetensors.index.json"]
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(read_state_dict(files.get(shard, index.parent / shard)))
        return sd, str(index)
    if "pytorch_model.bin" in files:
        return read_state_dict(files["pytorch_model.bin"]), str(files["pytorch_model.bin"])
    raise CheckpointError(
        "no weights found (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------ from_pretrained
def from_pretrained(
    source: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    config: ViTConfig | None = None,
    strict: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    resample_antialias: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """Load a `VisionTransformer` from a folder, hub id, timm state dict file or JAX `.npz`.

    num_classes: a new head of this size, zero-initialised (the paper's fine-tuning recipe);
        None keeps the checkpoint's head.
    image_size: resample the position table to this size at load (bicubic, align_corners=False;
        `resample_antialias=True` gives timm's load-time resampling).
    model_name / config: the architecture, needed for timm state dicts (heads are not stored in
        the weights); `config` also overrides what a folder's config.json or an npz implies
        (e.g. `act="gelu"`).
    overrides: `ViTConfig` fields that do not change parameter shapes (drop_path_rate,
        attn_implementation, ...).
    strict: with False, missing and unexpected keys are warned about instead of raised;
        shape conflicts are always errors.
    Returns the model in eval mode.
    """
    from vitkit.checkpoints.hub import looks_like_hub_id, resolve_hub

    path = Path(source).expanduser()
    if path.is_dir():
        config, sd, name = _load_folder(_folder_files(path), path, model_name, config)
    elif path.is_file():
        config, sd, name = _load_file(path, model_name, config)
    elif looks_like_hub_id(str(source)):
        try:
            files = resolve_hub(str(source), revision=revision, cache_dir=cache_dir)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{source!r} is not a local file or folder, so it was read as "
                f"a Hugging Face Hub id: {exc}"
            ) from exc
        config, sd, name = _load_folder(files, Path(str(source)), model_name, config)
    else:
        raise CheckpointError(f"{source} is neither a file, a folder nor a hub id (org/name)")
    return _build(
        config,
        sd,
        source=name,
        num_classes=num_classes,
        image_size=image_size,
        dtype=dtype,
        device=device,
        strict=strict,
        overrides=overrides,
        antialias=resample_antialias,
    )


def _load_folder(
    files: Mapping[str, Path], where: Path, model_name: str | None, config: ViTConfig | None
) -> tuple[ViTConfig, dict[str, Tensor], str]:
    from vitkit.checkpoints import hf, timm

    if "config.json" not in files:
        raise CheckpointError(
            f"{where} has no config.json; pass the weights file itself with "
            f"model_name=... for a timm state dict"
        )
    try:
        data = json.loads(files["config.json"].read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {files['config.json']}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{files['config.json']} must hold a JSON object")
    try:
        raw, name = _read_weights(files)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    model_type = data.get("model_type")
    if model_type in hf.MODEL_TYPES:
        return (*hf.load_hf(data, raw, name, config=config), name)
    if model_type == "vitkit":
        try:
            cfg = config or ViTConfig.from_dict(data)
        except ConfigError as exc:
            raise CheckpointError(f"{files['config.json']}: {exc}") from exc
        return cfg, raw, name
    if "architecture" in data:  # timm hub layout
        arch = model_name or data["architecture"]
        sd = timm.unwrap_state_dict(raw, source=name)
        cfg = timm.config_from_timm(sd, model_name=arch, config=config, source=name)
        labels = data.get("label_names") or (data.get("pretrained_cfg") or {}).get("label_names")
        if labels and len(labels) == cfg.num_classes and config is None:
            cfg = cfg.replace(id2label=dict(enumerate(labels)))
        return cfg, timm.state_dict_from_timm(sd, cfg, source=name), name
    raise CheckpointError(
        f"{files['config.json']}: model_type {model_type!r} is not one vitkit "
        f"reads ({', '.join(hf.MODEL_TYPES)}, 'vitkit', or a timm config with 'architecture')"
    )


def _load_file(
    path: Path, model_name: str | None, config: ViTConfig | None
) -> tuple[ViTConfig, dict[str, Tensor], str]:
    from vitkit.checkpoints import jax, timm

    name = str(path)
    if path.suffix == ".npz":
        weights = jax.load_npz(path)
        cfg = config or jax.config_from_npz(weights, source=name)
        return cfg, jax.state_dict_from_npz(weights, cfg, source=name), name
    raw = read_state_dict(path)
    if any("embeddings.patch_embeddings.projection" in k for k in raw):
        if config is None:
            raise CheckpointError(
                f"{path} holds transformers (HF) weights; pass the folder with "
                f"its config.json, or config=ViTConfig(...)"
            )
        from vitkit.checkpoints.hf import state_dict_from_hf

        return config, state_dict_from_hf(raw, config, source=name), name
    cfg = timm.config_from_timm(raw, model_name=model_name, config=config, source=name)
    return cfg, timm.state_dict_from_timm(raw, cfg, source=name), name


def _build(
    config: ViTConfig,
    sd: dict[str, Tensor],
    *,
    source: str,
    num_classes: int | None,
    image_size: int | tuple[int, int] | None,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    strict: bool,
    overrides: Mapping[str, Any],
    antialias: bool,
) -> VisionTransformer:
    from vitkit.layers.pos_embed import resample_pos_embed
    from vitkit.models.vit import VisionTransformer

    try:
        if overrides:
            config = config.replace(**overrides)
        if image_size is not None:
            new = config.replace(image_size=image_size)
            pos = sd.get("pos_embed")
            if new.grid_size != config.grid_size and pos is not None and pos.ndim == 3:
                sd["pos_embed"] = resample_pos_embed(
                    pos,
                    new.grid_size,
                    old_grid=config.grid_size,
                    num_prefix_tokens=config.num_pos_prefix_tokens,
                    antialias=antialias,
                )
            config = new
        new_head = num_classes is not None and num_classes != config.num_classes
        if new_head:
            sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
            config = config.replace(num_classes=num_classes)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from exc

    expected = expected_shapes(config)
    fresh = {k for k in expected if k.startswith(("head.", "head_dist."))} if new_head else set()
    missing = [k for k in expected if k not in sd and k not in fresh]
    unexpected = [k for k in sd if k not in expected]
    conflicts = {
        k: (expected[k], tuple(v.shape))
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != expected[k]
    }
    if conflicts or (strict and (missing or unexpected)):
        raise mismatch_error(
            source,
            missing=missing,
            unexpected=unexpected,
            conflicts=conflicts,
            hint="pass strict=False to load what matches"
            if not conflicts
            else "check model_name/config, num_classes and image_size",
        )
    if missing or unexpected:
        warnings.warn(
            str(mismatch_error(source, missing=missing, unexpected=unexpected)), stacklevel=3
        )
    sd = {k: v for k, v in sd.items() if k in expected}
    if missing:  # strict=False: what the file lacks keeps its fresh initialisation
        model = VisionTransformer(config)
        model.load_state_dict(sd, strict=False)
    else:  # skip the random initialisation of parameters the file overwrites anyway
        with torch.device("meta"):
            model = VisionTransformer(config)
        model.load_state_dict(sd, strict=False, assign=True)
    if new_head:
        model.reset_classifier(num_classes, zero_init=True)
    model.to(device=device, dtype=dtype or torch.get_default_dtype())
    return model.eval()


# ------------------------------------------------------------------------------ save_pretrained
def save_pretrained(model: Any, directory: str | os.PathLike[str], format: str = "auto") -> Path:
    """Write `model` into `directory` as config.json + model.safetensors.

    format "hf": transformers ViT/DeiT names and config (`ViTForImageClassification`,
    `ViTModel` for a headless model with pooler, `DeiTForImageClassificationWithTeacher`);
    "vitkit": our config (model_type "vitkit") and parameter names, for every variant;
    "auto": "hf" when transformers can express the model, else "vitkit".
    Each file is written atomically, weights first, so config.json appears only when the
    weights are complete.
    """
    from safetensors.torch import save_file

    from vitkit.checkpoints import hf
    from vitkit._io import atomic_path, atomic_write_text

    config: ViTConfig = model.config
    if format not in ("auto", "hf", "vitkit"):
        raise ValueError(f"format must be 'auto', 'hf' or 'vitkit', got {format!r}")
    if format == "auto":
        format = "vitkit" if hf.hf_unsupported(config) else "hf"
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(sd.values())).dtype
    if format == "hf":
        meta, weights = hf.save_hf(config, sd)
        meta["dtype"] = str(dtype).removeprefix("torch.")
    else:
        meta = json.loads(config.to_json())
        weights = sd
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory
