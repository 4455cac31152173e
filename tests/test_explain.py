import pytest
import torch

from vitkit import VisionTransformer, ViTConfig
from vitkit.errors import ConfigError
from vitkit.explain import METHODS, explain

SIZE, PATCH, GRID = 32, 8, 4  # a 4x4 patch grid; the top-left quadrant is its 2x2 corner
REGION = torch.zeros(GRID, GRID, dtype=torch.bool)
REGION[:2, :2] = True

VARIANTS = {
    "cls": {},
    "mean-pool+registers": dict(class_token=False, global_pool="avg", num_register_tokens=2),
    "deit+register": dict(distilled=True, num_register_tokens=1),
}


def _square_task(n, generator):
    """Noise images; class 1 has a bright 8x8 square somewhere in the top-left quadrant."""
    x = torch.randn(n, 3, SIZE, SIZE, generator=generator) * 0.5
    y = torch.randint(0, 2, (n,), generator=generator)
    for i in range(n):
        if y[i]:
            r, c = torch.randint(0, 9, (2,), generator=generator).tolist()
            x[i, :, r : r + 8, c : c + 8] += 2.0
    return x, y


def _tiny(**changes):
    base = dict(
        image_size=SIZE, patch_size=PATCH, num_classes=2, embed_dim=32, depth=3, num_heads=2,
        mlp_ratio=2.0,
    )  # fmt: skip
    return VisionTransformer(ViTConfig(**{**base, **changes}))


@pytest.fixture(scope="module")
def trained():
    """One tiny ViT per variant trained on the square task (about a second each, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two on a shared machine at this size
    models = {}
    try:
        for name, changes in VARIANTS.items():
            torch.manual_seed(0)
            model = _tiny(**changes)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
            g = torch.Generator().manual_seed(0)
            for _ in range(100):
                x, y = _square_task(64, g)
                loss = torch.nn.functional.cross_entropy(model(x).logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            models[name] = model.eval()
    finally:
        torch.set_num_threads(threads)
    x, y = _square_task(192, torch.Generator().manual_seed(1))
    return models, x[y == 1][:48]


def _delete(x, patches):
    """Zero (the dataset mean) the given patch indices of each image."""
    x = x.clone()
    for i, row in enumerate(patches.tolist()):
        for p in row:
            r, c = divmod(p, GRID)
            x[i, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 0.0
    return x


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_relevance_lands_on_the_deciding_region(trained, variant, method):
    models, x = trained
    model = models[variant]
    with torch.no_grad():
        probs = model(x).logits.softmax(-1)[:, 1]
    assert (probs > 0.5).float().mean() > 0.95  # the model solved the task

    e = explain(model, x, method, label=1)
    assert e.maps.shape == (len(x), GRID, GRID)
    flat = e.maps.flatten(1)
    top2 = flat.topk(2, dim=1).indices
    in_region = REGION.flatten()[top2].float().mean().item()
    assert in_region >= 0.85, f"{method}: only {in_region:.0%} of the top patches in the region"

    k = 4
    random_patches = torch.stack(
        [torch.randperm(GRID * GRID, generator=torch.Generator().manual_seed(i))[:k] for i in
         range(len(x))]
    )  # fmt: skip
    with torch.no_grad():
        drop_top = probs - model(_delete(x, flat.topk(k, dim=1).indices)).logits.softmax(-1)[:, 1]
        drop_random = probs - model(_delete(x, random_patches)).logits.softmax(-1)[:, 1]
    assert drop_top.mean() > drop_random.mean() + 0.3


def test_one_layer_rollout_is_half_the_attention():
    """With one layer and mean fusion, rollout's [CLS] row is (A + I) / 2: half the attention."""
    model = _tiny(depth=1).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    att = explain(model, x, "attention")
    roll = explain(model, x, "rollout")
    torch.testing.assert_close(roll.maps, 0.5 * att.maps)
    assert att.head_maps.shape == (2, 2, GRID, GRID)
    torch.testing.assert_close(att.maps, att.head_maps.mean(1))


def test_readout_rows_for_each_token_layout():
    """Any resolution; [CLS] and [DIST] rows averaged for DeiT; registers dropped; patch rows
    averaged for a mean-pooled model without [CLS]."""
    x = torch.randn(1, 3, 48, 40)  # a 6x5 grid at a size the model was not built for
    deit = _tiny(distilled=True, num_register_tokens=2).eval()
    with torch.no_grad():
        a = deit(x, output_attentions=[-1]).attentions[0][0]  # (H, T, T)
    expected = ((a[:, 0] + a[:, 1]) / 2)[:, 4:].mean(0).reshape(6, 5)
    torch.testing.assert_close(explain(deit, x, "attention").maps[0], expected)

    pooled = _tiny(class_token=False, global_pool="avg", num_register_tokens=1).eval()
    with torch.no_grad():
        a = pooled(x, output_attentions=[-1]).attentions[0][0]
    expected = a[:, 1:, 1:].mean(1).mean(0).reshape(6, 5)
    torch.testing.assert_close(explain(pooled, x, "attention").maps[0], expected)
    for method in ("rollout", "grad-rollout"):
        assert explain(pooled, x, method).maps.shape == (1, 6, 5)


