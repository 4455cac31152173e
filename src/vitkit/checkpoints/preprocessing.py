"""Other libraries' preprocessing configs <-> `ImageProcessor`, and the one preprocessing a
checkpoint folder gets.

A folder gets its own library's preprocessing, whichever way it is opened (`vitkit.resolve`
or `ImageProcessor.from_pretrained`):

    preprocessor_config.json (transformers)   resized with torchvision on uint8 tensors, as
                                              transformers' default image processors do
    config.json with a timm `pretrained_cfg`  resized with PIL, as timm's eval transform does
    open_clip_config.json                     resized with PIL, as open_clip does

The translators only rename and reshape; `ImageProcessor` checks every value it is given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from vitkit._io import atomic_write_text
from vitkit.checkpoints import open_clip
from vitkit.config import pair, read_json
from vitkit.data.processor import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ImageProcessor,
)
from vitkit.errors import ConfigError
from vitkit.limits import is_finite, is_int

CONFIG_NAME = "preprocessor_config.json"

# Defaults of the transformers processors the encoder families ship with, for keys a file omits.
# CLIP and BiT (DINOv2) read an integer `size` as the shortest edge (default_to_square=False).
_CLIP = dict(  # OpenAI's mean and std; BiT (DINOv2) processors share them
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
    resample=3, image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
)  # fmt: skip
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP,
    "BitImageProcessor": _CLIP,
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, resample=3),
}
_SHORTEST_EDGE_INT = ("CLIPImageProcessor", "BitImageProcessor")
_RESAMPLE = {m.value: m.name.lower() for m in Image.Resampling}  # PIL codes, transformers' key


# ------------------------------------------------------------------------------ transformers
def from_hf_dict(data: Any, **overrides: Any) -> ImageProcessor:
    """From the dict of a transformers image processor config. Keys a file omits take the
    defaults of its `image_processor_type` (CLIPImageProcessor, BitImageProcessor for DINOv2,
    SiglipImageProcessor, their Fast/Pil variants) or else ViTImageProcessor's."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of preprocessor keys, got {type(data).__name__}")
    kind = str(data.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    given = {key: value for key, value in data.items() if value is not None}  # null: the default
    data = {**_HF_DEFAULTS.get(kind, {}), **given}

    def flag(key: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value

    size = data.get("size", {"height": 224, "width": 224})
    crop = data.get("crop_size") if flag("do_center_crop", False) else None
    resample = data.get("resample", 2)
    resample = _RESAMPLE.get(int(resample), "") if is_int(resample) else resample
    if not isinstance(resample, str) or resample.lower() not in _RESAMPLE.values():
        raise ConfigError(f"resample={data['resample']!r} is not a PIL resampling code 0..5")
    extra = data.get("vitkit", {})
    if not isinstance(extra, dict):
        raise ConfigError(f"vitkit={extra!r} must be an object like {{'crop_rounding': ...}}")
    crop_pct = data.get("crop_pct")  # used by some transformers processors, never by this one
    if crop_pct is not None and not (is_finite(crop_pct) and 0 < crop_pct <= 1):
        raise ConfigError(f"crop_pct={crop_pct!r} must be a number in (0, 1]")
    normalize = flag("do_normalize", True)
    fields = dict(
        resize=_size(size, "size", shortest=is_int(size) and kind in _SHORTEST_EDGE_INT)
        if flag("do_resize", True) else None,
        crop_size=None if crop is None else pair(_size(crop, "crop_size"), "crop_size"),
        interpolation=resample.lower(),
        crop_rounding=extra.get("crop_rounding") or "floor",
        rescale_factor=data.get("rescale_factor", 1 / 255) if flag("do_rescale", True) else None,
        mean=_floats(data.get("image_mean", IMAGENET_STANDARD_MEAN)) if normalize else None,
        std=_floats(data.get("image_std", IMAGENET_STANDARD_STD)) if normalize else None,
        backend="tensor",  # transformers' default processors resize with torchvision
    )  # fmt: skip
    edge = isinstance(size, dict) and "shortest_edge" in size
    keys = {"resize": "size.shortest_edge" if edge else "size", "interpolation": "resample",
            "mean": "image_mean", "std": "image_std", "crop_rounding": "vitkit.crop_rounding"}  # fmt: skip
    try:
        return ImageProcessor(**{**fields, **overrides})
    except ConfigError as exc:  # name the file's keys too: those are what a user edits
        said = str(exc)
        named = ", ".join(f"{f} is {k}" for f, k in keys.items() if re.search(rf"\b{f}\b", said))
        raise ConfigError(f"{said} (in the file: {named})" if named else said) from None


def to_hf_dict(processor: ImageProcessor) -> dict[str, Any]:
    """The transformers ViTImageProcessor config that reproduces `processor`; the one setting
    transformers has no key for (`crop_rounding`) goes under "vitkit", which it ignores."""
    p = processor
    if isinstance(p.resize, int):
        size: dict[str, int] = {"shortest_edge": p.resize}
    else:
        height, width = p.resize or (224, 224)
        size = {"height": height, "width": width}
    out: dict[str, Any] = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": p.resize is not None,
        "size": size,
        "resample": Image.Resampling[p.interpolation.upper()].value,
        "do_center_crop": p.crop_size is not None,
        "do_rescale": p.rescale_factor is not None,
        "rescale_factor": p.rescale_factor if p.rescale_factor is not None else 1 / 255,
        "do_normalize": p.mean is not None,
        "image_mean": list(p.mean or IMAGENET_STANDARD_MEAN),
        "image_std": list(p.std or IMAGENET_STANDARD_STD),
    }
    if p.crop_size is not None:
        out["crop_size"] = {"height": p.crop_size[0], "width": p.crop_size[1]}
    out["vitkit"] = {"crop_rounding": p.crop_rounding}
    return out


def read(file: Path) -> ImageProcessor:
    """A transformers preprocessor_config.json; `ConfigError` naming the file."""
    data = read_json(file, "preprocessor config")
    try:
        return from_hf_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def save(processor: ImageProcessor, folder: str | os.PathLike[str]) -> Path:
    """Write `folder/preprocessor_config.json` (atomically); transformers loads it back."""
    file = Path(folder) / CONFIG_NAME
    atomic_write_text(file, json.dumps(to_hf_dict(processor), indent=2) + "\n")
    return file


def _size(size: Any, key: str, *, shortest: bool = False) -> Any:
    """transformers' size: {"height", "width"}, {"shortest_edge"}, or an int (a square, or the
    shortest edge for CLIP and BiT) -> `ImageProcessor.resize` (an int, or (height, width))."""
    if isinstance(size, dict) and set(size) >= {"height", "width"}:
        return (size["height"], size["width"])
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return size["shortest_edge"]
    if is_int(size) or isinstance(size, list):
        return size if shortest else pair(size, key)
    raise ConfigError(
        f"{key}={size!r} is not supported; use {{'height': H, 'width': W}} or {{'shortest_edge': S}}"
    )


def _floats(value: Any) -> Any:
    """transformers allows one number for every channel."""
    return [value] * 3 if is_finite(value) else value


# ------------------------------------------------------------------------------ timm
def from_timm_cfg(pretrained_cfg: Any, **overrides: Any) -> ImageProcessor:
    """From timm's `model.pretrained_cfg` or `resolve_data_config(...)` dict (input_size,
    interpolation, crop_pct, crop_mode, mean, std); resized with PIL, as timm does."""
    if not isinstance(pretrained_cfg, dict):
        raise ConfigError(f"pretrained_cfg must be a mapping, got {type(pretrained_cfg)}")
    cfg = pretrained_cfg
    input_size = cfg.get("input_size", (3, 224, 224))
    if not (isinstance(input_size, list | tuple) and len(input_size) == 3):
        raise ConfigError(f"input_size={input_size!r} must be [channels, height, width]")
    channels, h, w = input_size
    interpolation = cfg.get("interpolation") or "bicubic"
    crop_pct = cfg.get("crop_pct")
    return ImageProcessor.timm_eval(
        image_size=(h, w),
        crop_pct=0.875 if crop_pct is None else crop_pct,
        interpolation="bilinear" if interpolation == "random" else interpolation,
        mean=_floats(cfg.get("mean") or IMAGENET_DEFAULT_MEAN),
        std=_floats(cfg.get("std") or IMAGENET_DEFAULT_STD),
        crop_mode=cfg.get("crop_mode") or "center",
        **{"num_channels": 1 if channels == 1 else 3, "backend": "pil", **overrides},
    )


# ------------------------------------------------------------------------------ folders
def stated(files: Mapping[str, Path]) -> ImageProcessor | None:
    """The processor a checkpoint's files state (name -> path), with its library's backend:
    preprocessor_config.json, else an open_clip config, else timm's pretrained_cfg inside
    config.json; None when they state nothing."""
    if CONFIG_NAME in files:
        return read(files[CONFIG_NAME])
    if "config.json" not in files and open_clip.CONFIG_FILE in files:
        return open_clip.processor(files[open_clip.CONFIG_FILE])
    cfg = _config(files).get("pretrained_cfg")
    if not isinstance(cfg, dict):
        return None
    try:
        return from_timm_cfg(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{files['config.json']}: pretrained_cfg: {exc}") from None


def load(path: str | os.PathLike[str]) -> ImageProcessor:
    """`ImageProcessor.from_pretrained`: the processor a folder states (see `stated`), for as
    many channels as its config.json gives the model, or that of a preprocessor_config.json."""
    path = Path(path)
    if path.is_file():
        return read(path)
    files = {p.name: p for p in path.iterdir() if p.is_file()} if path.is_dir() else {}
    found = stated(files)
    if found is None:
        raise ConfigError(
            f"{path}: no {CONFIG_NAME} found (nor a timm pretrained_cfg or an open_clip config); "
            "vitkit.resolve(folder).processor gives transformers' defaults at the model's size"
        )
    config = _config(files)
    channels = config.get("in_chans", config.get("num_channels"))  # vitkit's, transformers'
    return found.with_channels(channels) if is_int(channels) else found


def _config(files: Mapping[str, Path]) -> dict[str, Any]:
    """A folder's config.json, or {} when it has none (or one that is not a JSON object)."""
    try:
        data = read_json(files["config.json"], "config") if "config.json" in files else {}
    except ConfigError:
        return {}
    return data if isinstance(data, dict) else {}


# ImageProcessor's own entry points for these files (data/ cannot import checkpoints/)
ImageProcessor.from_pretrained = staticmethod(load)  # type: ignore[assignment]
ImageProcessor.save_pretrained = save  # type: ignore[assignment]
ImageProcessor.from_hf_dict = staticmethod(from_hf_dict)  # type: ignore[assignment]
ImageProcessor.to_hf_dict = to_hf_dict  # type: ignore[assignment]
ImageProcessor.from_timm_cfg = staticmethod(from_timm_cfg)  # type: ignore[assignment]
