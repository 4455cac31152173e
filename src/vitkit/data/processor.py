"""Inference preprocessing: images -> the exact (B, C, H, W) float tensor a checkpoint expects.

A checkpoint is only as good as the preprocessing it was trained with. `ImageProcessor` holds
the four choices that matter (resize rule, interpolation, crop, rescale + normalize) and
reproduces both conventions found on the hub:

- transformers' `ViTImageProcessor`: resize straight to 224x224 (aspect ignored), bilinear,
  x/255, mean = std = 0.5 (`ImageProcessor.hf_vit()`);
- timm's eval transform: shorter side to floor(size / crop_pct), centre crop, bicubic,
  per-model mean/std (`ImageProcessor.timm_eval()`).

Two execution paths give the same numbers (docs/preprocessing.md has the measured gaps):
PIL images and files are resized by PIL on 8-bit RGB, exactly as transformers' PIL backend and
timm do; numpy arrays and tensors are resized batched with torchvision.transforms.v2 (on any
device), exactly as transformers' default torchvision backend does. Which one a checkpoint
gets, and the translation of preprocessor_config.json and timm's pretrained_cfg, live in
`vitkit.checkpoints.preprocessing`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from PIL import Image

from vitkit import limits
from vitkit._fields import POSITIVE, In, over_limit, problems
from vitkit.config import pair
from vitkit.data.images import MAX_PIXELS, WHITE, load_image
from vitkit.errors import ConfigError, ImageError
from vitkit.limits import is_finite, is_int

if TYPE_CHECKING:  # torch loads where a tensor is made: a warm `vitkit predict` runs without it
    import torch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]


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
    mean, std: per-channel normalization after rescaling (one value for every channel, or one
        per channel), or None for none.
    num_channels: 3 (RGB) or 1 (grayscale, ITU-R 601 luma) for single-channel models.
    backend: "auto" resizes PIL images/files with PIL and arrays/tensors with torchvision;
        "pil" or "tensor" forces one path for everything.
    background, max_pixels: passed to `vitkit.data.images.load_image` for files.
    """

    resize: Annotated[int | tuple[int, int] | None, POSITIVE] = (224, 224)
    crop_size: Annotated[tuple[int, int] | None, POSITIVE] = None
    interpolation: Interpolation = "bilinear"
    crop_rounding: Literal["floor", "round"] = "floor"
    rescale_factor: Annotated[float | None, In("(0, inf)", "1/255 for 8-bit images")] = 1 / 255
    mean: tuple[float, ...] | None = IMAGENET_STANDARD_MEAN
    std: Annotated[tuple[float, ...] | None, In("(0, inf)", "e.g. 0.5 or 0.229")] = (
        IMAGENET_STANDARD_STD
    )
    num_channels: Literal[1, 3] = 3
    backend: Literal["auto", "pil", "tensor"] = "auto"
    background: Annotated[tuple[int, int, int] | None, In("[0, 255]")] = WHITE
    max_pixels: Annotated[int | None, POSITIVE] = MAX_PIXELS

    def __post_init__(self) -> None:
        errors = problems(self)
        if not errors:
            n = self.num_channels
            errors = [
                f"{key} has {len(v)} values for {n} channels"
                for key, v in (("mean", self.mean), ("std", self.std))
                if v is not None and len(v) not in (1, n)
            ]
            if (self.mean is None) != (self.std is None):
                errors.append("mean and std must both be set or both be None")
            for name, size in (("resize", self.resize), ("crop_size", self.crop_size)):
                if is_int(size):  # the shorter side: the longer one is checked per image
                    errors += over_limit(size, "IMAGE_SIDE", name)  # type: ignore[arg-type]
                elif size is not None:
                    errors += over_limit(max(size), "IMAGE_SIDE", f"{name} side")
                    errors += over_limit(size[0] * size[1], "INPUT_PIXELS", f"{name} pixels")
        if errors:
            raise ConfigError("invalid ImageProcessor: " + "; ".join(errors))

    # ---- as JSON ---------------------------------------------------------------------------
    def to_fields(self) -> dict[str, Any]:
        """Every field, as JSON gives it back (tuples as lists): what a cache or an index keeps
        of the preprocessing, the backend included (unlike `to_hf_dict`)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # fmt: skip

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ImageProcessor:
        """`to_fields`' inverse; the values are checked as any others are (ConfigError)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def hf_vit(cls, image_size: int | tuple[int, int] = 224, **overrides: Any) -> ImageProcessor:
        """transformers' ViTImageProcessor defaults: squash-resize to image_size, bilinear,
        x/255, mean = std = 0.5, no crop."""
        return cls(**{"resize": pair(image_size, "image_size"), **overrides})

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
        h, w = pair(image_size, "image_size")
        limits.check(max(h, w), "IMAGE_SIDE", "image_size")
        if not (is_finite(crop_pct) and 0 < crop_pct <= 1 and math.isfinite(h / crop_pct)):
            raise ConfigError(f"crop_pct={crop_pct!r} must be a number in (0, 1], e.g. 0.9")
        scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))  # checked as resize
        if crop_mode not in ("center", "squash"):
            raise ConfigError(
                f"crop_mode={crop_mode!r} is not supported; use 'center' or 'squash' "
                "(timm's 'border' pads with the mean colour, which vitkit does not reproduce)"
            )
        resize = scaled if crop_mode == "squash" else scaled[0] if h <= w else scaled[1]
        fields: dict[str, Any] = dict(
            resize=resize, crop_size=(h, w), interpolation=interpolation, crop_rounding="round",
            rescale_factor=1 / 255, mean=mean, std=std,
        )  # fmt: skip
        return cls(**{**fields, **overrides})

    @classmethod
    def for_model(cls, config: Any, **overrides: Any) -> ImageProcessor:
        """transformers-style defaults sized for a `ViTConfig` (image size, channel count)."""
        channels = int(getattr(config, "in_chans", 3))
        fields: dict[str, Any] = {}
        if channels == 1:
            fields = dict(num_channels=1, mean=(0.5,), std=(0.5,))
        return cls.hf_vit(config.image_hw, **{**fields, **overrides})

    # ---- files: preprocessor_config.json, timm's pretrained_cfg ---------------------------
    # The formats are other libraries', so `vitkit.checkpoints.preprocessing` translates them and
    # installs these entry points when it is imported: data/ does not import checkpoints/, and
    # the first use of one of them loads the translators (`_Translated`).
    # `from_pretrained(folder)` gives what `vitkit.resolve(folder).processor` does.
    from_pretrained: ClassVar[Callable[[str | os.PathLike[str]], ImageProcessor]]
    save_pretrained: ClassVar[Callable[[ImageProcessor, str | os.PathLike[str]], Path]]
    from_hf_dict: ClassVar[Callable[..., ImageProcessor]]
    to_hf_dict: ClassVar[Callable[[ImageProcessor], dict[str, Any]]]
    from_timm_cfg: ClassVar[Callable[..., ImageProcessor]]

    # ---- variants --------------------------------------------------------------------------

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
        hw = pair(hw, "hw")
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
        import torch

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
        import torch

        return torch.from_numpy(self._pil_one(image))

    def without_torch(self) -> bool:
        """Whether `to_array` can give the predictor's numbers: always on the PIL path (the
        same code); on the tensor path for RGB bilinear or bicubic resizing, where torch's
        8-bit kernels use the fixed-point filters `_resize_uint8` reproduces. Which kernel
        torch runs depends on the CPU, so `matches_without_torch` checks it on the machine
        before a warm run relies on it."""
        if self._use_pil(np.empty(0, np.uint8)):  # the PIL path, as for a decoded array
            return True
        return self.num_channels == 3 and self.interpolation in _UINT8_FILTERS

    def matches_without_torch(self) -> bool:
        """Whether `to_array` gives the pixels torch gives here, bit for bit: probed on two
        noise images, one shrunk and one enlarged (torch's 8-bit resize runs other kernels on
        other CPUs). Imports torch: a cold run asks, and keeps the answer with the CPU's
        capability for the warm runs (`vitkit.infer.warm`)."""
        if not self.without_torch():
            return False
        if self._use_pil(np.empty(0, np.uint8)):
            return True  # the very code the torch path runs
        rng = np.random.default_rng(0)
        for shape in ((300, 200, 3), (37, 53, 3)):
            x = (rng.random(shape) * 255).astype(np.uint8)
            if not np.array_equal(self.to_array(Image.fromarray(x)), self([x])[0].numpy()):
                return False
        return True

    def to_array(self, source: Any) -> np.ndarray:
        """One image (path, bytes, PIL image) -> (C, H, W) float32 without torch: the numbers
        `vitkit.infer.predictor.preprocess` gives where `without_torch` says so."""
        if self._use_pil(np.empty(0, np.uint8)):
            return self._pil_one(source)
        image = load_image(source, background=self.background, max_pixels=self.max_pixels)
        x = np.asarray(image)  # (H, W, 3) uint8, as the predictor decodes it
        if self.resize is not None:
            h, w = self._resized_hw(*x.shape[:2])
            x = _resize_uint8(x, h, w, self.interpolation)
        if self.crop_size is not None:
            top, left = self._crop_offsets(*x.shape[:2])
            ch, cw = self.crop_size
            canvas = np.zeros((ch, cw, x.shape[2]), np.uint8)  # zeros outside the image
            rows, cols = slice(max(top, 0), top + ch), slice(max(left, 0), left + cw)
            part = x[rows, cols]
            canvas[max(-top, 0) : max(-top, 0) + part.shape[0],
                   max(-left, 0) : max(-left, 0) + part.shape[1]] = part  # fmt: skip
            x = canvas
        weight, bias = (v.astype(np.float64) for v in self._affine())
        out = x.astype(np.float64) * weight + bias  # exact, then rounded once: torch's addcmul
        return np.ascontiguousarray(out.astype(np.float32).transpose(2, 0, 1))

    def _decode(self, item: Any) -> np.ndarray:
        """A path, bytes or PIL image -> (H, W, C) uint8, upright, RGB (L for one channel)."""
        image = load_image(item, background=self.background, max_pixels=self.max_pixels)
        if self.num_channels == 1:
            image = image.convert("L")
        return np.asarray(image)

    # -- PIL path: resample 8-bit RGB with PIL, like transformers' PIL backend and timm

    def _use_pil(self, item: Any) -> bool:
        if self.backend != "auto":
            return self.backend == "pil"
        if isinstance(item, np.ndarray) or _is_tensor(item):
            return self.interpolation in ("box", "hamming")  # torchvision lacks these modes
        return True

    def _pil_one(self, item: Any) -> np.ndarray:
        if isinstance(item, np.ndarray) or _is_tensor(item):
            image = _tensor_to_pil(_to_chw_tensor(item), self.background)
        else:
            image = load_image(item, background=self.background, max_pixels=self.max_pixels)
        if self.num_channels == 1:
            image = image.convert("L")
        if self.resize is not None:
            h, w = self._resized_hw(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), resample=Image.Resampling[self.interpolation.upper()])
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
        # lazy: torchvision loads torch._dynamo (~1.5 s)
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
        import torch

        if x.shape[1] == 4:  # RGBA array: composite onto the background like load_image does
            xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            alpha = xf[:, 3:4]
            rgb = xf[:, :3]
            if self.background is not None:
                bg = torch.tensor(self.background, dtype=xf.dtype, device=x.device) / 255.0
                rgb = rgb * alpha + bg.view(1, 3, 1, 1) * (1 - alpha)
            integers = x.dtype == torch.uint8
            x = (rgb * 255.0).round().clamp(0, 255).to(torch.uint8) if integers else rgb
        return match_channels(x, self.num_channels)

    def _crop_tensor(self, x: torch.Tensor) -> torch.Tensor:
        # lazy: torchvision loads torch._dynamo (~1.5 s)
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
        import torch

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


