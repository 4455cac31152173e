from vitkit.cli import main


def test_models_lists_presets(capsys):
    assert main(["models", "vit_base_patch16_*"]) == 0
    assert capsys.readouterr().out.split() == ["vit_base_patch16_224", "vit_base_patch16_384"]


def test_models_verbose_prints_counts(capsys):
    assert main(["models", "-v", "vit_base_patch16_224"]) == 0
    assert "86,567,656" in capsys.readouterr().out


def test_models_text_lists_the_presets_with_a_text_tower(capsys):
    assert main(["models", "--text", "-v", "clip_*"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(rows) == ["clip_vit_base_patch16_224", "clip_vit_base_patch32_224",
                            "clip_vit_large_patch14_224"]  # fmt: skip
    # CLIPTextModelWithProjection's counts (B: width 512; L: 768)
    assert rows["clip_vit_base_patch32_224"][-1] == "63,428,096"
    assert rows["clip_vit_large_patch14_224"][-1] == "123,650,304"
    assert main(["models", "--text", "vit_base_*"]) == 1  # no text tower there


def test_info_reports_shapes_and_resampling(capsys):
    assert main(["info", "vit_base_patch16_224", "--image-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "(B, 577, 768)" in out and "24 x 24" in out and "(14, 14) table resampled" in out
    assert "86,567,656" in out


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "vit_nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitkit info: error: unknown model 'vit_nope'")
    assert "Traceback" not in err


def test_info_reads_a_checkpoint_with_its_classes_and_preprocessing(tmp_path, capsys):
    import vitkit

    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, num_classes=3)
    model.reset_classifier(3, id2label={0: "cat", 1: "dog", 2: "fox"})
    vitkit.save_pretrained(model, tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt"), "--image-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "(B, 577, 192)" in out and "(B, 3) logits" in out
    assert "3 (cat, dog, fox)" in out and "preprocessing  resize to (224, 224)" in out
