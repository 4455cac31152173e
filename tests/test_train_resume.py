"""Kill a training run with SIGKILL mid-epoch, resume it, and get bit-identical weights: for
supervised training and for DINO (student, teacher with its head's BatchNorm statistics,
center, and the recipe's EMA; the momentum and temperature schedules follow the global step,
the crops the (seed, epoch, step) generator)."""

import pytest
import torch

from conftest import kill_at_first_checkpoint
from vitkit.train import Recipe, train
from vitkit.train.state import load_state

RECIPE = dict(
    model_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2},
    batch_size=64,
    epochs=2,
    warmup_epochs=0.5,
    progress=False,
    plot=False,
    threads=1,
    save_every_steps=4,
    drop_path=0.1,  # the student's drop-path draws from the global RNG
    ema_decay=0.9,
)
CLASSIFY = dict(RECIPE, random_shift=1, rrc_scale=[0.6, 1.0])
# head_bn (the default): the head's BatchNorm statistics are state too
DINO = dict(
    RECIPE, objective="dino", model="vit_digits_patch2_8", out_dim=32, local_crops=2, hflip=True
)


@pytest.mark.parametrize("recipe", [CLASSIFY, DINO], ids=["classify", "dino"])
def test_kill_and_resume_is_bit_exact(tmp_path, recipe):
    n = torch.get_num_threads()
    try:
        ref = train(Recipe.from_dict({**recipe, "output": str(tmp_path / "ref")}))
        run = tmp_path / "killed"
        kill_at_first_checkpoint(recipe, run)
        saved = load_state(run)
        assert saved["epoch"] == 0 and 0 < saved["step"] < ref.steps // 2  # mid-epoch
        res = train(None, resume=run)
        assert res.steps == ref.steps == (40 if recipe is CLASSIFY else 2 * (1437 // 64))
    finally:
        torch.set_num_threads(n)
    a, b = load_state(tmp_path / "ref"), load_state(run)
    if recipe is DINO:
        assert {"dino.loss.center", "dino.teacher.head.mlp.1.running_var"} <= a["objective"].keys()
    for part in ("model", "objective"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), key
    for key, value in a["ema"]["module"].items():
        assert torch.equal(value, b["ema"]["module"][key]), key
    # every figure of every epoch row, the killed epoch's too (its loss and DINO's teacher
    # entropies are sums carried through the checkpoint); only the clock differs
    assert len(a["metrics"]) == len(b["metrics"])
    for row, again in zip(a["metrics"], b["metrics"]):
        timed = {k for k in row if k.endswith("_s") or "per_s" in k}
        assert {k: v for k, v in row.items() if k not in timed} == {
            k: v for k, v in again.items() if k not in timed
        }
    if recipe is DINO:
        assert "teacher_entropy" in a["metrics"][0]