def test_only_the_layers_a_method_needs_materialise_attention(monkeypatch):
    from vitkit.layers.attention import Attention

    model = _tiny(depth=3).eval()
    calls = []
    forward = Attention.forward

    def counting(self, x, need_weights=False, attn_mask=None):
        calls.append(need_weights)
        return forward(self, x, need_weights, attn_mask)

    monkeypatch.setattr(Attention, "forward", counting)
    x = torch.randn(1, 3, SIZE, SIZE)
    explain(model, x, "attention")
    assert calls == [False, False, True]
    calls.clear()
    explain(model, x, "rollout")
    assert calls == [True, True, True]


def test_grad_rollout_is_class_specific_and_leaves_no_gradients():
    model = _tiny().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    top = explain(model, x, "grad-rollout")
    assert torch.equal(top.labels, top.probabilities.argmax(-1))
    other = explain(model, x, "grad-rollout", label=1 - top.labels)
    assert torch.equal(other.labels, 1 - top.labels)
    assert not torch.allclose(top.maps, other.maps)
    assert all(p.grad is None for p in model.parameters())

    for p in model.parameters():
        p.requires_grad_(False)  # frozen weights: the input carries the graph
    torch.testing.assert_close(explain(model, x, "grad-rollout").maps, top.maps)

    with pytest.raises(ConfigError, match="out of range"):
        explain(model, x, "grad-rollout", label=5)
    with pytest.raises(ConfigError, match="no classification head"):
        explain(_tiny(num_classes=0).eval(), x, "grad-rollout")


def test_rollout_options():
    model = _tiny().eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    maps = {f: explain(model, x, "rollout", head_fusion=f).maps for f in ("mean", "max", "min")}
    assert not torch.allclose(maps["mean"], maps["max"])
    discarded = explain(model, x, "rollout", discard_ratio=0.9).maps
    assert torch.isfinite(discarded).all() and not torch.allclose(discarded, maps["mean"])
    with pytest.raises(ConfigError, match="discard_ratio"):
        explain(model, x, "rollout", discard_ratio=1.0)
    with pytest.raises(ConfigError, match="head_fusion"):
        explain(model, x, "rollout", head_fusion="median")
    with pytest.raises(ConfigError, match="unknown explanation method"):
        explain(model, x, "lrp")


def test_cli_writes_png_and_npy_per_image_and_reports_bad_ones(tmp_path, capsys):
    import numpy as np
    import skimage.data
    from PIL import Image

    import vitkit
    from vitkit.checkpoints.resolve import resolve
    from vitkit.cli import main

    model = _tiny(image_size=64).eval()
    model.config = model.config.replace(num_classes=2, id2label={0: "noise", 1: "square"})
    vitkit.save_pretrained(model, tmp_path / "model")
    photo = tmp_path / "a" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray(skimage.data.astronaut()[:300, :400]).save(photo)
    twin = tmp_path / "b" / "photo.png"  # same file name: written as photo-2
    twin.parent.mkdir()
    twin.write_bytes(photo.read_bytes())
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    out = tmp_path / "out"
    args = [str(photo), str(bad), str(twin), "--model", str(tmp_path / "model"), "-o", str(out)]
    code = main(["explain", *args, "--method", "grad-rollout", "--label", "square", "--save-npy"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{bad}: not an image file" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "photo-2.grad-rollout.npy", "photo-2.grad-rollout.png",
        "photo.grad-rollout.npy", "photo.grad-rollout.png",
    ]  # fmt: skip
    saved = np.load(out / "photo.grad-rollout.npy")
    r = resolve(tmp_path / "model")
    expected = explain(r.model, r.processor([str(photo)]), "grad-rollout", label=1).maps[0]
    np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-5, atol=1e-7)
    with Image.open(out / "photo.grad-rollout.png") as im:
        assert im.size == (2 * 400 + 4, 300)  # the photo, then the map over it

    assert main(["explain", str(photo), "--model", str(tmp_path / "model"), "-o", str(out),
                 "--method", "attention"]) == 0  # fmt: skip
    with Image.open(out / "photo.attention.png") as im:
        assert im.size == (4 * 400 + 3 * 4, 300)  # image, head mean, two heads


def test_label_index():
    from vitkit.explain import label_index

    labels = {0: "tench, Tinca tinca", 1: "golden retriever"}
    assert label_index("1", labels) == 1
    assert label_index("Tinca tinca", labels) == 0
    assert label_index("Golden Retriever", labels) == 1
    with pytest.raises(ConfigError, match="no class named"):
        label_index("cat", labels)
