import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import vitkit
from vitkit import VisionTransformer, ViTConfig
from vitkit.errors import VitkitError
from vitkit.eval import evaluate
from vitkit.models.vit import ViTOutput

# 6 samples, 3 classes; hand-worked ranks below
LOGITS = torch.tensor([
    [3.0, 1.0, 0.0],  # true 0: top1 hit
    [0.0, 2.0, 1.0],  # true 2: predicted 1, 2 is second -> top2 hit
    [1.0, 0.0, 5.0],  # true 2: hit
    [0.5, 0.2, 0.1],  # true 1: predicted 0, 1 second
    [1.0, 0.0, 9.0],  # true 0: predicted 2, 0 second
    [1.0, 4.0, 2.0],  # true 1: hit
])  # fmt: skip
LABELS = torch.tensor([0, 2, 2, 1, 0, 1])


class FixedModel(nn.Module):
    """Returns the precomputed logits of the samples whose indices it is fed."""

    def __init__(self, wrap=True):
        super().__init__()
        self.wrap = wrap
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        logits = LOGITS[idx.long()]
        if not self.wrap:
            return logits
        return ViTOutput(logits=logits, last_hidden_state=logits[:, None], pooler_output=logits)


def _loader(batch_size=4):
    idx = torch.arange(6)
    return [(idx[i : i + batch_size], LABELS[i : i + batch_size]) for i in range(0, 6, batch_size)]


@pytest.mark.parametrize("wrap", [True, False])
def test_hand_computed_metrics(wrap):
    model = FixedModel(wrap).train()
    r = evaluate(model, _loader(), topk=(1, 2, 5))
    assert model.training  # restored
    assert r.num_samples == 6
    assert r.top1 == pytest.approx(3 / 6)
    assert r.topk[2] == 1.0  # every miss has the true class second
    assert r.top5 == 1.0  # k > K counts as K
    expected_conf = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    assert np.array_equal(r.confusion, expected_conf)
    assert r.per_class_accuracy == pytest.approx([0.5, 0.5, 0.5])
    ce = float(nn.functional.cross_entropy(LOGITS, LABELS))
    assert r.loss == pytest.approx(ce, rel=1e-6)


def test_topk_only_requested():
    idx = torch.tensor([0, 1, 2, 3, 5])
    r = evaluate(FixedModel(), [(idx, LABELS[idx])], topk=(2,))
    assert r.top1 == pytest.approx(3 / 5) and r.topk[2] == 1.0 and r.top5 is None


def test_to_dict_is_json_and_nan_safe():
    idx = torch.tensor([0, 3])  # classes 0 and 1 only: class 2 has no samples
    r = evaluate(FixedModel(), [(idx, LABELS[idx])], class_names=["a", "b", "c"])
    d = json.loads(json.dumps(r.to_dict()))
    assert d["per_class_accuracy"] == [1.0, 0.0, None]
    assert d["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert d["class_names"] == ["a", "b", "c"]
    assert d["mean_class_accuracy"] == 0.5
    assert math.isnan(r.per_class_accuracy[2])


def test_distilled_model_uses_mean_of_heads_and_dict_batches():
    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        in_chans=3,
        num_classes=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        distilled=True,
    )
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight)
    torch.nn.init.normal_(model.head_dist.weight)
    x = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    y = torch.arange(10) % 4
    r = evaluate(
        model, [{"pixel_values": x[:5], "labels": y[:5]}, {"pixel_values": x[5:], "labels": y[5:]}]
    )
    expected = (out.logits.argmax(1) == y).float().mean().item()
    assert r.top1 == pytest.approx(expected)
    assert r.loss == pytest.approx(float(nn.functional.cross_entropy(out.logits, y)), rel=1e-5)
    assert r.confusion.sum() == 10


def test_errors():
    with pytest.raises(VitkitError, match="no samples"):
        evaluate(FixedModel(), [])
    with pytest.raises(VitkitError, match="outside"):
        evaluate(FixedModel(), [(torch.tensor([0]), torch.tensor([7]))])


# --- vitkit eval (CLI) --------------------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


def _save_native(model, folder):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model.config.save(folder / "config.json")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )


