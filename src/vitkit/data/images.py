"""Read image files safely and turn any PIL mode into 8-bit RGB.

Image files are untrusted input: every failure (missing file, not an image, truncated data,
a decompression bomb, an unsupported mode) becomes one `vitkit.ImageError` whose message starts
with the file name, never a raw PIL traceback.

Conversion rules (see docs/preprocessing.md):
- EXIF orientation is applied, so a phone photo comes out upright with the rotated size.
- Transparency (RGBA, LA, PA, P with a transparent colour) is composited onto a white
  background by default, like transformers' `convert_to_rgb`; `background=None` drops alpha
  instead (timm's `convert("RGB")`). Opaque RGB photos are unaffected either way.
- 16-bit grayscale (I;16, I;16B, I;16L, I) is scaled by 255/65535 with rounding, not clipped;
  32-bit float (F) in [0, 1] is scaled by 255; other ranges are stretched min..max.
- Palette, 1-bit, grayscale and CMYK images go through PIL's own conversion to RGB.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitkit._warnings import ignoring
from vitkit.errors import ImageError

ImageSource = str | os.PathLike[str] | bytes | Image.Image | Any
"""A path, raw encoded bytes, a binary file object or an already open PIL image."""

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
    ".pnm", ".jfif", ".ico", ".tga",
)  # fmt: skip
"""Extensions treated as images when a folder is expanded."""

WHITE = (255, 255, 255)

MAX_PIXELS = 89_478_485
"""Default decompression-bomb limit: PIL's own warning threshold (about 9459 x 9459)."""


def quiet_bomb_warning() -> contextlib.AbstractContextManager[None]:
    """Hide PIL's DecompressionBombWarning while `Image.open` reads a header that vitkit's own
    size check follows (the warning would only repeat the refusal, or be noise when the user
    raised the limit). Threads take turns in it (`vitkit._warnings`): hold it for the header
    only, never the decode."""
    return ignoring(Image.DecompressionBombWarning)


def load_image(
    source: ImageSource,
    *,
    background: tuple[int, int, int] | None = WHITE,
    max_pixels: int | None = MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Open `source` and return an upright 8-bit RGB PIL image, fully decoded.

    `background` is the colour transparent pixels are composited onto (None drops alpha).
    `max_pixels` rejects images with more pixels than that before decoding them (a
    decompression bomb: a tiny file that expands to gigabytes); None disables vitkit's check,
    though PIL still refuses anything above twice its own `Image.MAX_IMAGE_PIXELS`.
    Raises `ImageError` naming the file for every failure.
    """
    name = _describe(source)
    try:
        image = source if isinstance(source, Image.Image) else _open(source, name)
        _check_size(image, name, max_pixels)
        if getattr(image, "is_animated", False):  # not n_frames: it walks every frame
            image.seek(0)  # animated GIF / multi-page TIFF: the first frame
        image.load()
        if exif_transpose:
            image = _exif_transpose(image)
        return to_rgb(image, background=background, name=name)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
    except MemoryError:
        raise ImageError(f"{name}: image too large to decode in memory") from None
    except OSError as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason or "broken data stream" in reason:
            reason = f"truncated or corrupt image data ({reason})"
        raise ImageError(f"{name}: cannot decode image: {reason}") from None
    except Exception as exc:  # PIL plugins raise SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"{name}: cannot decode image: {type(exc).__name__}: {exc}") from None


def to_rgb(
    image: Image.Image, *, background: tuple[int, int, int] | None = WHITE, name: str = "<image>"
) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (rules in the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        if background is None:
            return rgba.convert("RGB")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_wide_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "RGBX", "HSV"):
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: unsupported image mode {mode!r} ({exc})") from None


def _wide_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grayscale (H, W) -> uint8, scaled rather than clipped."""
    a = array.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = a * (255.0 / 65535.0)
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif mode != "F" and lo >= 0.0 and hi <= 65535.0:
            scaled = a * (255.0 / 65535.0)  # mode I from a 16-bit file
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _open(source: Any, name: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageError(f"{name}: empty data")
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    elif not hasattr(source, "read"):
        raise ImageError(
            f"{name}: unsupported input type {type(source).__name__}; pass a path, bytes, a "
            "binary file object or a PIL image"
        )
    try:
        with quiet_bomb_warning():  # load_image applies its own limit right after
            return Image.open(source)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (unrecognised format)") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None


def size_problem(width: int, height: int, max_pixels: int | None = MAX_PIXELS) -> str | None:
    """Why an image of this header size is refused before decoding, or None if it is not."""
    if width <= 0 or height <= 0:
        return f"invalid image size {width}x{height}"
    if max_pixels is not None and width * height > max_pixels:
        return (
            f"refused as a possible decompression bomb: {width}x{height} = {width * height:,d} "
            f"pixels is more than the limit of {max_pixels:,d} (raise max_pixels to allow it)"
        )
    return None


def _check_size(image: Image.Image, name: str, max_pixels: int | None) -> None:
    problem = size_problem(*image.size, max_pixels)
    if problem:
        raise ImageError(f"{name}: {problem}")


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: keep the pixels as stored rather than fail the image
        return image


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "") or f"<{type(source).__name__}>")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` has an image extension (used when a folder is expanded)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def reason_of(source: Any, error: ImageError) -> str:
    """Why `source` could not be read, without the file name its `ImageError` starts with
    (what a per-image report prints after `path: `)."""
    message = str(error)
    prefix = f"{os.fspath(source)}: " if isinstance(source, (str, os.PathLike)) else ""
    return message[len(prefix) :] if prefix and message.startswith(prefix) else message


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Arguments -> (image paths in order, [(argument, reason)] for the ones that failed).

    Folders expand to the image files under them, sorted; a folder with none is a failure.
    Files are kept whatever their extension (the decoder decides); missing paths fail here.
    """
    paths: list[str] = []
    failures: list[tuple[str, str]] = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file() and is_image_file(p) and not _hidden(p.relative_to(path))
            )
            if found:
                paths.extend(found)
            else:
                failures.append((arg, "directory contains no image files"))
        elif path.exists():
            paths.append(arg)
        else:
            failures.append((arg, "no such file or directory"))
    return paths, failures


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
