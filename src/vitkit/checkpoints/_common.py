"""Shared pieces of the checkpoint mappings: one `CheckpointError` that lists every problem, and
rule-driven renaming for the formats that translate name by name (transformers' families)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError
from vitkit.limits import is_finite, is_int

_MAX_LISTED = 12


def expected_state(config: ViTConfig) -> dict[str, Tensor]:
    """The state dict a `VisionTransformer(config)` has, as `meta` tensors (names, shapes and
    dtypes, nothing allocated)."""
    from vitkit.models.vit import VisionTransformer

    with torch.device("meta"):
        return VisionTransformer(config).state_dict()


def expected_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict a `VisionTransformer(config)` has."""
    return {k: tuple(v.shape) for k, v in expected_state(config).items()}


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def mismatch_error(
    source: str,
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    conflicts: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    hint: str = "",
) -> CheckpointError:
    """Build one error naming the file, the missing and unexpected keys and the shape conflicts."""
    parts = []
    missing, unexpected = list(missing), list(unexpected)
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if conflicts:
        items = [
            f"{k} (model {list(exp)}, file {list(got)})"
            for k, (exp, got) in sorted(conflicts.items())
        ]
        parts.append(
            f"shape conflicts ({len(items)}): "
            + "; ".join(items[:_MAX_LISTED])
            + (" ..." if len(items) > _MAX_LISTED else "")
        )
    msg = f"checkpoint {source} does not match the model: " + "; ".join(parts)
    return CheckpointError(msg + (f". {hint}" if hint else ""))


def check_state_dict(
    sd: Mapping[str, Tensor], config: ViTConfig, *, source: str, hint: str = ""
) -> None:
    """Raise one `CheckpointError` unless `sd` has exactly the keys and shapes of the model."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    conflicts = {
        k: (expected[k], tuple(v.shape))
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != expected[k]
    }
    if missing or unexpected or conflicts:
        raise mismatch_error(
            source, missing=missing, unexpected=unexpected, conflicts=conflicts, hint=hint
        )


# A renaming rule between vitkit and a foreign format: vitkit names <- foreign (name, shape)s.
# The tensors of one side are flattened, concatenated in order and split into the other side's
# shapes, which covers renames, reshapes ((D,) -> (1, 1, D)), fused q/k/v (three -> one) and
# split ones (transformers' in_proj -> q + kv).
Rule = tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]]


def rename_from(
    sd: Mapping[str, Tensor],
    rules: Iterable[Rule],
    config: ViTConfig,
    *,
    prefix: str = "",
    ignore: Iterable[str] = (),
    source: str,
) -> dict[str, Tensor]:
    """vitkit state dict from a foreign one by `rules` (foreign names get `prefix`). Keys
    starting with an entry of `ignore` are skipped on purpose; anything else that does not map,
    a missing key or a size conflict raises one `CheckpointError`."""
    expected = expected_shapes(config)
    ignore = tuple(ignore)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    conflicts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for ours, theirs in rules:
        names = [prefix + name for name, _ in theirs]
        absent = [n for n in names if n not in sd]
        if absent:
            missing += absent
            continue
        used.update(names)
        sizes = [math.prod(expected[k]) for k in ours]
        if sum(sd[n].numel() for n in names) != sum(sizes):
            got = tuple(sd[names[0]].shape) if len(names) == 1 else (len(names),)
            conflicts[names[0]] = (tuple(expected[ours[0]]), got)
            continue
        if len(names) == len(ours) == 1:  # a rename (perhaps a reshape): no copy
            out[ours[0]] = sd[names[0]].reshape(expected[ours[0]])
            continue
        flat = torch.cat([sd[n].reshape(-1) for n in names])
        for key, part in zip(ours, flat.split(sizes), strict=True):
            out[key] = part.reshape(expected[key]).clone()
    unexpected = [k for k in sd if k not in used and not k.startswith(ignore)]
    if missing or unexpected or conflicts:
        raise mismatch_error(source, missing=missing, unexpected=unexpected, conflicts=conflicts)
    return out


def rename_to(sd: Mapping[str, Tensor], rules: Iterable[Rule], *, prefix: str = "") -> dict:
    """A foreign state dict from a vitkit one by `rules` (the inverse of `rename_from`).
    Raises `CheckpointError` naming the vitkit parameters no rule covers."""
    rules = list(rules)
    covered = {k for ours, _ in rules for k in ours}
    unmapped = sorted(k for k in sd if k not in covered)
    if unmapped:
        raise CheckpointError(
            f"these vitkit parameters have no equivalent in the target format: "
            f"{_listing(unmapped)}; save with format='vitkit'"
        )
    out: dict[str, Tensor] = {}
    for ours, theirs in rules:
        if len(ours) == len(theirs) == 1:
            out[prefix + theirs[0][0]] = sd[ours[0]].reshape(theirs[0][1]).contiguous()
            continue
        flat = torch.cat([sd[k].reshape(-1) for k in ours])
        sizes = [math.prod(shape) for _, shape in theirs]
        for (name, shape), part in zip(theirs, flat.split(sizes), strict=True):
            out[prefix + name] = part.reshape(shape).clone()
    return out


def same(ours: str, theirs: str, shape: tuple[int, ...]) -> Rule:
    """One tensor under another name (and perhaps another shape with the same elements)."""
    return ((ours,), ((theirs, shape),))


def linear(ours: str, theirs: str, out_dim: int, in_dim: int, bias: bool = True) -> list[Rule]:
    """The weight (and bias) of a Linear layer (or a LayerNorm with in_dim=0)."""
    weight = (out_dim, in_dim) if in_dim else (out_dim,)
    rules = [same(f"{ours}.weight", f"{theirs}.weight", weight)]
    if bias:
        rules.append(same(f"{ours}.bias", f"{theirs}.bias", (out_dim,)))
    return rules


def norm(ours: str, theirs: str, dim: int) -> list[Rule]:
    return linear(ours, theirs, dim, 0)


def fused_qkv(ours: str, theirs: Iterable[str], dim: int, bias: bool = True) -> list[Rule]:
    """vitkit's one q/k/v projection from three separate ones (q, k, v in that order)."""
    theirs = list(theirs)
    rules: list[Rule] = [((f"{ours}.weight",), tuple((f"{t}.weight", (dim, dim)) for t in theirs))]
    if bias:
        rules.append(((f"{ours}.bias",), tuple((f"{t}.bias", (dim,)) for t in theirs)))
    return rules


