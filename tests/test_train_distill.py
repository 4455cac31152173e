"""`vitkit train --teacher`: DeiT distillation wired into the supervised trainer."""

from vitkit.cli import main
from vitkit.train.recipe import Recipe
from vitkit.train.trainer import train

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "global_pool": "token", "pos_embed": "learned"}


def _recipe(tmp_path, **changes) -> Recipe:
    return Recipe(
        model="vit_digits_patch2_8",  # no stem: transformers' DeiT holds the student
        model_overrides=TINY,
        epochs=1,
        batch_size=64,
        ema_decay=None,
        plot=False,
        progress=False,
        output=str(tmp_path / "run"),
        **changes,
    )


def test_teacher_trains_a_distilled_student(tmp_path):
    teacher = train(_recipe(tmp_path / "t"))
    result = train(_recipe(tmp_path / "s", teacher=str(teacher.run_dir / "best")))
    config, weights = _weights(result.run_dir / "best")
    assert config.distilled and "head_dist.weight" in weights and "dist_token" in weights
    assert (result.run_dir / "best" / "config.json").read_text().count('"model_type": "deit"') == 1


def test_distillation_changes_the_loss(tmp_path, monkeypatch):
    from vitkit.models import distill

    calls = []
    real = distill.DistillationLoss.forward

    def spy(self, images, outputs, targets):
        calls.append(outputs.distillation_logits.shape)
        return real(self, images, outputs, targets)

    monkeypatch.setattr(distill.DistillationLoss, "forward", spy)
    train(_recipe(tmp_path, teacher="vit_digits_patch2_8", distillation="soft"))
    assert calls and all(shape[1] == 10 for shape in calls)


def test_cli_rejects_a_bad_distillation_type(tmp_path, capsys):
    code = main(
        [
            "train",
            "--teacher",
            "vit_digits_patch2_8",
            "--distillation",
            "medium",
            "--epochs",
            "1",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 1
    assert "distillation='medium'" in capsys.readouterr().err


def _weights(folder):
    """(config, state dict) of a saved model folder."""
    import vitkit

    model = vitkit.from_pretrained(folder)
    return model.config, model.state_dict()
