"""The CUDA paths: precision runners, training with autocast, prediction. Skipped without a GPU
(conftest); `bash benchmarks/gpu.sh` runs them on a machine that has one."""

import pytest
import torch

import vitkit
from vitkit.infer import prepare
from vitkit.train import Recipe, train

pytestmark = pytest.mark.gpu


def _model() -> vitkit.VisionTransformer:
    torch.manual_seed(0)
    model = vitkit.create_model(
        "vit_tiny_patch16_224", image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4
    ).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # spread logits: a real top-1 to compare
    return model


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_precision_paths_on_cuda_keep_the_fp32_top1(precision):
    model = _model().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        ref = model(x).logits.float()
    runner = prepare(model, precision, device="cuda")
    out = runner(x)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    # bf16 keeps 8 significant bits: a few percent of the largest logit after two blocks
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_int8_on_cuda_is_refused_with_one_line():
    from vitkit.errors import ConfigError

    with pytest.raises(ConfigError, match="int8"):
        prepare(_model().cuda(), "int8", device="cuda")


def test_training_on_cuda_with_bf16_autocast_gives_a_model_the_cpu_loads(tmp_path):
    recipe = Recipe(
        model_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
        epochs=20,
        warmup_epochs=0.5,
        dtype="bf16",
        ema_decay=None,
        progress=False,
        plot=False,
        output=str(tmp_path / "run"),
    )
    result = train(recipe)
    assert result.test_acc is not None and result.test_acc > 0.3  # 40-45% on the CPU
    model = vitkit.from_pretrained(result.run_dir / "best")
    assert next(model.parameters()).device.type == "cpu"
    assert torch.isfinite(model(torch.zeros(1, 1, 8, 8)).logits).all()


def test_predictor_on_cuda_matches_cpu(photos):
    from vitkit.data.processor import ImageProcessor
    from vitkit.infer.predictor import Predictor

    model, processor = _model(), ImageProcessor(resize=(32, 32))
    cpu = list(Predictor(model, processor, device="cpu").predict(photos[:3]))
    gpu = list(Predictor(model, processor, device="cuda").predict(photos[:3]))
    assert len(cpu) == len(gpu) == 3
    for a, b in zip(cpu, gpu):
        assert a.top_k[0][0] == b.top_k[0][0]
        assert abs(a.top_k[0][2] - b.top_k[0][2]) < 1e-3