def find_prefix(sd: Mapping[str, Tensor], anchor: str, *, source: str, what: str) -> str:
    """The prefix before `anchor` in the state dict's keys (e.g. "vision_model.")."""
    found = sorted({k[: -len(anchor)] for k in sd if k.endswith(anchor)})
    if len(found) != 1:
        raise CheckpointError(
            f"{source}: cannot find one '...{anchor}' among the weights; is this a {what} "
            f"checkpoint? (first keys: {sorted(sd)[:5]})"
        )
    return found[0]


_MISSING = object()


def integer(
    config: Mapping[str, Any],
    key: str,
    default: Any = _MISSING,
    *,
    source: str = "config.json",
    minimum: int = 1,
) -> int:
    """A count or size of a foreign config file, at least `minimum` (1 unless zero means
    something), checked before anything divides or allocates with it: refused (not truncated)
    when it is a fraction, infinite or NaN (Python's JSON reads `Infinity`), a bool, a string,
    too small, or missing without a default. Upper bounds are `ViTConfig`'s (vitkit.limits)."""
    value = config.get(key, default)
    if value is _MISSING:
        raise CheckpointError(f"{source} has no {key!r}")
    if not (is_int(value) or (is_finite(value) and value == int(value))):
        raise CheckpointError(f"{source}: {key}={value!r} must be a whole number")
    if not minimum <= value <= 1 << 53:  # past 2**53 a count is no count (and floats overflow)
        raise CheckpointError(f"{source}: {key}={value!r} must be at least {minimum}"
                              f"{'' if value < minimum else ' and at most 2**53'}")  # fmt: skip
    return int(value)


