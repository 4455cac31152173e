"""Stated limits on what a file may ask vitkit to allocate (docs/security.md explains each).

Files are untrusted: a 60-byte config can ask for a million layers, a `.npz` can hold a zip bomb.
Every size a file states is checked against these limits *before* anything is allocated or
decompressed, and a refusal names the file, the field and the limit. The defaults sit well above
the largest real ViT checkpoints and images (ViT-22B: width 6144, depth 48, 48 heads, MLP 24576;
DINOv2 at 518 px; GLDv2's 203,094 classes); raise one with an environment variable
`VITKIT_MAX_<NAME>` (e.g. `VITKIT_MAX_DEPTH=512`), read when a check runs. A lower value makes
vitkit stricter, but the built-in presets must still fit (they are checked at import).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any

from vitkit.errors import ConfigError

_GIB = 1 << 30

DEFAULTS: dict[str, int] = {
    # model architecture (ViTConfig)
    "DEPTH": 256,  # ViT-22B has 48 blocks, ViT-e 56
    "WIDTH": 16_384,  # embed_dim; ViT-22B: 6144
    "HEADS": 256,  # ViT-22B: 48
    "MLP_DIM": 65_536,  # MLP hidden size and head_hidden_dim; ViT-22B: 24576
    "PATCH_SIZE": 256,  # real models: 8..32
    "CHANNELS": 1_024,  # in_chans; RGB 3, multispectral ~13, hyperspectral a few hundred
    "IMAGE_SIDE": 8_192,  # pixels per side of a model input or a processor's output
    "PATCHES": 65_536,  # patches per image (4096 x 4096 at patch 16)
    "REGISTER_TOKENS": 256,  # DINOv2: 4
    "STEM_LAYERS": 16,  # convolutions before the patch projection (stem_channels); ViTc: 4-5
    "CLASSES": 1_048_576,  # num_classes, labels of a dataset; GLDv2: 203,094
    "VOCAB": 1_048_576,  # a text tower's token table; CLIP 49,408, SigLIP 32,000 (i18n 250,000)
    "TEXT_TOKENS": 4_096,  # a text tower's context; CLIP 77, SigLIP 64
    "PARAMS": 25_000_000_000,  # parameters a config may describe; ViT-22B: 21.7e9
    # images and preprocessing
    "INPUT_PIXELS": 4096 * 4096,  # H x W a processor may resize or crop to
    # files
    "CHECKPOINT_BYTES": 128 * _GIB,  # uncompressed bytes of one .npz or .pth (ViT-22B fp32: 87 GB)
    "ZIP_RATIO": 100,  # uncompressed / compressed bytes of an .npz or .pth larger than 64 MiB
    "DATA_FILE_BYTES": 1 * _GIB,  # one CIFAR pickle (CIFAR-100 train: 155 MB)
    "JSON_BYTES": 64 * (1 << 20),  # config.json, preprocessor_config.json, index files
    "PICKLE_BYTES": 64 * (1 << 20),  # the pickle of a .pth/.bin archive (ViT-B's: 30 kB)
}


def limit(name: str) -> int:
    """The limit `name` (a key of `DEFAULTS`), or `VITKIT_MAX_<name>` from the environment."""
    default = DEFAULTS[name]
    text = os.environ.get(f"VITKIT_MAX_{name}")
    if text is None or not text.strip():
        return default
    try:
        value = int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:  # read at import too (presets): a warning, never a crash
        if name not in _WARNED:
            _WARNED.add(name)
            print(
                f"vitkit: warning: VITKIT_MAX_{name}={text!r} is not a positive integer; "
                f"using the default {default}",
                file=sys.stderr,
            )
        return default
    return value


_WARNED: set[str] = set()


def check(value: int, name: str, what: str, source: str = "") -> None:
    """Raise `ConfigError` if `value` exceeds limit `name`; `what` names the field."""
    cap = limit(name)
    if value > cap:
        where = f"{source}: " if source else ""
        raise ConfigError(
            f"{where}{what}={value:,d} exceeds vitkit's limit of {cap:,d}; if the file is "
            f"genuine, raise it with VITKIT_MAX_{name}={value}"
        )


def at_least(value: Any, least: int, name: str, error: type[Exception] = ConfigError) -> None:
    """Raise `error` if `value` is below `least` (None, an unset option, passes)."""
    if value is not None and value < least:
        raise error(f"{name} must be at least {least}, got {value}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON `true` must not pass for 1, nor 2.7 for 2)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
