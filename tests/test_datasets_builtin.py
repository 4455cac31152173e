import torch

from vitkit.data.builtin import load_digits
from vitkit.data.datasets import epoch_order, shard_indices
from vitkit.data.transforms import Augmentation, random_hflip, random_shift


def test_digits_split_is_stratified_and_fixed():
    train, test = load_digits()
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    assert test.labels.bincount().tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    train2, test2 = load_digits()
    assert torch.equal(test.images, test2.images) and torch.equal(train.labels, train2.labels)


def test_epoch_order_and_shards():
    a, b = epoch_order(100, 0, 3), epoch_order(100, 0, 3)
    assert torch.equal(a, b) and not torch.equal(a, epoch_order(100, 0, 4))
    assert sorted(a.tolist()) == list(range(100))
    one = shard_indices(a, 1, 16, 2, 0, 1)
    two = [shard_indices(a, 1, 16, 2, r, 2) for r in range(2)]
    for m in range(2):  # the two processes together hold each micro-batch exactly once
        assert torch.equal(torch.cat([two[0][m], two[1][m]]), one[m])
    assert torch.equal(torch.cat(one), a[16:32])


def test_random_shift_moves_pixels_and_pads_with_zeros():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1) + 1
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 1, g)
    assert torch.equal(random_shift(x, 0, g), x)
    for img in y:  # every output is the input shifted by (dy, dx) in {-1, 0, 1}^2
        ok = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.nn.functional.pad(x[0], (1, 1, 1, 1))[
                    :, 1 + dy : 5 + dy, 1 + dx : 5 + dx
                ]
                ok |= torch.equal(img, ref)
        assert ok
    assert len({tuple(img.flatten().tolist()) for img in y}) > 4


def test_flip_and_batch_pipeline_are_seeded():
    x = torch.rand(32, 1, 8, 8)
    f = random_hflip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(f[i], x[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(f[i], x[i]) for i in range(32)]
    assert all(a or b for a, b in zip(flipped, kept)) and any(flipped) and any(kept)
    aug = Augmentation(random_shift=1, hflip=True, rrc_scale=(0.5, 1.0))
    a = aug.batch(x, torch.Generator().manual_seed(5))
    b = aug.batch(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(Augmentation().batch(x, torch.Generator()), x)  # nothing enabled
