import pytest
import torch

from vitkit.data.augment import MixupCutmix, one_hot_smooth
from vitkit.errors import ConfigError


def _batch(b=6, k=5, hw=16):
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, hw, hw).clone()
    return images, torch.arange(b) % k


def test_one_hot_smooth_values():
    t = one_hot_smooth(torch.tensor([2, 0]), 4, smoothing=0.1)
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(t.sum(1), torch.ones(2))


def test_both_alphas_zero_is_identity_with_smoothing():
    images, labels = _batch()
    mix = MixupCutmix(5, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    out, targets = mix(images, labels)
    assert torch.equal(out, images)
    assert torch.allclose(targets, one_hot_smooth(labels, 5, 0.1))


def test_mixup_blends_with_reversed_batch_and_targets_sum_to_one():
    images, labels = _batch(k=6)
    mix = MixupCutmix(
        6,
        mixup_alpha=0.8,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    out, targets = mix(images, labels)
    lam = mix.last_lam
    assert 0.0 < lam < 1.0
    expected = images * lam + images.flip(0) * (1 - lam)
    assert torch.allclose(out, expected)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    # image 0 is paired with image 5: its target splits lam / 1 - lam between their labels
    assert targets[0, labels[0]] == pytest.approx(lam, abs=1e-6)
    assert targets[0, labels[5]] == pytest.approx(1 - lam, abs=1e-6)


def test_cutmix_lambda_equals_untouched_area():
    images, labels = _batch(hw=32)
    gen = torch.Generator().manual_seed(3)
    mix = MixupCutmix(5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, generator=gen)
    seen_box = False
    for _ in range(20):
        out, targets = mix(images, labels)
        # pixels that changed are exactly the box; lam = 1 - box area / image area
        changed = (out != images)[0, 0]
        frac_changed = changed.float().mean().item()
        assert mix.last_lam == pytest.approx(1 - frac_changed, abs=1e-6)
        if mix.last_box is not None and frac_changed > 0:
            seen_box = True
            y0, y1, x0, x1 = mix.last_box
            assert changed[y0:y1, x0:x1].all()
            assert torch.all(out[0, :, y0:y1, x0:x1] == 5.0)  # pasted from the partner image
        assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
        assert targets[0, labels[5]] >= 0.1 / 5
    assert seen_box


def test_generator_makes_it_deterministic():
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    runs = []
    for _ in range(2):
        mix = MixupCutmix(10, generator=torch.Generator().manual_seed(42))
        runs.append([mix(images, labels) for _ in range(5)])
    for (a, ta), (b, tb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_prob_zero_never_mixes():
    images, labels = _batch()
    mix = MixupCutmix(5, prob=0.0, label_smoothing=0.0)
    out, targets = mix(images, labels)
    assert torch.equal(out, images)
    assert torch.equal(targets.argmax(1), labels)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        MixupCutmix(5, mixup_alpha=-1)
    with pytest.raises(ConfigError):
        MixupCutmix(5, prob=2.0)
    with pytest.raises(ConfigError):
        MixupCutmix(5)(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))


def test_soft_target_cross_entropy_matches_hard_and_smoothed_ce():
    from vitkit.data.augment import soft_target_cross_entropy

    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    hard = soft_target_cross_entropy(logits, one_hot_smooth(labels, 7))
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(logits, labels))
    smooth = soft_target_cross_entropy(logits, one_hot_smooth(labels, 7, 0.1))
    ref = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(smooth, ref)


def test_random_affine_identity_rotation_and_zoom():
    from vitkit.data.transforms import random_affine

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(random_affine(x, 0.0, (1.0, 1.0), g), x, atol=1e-6)
    small = random_affine(torch.ones(1, 1, 8, 8), 0.0, (0.5, 0.5), g)  # shrunk: zero border
    assert small[0, 0, 0, 0] == 0 and small[0, 0, 4, 4] == 1
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disc = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 20).float()[None, None].repeat(8, 1, 1, 1)
    bar = torch.zeros(8, 1, 16, 16)
    bar[:, :, 7:9, 2:14] = 1
    turned_disc = random_affine(disc, 45.0, (1.0, 1.0), torch.Generator().manual_seed(1))
    turned_bar = random_affine(bar, 45.0, (1.0, 1.0), torch.Generator().manual_seed(1))
    assert (turned_disc - disc).abs().mean() < 0.05  # a disc looks the same turned
    assert (turned_bar - bar).abs().mean() > 0.02  # a bar does not


def test_random_elastic_is_torchvisions_elastic_transform_per_image():
    from torchvision.transforms.v2 import functional as TF

    from vitkit.data.transforms import random_elastic

    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(random_elastic(x, 0.0, 4.0, torch.Generator()), x, atol=1e-5)
    alpha, sigma = 34.0, 4.0
    out = random_elastic(x, alpha, sigma, torch.Generator().manual_seed(3))
    # the same noise through torchvision's own displacement recipe and elastic kernel
    noise = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for i in range(3):
        d = TF.gaussian_blur(noise[i : i + 1], [33, 33], [sigma]) * alpha / 28
        expected = TF.elastic(x[i], d.permute(0, 2, 3, 1), fill=None)  # zero padding
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    moved = (out - x).abs().mean()
    assert moved > 0.01  # a visible distortion, each image its own
    assert not torch.allclose(out[0] - x[0], out[1] - x[1])


def test_file_datasets_get_the_same_elastic_knob():
    import numpy as np
    from PIL import Image

    from vitkit.data.transforms import Augmentation

    image = Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8))
    plain = Augmentation().per_image(28, 1)(image)
    torch.manual_seed(0)
    bent = Augmentation(elastic=(34.0, 4.0)).per_image(28, 1)(image)
    assert bent.shape == plain.shape == (1, 28, 28)
    assert (bent - plain).abs().mean() > 0.01


def test_resized_crop_cuts_each_box_at_any_size():
    from vitkit.data.transforms import random_boxes, resized_crop

    x = torch.rand(3, 2, 12, 12)
    whole = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(3, 1)  # (width, height, centre x, y)
    for size in (6, 20):
        want = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(resized_crop(x, whole, size), want, atol=1e-5, rtol=0)
    quarter = torch.tensor([0.5, 0.5, 0.5, 0.5]).repeat(3, 1)  # the bottom-right quarter
    torch.testing.assert_close(resized_crop(x, quarter, 6), x[..., 6:, 6:], atol=1e-6, rtol=0)
    mirrored = whole * torch.tensor([-1.0, 1.0, 1.0, 1.0])  # a negative width flips left-right
    torch.testing.assert_close(resized_crop(x, mirrored), x.flip(-1), atol=1e-6, rtol=0)
    w, h, cx, cy = random_boxes(1000, (0.2, 0.5), torch.Generator().manual_seed(0)).unbind(1)
    assert ((w * h > 0.2 - 1e-6) & (w * h < 0.5 + 1e-6)).all()  # the area fraction drawn
    assert ((cx.abs() <= 1 - w) & (cy.abs() <= 1 - h)).all()  # inside the image
