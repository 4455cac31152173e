"""The result scripts (scripts/) run end to end on a smoke budget; their figures live in
benchmarks/RESULTS.md, not in assertions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_low_label_runs_every_arm_on_the_trainer(tmp_path, capsys):
    low = _load("low_label")
    out = tmp_path / "low"
    argv = ["--methods", "mae", "--seeds", "0", "--out", str(out), "--set", "epochs=1",
            "--set", "threads=1"]  # fmt: skip
    assert low.main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert set(table) == {"scratch", "mae"} and all(len(v) == 1 for v in table.values())
    fine = json.loads((out / "mae-s0" / "recipe.json").read_text())
    assert fine["label_fraction"] == 0.1 and fine["init"] == str(out / "pretrain-mae")
    assert "| mae pre-trained |" in capsys.readouterr().out
    # --reuse keeps finished runs, pre-training too: nothing is trained again
    stamps = {
        d: (out / d / "wall_seconds.txt").stat().st_mtime_ns for d in ("mae-s0", "pretrain-mae")
    }
    assert low.main([*argv, "--reuse"]) == 0
    assert all((out / d / "wall_seconds.txt").stat().st_mtime_ns == t for d, t in stamps.items())


def test_sweep_parses_variants_with_lists():
    sweep = _load("sweep")
    assert sweep.parse_variant("rot=epochs=200,rotate=10,zoom=[0.9,1.1]") == (
        "rot",
        ["epochs=200", "rotate=10", "zoom=[0.9,1.1]"],
    )
    assert sweep.parse_variant(
        "p4=model_overrides={patch_size: 4, stem_channels: [16]},lr=1e-3"
    ) == (
        "p4",
        ["model_overrides={patch_size: 4, stem_channels: [16]}", "lr=1e-3"],
    )
    assert sweep.parse_variant("base=") == ("base", [])


def test_sweep_table_has_spread_and_loss_per_variant():
    sweep = _load("sweep")

    def run(acc, loss):
        return {"test_acc": acc, "test_loss": loss, "best_val_acc": 0.99, "seconds": 10}

    results = [("a", 0, run(0.98, 0.2)), ("b", 0, {"seconds": 5}), ("a", 1, run(0.99, 0.1)),
               ("b", 1, run(0.97, 0.3))]  # fmt: skip
    head, rule, a, b = sweep.table([("a", []), ("b", ["lr=2e-3"])], [0, 1], results)
    assert head.count("|") == rule.count("|") == a.count("|") == b.count("|")
    # mean 98.50%, sample standard deviation 0.71 points, mean loss 0.150
    assert a == "| a | as is | 98.00% | 99.00% | 98.50% | 0.71% | 0.150 | 99.00% | 10 |"
    # a failed seed shows as such and is left out of the statistics, not counted as zero
    assert b == "| b | lr=2e-3 | failed | 97.00% | 97.00% | - | 0.300 | 99.00% | 8 |"
