"""SOURCE -> model + preprocessing: the one place vitkit turns a name into a model.

`resolve(source)` accepts, in this order:

    a preset name (`vitkit models`)     random weights, only with allow_preset=True
    a `vitkit train` run directory      its best/ folder, else last/ (state.pt)
    a folder with config.json           transformers, timm hub or vitkit layout
    a folder with open_clip_config.json an open_clip snapshot (the CLIP image tower)
    a file                              timm or open_clip state dict (.safetensors/.pth/.bin)
                                        or JAX .npz
    a hub id ("google/vit-base-...")    through the huggingface_hub cache

and returns the model together with the `ImageProcessor` its checkpoint was trained with, as
its library applies it (`vitkit.checkpoints.preprocessing`; `ImageProcessor.from_pretrained`
gives a folder the same one): the folder's preprocessor_config.json, else a timm
`pretrained_cfg` in config.json (or an open_clip config's preprocess_cfg), else transformers'
defaults at the model's size.
`from_pretrained`, `vitkit train --init/--teacher`, `eval`, `predict`, `pretrain`, `export`,
`serve` and `explain` all come through here.

With `text=True` the source must hold both towers of a CLIP / SigLIP model (a transformers
CLIPModel / SiglipModel folder or snapshot, an open_clip folder or state dict, a vitkit
image-text folder, or a preset with a text tower); `Resolved.image_text` is that
`ImageTextModel` and `Resolved.model` its image tower (the same module), so every image
consumer works unchanged. `text="auto"` loads both towers when the source has them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitkit.checkpoints import open_clip, preprocessing
from vitkit.checkpoints._common import with_text
from vitkit.checkpoints._local import run_folder
from vitkit.checkpoints.hub import looks_like_hub_id, resolve_hub
from vitkit.checkpoints.pretrained import (
    build_model,
    load_folder,
    load_path,
    read_training_state,
)
from vitkit.config import ViTConfig
from vitkit.data.processor import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageProcessor
from vitkit.errors import CheckpointError, ConfigError
from vitkit.models.image_text import ImageTextConfig, ImageTextModel
from vitkit.presets import create_image_text_model, create_model, list_models
from vitkit.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from vitkit.models.vit import VisionTransformer

PROCESSOR_CHOICES = ("auto", "hf", "timm")


@dataclass
class Resolved:
    """A model and the preprocessing that goes with it.

    folder: where the checkpoint's files were found (None for a single file or a preset).
    random_weights: True when `source` named a preset (nothing was loaded).
    image_text: both towers (CLIP / SigLIP) when loaded with `text=True` (or "auto" and the
        source has them), else None; `model` is then `image_text.vision`, the same module.
    tokenizer: the text tower's tokenizer, when one was found (None otherwise).
    """

    model: VisionTransformer
    processor: ImageProcessor
    source: str
    folder: Path | None = None
    random_weights: bool = False
    image_text: ImageTextModel | None = None
    tokenizer: Any = None


def resolve(
    source: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    model_name: str | None = None,
    config: ViTConfig | ImageTextConfig | None = None,
    strict: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    resample_antialias: bool = False,
    processor: str = "auto",
    allow_preset: bool = False,
    text: bool | str = False,
    **overrides: Any,
) -> Resolved:
    """Load `source` (see the module docstring) with the processor its checkpoint implies.

    num_classes: a new zero-initialised head of this size (None keeps the checkpoint's).
    image_size: resample the position table to this size (bicubic, align_corners=False;
        `resample_antialias=True` gives timm's load-time rule); the processor follows.
    model_name / config: the architecture for timm state dicts; `config` also overrides what a
        folder's config.json or an npz implies.
    overrides: `ViTConfig` fields that keep parameter shapes (drop_path_rate, ...).
    processor: "auto" (the checkpoint's own), "hf" (squash-resize, bilinear) or "timm"
        (shorter side to size / crop_pct, centre crop, bicubic); mean/std stay the checkpoint's.
    allow_preset: accept a preset name and build it with random weights.
    text: False (the image model; a CLIP / SigLIP checkpoint gives its image tower), True
        (both towers, `Resolved.image_text`; a source without a text tower is refused, and
        so is `num_classes`) or "auto" (both towers when the source has them). `config` is
        then an `ImageTextConfig`; `dtype`, `device`, `strict` and `overrides` apply to both
        towers (a field both have, e.g. attn_implementation, changes both), `image_size` to
        the image tower.
    """
    if processor not in PROCESSOR_CHOICES:
        raise ConfigError(f"processor={processor!r}; choose one of {PROCESSOR_CHOICES}")
    if text not in (True, False, "auto"):
        raise ConfigError(f"text={text!r}; choose True, False or 'auto'")
    if num_classes is not None:
        if text is True:
            raise ConfigError(
                f"num_classes={num_classes} with text=True: an image-text model classifies "
                "with its text tower (zero-shot); a new head is for an image model (text=False)"
            )
        text = False  # "auto" with a new head: an image classifier
    if isinstance(config, ImageTextConfig) or (config is not None and text is True):
        if text is False or not isinstance(config, ImageTextConfig):
            raise ConfigError("both towers (text=True) go with an ImageTextConfig (config=), "
                              "an image model (text=False) with a ViTConfig")  # fmt: skip
        text = True
    elif config is not None:
        text = False
    name = os.fspath(source)
    path = Path(name).expanduser()
    build = dict(num_classes=num_classes, image_size=image_size, dtype=dtype, device=device,
                 strict=strict, overrides=overrides, antialias=resample_antialias)  # fmt: skip
    if not path.exists() and _is_preset(name):
        if not allow_preset:
            raise CheckpointError(
                f"{name!r} is a preset name, not a checkpoint: it has no trained weights "
                "(pass a checkpoint folder, file or hub id)"
            )
        joint = text is True or (text == "auto" and name in list_models(text=True))
        changes = {k: v for k, v in dict(image_size=image_size, **overrides).items()
                   if v is not None}  # fmt: skip
        if joint:
            model = create_image_text_model(name, **changes)
        else:
            model = _preset(name, num_classes=num_classes, **changes)
        model = model.to(device=device, dtype=dtype or torch.get_default_dtype()).eval()
        return _resolved(model, None, processor, name, image_size, None, random_weights=True)

    folder: Path | None = None
    files: dict[str, Path] = {}
    if path.is_dir():
        folder = run_folder(path)
        if folder is None:  # a run directory with only last/state.pt
            with_text(text, False, source=str(path), what="a vitkit training run (an image "
                      "model)")  # fmt: skip
            state = read_training_state(path)
            cfg = config or ViTConfig.from_dict(state["model_config"])
            model = build_model(cfg, dict(state["model"]), source=str(path), **build)
            found = _processor_from_dict(state.get("preprocessor"), str(path))
            return _resolved(model, found, processor, name, image_size, path / "last")
        cfg, sd, weights, files = load_folder(folder, model_name, config, text=text)
        tokens = folder
    elif path.is_file():
        cfg, sd, weights = load_path(path, model_name, config, text=text)
        tokens = path.parent  # an open_clip state dict: open_clip's vocabulary
    else:
        cfg, sd, weights, files = _load_hub(name, model_name, config, revision, cache_dir, text)
        folder = tokens = next(iter(files.values())).parent  # the snapshot folder
    model = build_model(cfg, sd, source=weights, **build)
    found = preprocessing.stated(files)
    resolved = _resolved(model, found, processor, name, image_size, folder)
    if resolved.image_text is not None:
        snapshot = (tokens / open_clip.CONFIG_FILE).is_file() and not (
            tokens / "config.json"
        ).is_file()
        kind = "open_clip" if path.is_file() or snapshot else None
        resolved.tokenizer = tokenizer_for(resolved.image_text, tokens, kind)
    return resolved


def tokenizer_for(model: ImageTextModel, folder: Path, kind: str | None = None) -> Any:
    """The tokenizer in a checkpoint's `folder` for `model`'s text tower (at most its context),
    or None when the folder has no tokenizer files; files that are there but unreadable raise."""
    names = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")
    if kind is None and not any((folder / n).is_file() for n in names):
        return None
    return load_tokenizer(folder, kind=kind, context_length=model.config.text.context_length)


def _resolved(
    model: Any,
    found: ImageProcessor | None,
    choice: str,
    source: str,
    size: int | tuple[int, int] | None,
    folder: Path | None,
    random_weights: bool = False,
) -> Resolved:
    """`Resolved` for an image model or both towers (`model` is then the image tower)."""
    image_text = model if isinstance(model, ImageTextModel) else None
    vision = image_text.vision if image_text is not None else model
    proc = _processor(found, vision.config, choice, source, size)
    return Resolved(vision, proc, source, folder, random_weights, image_text)


def from_pretrained(source: str | os.PathLike[str], **kwargs: Any) -> VisionTransformer:
    """Load a `VisionTransformer` from a folder, hub id, timm state dict file, JAX `.npz` or a
    `vitkit train` run directory; in eval mode. Options as `resolve`; the processor is
    `resolve(source).processor`."""
    return resolve(source, **kwargs).model


# ---------------------------------------------------------------------------------- presets
def _is_preset(name: str) -> bool:
    return name in list_models()


def _preset(name: str, **changes: Any) -> VisionTransformer:
    return create_model(name, **{k: v for k, v in changes.items() if v is not None})


# ---------------------------------------------------------------------------------- hub
def _load_hub(
    repo_id: str,
    model_name: str | None,
    config: ViTConfig | ImageTextConfig | None,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    text: bool | str = False,
):
    if not looks_like_hub_id(repo_id):
        raise CheckpointError(
            f"{repo_id} is neither a file, a folder, a preset nor a hub id (org/name)"
        )
    try:
        files = resolve_hub(repo_id, revision=revision, cache_dir=cache_dir)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{repo_id!r} is not a local file or folder, so it was read as a Hugging Face Hub "
            f"id: {exc}"
        ) from exc
    cfg, sd, name, files = load_folder(files, model_name, config, where=Path(repo_id), text=text)
    return cfg, sd, name, files


# ---------------------------------------------------------------------------------- processor
def processor_for(
    config: ViTConfig, folder: str | os.PathLike[str] | None = None, choice: str = "auto"
) -> ImageProcessor:
    """The processor a model folder states for a model of `config` (see `resolve`)."""
    path = Path(folder) if folder is not None else None
    files = {p.name: p for p in path.iterdir() if p.is_file()} if path and path.is_dir() else {}
    return _processor(preprocessing.stated(files), config, choice, str(path or ""))


def _processor_from_dict(data: Any, source: str) -> ImageProcessor | None:
    if not isinstance(data, dict):
        return None
    try:
        return preprocessing.from_hf_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: saved preprocessor: {exc}") from None


def _processor(
    found: ImageProcessor | None,
    config: ViTConfig,
    choice: str,
    source: str,
    size: int | tuple[int, int] | None = None,
) -> ImageProcessor:
    """The checkpoint's processor as its library applies it (`checkpoints.preprocessing`), or
    transformers' defaults at the model's size, with the geometry of `choice` ("hf" resizes
    with torchvision like transformers, "timm" with PIL like timm) and as many channels as the
    model takes; producing `size` when one was asked for (a checkpoint's own processor may
    differ from its config's size on purpose: DINOv2's crops 224 for a 518 position table)."""
    processor = found or ImageProcessor.for_model(config, backend="tensor")
    if choice == "hf":
        processor = ImageProcessor.hf_vit(
            config.image_hw, mean=processor.mean, std=processor.std, backend="tensor"
        )
    elif choice == "timm":
        deit = config.distilled or "deit" in Path(source).name.lower()
        mean, std = (
            (found.mean, found.std) if found else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        )
        processor = ImageProcessor.timm_eval(
            config.image_hw, crop_pct=0.875 if deit else 0.9, mean=mean, std=std, backend="pil"
        )
    if size is not None:
        processor = processor.at_size(size)
    return processor.with_channels(config.in_chans)