def number(
    config: Mapping[str, Any], key: str, default: float, *, source: str = "config.json"
) -> float:
    """A real-valued field of a foreign config file: refused (not parsed) when it is text, a
    bool, a list, or infinite / NaN."""
    value = config.get(key, default)
    if not is_finite(value):
        raise CheckpointError(f"{source}: {key}={value!r} must be a finite number")
    return float(value)


# transformers' `hidden_act` names <-> vitkit's `act`
HF_ACT_FROM = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
HF_ACT_TO = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


def hf_act(name: str, *, source: str) -> str:
    if name not in HF_ACT_FROM:
        raise CheckpointError(
            f"{source}: hidden_act={name!r} is not supported; vitkit has exact GELU ('gelu'), "
            f"its tanh approximation ('gelu_pytorch_tanh') and 'quick_gelu'"
        )
    return HF_ACT_FROM[name]


def hf_labels(c: Mapping[str, Any], *, source: str) -> tuple[int, dict[int, str] | None]:
    """(num_classes, id2label) of a transformers classifier's config.json: `num_labels`, else
    the number of `id2label` entries, else transformers' default of 2. Placeholder names
    (LABEL_0, ...) carry no information and come back as None."""
    id2label = c.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise CheckpointError(f"{source}: id2label must map class indices to names")
    try:
        labels = {int(k): str(v) for k, v in id2label.items()} if id2label else None
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: id2label keys must be class indices") from None
    num_classes = integer(c, "num_labels", None) if c.get("num_labels") else 0
    num_classes = num_classes or (len(labels) if labels else 2)
    if labels and len(labels) != num_classes:
        raise CheckpointError(
            f"{source} has num_labels={num_classes} but {len(labels)} id2label entries"
        )
    if labels and all(v == f"LABEL_{k}" for k, v in labels.items()):
        labels = None
    return num_classes, labels


def hf_label_fields(config: ViTConfig) -> dict[str, Any]:
    """config.json's id2label / label2id for a classifier (transformers' placeholders when
    the model has no names); empty for a model without a head."""
    if not config.num_classes:
        return {}
    labels = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_classes)}
    return {
        "id2label": {str(k): v for k, v in sorted(labels.items())},
        "label2id": {v: k for k, v in sorted(labels.items())},
    }


def mlp_ratio(hidden: int, intermediate: int) -> float:
    """A ratio that gives back exactly `intermediate` units (see `ViTConfig.mlp_hidden_dim`)."""
    return intermediate / hidden


def differences(config: ViTConfig, family: str, required: Mapping[str, Any]) -> list[str]:
    """Reasons `family`'s transformers classes cannot hold `config`: each field that differs
    from `required` (a value, or a tuple of allowed values), plus a non-square image size."""
    reasons = []
    for name, want in required.items():
        have = getattr(config, name)
        allowed = want if isinstance(want, tuple) else (want,)
        if have not in allowed:
            reasons.append(f"{name}={have!r} ({family} has {' or '.join(map(repr, allowed))})")
    h, w = config.image_hw
    if h != w:
        reasons.append(f"image_size={config.image_hw} ({family} configs are square)")
    if config.mlp_hidden_dim != round(config.embed_dim * config.mlp_ratio, 6):
        reasons.append(f"mlp_ratio={config.mlp_ratio} gives a fractional hidden size")
    return reasons


# what every transformers family below needs (each adds or overrides its own switches)
HF_BASE = dict(
    pos_embed="learned",
    dynamic_img_pad=False,
    pos_embed_interpolation="bicubic",
    pos_embed_antialias=False,
    use_fc_norm=False,
    head="linear",
    distilled=False,
    num_classes=0,
    num_register_tokens=0,
    use_mask_token=False,
    layer_scale_init=None,
    mlp_layer="mlp",
    no_embed_class=False,
    pre_norm=False,
    patch_bias=True,
    class_token=True,
    global_pool="token",
    projection_dim=None,
    qkv_bias=True,
)
