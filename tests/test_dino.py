"""DINO: loss decreases on a tiny batch, the teacher gets no gradients, exact EMA and center
updates, schedules, multi-crop shapes and flips; two processes with the head's BatchNorm train
to one process's weights."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from conftest import free_port
from vitkit import ViTConfig
from vitkit.data.transforms import MultiCrop
from vitkit.models.dino import DINO, DINOLoss, teacher_momentum
from vitkit.train.ema import ModelEMA

TINY = ViTConfig(
    image_size=8, patch_size=2, in_chans=1, num_classes=0, embed_dim=32, depth=2, num_heads=2
)


def _model(n_local=2, use_bn=False, **loss_kwargs):
    return DINO(TINY, out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local_crops=n_local,
                use_bn=use_bn, **loss_kwargs)  # fmt: skip


def _teacher_ema(model):
    """The teacher's average as DINOObjective keeps it."""
    return ModelEMA(model.student, module=model.teacher, params_only=True)


def test_loss_is_finite_and_decreases_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    # a frozen center isolates the student's fit to the (slowly moving) teacher; with a moving
    # center the loss first rises on one batch, as the center flattens the teacher's targets
    model = _model(center_momentum=1.0).train()
    images = torch.rand(8, 1, 8, 8)
    crops = MultiCrop(8, patch_size=2, n_local=2).batch(images)
    opt = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=3e-4)
    ema = _teacher_ema(model)
    losses = []
    for step in range(6):
        loss = model(crops, progress=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model.student, teacher_momentum(step, 6))
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_ema_update_is_exact_and_leaves_the_teacher_its_batchnorm_statistics():
    a, b = _model(use_bn=True), _model(use_bn=True)
    b.train()(MultiCrop(8, patch_size=2, n_local=2).batch(torch.rand(4, 1, 8, 8)))
    before = [p.clone() for p in a.teacher.parameters()]
    buffers = {k: v.clone() for k, v in a.teacher.named_buffers()}
    _teacher_ema(a).update(b.student, 0.9)
    for t, old, s in zip(a.teacher.parameters(), before, b.student.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * old + 0.1 * s, atol=1e-7, rtol=0)
    assert buffers and all(torch.equal(v, buffers[k]) for k, v in a.teacher.named_buffers())


def test_center_update_and_loss_value_are_exact():
    loss_fn = DINOLoss(
        4, student_temp=0.1, teacher_temp=0.05, warmup_fraction=0.0, center_momentum=0.9
    )
    loss_fn.center.fill_(0.5)
    student, teacher = torch.randn(3 * 2, 4), torch.randn(2 * 2, 4)
    loss = loss_fn(student, teacher, n_crops=3)
    q = F.softmax((teacher - 0.5) / 0.05, dim=-1).chunk(2)
    s = F.log_softmax(student / 0.1, dim=-1).chunk(3)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    want = sum((-q[i] * s[v]).sum(-1).mean() for i, v in pairs) / 4
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.allclose(loss_fn.center, 0.9 * 0.5 + 0.1 * teacher.mean(0, keepdim=True))


def test_schedules():
    assert teacher_momentum(0, 100) == 0.996 and teacher_momentum(99, 100) == 1.0
    assert abs(teacher_momentum(50, 101) - 0.998) < 1e-12
    fn = DINOLoss(4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_fraction=0.5)
    assert fn.teacher_temperature(0.0) == 0.04 and abs(fn.teacher_temperature(0.25) - 0.055) < 1e-9
    assert fn.teacher_temperature(0.9) == 0.07


def test_head_last_layer_has_unit_norm_and_crops_have_patch_multiple_sizes():
    model = _model()
    w = model.student.head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-5)
    crops = MultiCrop(28, patch_size=4, n_local=3).batch(torch.rand(2, 1, 28, 28))
    assert [tuple(c.shape) for c in crops] == [(2, 1, 28, 28)] * 2 + [(2, 1, 12, 12)] * 3


def test_batched_crops_are_per_image_and_keep_values():
    torch.manual_seed(0)
    crops = MultiCrop(16, patch_size=4, n_local=1).batch(torch.full((4, 1, 16, 16), 0.25))
    assert all(torch.allclose(c, torch.full_like(c, 0.25)) for c in crops)
    ramp = torch.arange(16.0).expand(16, 16).reshape(1, 1, 16, 16).repeat(6, 1, 1, 1)
    views = MultiCrop(16, patch_size=4, n_local=1).batch(ramp)[0]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 6  # each image its own crop


def test_hflip_false_never_flips():
    ramp = torch.arange(16.0).expand(16, 16).reshape(1, 1, 16, 16).repeat(32, 1, 1, 1)

    def mirrored(hflip: bool) -> Tensor:  # per view and image: does the ramp fall left to right
        views = MultiCrop(16, patch_size=4, n_local=2, hflip=hflip).batch(ramp, torch.Generator())
        return torch.stack([(v.diff(dim=-1) < 0).flatten(1).any(1) for v in views])

    assert not mirrored(False).any()
    assert 0.3 < mirrored(True).float().mean() < 0.7


def _train_steps(rank: int = 0, world: int = 1, steps: int = 3) -> DINO:
    """`steps` SGD steps of a DINO with the head's BatchNorm on this process's rows of one global
    batch of 8 images, gradients averaged over the processes as DDP does."""
    torch.manual_seed(0)
    model = _model(use_bn=True).train()
    ema = _teacher_ema(model)
    opt = torch.optim.SGD([p for p in model.student.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(1)
    rows = 8 // world
    for step in range(steps):
        crops = MultiCrop(8, patch_size=2, n_local=2).batch(torch.rand(8, 1, 8, 8, generator=g), g)
        loss = model([c[rank * rows : (rank + 1) * rows] for c in crops], progress=step / steps)
        opt.zero_grad()
        loss.backward()
        for p in model.student.parameters():
            if p.grad is not None and world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        ema.update(model.student, teacher_momentum(step, steps))
    return model


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        model = _train_steps(rank, 2)
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_head_batchnorm_match_one(tmp_path):
    """The head's BatchNorm normalises by the global batch's statistics (forward and backward,
    student and teacher), so two processes train to one's weights, running statistics and
    center (MAE's tolerances)."""
    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2)
    one, two = _train_steps().state_dict(), torch.load(out)
    assert sum(k.endswith("running_var") for k in one) == 4  # 2 norms x (student, teacher)
    assert one.keys() == two.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
