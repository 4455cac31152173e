"""Shared pieces of the checkpoint mappings: one `CheckpointError` that lists every problem, the
rule engine every foreign format's table runs on (`Rule`, `rename_from`, `rename_to`), and the
config.json fields transformers' families share (`build_config` turns them into a config)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from vitkit.config import ViTConfig
from vitkit.errors import CheckpointError, ConfigError
from vitkit.limits import is_finite, is_int
from vitkit.models.image_text import ImageTextConfig, ImageTextModel
from vitkit.models.text import TextConfig, TextTransformer
from vitkit.models.vit import VisionTransformer

_MAX_LISTED = 12

AnyConfig = ViTConfig | TextConfig | ImageTextConfig
"""What a checkpoint holds: an image model, a text tower, or both towers (CLIP / SigLIP)."""


def model_class(config: AnyConfig) -> type[torch.nn.Module]:
    """The vitkit module a config builds: `VisionTransformer`, `TextTransformer` or
    `ImageTextModel`."""
    if isinstance(config, ImageTextConfig):
        return ImageTextModel
    return TextTransformer if isinstance(config, TextConfig) else VisionTransformer


def expected_state(config: AnyConfig) -> dict[str, Tensor]:
    """The state dict the model of `config` has (`model_class`), as `meta` tensors (names,
    shapes and dtypes, nothing allocated)."""
    with torch.device("meta"):
        return model_class(config)(config).state_dict()


def expected_shapes(config: AnyConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict the model of `config` has."""
    return {k: tuple(v.shape) for k, v in expected_state(config).items()}


def no_text_tower(source: str, what: str) -> CheckpointError:
    """The error for a checkpoint loaded with its text tower that has none."""
    return CheckpointError(
        f"{source} has no text tower: it is {what}. Zero-shot classification and text "
        f"embeddings need a CLIP or SigLIP checkpoint with both towers (a transformers "
        f"CLIPModel / SiglipModel folder, an open_clip checkpoint, or a vitkit image-text folder)"
    )


def with_text(text: bool | str, has_text: bool, *, source: str, what: str) -> bool:
    """Whether to load a checkpoint's text tower: `text=True` needs one (else `no_text_tower`),
    "auto" takes it when there is one, False never."""
    if text is True and not has_text:
        raise no_text_tower(source, what)
    return has_text and text in (True, "auto")


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
    sd: Mapping[str, Tensor],
    config: AnyConfig,
    *,
    source: str,
    hint: str = "",
    strict: bool | None = None,
    fresh: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """The model's state as `meta` tensors, once `sd` is checked against it: one
    `CheckpointError` naming every missing and unexpected key and each shape conflict.

    `strict=None` checks a state dict that must fit exactly; `True` / `False` check one being
    loaded (the error hints at `strict=False`, which turns missing and unexpected keys into a
    warning; shape conflicts always raise). Keys starting with `fresh` (a new head) may be missing.
    """
    meta = expected_state(config)
    expected = {k: tuple(v.shape) for k, v in meta.items()}
    missing = [k for k in expected if k not in sd and not k.startswith(fresh)]
    unexpected = [k for k in sd if k not in expected]
    conflicts = {
        k: (expected[k], tuple(v.shape))
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != expected[k]
    }
    if conflicts or (strict is not False and (missing or unexpected)):
        if strict is not None:
            hint = "check model_name/config, num_classes and image_size" if conflicts else (
                "pass strict=False to load what matches")  # fmt: skip
        raise mismatch_error(
            source, missing=missing, unexpected=unexpected, conflicts=conflicts, hint=hint
        )
    if missing or unexpected:
        warning = mismatch_error(source, missing=missing, unexpected=unexpected)
        warnings.warn(str(warning), stacklevel=4)
    return meta


# A rule maps vitkit names to foreign (name, shape)s, both ways: the tensors of one side are
# flattened, concatenated in order and split into the other side's shapes. That covers renames,
# reshapes ((D,) <-> (1, 1, D)), fused q/k/v (three <-> one) and split ones (in_proj <-> q + kv).
# A shape of None is the vitkit tensor's own. A `Hook` handles layouts a reshape cannot: it
# turns each foreign tensor into vitkit's layout (before the merge) and a flat part back into
# the foreign shape (after the split), e.g. Flax's (in, out) kernels <-> PyTorch's (out, in).
Hook = tuple[Callable[[Tensor], Tensor], Callable[[Tensor, tuple[int, ...]], Tensor]]


