"""The inference benchmark runs end to end on a tiny model (no timing assertions)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_format_table_aligns_numbers():
    common = _load("common")
    table = common.format_table(["name", "img/s"], [["a", "1.50"], ["bb", "10.25"]])
    lines = table.splitlines()
    assert lines[0] == "| name | img/s |"
    assert lines[1] == "|------|------:|"
    assert lines[2] == "| a    |  1.50 |"


def test_round_robin_times_every_contender_each_repeat():
    common = _load("common")
    calls = []
    times = common.round_robin(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating order


def test_infer_runs_on_a_tiny_model():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    infer = _load("infer")
    rows = infer.run_benchmark(
        models=["vit_tiny_patch16_224"],
        batch_sizes=[1],
        dtypes=["fp32", "bf16"],
        repeats=1,
        warmup=0,
        image_size=32,
        peak_sizes={"fp32": 64},
        bf16_weights=True,
        log=lambda s: None,
    )
    assert [(r.dtype, r.batch) for r in rows] == [("fp32", 1), ("bf16", 1)]
    assert set(rows[0].seconds) == {
        "vitkit",
        "vitkit eager",
        "timm",
        "HF sdpa",
        "HF eager",
        infer.PEAK,
    }
    assert {"vitkit bf16 weights", "timm bf16 weights"} <= set(rows[1].seconds)
    assert rows[0].fraction_of_peak("vitkit") > 0
    assert math.isnan(rows[1].fraction_of_peak("vitkit"))  # no bf16 peak matmul was timed
    # a ViT-Ti/16 at 32x32 sees 4 patches + [CLS]
    assert rows[0].gmacs_per_image == pytest.approx(
        infer.vitkit.create_model("vit_tiny_patch16_224", image_size=32).flops() / 1e9
    )
    table = infer.results_table(rows)
    assert "vitkit/timm" in table and table.count("\n") == 3


def test_profile_table_splits_time_by_operator():
    infer = _load("infer")
    fast = torch.nn.Linear(64, 64)
    slow = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
    x = torch.randn(8, 64)
    table = infer.profile_table(
        {"a": lambda: fast(x), "b": lambda: slow(x)}, torch.device("cpu"), iters=2
    )
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[2:4]] == ["a", "b"]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in lines[2:]}
    assert "aten::addmm" in rows and "total" in rows
    assert float(rows["aten::gelu"][0]) == 0.0 < float(rows["aten::gelu"][1])  # only b has it


def test_matmul_peak_is_positive():
    common = _load("common")
    assert common.matmul_peak(torch.float32, n=64, repeats=2) > 0


def test_classical_baselines_score_the_builtin_test_split(capsys):
    pytest.importorskip("sklearn")
    baselines = _load("baselines")
    assert baselines.main(["--datasets", "digits"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| digits")]
    assert [row.split(" | ")[1] for row in rows] == ["RBF SVM", "k-NN", "logistic regression"]
    accs = [float(row.split(" | ")[3].rstrip("%")) for row in rows]
    assert all(90.0 < acc <= 100.0 for acc in accs)  # 360 test images, 1,437 training ones
    assert "(1,437 / 360)" in rows[0]
