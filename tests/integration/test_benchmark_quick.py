"""The benchmark's quick mode end to end on the real models, and the schema of its JSON output."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_models

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_RUN_KEYS = {
    "direction",
    "task",
    "method",
    "score",
    "gain_recovered",
    "gain_recovered_ci",
    "retained",
    "negative_flips",
}


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_report(tmp_path):
    benchmark = _load_benchmark()
    # One direction keeps the test near 10 minutes on a 2-core CPU; the other direction runs
    # the same code with the models swapped.
    assert benchmark.main(["--quick", "--directions", "forward", "--out", str(tmp_path)]) == 0

    document = json.loads((tmp_path / "benchmarks.json").read_text())
    for key in ("machine", "date", "commit", "command", "runs", "costs"):
        assert key in document
    runs = document["runs"]
    directions = {run["direction"] for run in runs}
    assert directions == {"smollm2-135m-instruct->gemma-3-270m"}
    assert {run["task"] for run in runs} == {"sentiment", "arithmetic", "shakespeare"}
    for run in runs:
        assert REQUIRED_RUN_KEYS <= set(run)
    methods = {run["method"] for run in runs}
    for method in (
        "source-base",
        "source-adapter",
        "target-base",
        "target-retrained",
        "cartridge-mlp",
        "cartridge-linear",
        "cartridge-mlp-cka",
        "baked",
        "weight-projection",
    ):
        assert method in methods
    for costs in document["costs"]:
        for task_costs in costs["tasks"].values():
            assert task_costs["tokens_per_second"]["baked"] > 0
            assert 0 <= task_costs["bake"]["relative_error_mean"] <= 1.5
    retrained = [run for run in runs if run["method"] == "target-retrained"]
    for run in retrained:
        assert run["gain_recovered"] == pytest.approx(1.0) or math.isnan(run["gain_recovered"])

    report = (tmp_path / "benchmarks.md").read_text()
    assert "Quick mode" in report
    assert "## Gain recovered" in report
    assert list((tmp_path / "benchmarks").glob("*.png"))