class Rule(NamedTuple):
    ours: tuple[str, ...]
    theirs: tuple[tuple[str, tuple[int, ...] | None], ...]
    hook: Hook | None = None


def same(
    ours: str, theirs: str, shape: tuple[int, ...] | None = None, hook: Hook | None = None
) -> Rule:
    """One tensor under another name (and perhaps another shape or layout)."""
    return Rule((ours,), ((theirs, shape),), hook)


def weight_and_bias(ours: str, theirs: str) -> list[Rule]:
    """A layer's weight and bias under another name, same shapes (a Linear or a LayerNorm)."""
    return [same(f"{ours}.weight", f"{theirs}.weight"), same(f"{ours}.bias", f"{theirs}.bias")]


def fused_qkv(ours: str, theirs: Iterable[str], dim: int, bias: bool = True) -> list[Rule]:
    """vitkit's one q/k/v projection from three separate ones (q, k, v in that order)."""
    theirs = list(theirs)
    rules = [Rule((f"{ours}.weight",), tuple((f"{t}.weight", (dim, dim)) for t in theirs))]
    if bias:
        rules.append(Rule((f"{ours}.bias",), tuple((f"{t}.bias", (dim,)) for t in theirs)))
    return rules


def block_rules(
    ours: str, theirs: str, names: Mapping[str, str], dim: int, qkv_bias: bool = True
) -> list[Rule]:
    """One transformer block: vitkit's at `ours` ("blocks.3.") <-> a layer at `theirs` whose
    sublayers `names` spells (keys ln1, q, k, v, o, ln2, fc1, fc2; or `qkv` instead of q, k, v
    for one fused projection whose tensors are `{qkv}weight` and `{qkv}bias`, as
    `nn.MultiheadAttention`'s `in_proj_`)."""
    n = {k: theirs + v for k, v in names.items()}
    if "qkv" in n:
        qkv = [same(f"{ours}attn.qkv.weight", f"{n['qkv']}weight")]
        qkv += [same(f"{ours}attn.qkv.bias", f"{n['qkv']}bias")] if qkv_bias else []
    else:
        qkv = fused_qkv(f"{ours}attn.qkv", [n["q"], n["k"], n["v"]], dim, qkv_bias)
    return [
        *weight_and_bias(f"{ours}norm1", n["ln1"]),
        *qkv,
        *weight_and_bias(f"{ours}attn.proj", n["o"]),
        *weight_and_bias(f"{ours}norm2", n["ln2"]),
        *weight_and_bias(f"{ours}mlp.fc1", n["fc1"]),
        *weight_and_bias(f"{ours}mlp.fc2", n["fc2"]),
    ]


def under(rules: Iterable[Rule], theirs: str = "", ours: str = "") -> list[Rule]:
    """`rules` with their foreign names under `theirs` and vitkit's under `ours`."""
    return [
        Rule(tuple(ours + k for k in r.ours), tuple((theirs + n, s) for n, s in r.theirs), r.hook)
        for r in rules
    ]


def rename_from(
    sd: Mapping[str, Tensor],
    rules: Iterable[Rule],
    expected: AnyConfig | Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    source: str,
) -> dict[str, Tensor]:
    """vitkit state dict from a foreign one by `rules`, for a model of `expected` (a config, or
    names and shapes; a name it lacks takes the file's shape). Keys starting with an entry of
    `ignore` are skipped on purpose; anything else that does not map, a missing key or a shape
    other than the rule's raises one `CheckpointError` that names the file's keys."""
    if not isinstance(expected, Mapping):
        expected = expected_shapes(expected)
    ignore, rules = tuple(ignore), list(rules)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    covered = {k for r in rules for k in r.ours}
    missing = [k for k in expected if k not in covered]  # the format has no name for these
    conflicts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for ours, theirs, hook in rules:
        failed = len(missing) + len(conflicts)
        for name, shape in theirs:  # a shape of None (renames only): as vitkit's
            used.add(name)
            want, got = shape or expected.get(ours[0]), sd[name].shape if name in sd else None
            if got is None:
                missing.append(name)
            elif want is not None and tuple(got) != tuple(want):
                conflicts[f"{name} -> {'+'.join(ours)}"] = (tuple(want), tuple(got))
        if len(missing) + len(conflicts) > failed:
            continue
        parts = [hook[0](sd[n]) if hook else sd[n] for n, _ in theirs]
        if len(ours) == 1:  # a rename (no copy) or a merge
            merged = parts[0] if len(parts) == 1 else torch.cat(parts)
            out[ours[0]] = merged.reshape(expected.get(ours[0], merged.shape)).contiguous()
            continue
        flat = torch.cat([p.reshape(-1) for p in parts])
        for key, part in zip(ours, flat.split([math.prod(expected[k]) for k in ours]), strict=True):
            out[key] = part.reshape(expected[key]).clone()
    unexpected = [k for k in sd if k not in used and not k.startswith(ignore)]
    if missing or unexpected or conflicts:
        raise mismatch_error(source, missing=missing, unexpected=unexpected, conflicts=conflicts)
    return out