def _is_tensor(item: Any) -> bool:
    """Whether `item` is a torch tensor, without importing torch (none exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(item, torch.Tensor)


def _as_list(images: Any) -> list[Any]:
    import torch

    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _check_batch(x: torch.Tensor) -> torch.Tensor:
    import torch

    if x.shape[1] not in (1, 3, 4):
        raise ImageError(
            f"expected a (B, C, H, W) batch with 1, 3 or 4 channels, got {tuple(x.shape)}"
        )
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ImageError(f"dtype {x.dtype} not supported; use uint8 or float in [0, 1]")
    return x if x.dtype == torch.uint8 else x.to(torch.float32)


def _to_chw_tensor(item: Any, index: int = 0) -> torch.Tensor:
    """numpy (HWC / HW) or tensor (CHW / HW) -> (C, H, W) tensor, uint8 or float32 in [0, 1]."""
    import torch

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
    import torch

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
    import torch

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


# ---- torchvision's 8-bit antialiased resize, in numpy ---------------------------------------
# torch resizes uint8 images with Pillow-SIMD's fixed-point separable filters (ATen's
# UpSampleKernel: weights in double, rounded to int16 at a precision set by the largest one,
# a horizontal then a vertical pass, each rounded and clamped to 8 bits), which PIL's own
# resize (22 fixed bits) misses by a level here and there. tests/test_warm.py checks the two
# agree bit for bit.


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_UINT8_FILTERS = {"bilinear": (2, _bilinear), "bicubic": (4, _bicubic)}


def _uint8_weights(n_in: int, n_out: int, interpolation: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(input index, int16 weight) per output pixel and tap, and the weights' fixed-point bits."""
    size, kernel = _UINT8_FILTERS[interpolation]
    scale = n_in / n_out
    support = size * 0.5 * scale if scale >= 1.0 else size * 0.5
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(n_out) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - first
    j = np.arange(taps)
    w = kernel((j + first[:, None] - center[:, None] + 0.5) * (1.0 / scale if scale >= 1 else 1))
    w = np.where(j < np.clip(count, 0, taps)[:, None], w, 0.0)
    total = w.sum(1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    bits, top = 0, float(w.max())
    while bits < 22 and int(0.5 + top * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    v = w * (1 << bits)
    fixed = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int32)
    return np.minimum(first[:, None] + j, n_in - 1), fixed, bits


def _resize_uint8(x: np.ndarray, h: int, w: int, interpolation: str) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8, as torchvision resizes a uint8 tensor (antialias)."""
    if x.shape[:2] == (h, w):
        return x
    out = x.astype(np.int32)
    for axis, n in ((1, w), (0, h)):  # horizontal first, as torch
        if out.shape[axis] == n:
            continue
        index, fixed, bits = _uint8_weights(out.shape[axis], n, interpolation)
        shape = [1, 1, 1]
        shape[axis] = n
        acc = np.full([n if a == axis else out.shape[a] for a in range(3)], 1 << (bits - 1),
                      np.int32)  # fmt: skip
        for tap in range(fixed.shape[1]):
            acc += np.take(out, index[:, tap], axis=axis) * fixed[:, tap].reshape(shape)
        out = np.clip(acc >> bits, 0, 255)
    return out.astype(np.uint8)


class _Translated:
    """Stands for an entry point `vitkit.checkpoints.preprocessing` installs on `ImageProcessor`
    until that module is loaded: the first access loads it (it replaces these stand-ins with the
    translators) and returns the real attribute. `import vitkit` loads nothing eagerly."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        importlib.import_module("vitkit.checkpoints.preprocessing")  # installs the translators
        if vars(ImageProcessor).get(self.name) is self:  # pragma: no cover - a broken install
            raise AttributeError(f"ImageProcessor.{self.name} was not installed")
        return getattr(owner if instance is None else instance, self.name)


for _name in ("from_pretrained", "save_pretrained", "from_hf_dict", "to_hf_dict", "from_timm_cfg"):
    _stand_in = _Translated()
    _stand_in.__set_name__(ImageProcessor, _name)
    setattr(ImageProcessor, _name, _stand_in)
