"""Why a ViT decided what it did: relevance of each image patch, by three methods.

- "attention": the last layer's attention from the readout token to the patches, per head and
  averaged over heads.
- "rollout": attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in
  Transformers"). Per layer the heads are fused (mean, max or min), the lowest `discard_ratio`
  of the fused matrix is zeroed, the residual is added as (A + I) / 2 with rows renormalised,
  and the layers are multiplied together: R = A_L ... A_1.
- "grad-rollout": class-specific relevance of Chefer et al. 2021 ("Generic Attention-model
  Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"):
  R = I; for each layer R += mean_heads((dy_c/dA * A)^+) R, for the class c asked (default:
  the top-1 class).

The readout is the token(s) the head reads: [CLS]; [CLS] and [DIST] averaged for a distilled
DeiT (its logits average both heads); the mean of the patch rows for a model that pools the
patches instead of reading [CLS]; half [CLS], half the patch mean for DINOv2's classifier
(`global_pool="token_avg"`). Register tokens take part in the flow but are not image
locations, so maps cover the patch grid only. Only the layers a method needs materialise their
attention probabilities (`output_attentions=`); the others keep the fused SDPA kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from vitkit._names import HEAD_FUSIONS, METHODS
from vitkit.data.images import load_image
from vitkit.errors import ConfigError
from vitkit.models.vit import VisionTransformer
from vitkit.viz import heatmap_overlay

if TYPE_CHECKING:
    from PIL import Image

    from vitkit.data.processor import ImageProcessor

__all__ = [
    "HEAD_FUSIONS",
    "METHODS",
    "Explanation",
    "attention_map",
    "attention_rollout",
    "explain",
    "explain_image",
    "grad_rollout",
    "label_index",
]

Method = Literal["attention", "rollout", "grad-rollout"]
HeadFusion = Literal["mean", "max", "min"]


@dataclass
class Explanation:
    """Relevance maps of a batch of images.

    maps: (B, gh, gw) float32 relevance of each patch (for "attention": the mean over heads).
    head_maps: (B, heads, gh, gw) per head ("attention" only, else None).
    labels: (B,) the class each map explains: the one asked for, else the top-1 class
        (None for a model without a classification head).
    probabilities: (B, K) softmax of the logits (None without a head).
    """

    method: str
    maps: Tensor
    head_maps: Tensor | None = None
    labels: Tensor | None = None
    probabilities: Tensor | None = None


def explain(
    model: VisionTransformer,
    pixel_values: Tensor,
    method: Method = "rollout",
    *,
    label: int | Sequence[int] | Tensor | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Relevance maps of `pixel_values` (B, C, H, W) by `method` (see the module docstring).

    `label` picks the class grad-rollout explains (one per image or one for all; default: the
    top-1 class); `head_fusion` and `discard_ratio` apply to rollout.
    """
    if method == "attention":
        return attention_map(model, pixel_values)
    if method == "rollout":
        return attention_rollout(
            model, pixel_values, head_fusion=head_fusion, discard_ratio=discard_ratio
        )
    if method == "grad-rollout":
        return grad_rollout(model, pixel_values, label=label)
    raise ConfigError(f"unknown explanation method {method!r}; choose one of {METHODS}")


def explain_image(
    model: VisionTransformer,
    processor: ImageProcessor,
    image: Any,
    method: Method = "rollout",
    *,
    label: int | None = None,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    with_image: bool = True,
    per_head: bool = True,
    max_side: int | None = 512,
) -> tuple[Explanation, Image.Image]:
    """Explain one image (a path, encoded bytes or a PIL image) and draw it.

    The image goes through `processor` exactly as for prediction; the map is drawn over the
    region the model saw (`processor.crop_box`), after the plain image when `with_image`, and
    for "attention" followed by one panel per head when `per_head`. Raises `ImageError` for an
    unreadable image.
    """
    picture = load_image(image, background=processor.background, max_pixels=processor.max_pixels)
    device = next(model.parameters()).device
    pixels = processor([picture]).to(device)  # (1, C, H, W), as `vitkit predict` prepares it
    result = explain(
        model, pixels, method, label=label, head_fusion=head_fusion, discard_ratio=discard_ratio
    )
    maps = result.maps[0][None]  # (1, gh, gw)
    if result.head_maps is not None and per_head:
        maps = torch.cat([maps, result.head_maps[0]])  # (1 + heads, gh, gw)
    view = picture.crop(processor.crop_box(picture.width, picture.height))
    drawn = heatmap_overlay(view, maps, max_side=max_side, with_image=with_image)
    return result, drawn


def label_index(label: str | int, id2label: dict[int, str]) -> int:
    """A class given as an index ("207") or a name (exact, or one of the comma-separated
    synonyms ImageNet names carry: "golden retriever"), case-insensitive -> its index."""
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    wanted = text.casefold()
    for index, name in id2label.items():
        synonyms = [s.strip().casefold() for s in name.split(",")]
        if wanted == name.casefold() or wanted in synonyms:
            return int(index)
    raise ConfigError(f"no class named {text!r}; pass a class index or one of the model's labels")