def rename_to(sd: Mapping[str, Tensor], rules: Iterable[Rule]) -> dict[str, Tensor]:
    """A foreign state dict from a vitkit one by `rules` (the inverse of `rename_from`).
    Raises `CheckpointError` naming the vitkit parameters no rule covers."""
    rules = list(rules)
    covered = {k for r in rules for k in r.ours}
    unmapped = sorted(k for k in sd if k not in covered)
    if unmapped:
        raise CheckpointError(
            f"these vitkit parameters have no equivalent in the target format: "
            f"{_listing(unmapped)}; save with format='vitkit'"
        )
    out: dict[str, Tensor] = {}
    for ours, theirs, hook in rules:
        flat = torch.cat([sd[k].reshape(-1) for k in ours]) if len(ours) > 1 else sd[ours[0]]
        shapes = [shape or tuple(sd[ours[0]].shape) for _, shape in theirs]
        parts = (
            flat.reshape(-1).split([math.prod(s) for s in shapes]) if len(theirs) > 1 else [flat]
        )
        for (name, _), shape, part in zip(theirs, shapes, parts, strict=True):
            part = hook[1](part, shape) if hook else part.reshape(shape)
            shared = len(theirs) > 1 and part.is_contiguous()  # a view of one split tensor
            out[name] = part.clone() if shared else part.contiguous()
    return out


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
_C = TypeVar("_C")


def build_config(cls: Callable[..., _C], source: str, what: str = "model", /, **fields: Any) -> _C:
    """`cls(**fields)`, a `ConfigError` raised as a `CheckpointError` naming the file `source`."""
    try:
        return cls(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{source} describes an invalid {what}: {exc}") from exc


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


def hf_act(name: Any, *, source: str) -> str:
    if not isinstance(name, str) or name not in HF_ACT_FROM:
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
    num_classes = integer(c, "num_labels", None, source=source) if c.get("num_labels") else 0
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


def hf_fields(config: ViTConfig, **extra: Any) -> dict[str, Any]:
    """The config.json fields every transformers family spells the same way, and `extra`."""
    c = config
    return {
        "hidden_size": c.embed_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "hidden_act": HF_ACT_TO[c.act],
        "layer_norm_eps": c.layer_norm_eps,
        "image_size": c.image_hw[0],
        "patch_size": c.patch_size,
        "num_channels": c.in_chans,
        **extra,
    }


def differences(
    config: ViTConfig | TextConfig, family: str, required: Mapping[str, Any], *, square: bool = True
) -> list[str]:
    """Reasons `family`'s transformers classes cannot hold `config`, an image model or a text
    tower (whose reasons start with "text "): each field that differs from `required` (a value,
    or a tuple of allowed values), a non-square image size where the family's configs are
    `square`, and an `mlp_ratio` that gives a fractional hidden size."""
    image = isinstance(config, ViTConfig)
    tag, width = ("", config.embed_dim) if image else ("text ", config.width)
    reasons = []
    for name, want in required.items():
        have = getattr(config, name)
        allowed = want if isinstance(want, tuple) else (want,)
        if have not in allowed:
            reasons.append(f"{tag}{name}={have!r} ({family} has {' or '.join(map(repr, allowed))})")
    if image and square and config.image_hw[0] != config.image_hw[1]:
        reasons.append(f"image_size={config.image_hw} ({family} configs are square)")
    if config.mlp_hidden_dim != round(width * config.mlp_ratio, 6):
        reasons.append(f"{tag}mlp_ratio={config.mlp_ratio} gives a fractional hidden size")
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
