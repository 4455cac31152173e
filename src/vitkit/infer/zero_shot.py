"""Zero-shot classification: name the classes in words, get scores, no training.

    classifier = ZeroShotClassifier(model, tokenizer, ["cat", "dog", "red car"])
    probs = classifier.probabilities(classifier(pixels))     # (B, 3)

Each label is written into prompt templates ("This is a photo of {}.", transformers' pipeline
default), the text tower embeds them once, and an image's logits are its normalised embedding
against the labels' (CLIP, Radford et al. 2021, sec. 3.1.4). With several templates (a prompt
ensemble, sec. 3.1.4) a label's embedding is the normalised mean of its prompts'. The result is
a plain classifier module, pixels -> (B, K) logits with `config.id2label` set to the labels, so
`predict`, `eval`, `serve` and the precision paths take it as they take any classifier; only
`probabilities` differs: a softmax over the labels for CLIP, a sigmoid each for SigLIP.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit import limits
from vitkit.errors import ConfigError
from vitkit.models.image_text import ImageTextModel

DEFAULT_TEMPLATE = "This is a photo of {}."  # transformers' zero-shot pipeline
TEXT_BATCH = 256  # prompts per forward pass of the text tower
MAX_LINES_BYTES = 16 << 20  # a labels or templates file


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-empty lines of a labels / templates file (UTF-8, at most 16 MiB)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_LINES_BYTES:
            raise ConfigError(f"{what} file {path} is over {MAX_LINES_BYTES >> 20} MiB")
        text = path.read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line]


def check_labels(labels: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> None:
    """Refuse what cannot make a classifier: no labels, an empty or repeated label, more labels
    than `vitkit.limits` CLASSES, a template without (or with a misplaced) `{}`."""
    if not labels:
        raise ConfigError("no labels: name at least one class")
    if not templates:
        raise ConfigError("no templates: give at least one, e.g. 'a photo of a {}.'")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"label {label!r} is empty; every label needs a name")
    seen: set[str] = set()
    repeated = [label for label in labels if label in seen or seen.add(label)]  # type: ignore[func-returns-value]
    if repeated:
        raise ConfigError(f"label {repeated[0]!r} is given twice; labels must differ")
    limits.check(len(labels), "CLASSES", "number of labels")
    for template in templates:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ConfigError(f"template {template!r} cannot be filled ({exc}); write the "
                              "label's place as {}") from None  # fmt: skip
        if "{}" not in template:
            raise ConfigError(f"template {template!r} has no {{}} for the label")


@torch.inference_mode()
def encode_texts(
    model: ImageTextModel,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = TEXT_BATCH,
    normalize: bool = True,
) -> Tensor:
    """(N, E) float32 text embeddings (L2-normalised unless `normalize=False`), on the CPU, the
    text tower run at `dtype` (fp32, bf16)."""
    tower = model.text
    device = tower.pos_embed.device
    if tower.pos_embed.dtype != dtype:
        tower = _cast(tower, dtype)
    rows = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size]))
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        out = tower(ids, mask).float()
        rows.append(F.normalize(out, dim=-1) if normalize else out)
    if not rows:
        return torch.zeros(0, model.config.text.embed_dim)
    return torch.cat(rows).cpu()


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(module).to(dtype)


class ZeroShotClassifier(nn.Module):
    """The image tower of `model` with a head made of the labels' text embeddings: pixels
    (B, C, H, W) -> (B, K) logits, `config.id2label` the labels (see the module doc).

    names: what the labels are called in the output (default: `labels`); `eval --zero-shot`
        keeps a dataset's folder names there while the prompts read them with spaces.
    text_dtype: the text tower's precision while the labels are embedded (fp32, bf16).
    """

    def __init__(
        self,
        model: ImageTextModel,
        tokenizer: Any,
        labels: Sequence[str],
        templates: Sequence[str] = (DEFAULT_TEMPLATE,),
        *,
        names: Sequence[str] | None = None,
        text_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        labels, templates = list(labels), list(templates)
        check_labels(labels, templates)
        names = list(names) if names is not None else labels
        self.vision = model.vision
        self.scores = model.config.scores
        prompts = [t.format(label) for label in labels for t in templates]
        embeds = encode_texts(model, tokenizer, prompts, dtype=text_dtype)
        embeds = embeds.reshape(len(labels), len(templates), -1)
        # one template: its embedding as it is (the pipeline's); several: their normalised mean
        embeds = embeds[:, 0] if len(templates) == 1 else F.normalize(embeds.mean(1), dim=-1)
        dtype = model.logit_scale.dtype
        self.register_buffer("text_embeds", embeds.to(device=model.logit_scale.device, dtype=dtype))
        self.register_buffer("logit_scale", model.logit_scale.detach().exp().clone())
        bias = model.logit_bias.detach().clone() if model.logit_bias is not None else None
        self.register_buffer("logit_bias", bias)
        self.config = self.vision.config.replace(
            num_classes=len(labels), id2label=dict(enumerate(names))
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.vision.forward_features(pixel_values)
        image = out.image_embeds if out.image_embeds is not None else out.pooler_output
        image = F.normalize(image, dim=-1)
        logits = image @ self.text_embeds.to(image.dtype).t() * self.logit_scale.to(image.dtype)
        return logits + self.logit_bias.to(image.dtype) if self.logit_bias is not None else logits

    def probabilities(self, logits: Tensor) -> Tensor:
        """(B, K) logits -> zero-shot scores: softmax over the labels (CLIP) or sigmoid (SigLIP)."""
        return logits.sigmoid() if self.scores == "sigmoid" else logits.softmax(-1)


def text_dtype_for(precision: str, *, strict: bool = False) -> torch.dtype:
    """The text tower's dtype for `precision`: bf16 with bf16, else fp32 (the label embeddings
    of fp16 and int8 image paths stay exact); `strict` refuses what the text tower lacks."""
    if strict and precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"--precision {precision}: the text tower runs in fp32 or bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def classifier_for(
    resolved: Any,
    labels: Sequence[str],
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    *,
    precision: str = "fp32",
    names: Sequence[str] | None = None,
) -> ZeroShotClassifier:
    """The `ZeroShotClassifier` of a `resolve(source, text=True)` result."""
    if resolved.image_text is None:
        raise ConfigError(f"{resolved.source} has no text tower: load it with text=True")
    if resolved.tokenizer is None:
        raise ConfigError(f"{resolved.source} has no tokenizer files (tokenizer.json, vocab.json "
                          "+ merges.txt, or spiece.model): zero-shot needs them")  # fmt: skip
    return ZeroShotClassifier(resolved.image_text, resolved.tokenizer, labels, templates,
                              names=names, text_dtype=text_dtype_for(precision))  # fmt: skip
