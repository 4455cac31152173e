"""DeiT distillation: the loss against a hand computation, the frozen teacher, timm parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit import ConfigError, VisionTransformer, ViTConfig, create_model
from vitkit.models.distill import DistillationLoss

STUDENT = ViTConfig(
    image_size=8,
    patch_size=4,
    in_chans=1,
    num_classes=3,
    embed_dim=16,
    depth=1,
    num_heads=2,
    distilled=True,
)


class _FixedTeacher(nn.Module):
    """Returns fixed logits whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.register_buffer("out", logits)

    def forward(self, x):
        return self.out * self.w


def test_hard_and_soft_losses_equal_hand_computation():
    teacher_out = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.5, 3.0]])
    student = VisionTransformer(STUDENT)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 0])
    out = student(x)
    teacher = _FixedTeacher(teacher_out)
    hard = DistillationLoss(teacher, nn.CrossEntropyLoss(), "hard", alpha=0.3)(x, out, y)
    cls, dist = out.cls_logits, out.distillation_logits
    want = 0.7 * F.cross_entropy(cls, y) + 0.3 * F.cross_entropy(dist, torch.tensor([0, 2]))
    assert torch.allclose(hard, want, atol=1e-6)

    soft = DistillationLoss(teacher, nn.CrossEntropyLoss(), "soft", alpha=0.5, tau=2.0)(x, out, y)
    p_t = F.softmax(teacher_out / 2, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(dist / 2, dim=1))).sum() * 4 / dist.numel()
    assert torch.allclose(soft, 0.5 * F.cross_entropy(cls, y) + 0.5 * kl, atol=1e-6)

    class TupleTeacher(_FixedTeacher):  # a foreign model: (logits, ...) out
        def forward(self, x):
            return (super().forward(x), None)

    from_tuple = DistillationLoss(TupleTeacher(teacher_out), nn.CrossEntropyLoss())(x, out, y)
    assert torch.equal(from_tuple, DistillationLoss(teacher, nn.CrossEntropyLoss())(x, out, y))

    none = DistillationLoss(None, nn.CrossEntropyLoss(), "none")(x, out, y)
    assert torch.allclose(none, F.cross_entropy(cls, y))


def test_teacher_is_frozen_and_gets_no_gradient():
    teacher = _FixedTeacher(torch.randn(2, 3)).train()
    loss_fn = DistillationLoss(teacher, nn.CrossEntropyLoss(), "hard").train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not loss_fn.teacher.training
    assert not list(loss_fn.parameters())  # the teacher stays out of the student's optimizer
    student = VisionTransformer(STUDENT)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 0])
    loss_fn(x, student(x), y).backward()
    assert teacher.w.grad is None and student.head_dist.weight.grad is not None


def test_vitkit_teacher_from_preset_and_folder(tmp_path):
    teacher = VisionTransformer(STUDENT.replace(distilled=False))
    vitkit.save_pretrained(teacher, str(tmp_path), format="vitkit")
    loaded = vitkit.resolve(str(tmp_path)).model
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, teacher.eval()(x).logits, atol=1e-6)
    preset = vitkit.resolve("vit_digits_patch2_8", allow_preset=True)
    assert isinstance(preset.model, VisionTransformer) and preset.random_weights


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError):
        DistillationLoss(None, nn.CrossEntropyLoss(), "hard")
    with pytest.raises(ConfigError):
        DistillationLoss(nn.Identity(), nn.CrossEntropyLoss(), "medium")


@pytest.mark.parity
def test_timm_deit_distilled_logits_equal_vitkit_eval_logits():
    timm = pytest.importorskip("timm")
    ref = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, num_classes=7
    ).eval()
    assert ref.head_dist.weight.abs().sum() > 0  # both heads carry signal
    ours = create_model("deit_tiny_distilled_patch16_224", image_size=32, num_classes=7).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ref(x) - ours(x).logits).abs().max().item()
    assert diff <= 1e-5
