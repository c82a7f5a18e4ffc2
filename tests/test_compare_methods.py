"""Smoke test of benchmarks/compare_methods.py: --quick on offline data (sklearn digits + a synthetic corpus)."""

from __future__ import annotations

import csv
import importlib.util
import os
import random

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"dgate D=2", "dgate D=3", "dgate D=4", "direct+MP", "l0", "l0+MP", "l0 target", "dense+MP"}


def _load():
    path = os.path.join(ROOT, "benchmarks", "compare_methods.py")
    spec = importlib.util.spec_from_file_location("compare_methods", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_has_every_method_on_both_tasks(tmp_path):
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "the", "king", "lord", "what", "say", "thou", "and", "my"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cm = _load()
    cm.main(
        ["--quick", "--dataset", "digits", "--data-file", str(corpus), "--output-dir", str(out)]
        + ["--ratios", "0", "0.5", "--gpt-steps", "5"]
    )
    with open(out / "compare_methods.csv") as f:
        rows = list(csv.DictReader(f))
    assert (out / "compare_methods.png").stat().st_size > 0
    for task, groups in (("lenet", 64), ("nanogpt", 2 * 4)):
        task_rows = [r for r in rows if r["task"] == task]
        assert {r["method"] for r in task_rows} == METHODS, task
        for r in task_rows:
            assert int(r["groups_total"]) == groups
            assert 0.0 <= float(r["sparsity"]) <= 1.0 and 0.0 <= float(r["accuracy"]) <= 1.0
            if r["method"].endswith("+MP"):  # pruning half the groups leaves at least half of them zero
                assert float(r["sparsity"]) >= float(r["prune_ratio"]) - 1e-9
            else:
                assert r["prune_ratio"] == ""
        # dense + magnitude pruning at ratio 0 is the untouched lam = 0 model: no zero groups
        dense0 = [r for r in task_rows if r["method"] == "dense+MP" and float(r["prune_ratio"]) == 0.0]
        assert len(dense0) == 1 and int(dense0[0]["groups_zero"]) == 0
        # the best-over-lam curve has exactly one point per prune ratio for every +MP method
        for m in ("direct+MP", "l0+MP"):
            curve = [r for r in task_rows if r["method"] == m and r["on_curve"] == "1"]
            assert sorted(float(r["prune_ratio"]) for r in curve) == [0.0, 0.5]
