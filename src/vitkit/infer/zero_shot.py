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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit import limits
from vitkit.errors import ConfigError
from vitkit.features import pool_output
from vitkit.models.image_text import ImageTextModel, joint_logits, zero_shot_scores
from vitkit.models.text import TextTransformer

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
    than `vitkit.limits` CLASSES, and the templates `check_templates` refuses."""
    if not labels:
        raise ConfigError("no labels: name at least one class")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"label {label!r} is empty; every label needs a name")
    repeated = next((label for label, n in Counter(labels).items() if n > 1), None)
    if repeated is not None:
        raise ConfigError(f"label {repeated!r} is given twice; labels must differ")
    limits.check(len(labels), "CLASSES", "number of labels")
    check_templates(templates)


def check_templates(templates: Sequence[str]) -> None:
    """Refuse no templates, or one without (or with a misplaced) `{}` for the label."""
    if not templates:
        raise ConfigError("no templates: give at least one, e.g. 'a photo of a {}.'")
    for template in templates:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ConfigError(f"template {template!r} cannot be filled ({exc}); write the "
                              "label's place as {}") from None  # fmt: skip
        if "{}" not in template:
            raise ConfigError(f"template {template!r} has no {{}} for the label")


def text_tower(model: ImageTextModel, dtype: torch.dtype = torch.float32) -> TextTransformer:
    """`model`'s text tower at `dtype` (fp32, bf16): the tower itself, or a copy cast once (keep
    it where texts keep coming, as `vitkit serve` does)."""
    tower = model.text
    return tower if tower.pos_embed.dtype == dtype else copy.deepcopy(tower).to(dtype)


@torch.inference_mode()
def encode_texts(
    tower: TextTransformer,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = TEXT_BATCH,
    normalize: bool = True,
) -> Tensor:
    """(N, E) float32 text embeddings (L2-normalised unless `normalize=False`), on the CPU, by a
    text tower at its own precision (`text_tower`)."""
    device = tower.pos_embed.device
    rows = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size]))
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        out = tower(ids, mask).float()
        rows.append(F.normalize(out, dim=-1) if normalize else out)
    if not rows:
        return torch.zeros(0, tower.config.embed_dim)
    return torch.cat(rows).cpu()


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
        embeds = encode_texts(text_tower(model, text_dtype), tokenizer, prompts)
        embeds = embeds.reshape(len(labels), len(templates), -1)
        # one template: its embedding as it is (the pipeline's); several: their normalised mean
        embeds = embeds[:, 0] if len(templates) == 1 else F.normalize(embeds.mean(1), dim=-1)
        dtype = model.logit_scale.dtype
        self.register_buffer("text_embeds", embeds.to(device=model.logit_scale.device, dtype=dtype))
        self.register_buffer("logit_scale", model.logit_scale.detach().clone())
        bias = model.logit_bias.detach().clone() if model.logit_bias is not None else None
        self.register_buffer("logit_bias", bias)
        self.config = self.vision.config.replace(
            num_classes=len(labels), id2label=dict(enumerate(names))
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        image = pool_output(self.vision.forward_features(pixel_values), self.vision.config)
        return joint_logits(F.normalize(image, dim=-1), self.text_embeds, self.logit_scale,
                            self.logit_bias)  # fmt: skip

    def probabilities(self, logits: Tensor) -> Tensor:
        """(B, K) logits -> zero-shot scores: softmax over the labels (CLIP) or sigmoid (SigLIP)."""
        return zero_shot_scores(logits, self.scores)


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
