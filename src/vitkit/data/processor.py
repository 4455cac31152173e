"""Inference preprocessing: images -> the exact (B, C, H, W) float tensor a checkpoint expects.

A checkpoint is only as good as the preprocessing it was trained with. `ImageProcessor` holds
the four choices that matter (resize rule, interpolation, crop, rescale + normalize) and
reproduces both conventions found on the hub:

- transformers' `ViTImageProcessor`: resize straight to 224x224 (aspect ignored), bilinear,
  x/255, mean = std = 0.5 (`ImageProcessor.hf_vit()`, or `from_pretrained(folder)` reading
  preprocessor_config.json);
- timm's eval transform: shorter side to floor(size / crop_pct), centre crop, bicubic,
  per-model mean/std (`ImageProcessor.timm_eval()`, `from_timm_cfg(model.pretrained_cfg)`).

Two execution paths give the same numbers (docs/preprocessing.md has the measured gaps):
PIL images and files are resized by PIL on 8-bit RGB, exactly as transformers' PIL backend and
timm do; numpy arrays and tensors are resized batched with torchvision.transforms.v2 (on any
device), exactly as transformers' default torchvision backend does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vitkit import limits
from vitkit.config import read_json
from vitkit.data.images import MAX_PIXELS, WHITE, load_image
from vitkit.errors import ConfigError, ImageError
from vitkit.limits import is_finite, is_int

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

CONFIG_NAME = "preprocessor_config.json"

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
# PIL's integer codes, which is what transformers stores as "resample"
_PIL_CODES: dict[str, int] = {
    "nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
}  # fmt: skip
_PIL_NAMES = {code: name for name, code in _PIL_CODES.items()}

# Defaults of the transformers processors the encoder families ship with, for keys a file omits.
# CLIP and BiT (DINOv2) read an integer `size` as the shortest edge (default_to_square=False).
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        do_center_crop=True, resample=3, image_mean=_OPENAI_CLIP_MEAN, image_std=_OPENAI_CLIP_STD,
    ),
    "BitImageProcessor": dict(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
        do_center_crop=True, resample=3, image_mean=_OPENAI_CLIP_MEAN, image_std=_OPENAI_CLIP_STD,
    ),
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224}, resample=3,
        image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
    ),
}  # fmt: skip
_SHORTEST_EDGE_INT = ("CLIPImageProcessor", "BitImageProcessor")


@dataclasses.dataclass
class ImageProcessor:
    """Turns paths, PIL images, arrays or tensors into a normalized (B, C, H, W) float32 batch.

    resize: an int resizes the shorter side to it keeping the aspect ratio (the longer side is
        truncated, as torchvision and transformers do); (H, W) resizes to exactly that size;
        None keeps the size.
    crop_size: (H, W) centre crop after the resize, or None.
    crop_rounding: "round" places an odd margin like torchvision/timm, "floor" like transformers.
    rescale_factor: multiplies 8-bit values (1/255); None leaves them in 0..255. Float inputs are
        taken to be in [0, 1] already, so the default treats them as 8-bit / 255.
    mean, std: per-channel normalization after rescaling, or None for none.
    num_channels: 3 (RGB) or 1 (grayscale, ITU-R 601 luma) for single-channel models.
    backend: "auto" resizes PIL images/files with PIL and arrays/tensors with torchvision;
        "pil" or "tensor" forces one path for everything.
    background, max_pixels: passed to `vitkit.data.images.load_image` for files.
    """

    resize: int | tuple[int, int] | None = (224, 224)
    crop_size: tuple[int, int] | None = None
    interpolation: Interpolation = "bilinear"
    crop_rounding: Literal["floor", "round"] = "floor"
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = IMAGENET_STANDARD_MEAN
    std: tuple[float, ...] | None = IMAGENET_STANDARD_STD
    num_channels: int = 3
    backend: Literal["auto", "pil", "tensor"] = "auto"
    background: tuple[int, int, int] | None = WHITE
    max_pixels: int | None = MAX_PIXELS

    def __post_init__(self) -> None:
        errors: list[str] = []

        def pair_or_none(name: str) -> None:
            value = getattr(self, name)
            if value is None or (name == "resize" and is_int(value)):
                return
            try:
                setattr(self, name, _pair(value, name))
            except ConfigError as exc:
                errors.append(str(exc))

        pair_or_none("resize")
        pair_or_none("crop_size")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                setattr(self, key, _floats(value, key))
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise ConfigError("invalid ImageProcessor: " + "; ".join(errors))
        if not isinstance(self.interpolation, str) or self.interpolation not in _PIL_CODES:
            errors.append(
                f"interpolation={self.interpolation!r} is not one of {sorted(_PIL_CODES)}"
            )
        if is_int(self.resize) and self.resize <= 0:
            errors.append(f"resize={self.resize} must be positive")
        for name in ("resize", "crop_size"):
            value = getattr(self, name)
            try:
                if is_int(value):  # the shorter side: the longer one is checked per image
                    limits.check(value, "IMAGE_SIDE", name)
                elif value is not None:
                    limits.check(max(value), "IMAGE_SIDE", f"{name} side")
                    limits.check(value[0] * value[1], "INPUT_PIXELS", f"{name} pixels")
            except ConfigError as exc:
                errors.append(str(exc))
        if self.crop_rounding not in ("floor", "round"):
            errors.append(f"crop_rounding={self.crop_rounding!r} must be 'floor' or 'round'")
        if self.backend not in ("auto", "pil", "tensor"):
            errors.append(f"backend={self.backend!r} must be 'auto', 'pil' or 'tensor'")
        if not is_int(self.num_channels) or self.num_channels not in (1, 3):
            errors.append(f"num_channels={self.num_channels!r} must be 1 or 3")
        if self.rescale_factor is not None and not (
            is_finite(self.rescale_factor) and self.rescale_factor > 0
        ):
            errors.append(
                f"rescale_factor={self.rescale_factor!r} must be a positive number (1/255 for "
                "8-bit images) or None"
            )
        if (self.mean is None) != (self.std is None):
            errors.append("mean and std must both be set or both be None")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) not in (1, self.num_channels):
                errors.append(f"{key} has {len(v)} values for {self.num_channels} channels")
        if self.std is not None and any(s <= 0 for s in self.std):
            errors.append(f"std={list(self.std)} must be positive (e.g. 0.5 or 0.229)")
        if self.background is not None and not (
            isinstance(self.background, (tuple, list))
            and len(self.background) == 3
            and all(is_int(v) and 0 <= v <= 255 for v in self.background)
        ):
            errors.append(f"background={self.background!r} must be (R, G, B) in 0..255 or None")
        if self.max_pixels is not None and not (is_int(self.max_pixels) and self.max_pixels > 0):
            errors.append(f"max_pixels={self.max_pixels!r} must be a positive integer or None")
        if errors:
            raise ConfigError("invalid ImageProcessor: " + "; ".join(errors))

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def hf_vit(cls, image_size: int | tuple[int, int] = 224, **overrides: Any) -> ImageProcessor:
        """transformers' ViTImageProcessor defaults: squash-resize to image_size, bilinear,
        x/255, mean = std = 0.5, no crop."""
        fields: dict[str, Any] = dict(resize=_pair(image_size, "image_size"))
        return cls(**{**fields, **overrides})

    @classmethod
    def timm_eval(
        cls,
        image_size: int | tuple[int, int] = 224,
        crop_pct: float = 0.9,
        interpolation: Interpolation = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        crop_mode: Literal["center", "squash"] = "center",
        **overrides: Any,
    ) -> ImageProcessor:
        """timm's eval transform: shorter side to floor(size / crop_pct), centre crop to size,
        `interpolation`, ImageNet mean/std. ViT uses crop_pct 0.9, DeiT 0.875.

        crop_mode "squash" resizes both sides to floor(size / crop_pct) instead (aspect lost).
        Non-square sizes with "center" resize the shorter side to the scaled size of that side
        (timm's ResizeKeepRatio rounds slightly differently there).
        """
        h, w = _pair(image_size, "image_size")
        if not (is_finite(crop_pct) and 0 < crop_pct <= 1):
            raise ConfigError(f"crop_pct={crop_pct!r} must be a number in (0, 1], e.g. 0.9")
        limits.check(max(h, w), "IMAGE_SIDE", "image_size")
        scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        if crop_mode == "squash":
            resize: int | tuple[int, int] = scaled
        elif crop_mode == "center":
            resize = scaled[0] if h <= w else scaled[1]
        else:
            raise ConfigError(
                f"crop_mode={crop_mode!r} is not supported; use 'center' or 'squash' "
                "(timm's 'border' pads with the mean colour, which vitkit does not reproduce)"
            )
        fields: dict[str, Any] = dict(
            resize=resize, crop_size=(h, w), interpolation=interpolation, crop_rounding="round",
            rescale_factor=1 / 255, mean=tuple(mean), std=tuple(std),
        )  # fmt: skip
        return cls(**{**fields, **overrides})

    @classmethod
    def from_timm_cfg(cls, pretrained_cfg: dict[str, Any], **overrides: Any) -> ImageProcessor:
        """From timm's `model.pretrained_cfg` or `resolve_data_config(...)` dict (input_size,
        interpolation, crop_pct, crop_mode, mean, std)."""
        if not isinstance(pretrained_cfg, dict):
            raise ConfigError(f"pretrained_cfg must be a mapping, got {type(pretrained_cfg)}")
        cfg = dict(pretrained_cfg)
        input_size = cfg.get("input_size", (3, 224, 224))
        if not (
            isinstance(input_size, (list, tuple))
            and len(input_size) == 3
            and all(is_int(v) and v > 0 for v in input_size)
        ):
            raise ConfigError(f"input_size={input_size!r} must be [channels, height, width]")
        channels, h, w = (int(v) for v in input_size)
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation == "random":
            interpolation = "bilinear"
        crop_pct = cfg.get("crop_pct")
        return cls.timm_eval(
            image_size=(h, w),
            crop_pct=0.875 if crop_pct is None else crop_pct,
            interpolation=interpolation,
            mean=_floats(cfg.get("mean") or IMAGENET_DEFAULT_MEAN, "mean"),
            std=_floats(cfg.get("std") or IMAGENET_DEFAULT_STD, "std"),
            crop_mode=cfg.get("crop_mode") or "center",
            **{"num_channels": 1 if channels == 1 else 3, **overrides},
        )

    @classmethod
    def for_model(cls, config: Any, **overrides: Any) -> ImageProcessor:
        """transformers-style defaults sized for a `ViTConfig` (image size, channel count)."""
        channels = int(getattr(config, "in_chans", 3))
        fields: dict[str, Any] = {}
        if channels == 1:
            fields = dict(num_channels=1, mean=(0.5,), std=(0.5,))
        return cls.hf_vit(config.image_hw, **{**fields, **overrides})

    # ---- transformers preprocessor_config.json ----------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **overrides: Any) -> ImageProcessor:
        """Read a transformers preprocessor_config.json (a folder holding one, or the file)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{file}: no {CONFIG_NAME} found")
        data = read_json(file, "preprocessor config")
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object, found {type(data).__name__}")
        try:
            return cls.from_hf_dict(data, **overrides)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], **overrides: Any) -> ImageProcessor:
        """From the dict of a transformers image processor config. Keys a file omits take the
        defaults of its `image_processor_type` (CLIPImageProcessor, BitImageProcessor for
        DINOv2, SiglipImageProcessor, their Fast/Pil variants) or else ViTImageProcessor's.
        Every value is type-checked and bounded (docs/security.md)."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of preprocessor keys, got {type(data).__name__}")
        kind = str(data.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
        data = {**_HF_DEFAULTS.get(kind, {}), **data}

        def flag(key: str, default: bool) -> bool:
            value = data.get(key)
            if value is None:
                return default
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} must be true or false")
            return value

        fields: dict[str, Any] = {}
        if flag("do_resize", True):
            size = data.get("size")
            size = {"height": 224, "width": 224} if size is None else size
            if is_int(size) and kind in _SHORTEST_EDGE_INT:
                size = {"shortest_edge": size}
            fields["resize"] = _hf_size(size, "size")
        else:
            fields["resize"] = None
        if flag("do_center_crop", False) and data.get("crop_size") is not None:
            crop = _hf_size(data["crop_size"], "crop_size")
            fields["crop_size"] = (crop, crop) if isinstance(crop, int) else crop
        crop_pct = data.get("crop_pct")
        if crop_pct is not None and not (is_finite(crop_pct) and 0 < crop_pct <= 1):
            raise ConfigError(f"crop_pct={crop_pct!r} must be a number in (0, 1]")
        resample = data.get("resample", 2)
        if isinstance(resample, str) and resample.lower() in _PIL_CODES:
            resample = _PIL_CODES[resample.lower()]
        if not is_int(resample) or resample not in _PIL_NAMES:
            raise ConfigError(f"resample={resample!r} is not a PIL resampling code 0..5")
        fields["interpolation"] = _PIL_NAMES[resample]
        if flag("do_rescale", True):
            factor = data.get("rescale_factor", 1 / 255)
            if not (is_finite(factor) and factor > 0):
                raise ConfigError(f"rescale_factor={factor!r} must be a positive number (1/255)")
            fields["rescale_factor"] = float(factor)
        else:
            fields["rescale_factor"] = None
        if flag("do_normalize", True):
            fields["mean"] = _floats(data.get("image_mean", IMAGENET_STANDARD_MEAN), "image_mean")
            fields["std"] = _floats(data.get("image_std", IMAGENET_STANDARD_STD), "image_std")
            if any(v <= 0 for v in fields["std"]):
                raise ConfigError(f"image_std={list(fields['std'])} must be positive")
        else:
            fields["mean"] = fields["std"] = None
        extra = data.get("vitkit") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"vitkit={extra!r} must be an object like {{'crop_rounding': ...}}")
        if extra.get("crop_rounding") is not None:
            if extra["crop_rounding"] not in ("floor", "round"):
                raise ConfigError(
                    f"vitkit.crop_rounding={extra['crop_rounding']!r} must be 'floor' or 'round'"
                )
            fields["crop_rounding"] = extra["crop_rounding"]
        return cls(**{**fields, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ViTImageProcessor config that reproduces this processor."""
        if isinstance(self.resize, int):
            size: dict[str, int] = {"shortest_edge": self.resize}
        elif self.resize is not None:
            size = {"height": self.resize[0], "width": self.resize[1]}
        else:
            size = {"height": 224, "width": 224}
        out: dict[str, Any] = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": self.resize is not None,
            "size": size,
            "resample": _PIL_CODES[self.interpolation],
            "do_center_crop": self.crop_size is not None,
            "do_rescale": self.rescale_factor is not None,
            "rescale_factor": self.rescale_factor if self.rescale_factor is not None else 1 / 255,
            "do_normalize": self.mean is not None,
            "image_mean": list(self.mean or IMAGENET_STANDARD_MEAN),
            "image_std": list(self.std or IMAGENET_STANDARD_STD),
        }
        if self.crop_size is not None:
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        out["vitkit"] = {"crop_rounding": self.crop_rounding}
        return out

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write `folder/preprocessor_config.json` (atomically); transformers loads it back."""
        from vitkit._io import atomic_write_text

        file = Path(folder) / CONFIG_NAME
        atomic_write_text(file, json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return file

    def with_channels(self, channels: int) -> ImageProcessor:
        """The same rule for a model of `channels` inputs: grayscale (mean and std averaged over
        RGB) for 1, RGB for 3; unchanged for other channel counts, which no image has."""
        if channels == self.num_channels or channels not in (1, 3):
            return self
        mean, std = self.mean, self.std
        if channels == 1 and mean is not None and std is not None:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        return dataclasses.replace(self, num_channels=channels, mean=mean, std=std)

    def at_size(self, hw: int | tuple[int, int]) -> ImageProcessor:
        """The same rule producing (H, W) outputs (one int: square): a crop becomes `hw` with
        the resize scaled alike (timm's crop_pct is kept); a squash-resize becomes `hw`."""
        hw = _pair(hw, "hw")
        if self.output_hw == hw:
            return self
        if self.crop_size is not None:
            scale = min(hw) / min(self.crop_size)
            if isinstance(self.resize, int):
                resize: int | tuple[int, int] | None = math.floor(self.resize * scale)
            elif self.resize is not None:
                resize = (math.floor(self.resize[0] * scale), math.floor(self.resize[1] * scale))
            else:
                resize = None
            return dataclasses.replace(self, resize=resize, crop_size=hw)
        return dataclasses.replace(self, resize=hw)

    # ---- processing --------------------------------------------------------------------------

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the input (no resize/crop)."""
        if self.crop_size is not None:
            return self.crop_size
        if isinstance(self.resize, tuple):
            return self.resize
        return None

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the part of a `width` x `height` image that the output
        shows, in that image's pixels: the centre crop mapped back through the resize, or the
        whole image. Heat maps over the patch grid are drawn over this region."""
        if self.crop_size is None:
            return (0, 0, width, height)
        h, w = self._resized_hw(height, width)
        top, left = self._crop_offsets(h, w)
        ch, cw = self.crop_size
        sx, sy = width / w, height / h
        return (round(left * sx), round(top * sy), round((left + cw) * sx), round((top + ch) * sy))

    def __call__(self, images: Any, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Preprocess one image or a list of them into a (B, C, H, W) float32 tensor.

        Accepts paths, PIL images, numpy arrays (HWC or HW; uint8, uint16 or float in [0, 1]),
        tensors (CHW or BCHW; uint8 or float in [0, 1]), or a list mixing these. A single
        image still gives B = 1. Tensors stay on their device unless `device` is given.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4 and not self._use_pil(images):
            batch = _check_batch(images if device is None else images.to(device))
            return self._tensor_batch(batch)  # one (B, C, H, W) tensor: no per-image work
        items = _as_list(images)
        if not items:
            raise ImageError("no images given")
        outputs: list[np.ndarray | torch.Tensor | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for i, item in enumerate(items):
            if self._use_pil(item):
                outputs[i] = self._pil_one(item)
            else:
                if not isinstance(item, (np.ndarray, torch.Tensor)):  # a file or PIL image:
                    item = self._decode(item)  # decoded as for PIL, resized as a tensor
                t = _to_chw_tensor(item, index=i)
                if device is not None:
                    t = t.to(device)
                tensors[i] = t
                groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
        for indices in groups.values():
            batch = torch.stack([tensors[i] for i in indices])  # (G, C, H, W)
            for i, out in zip(indices, self._tensor_batch(batch)):
                outputs[i] = out
        shapes = {tuple(o.shape) for o in outputs}  # type: ignore[union-attr]
        if len(shapes) > 1:
            raise ImageError(
                f"images came out with different sizes {sorted(shapes)}; set resize or crop_size"
            )
        if all(isinstance(o, np.ndarray) for o in outputs):
            stacked = torch.from_numpy(np.stack(outputs))  # type: ignore[arg-type]
            return stacked if device is None else stacked.to(device)
        target = device or next(o.device for o in outputs if isinstance(o, torch.Tensor))
        return torch.stack([torch.as_tensor(o).to(target) for o in outputs])

    def preprocess_pil(self, image: Any) -> torch.Tensor:
        """One image (path, PIL image, ...) through the PIL path -> (C, H, W) float32."""
        return torch.from_numpy(self._pil_one(image))

    def _decode(self, item: Any) -> np.ndarray:
        """A path, bytes or PIL image -> (H, W, C) uint8, upright, RGB (L for one channel)."""
        image = load_image(item, background=self.background, max_pixels=self.max_pixels)
        if self.num_channels == 1:
            image = image.convert("L")
        return np.asarray(image)

    # -- PIL path: resample 8-bit RGB with PIL, like transformers' PIL backend and timm

    def _use_pil(self, item: Any) -> bool:
        if self.backend == "pil":
            return True
        if self.backend == "tensor":
            return False
        if isinstance(item, (np.ndarray, torch.Tensor)):
            return self.interpolation in ("box", "hamming")  # torchvision lacks these modes
        return True

    def _pil_one(self, item: Any) -> np.ndarray:
        if isinstance(item, (np.ndarray, torch.Tensor)):
            image = _tensor_to_pil(_to_chw_tensor(item), self.background)
        else:
            image = load_image(item, background=self.background, max_pixels=self.max_pixels)
        if self.num_channels == 1:
            image = image.convert("L")
        if self.resize is not None:
            h, w = self._resized_hw(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), resample=_PIL_CODES[self.interpolation])
        if self.crop_size is not None:
            top, left = self._crop_offsets(image.height, image.width)
            ch, cw = self.crop_size
            image = image.crop((left, top, left + cw, top + ch))  # outside the image reads 0
        # numpy, single-threaded: cheaper than torch ops for one small image on busy cores
        x = np.asarray(image, dtype=np.float32)  # (H, W) or (H, W, C), 0..255
        if x.ndim == 2:
            x = x[:, :, None]
        weight, bias = self._affine()
        x *= weight
        x += bias
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (C, H, W)

    # -- tensor path: batched torchvision.transforms.v2 ops, like transformers' default backend

    def _tensor_batch(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or float in [0, 1] -> (B, C', H', W') float32 normalized."""
        from torchvision.transforms.v2 import functional as tvf

        x = self._channels(x)
        if self.resize is not None:
            h, w = self._resized_hw(x.shape[-2], x.shape[-1])
            if (h, w) != tuple(x.shape[-2:]):
                mode = tvf.InterpolationMode(self.interpolation)
                x = tvf.resize(x, [h, w], interpolation=mode, antialias=True)
        if self.crop_size is not None:
            x = self._crop_tensor(x)
        return self._normalize(x, integer_scale=255.0)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == 4:  # RGBA array: composite onto the background like load_image does
            xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            alpha = xf[:, 3:4]
            rgb = xf[:, :3]
            if self.background is not None:
                bg = torch.tensor(self.background, dtype=xf.dtype, device=x.device) / 255.0
                rgb = rgb * alpha + bg.view(1, 3, 1, 1) * (1 - alpha)
            x = (
                (rgb * 255.0).round().clamp(0, 255).to(torch.uint8)
                if x.dtype == torch.uint8
                else rgb
            )
            c = 3
        return match_channels(x, self.num_channels)

    def _crop_tensor(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvf

        ch, cw = self.crop_size  # type: ignore[misc]
        h, w = x.shape[-2:]
        top, left = self._crop_offsets(h, w)  # negative when the crop is larger than the image
        pads = [max(-left, 0), max(-top, 0), max(left + cw - w, 0), max(top + ch - h, 0)]
        if any(pads):  # zeros outside the image, as PIL's crop reads them
            x = tvf.pad(x, pads)
            top, left = top + pads[1], left + pads[0]
        return x[..., top : top + ch, left : left + cw]

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) per channel with normalized = value_0_255 * weight + bias."""
        scale = self.rescale_factor if self.rescale_factor is not None else 1.0
        mean = np.asarray(self.mean if self.mean is not None else (0.0,), dtype=np.float64)
        std = np.asarray(self.std if self.std is not None else (1.0,), dtype=np.float64)
        return (scale / std).astype(np.float32), (-mean / std).astype(np.float32)

    def _normalize(self, x: torch.Tensor, *, integer_scale: float) -> torch.Tensor:
        """(B, C, H, W) uint8 (0..255) or float in [0, 1] -> rescaled, normalized float32."""
        weight, bias = (torch.from_numpy(v).to(x.device).view(1, -1, 1, 1) for v in self._affine())
        if x.is_floating_point():
            weight = weight * integer_scale  # [0, 1] floats stand for value / 255
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        return torch.addcmul(bias, x, weight)  # one fused pass: bias + x * weight

    # -- geometry shared by both paths

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.resize, int):
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = self.resize, int(self.resize * long / short)
            side, pixels = limits.limit("IMAGE_SIDE"), limits.limit("INPUT_PIXELS")
            if new_long > side or new_short * new_long > pixels:  # a 1 x 50000 strip
                raise ImageError(
                    f"a {w}x{h} image resized to shorter side {self.resize} would be "
                    f"{new_long} pixels long, over vitkit's limits ({side} per side, {pixels:,d} "
                    f"pixels; VITKIT_MAX_IMAGE_SIDE / VITKIT_MAX_INPUT_PIXELS); crop it first"
                )
            return (new_short, new_long) if h <= w else (new_long, new_short)
        return self.resize if self.resize is not None else (h, w)

    def _crop_offsets(self, h: int, w: int) -> tuple[int, int]:
        ch, cw = self.crop_size  # type: ignore[misc]
        if self.crop_rounding == "round":  # torchvision / timm
            return round((h - ch) / 2.0), round((w - cw) / 2.0)
        return (h - ch) // 2, (w - cw) // 2  # transformers


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An int or (height, width) of positive ints; floats, bools and strings are refused."""
    if is_int(value):
        value = (value, value)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_int, value))):
        raise ConfigError(f"{name}={value!r} must be an int or (height, width) of ints")
    h, w = int(value[0]), int(value[1])
    if h <= 0 or w <= 0:
        raise ConfigError(f"{name}={value!r} must be positive")
    return (h, w)


def _hf_size(size: Any, key: str) -> int | tuple[int, int]:
    """transformers size: int (square), {"height", "width"} or {"shortest_edge"}."""
    if is_int(size) or isinstance(size, (list, tuple)):
        return _pair(size, key)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return _pair((size["height"], size["width"]), key)
        if set(size) == {"shortest_edge"}:
            edge = size["shortest_edge"]
            if not is_int(edge) or edge <= 0:
                raise ConfigError(f"{key}.shortest_edge={edge!r} must be a positive integer")
            return int(edge)
    raise ConfigError(
        f"{key}={size!r} is not supported; use {{'height': H, 'width': W}} or {{'shortest_edge': S}}"
    )


def _floats(value: Any, key: str) -> tuple[float, ...]:
    """One finite number (for every channel) or a list of 1 to 4 of them."""
    if is_finite(value):
        return (float(value),) * 3
    if (
        isinstance(value, (list, tuple, np.ndarray))
        and 1 <= len(value) <= 4
        and all(is_finite(v) for v in value)
    ):
        return tuple(float(v) for v in value)
    raise ConfigError(f"{key}={value!r} must be a finite number or a list of 1 to 4 of them")


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _check_batch(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] not in (1, 3, 4):
        raise ImageError(
            f"expected a (B, C, H, W) batch with 1, 3 or 4 channels, got {tuple(x.shape)}"
        )
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ImageError(f"dtype {x.dtype} not supported; use uint8 or float in [0, 1]")
    return x if x.dtype == torch.uint8 else x.to(torch.float32)


def _to_chw_tensor(item: Any, index: int = 0) -> torch.Tensor:
    """numpy (HWC / HW) or tensor (CHW / HW) -> (C, H, W) tensor, uint8 or float32 in [0, 1]."""
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            array = array.transpose(2, 0, 1)  # HWC -> CHW
        if array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535.0
        elif array.dtype == np.bool_:
            array = array.astype(np.float32)
        array = np.ascontiguousarray(array)
        t = torch.from_numpy(array if array.flags.writeable else array.copy())
    elif isinstance(item, torch.Tensor):
        t = item
        if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
    else:
        raise ImageError(
            f"image {index}: unsupported input type {type(item).__name__}; pass a path, PIL image, "
            "numpy array or tensor"
        )
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ImageError(f"image {index}: expected (C, H, W) or (H, W) with 1, 3 or 4 channels, "
                         f"got shape {tuple(t.shape)}")  # fmt: skip
    if t.dtype == torch.uint8:
        return t
    if t.is_floating_point():
        return t.to(torch.float32)
    raise ImageError(f"image {index}: dtype {t.dtype} not supported; use uint8 or float in [0, 1]")


def _tensor_to_pil(t: torch.Tensor, background: tuple[int, int, int] | None) -> Image.Image:
    if t.is_floating_point():
        t = (t.clamp(0, 1) * 255.0).round().to(torch.uint8)
    array = t.cpu().permute(1, 2, 0).numpy()
    if array.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(array[..., 0])).convert("RGB")
    if array.shape[-1] == 4:
        return load_image(Image.fromarray(np.ascontiguousarray(array)), background=background)
    return Image.fromarray(np.ascontiguousarray(array))


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) images as `channels`-channel ones, as PIL's modes convert files: grayscale
    repeated to RGB (a view), RGB to ITU-R 601 luma; uint8 stays uint8."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        gray = (x.float() * weights).sum(1, keepdim=True)
        return gray.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else gray
    raise ImageError(f"cannot use a {c}-channel image for a {channels}-channel model")