@torch.inference_mode()
def attention_map(model: VisionTransformer, pixel_values: Tensor) -> Explanation:
    """The last layer's attention from the readout token(s) to every patch, per head."""
    out = model(pixel_values, output_attentions=[-1])
    attn = out.attentions[-1].float()  # (B, H, T, T)
    w = _readout(model, attn.shape[-1], attn.device)  # (T,)
    per_head = torch.einsum("t,bhtu->bhu", w, attn)  # (B, H, T)
    per_head = _to_grid(model, per_head, pixel_values)  # (B, H, gh, gw)
    return Explanation(
        "attention", per_head.mean(1), per_head, *_prediction(model, out.logits, None)
    )


@torch.inference_mode()
def attention_rollout(
    model: VisionTransformer,
    pixel_values: Tensor,
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> Explanation:
    """Attention rollout (Abnar & Zuidema 2020) through every layer."""
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head_fusion={head_fusion!r}; choose one of {HEAD_FUSIONS}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio={discard_ratio} must be in [0, 1)")
    out = model(pixel_values, output_attentions=True)
    B, _, T, _ = out.attentions[0].shape
    eye = torch.eye(T, device=pixel_values.device)
    rollout = eye.expand(B, T, T)
    for attn in out.attentions:
        a = _fuse(attn.float(), head_fusion)  # (B, T, T)
        if discard_ratio:
            flat = a.flatten(1)  # (B, T*T); the lowest entries are treated as noise
            drop = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            a = flat.scatter(1, drop, 0.0).view(B, T, T)
        a = (a + eye) / 2  # the residual connection
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    relevance = torch.einsum("t,btu->bu", _readout(model, T, eye.device), rollout)  # (B, T)
    maps = _to_grid(model, relevance, pixel_values)
    return Explanation("rollout", maps, None, *_prediction(model, out.logits, None))


def grad_rollout(
    model: VisionTransformer,
    pixel_values: Tensor,
    *,
    label: int | Sequence[int] | Tensor | None = None,
) -> Explanation:
    """Gradient-weighted relevance of Chefer et al. 2021 for `label` (default: top-1)."""
    if model.config.num_classes == 0:
        raise ConfigError("grad-rollout explains a class: the model has no classification head")
    with torch.enable_grad():
        # the input asks for gradients so the graph exists even when the weights are frozen
        x = pixel_values.detach().requires_grad_(True)
        out = model(x, output_attentions=True)
        labels, probs = _prediction(model, out.logits, label)
        score = out.logits.gather(1, labels[:, None].to(out.logits.device)).sum()
        grads = torch.autograd.grad(score, out.attentions)
    B, _, T, _ = out.attentions[0].shape
    relevance = torch.eye(T, device=x.device).expand(B, T, T)
    for attn, grad in zip(out.attentions, grads):
        cam = (grad.float() * attn.detach().float()).clamp(min=0).mean(1)  # (B, T, T)
        relevance = relevance + cam @ relevance
    rows = torch.einsum("t,btu->bu", _readout(model, T, x.device), relevance)
    return Explanation("grad-rollout", _to_grid(model, rows, pixel_values), None, labels, probs)


def _readout(model: VisionTransformer, num_tokens: int, device: torch.device) -> Tensor:
    """(T,) weights of the token rows the head reads (see the module docstring)."""
    c = model.config
    w = torch.zeros(num_tokens, device=device)
    if c.class_token and c.global_pool == "token":
        distilled = getattr(model, "head_dist", None) is not None
        w[: 2 if distilled else 1] = 0.5 if distilled else 1.0
    elif c.global_pool == "token_avg":  # [CLS] and the patch mean, side by side: half each
        w[0] = 0.5
        w[c.num_prefix_tokens :] = 0.5 / (num_tokens - c.num_prefix_tokens)
    else:  # mean pooling, or any pooling over the patch tokens
        w[c.num_prefix_tokens :] = 1.0 / (num_tokens - c.num_prefix_tokens)
    return w


def _to_grid(model: VisionTransformer, tokens: Tensor, pixel_values: Tensor) -> Tensor:
    """(..., T) values per token -> (..., gh, gw) over the patches (prefix tokens dropped)."""
    gh, gw = model.patch_embed.grid_size(*pixel_values.shape[-2:])
    patches = tokens[..., model.config.num_prefix_tokens :]
    return patches.reshape(*patches.shape[:-1], gh, gw).float().detach()


def _fuse(attn: Tensor, how: str) -> Tensor:
    """(B, H, T, T) -> (B, T, T) across heads."""
    if how == "mean":
        return attn.mean(1)
    return attn.amax(1) if how == "max" else attn.amin(1)


def _prediction(
    model: VisionTransformer,
    logits: Tensor | None,
    label: int | Sequence[int] | Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """(labels (B,), probabilities (B, K)): `label` broadcast to the batch, else the top-1."""
    if logits is None or model.config.num_classes == 0:
        return None, None
    probs = logits.detach().float().softmax(-1)
    B, K = probs.shape
    if label is None:
        return probs.argmax(-1), probs
    labels = torch.as_tensor(label, dtype=torch.long, device=probs.device).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(B)
    if labels.numel() != B:
        raise ConfigError(f"{labels.numel()} labels for a batch of {B} images")
    bad = [int(v) for v in labels if not 0 <= int(v) < K]
    if bad:
        raise ConfigError(f"label {bad[0]} is out of range for a model with {K} classes")
    return labels, probs