def _image_tree(root, n_per_class=4, in_chans=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        for i in range(n_per_class):
            noise = rng.integers(-30, 30, size=(20 + i, 18, 3))
            arr = np.clip(np.array(color)[None, None] + noise, 0, 255).astype(np.uint8)
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    (root / "red" / "bad.png").write_bytes(b"not a png")


def _direct(model, root, classes_to_model, gray=False):
    """Reference: decode, resize the uint8 image with torchvision (bilinear, antialiased: the
    default backend of transformers' image processors, which `vitkit predict` follows for a
    vitkit or transformers checkpoint), scale, normalise by hand, run the model."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as tvf

    xs, ys = [], []
    for name in sorted(COLORS):
        for path in sorted((root / name).glob("[0-9].png")):
            img = Image.open(path).convert("RGB")
            img = img.convert("L") if gray else img
            t = torch.from_numpy(np.array(img))
            t = t[None] if gray else t.permute(2, 0, 1)
            t = tvf.resize(t, list(model.config.image_hw), antialias=True).float() / 255.0
            xs.append((t - 0.5) / 0.5)
            ys.append(classes_to_model[name])
    with torch.no_grad():
        logits = model(torch.stack(xs)).logits
    return logits, torch.tensor(ys)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_cli_eval_image_folder_matches_direct_computation(tmp_path, in_chans, capsys):
    from vitkit.cli import main

    id2label = {0: "red", 1: "green", 2: "blue"}  # not the sorted folder order
    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        in_chans=in_chans,
        num_classes=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        id2label=id2label,
    )
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    ckpt = tmp_path / "ckpt"
    _save_native(model, ckpt)
    data = tmp_path / "data"
    _image_tree(data / "test")
    _image_tree(data / "train", n_per_class=1)
    out = tmp_path / "report"

    rc = main(
        [
            "eval",
            "--model",
            str(ckpt),
            "--data",
            str(data),
            "--split",
            "test",
            "--batch-size",
            "5",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "1 skipped" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "confusion.png").stat().st_size > 1000
    logits, y = _direct(
        model, data / "test", {v: k for k, v in id2label.items()}, gray=in_chans == 1
    )
    pred = logits.argmax(1)
    assert metrics["num_samples"] == 12 and metrics["num_skipped"] == 1
    assert metrics["top1"] == pytest.approx((pred == y).float().mean().item())
    assert metrics["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-4)
    conf = np.zeros((3, 3), dtype=int)
    for t, p in zip(y.tolist(), pred.tolist()):
        conf[t, p] += 1
    assert metrics["confusion"] == conf.tolist()
    assert metrics["class_names"] == ["red", "green", "blue"]
    assert metrics["top5"] == 1.0


def test_cli_eval_list_file_and_native_loader(tmp_path):
    from vitkit import from_pretrained
    from vitkit.cli import main

    cfg = ViTConfig(
        image_size=16, patch_size=8, in_chans=3, num_classes=4, embed_dim=32, depth=1, num_heads=2
    )
    model = VisionTransformer(cfg).eval()
    ckpt = tmp_path / "run" / "best"  # a `vitkit train` run directory
    _save_native(model, ckpt)
    loaded = from_pretrained(ckpt)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)

    _image_tree(tmp_path / "imgs", n_per_class=2)
    lst = tmp_path / "list.csv"
    lst.write_text("path,label\nimgs/red/0.png,3\nimgs/green/0.png,1\nimgs/blue/1.png,0\n")
    out = tmp_path / "o"
    assert (
        main(["eval", "--model", str(tmp_path / "run"), "--data", str(lst), "--out", str(out)]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 3
    assert sum(map(sum, metrics["confusion"])) == 3
    assert [sum(r) for r in metrics["confusion"]] == [1, 1, 0, 1]


def test_cli_eval_errors(tmp_path, capsys):
    from vitkit.cli import main

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "vitkit"}')
    rc = main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path)])
    assert rc == 1
    assert "vitkit eval: error:" in capsys.readouterr().err


def test_cli_eval_uses_the_checkpoints_preprocessor_config(tmp_path):
    processor_mod = pytest.importorskip("vitkit.data.processor")
    from vitkit.cli import main

    cfg = ViTConfig(
        image_size=16, patch_size=8, in_chans=3, num_classes=3, embed_dim=32, depth=1, num_heads=2
    )
    ckpt = tmp_path / "ckpt"
    _save_native(VisionTransformer(cfg).eval(), ckpt)
    processor = processor_mod.ImageProcessor.hf_vit(16, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    processor.save_pretrained(ckpt)
    transform = vitkit.resolve(ckpt).processor.preprocess_pil
    from PIL import Image

    img = Image.new("RGB", (20, 20), (255, 0, 128))
    x = transform(img)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.2, 0.3, 0.4])) / torch.tensor(
        [0.5, 0.6, 0.7]
    )
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 8, 8], expected, atol=1e-5)
    _image_tree(tmp_path / "data", n_per_class=1)
    assert main(["eval", "--model", str(ckpt), "--data", str(tmp_path / "data")]) == 0


def test_cli_eval_builtin_tensor_dataset(tmp_path):
    """Built-in sets are [0, 1] tensors: resized bilinearly, normalised with the checkpoint's
    mean / std; --split picks the same parts training uses."""
    pytest.importorskip("sklearn")
    from vitkit.cli import main
    from vitkit.data.datasets import open_splits

    splits = open_splits("digits", mode="L")
    cfg = ViTConfig(
        image_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2
    )
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    ckpt = tmp_path / "ckpt"
    _save_native(model, ckpt)
    for split in ("test", "val"):
        part = splits.get(split)
        out = tmp_path / split
        args = ["eval", "--model", str(ckpt), "--data", "digits", "--split", split]
        assert main([*args, "--output", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        x = nn.functional.interpolate(
            part.images, size=(16, 16), mode="bilinear", align_corners=False, antialias=True
        )
        with torch.no_grad():
            logits = model((x - 0.5) / 0.5).logits
        assert metrics["num_samples"] == len(part.labels)
        assert metrics["top1"] == pytest.approx((logits.argmax(1) == part.labels).float().mean())
        assert metrics["loss"] == pytest.approx(
            float(nn.functional.cross_entropy(logits, part.labels)), rel=1e-4
        )
        assert metrics["class_names"] == [str(i) for i in range(10)]
    assert len(splits.val) + len(splits.train) == 1437 and len(splits.test) == 360


def test_cli_eval_real_digits(tmp_path):
    builtin = pytest.importorskip("vitkit.data.builtin")
    pytest.importorskip("sklearn")
    from vitkit.cli import main

    cfg = ViTConfig(
        image_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2
    )
    ckpt = tmp_path / "ckpt"
    _save_native(VisionTransformer(cfg).eval(), ckpt)
    assert main(["eval", "--model", str(ckpt), "--data", "digits", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_samples"] == len(builtin.load_builtin("digits")[1])


@pytest.mark.gpu
def test_evaluate_on_cuda_with_bf16_autocast_matches_cpu():
    cfg = ViTConfig(
        image_size=16, patch_size=8, in_chans=3, num_classes=5, embed_dim=64, depth=2, num_heads=4
    )
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    x, y = torch.randn(32, 3, 16, 16), torch.arange(32) % 5
    cpu = evaluate(model, [(x, y)])
    gpu = evaluate(model.cuda(), [(x, y)], device="cuda")
    assert gpu.top1 == pytest.approx(cpu.top1) and gpu.loss == pytest.approx(cpu.loss, rel=1e-3)
    amp = evaluate(model, [(x, y)], device="cuda", amp_dtype=torch.bfloat16)
    assert amp.num_samples == 32 and abs(amp.loss - cpu.loss) < 0.05


def test_match_classes():
    from vitkit.eval import match_classes as _match_classes

    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        num_classes=3,
        embed_dim=32,
        depth=1,
        num_heads=2,
        id2label={0: "x", 1: "y", 2: "z"},
    )
    assert _match_classes(["z", "x"], cfg) == (["x", "y", "z"], {0: 2, 1: 0})
    assert _match_classes(["x", "y", "z"], cfg) == (["x", "y", "z"], None)
    assert _match_classes(["a", "b"], cfg)[0] == ["a", "b", "z"]
    with pytest.raises(VitkitError, match="4 classes"):
        _match_classes(["a", "b", "c", "d"], cfg)
    plain = cfg.replace(id2label=None)
    assert _match_classes(None, plain) == (["0", "1", "2"], None)


def test_cli_eval_precision_uses_the_predict_runner(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from vitkit.cli import main

    cfg = ViTConfig(
        image_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2
    )
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    _save_native(model, tmp_path / "ckpt")
    results = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        args = ["eval", "--model", str(tmp_path / "ckpt"), "--data", "digits", "--output", str(out)]
        assert main([*args, "--precision", precision]) == 0
        results[precision] = json.loads((out / "metrics.json").read_text())
    assert results["fp16"]["num_samples"] == results["fp32"]["num_samples"] == 360
    assert abs(results["fp16"]["top1"] - results["fp32"]["top1"]) <= 2 / 360  # ties may flip
    assert results["fp16"]["loss"] != results["fp32"]["loss"]  # it did run in fp16
    assert results["fp16"]["loss"] == pytest.approx(results["fp32"]["loss"], rel=1e-2)


@pytest.mark.parametrize("backend", ["pil", "tensor"])
def test_eval_preprocesses_images_as_predict_does(backend, photos):
    from PIL import Image

    from vitkit.data.processor import ImageProcessor
    from vitkit.eval import _Collate
    from vitkit.infer.predictor import preprocess

    processor = ImageProcessor(resize=(40, 40), backend=backend)
    images = [Image.fromarray(photos[0]), Image.fromarray(photos[1])]
    batch, labels = _Collate(processor, (40, 40), None)([(im, i) for i, im in enumerate(images)])
    expected = torch.stack([preprocess(im, processor) for im in images])
    assert torch.equal(batch, expected) and labels.tolist() == [0, 1]
    if backend == "tensor":  # the two backends differ: eval follows the checkpoint's
        assert not torch.equal(batch, torch.stack([processor.preprocess_pil(im) for im in images]))
