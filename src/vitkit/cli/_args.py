"""Flags and checks that several commands share, defined once."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any


def model_help(*, presets: bool, what: str = "the pipeline") -> str:
    """What `vitkit.checkpoints.resolve` accepts as SOURCE, said the same way by every command."""
    text = "a checkpoint folder or file (transformers, timm, JAX .npz), a hub id or a `vitkit train` run"
    if presets:
        text += f", or a preset name from `vitkit models` (random weights: for trying {what} only)"
    return text


def add_model(p: argparse.ArgumentParser, *, presets: bool, what: str = "the pipeline") -> None:
    """`--model/-m SOURCE`, resolved by `vitkit.checkpoints.resolve`; `presets` when the command
    passes allow_preset=True."""
    p.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="SOURCE",
        help=model_help(presets=presets, what=what),
    )


RESAMPLED = (
    "run the model at this input size: one number (square) or height width; the learned "
    "positions are resampled (bicubic) and the preprocessing follows (default: the checkpoint's)"
)


def add_image_size(p: argparse.ArgumentParser, *, help: str = RESAMPLED) -> None:
    """`--image-size PX [PX]`; read it back with `image_size(args)`."""
    p.add_argument("--image-size", type=int, nargs="+", metavar="PX", help=help)


def image_size(args: argparse.Namespace) -> int | tuple[int, int] | None:
    """`--image-size` as `vitkit.resolve` takes it: None, one side, or (height, width)."""
    from vitkit import limits
    from vitkit.errors import ConfigError

    sizes = args.image_size
    if sizes is None:
        return None
    if len(sizes) > 2 or min(sizes) <= 0:
        raise ConfigError(
            "--image-size takes one size or a height and a width in pixels, got "
            + " ".join(map(str, sizes))
        )
    cap = limits.limit("IMAGE_SIDE")
    if max(sizes) > cap:  # the user's flag, not the checkpoint: say so before loading it
        raise ConfigError(
            f"--image-size {max(sizes):,d} is over vitkit's limit of {cap:,d} pixels a side "
            f"(VITKIT_MAX_IMAGE_SIDE={max(sizes)} raises it)"
        )
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def add_precision(p: argparse.ArgumentParser, *, what: str = "the model") -> None:
    """`--precision` and `--backend`: the precision path `vitkit.infer.prepare` runs `what` on."""
    from vitkit._names import BACKENDS, PRECISIONS

    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help=f"run {what} in fp32 (exact), bf16, fp16 (GPU), int8 (CPU; calibrated on the first "
        "batch), or auto: the fastest path this machine offers that keeps fp32's results on the "
        "first batch (docs/inference.md)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="runtime for --precision (default: the fastest installed)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="build the precision path anew instead of reusing (and keeping) the one prepared "
        "in an earlier run; the cache is $VITKIT_CACHE_DIR or ~/.cache/vitkit (`vitkit cache`)",
    )


def check_output(
    path: str | os.PathLike[str], *, kind: str = "file", flag: str = "--output"
) -> Path:
    """Refuse an output `path` (a "file" or a "folder") that cannot be written, before a command
    loads a model or reads data: a file that stands where a folder is needed (on the path's
    parent chain, or the path itself for a folder), a folder where a file is needed, or a
    nearest existing folder that this user may not write into. Creates nothing: the writers make
    the missing folders when they write, so a command that fails later leaves none behind.
    Overwrite rules stay the commands' own. `flag` starts the message (the option, or what the
    file is). Returns `path` as a Path."""
    from vitkit.errors import ConfigError

    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    path = Path(path)
    where = f"{flag} {path}"
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{where} is a folder, not a file; choose another path")
    # the nearest entry that exists decides; missing ones (also those under a file) are skipped
    candidates = ([path] if kind == "folder" else []) + list(path.parents)
    for folder in candidates:
        try:
            mode = os.stat(folder).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(folder):
                raise ConfigError(f"{where}: {folder} is a broken symbolic link") from None
            continue
        except OSError as exc:
            raise ConfigError(f"{where}: cannot reach {folder}: {exc.strerror}") from None
        if not stat.S_ISDIR(mode):
            if folder == path:
                raise ConfigError(f"{where} is a file, not a folder; choose another path")
            raise ConfigError(f"{where}: {folder} is a file, not a folder; choose another path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{where}: cannot write into {folder} (permission denied or read-only); "
                "check its permissions or choose another folder"
            )
        return path
    return path  # nothing exists, not even "." (a deleted working folder): the writer will say


def add_zero_shot(p: argparse.ArgumentParser, *, labels: bool = True) -> None:
    """`--labels`/`--labels-file` (with `labels`) and `--template`/`--templates-file`: zero-shot
    classification with a CLIP or SigLIP checkpoint's text tower; read with `zero_shot(args)`."""
    g = p.add_argument_group("zero-shot (CLIP / SigLIP checkpoints with their text tower)")
    if labels:
        g.add_argument("--labels", nargs="+", metavar="LABEL",
                       help='class names in words, e.g. cat dog "red car"')  # fmt: skip
        g.add_argument("--labels-file", metavar="FILE", help="class names, one per line")
    g.add_argument("--template", metavar="TEXT",
                   help='the prompt around each label (default: "This is a photo of {}.", as '
                   "transformers' zero-shot pipeline)")  # fmt: skip
    g.add_argument("--templates-file", metavar="FILE",
                   help="a prompt ensemble, one template per line: a label's text embedding "
                   "is the mean of its prompts' (CLIP's ImageNet recipe)")  # fmt: skip


