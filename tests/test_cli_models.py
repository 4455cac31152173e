from vitkit.cli import main


def test_models_lists_presets(capsys):
    assert main(["models", "vit_base_patch16_*"]) == 0
    assert capsys.readouterr().out.split() == ["vit_base_patch16_224", "vit_base_patch16_384"]


def test_models_verbose_prints_counts(capsys):
    assert main(["models", "-v", "vit_base_patch16_224"]) == 0
    assert "86,567,656" in capsys.readouterr().out


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