def zero_shot(args: argparse.Namespace) -> tuple[list[str] | None, list[str]]:
    """(labels, templates) of `add_zero_shot`'s flags; labels None when none were given."""
    from vitkit.errors import ConfigError
    from vitkit.infer.zero_shot import DEFAULT_TEMPLATE, check_labels, check_templates, read_lines

    labels = None
    given = getattr(args, "labels", None), getattr(args, "labels_file", None)
    if all(v is not None for v in given):
        raise ConfigError("give --labels or --labels-file, not both")
    if given[0] is not None:
        labels = list(given[0])
    elif given[1] is not None:
        labels = read_lines(given[1], "labels")
        if not labels:
            raise ConfigError(f"--labels-file {given[1]} has no labels")
    if args.template is not None and args.templates_file is not None:
        raise ConfigError("give --template or --templates-file, not both")
    templates = [args.template] if args.template is not None else [DEFAULT_TEMPLATE]
    if args.templates_file is not None:
        templates = read_lines(args.templates_file, "templates")
    if labels is not None:  # before any model loads
        check_labels(labels, templates)
    else:
        check_templates(templates)
    return labels, templates


def open_exported(command: str, source: str, changes: dict[str, bool]) -> tuple:
    """(model, processor) of a file `vitkit export` wrote (`vitkit.infer.exported`), for
    `vitkit COMMAND --model FILE`, after refusing the flags in `changes` that were given: the file
    runs at the precision, size and preprocessing it was exported with."""
    from vitkit.infer.exported import check_unchanged, load_exported

    check_unchanged(source, changes)
    model, processor = load_exported(source)
    if not model.processor_stated:
        print(f"vitkit {command}: note: {source} states no preprocessing; using transformers' "
              f"defaults at {model.config.image_hw}", file=sys.stderr)  # fmt: skip
    print(f"vitkit {command}: {model.precision} {source} as exported", file=sys.stderr)
    return model, processor


def warn_random(resolved: Any, command: str, source: str) -> None:
    """Say on stderr that `source` named a preset, so the model `resolve` built is random."""
    if resolved.random_weights:
        print(f"vitkit {command}: warning: {source!r} is a preset name, not a checkpoint: the "
              "model has RANDOM weights and its outputs are meaningless", file=sys.stderr)  # fmt: skip
