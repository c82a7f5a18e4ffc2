"""Smoke runs of every example's `--quick` mode on data that needs no network and no ../shared.

Each example is imported from examples/ and its `main(argv)` called in-process (one torch import for all), with
outputs in tmp_path; the checks read the JSON/CSV files back and test that the numbers are sane.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on shared CI cores: intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _read(out, name):
    with open(os.path.join(out, f"{name}.json")) as f:
        data = json.load(f)
    with open(os.path.join(out, f"{name}.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(data["rows"]) > 0
    return data["rows"]


def _png(out, name):
    path = os.path.join(out, f"{name}.png")
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_group_lasso_simulation(tmp_path):
    out = str(tmp_path)
    _load("group_lasso_simulation").main(["--quick", "--output-dir", out])
    rows = _read(out, "summary")
    assert all(math.isfinite(r["test_mse"]) for r in rows)
    oracle = [r for r in rows if r["method"] == "oracle"][0]
    assert 0.8 < oracle["test_mse"] < 1.6  # noise variance 1, plus a little estimation error
    prox = {round(r["lam_rel"], 6): r for r in rows if r["method"] == "prox_group_lasso"}
    gated = {round(r["lam_rel"], 6): r for r in rows if r["method"] == "dgate" and r["depth"] == 2}
    small, big = min(prox), max(prox)
    assert big > 1 and prox[big]["selected"] == 0  # above lam_max the group lasso solution is exactly zero
    assert gated[big]["selected"] == 0  # and D=2 gating reaches the same exact zeros
    assert gated[small]["true_positives"] == prox[small]["true_positives"] == 7
    assert gated[small]["test_mse"] < 1.2 * prox[small]["test_mse"]
    _png(out, "group_lasso")


def test_feature_selection_digits(tmp_path):
    out = str(tmp_path)
    _load("feature_selection").main(["--quick", "--output-dir", out])
    rows = _read(out, "digits")
    assert {r["depth"] for r in rows} == {2, 3}
    for r in rows:
        assert r["total_features"] == 64 and 0 <= r["selected_features"] <= 64
        assert 0.0 <= r["test_acc"] <= 1.0
        assert abs(r["test_acc"] - r["test_acc_exported"]) <= 0.02  # export removes only (near-)zero columns
    assert max(r["test_acc"] for r in rows) > 0.5  # 10 classes: well above chance
    # the quick mode shows settled sparsity: at lam 0.05 D=3 keeps 22 of 64 pixels (D=2: 35) at ~0.94 accuracy
    sparse = {r["depth"]: r for r in rows if r["lam"] == 0.05}
    assert sparse[3]["selected_features"] <= 40 and sparse[2]["selected_features"] <= 52
    assert min(r["test_acc"] for r in sparse.values()) > 0.85
    _png(out, "digits")


def _fake_idx(data_dir, n_train=256, n_test=64):
    """A tiny Fashion-MNIST look-alike: 28x28 uint8 images whose brightest row encodes the label."""
    common = _load("common")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        images[np.arange(n), 2 * labels + 4, :] = 255
        common.write_idx(str(data_dir), split, images, labels)
        x, y = common.read_idx(str(data_dir), split)
        assert x.shape == (n, 28, 28) and (y == labels).all()


def test_feature_selection_fashion_idx_dir_and_trainer(tmp_path):
    pytest.importorskip("transformers")
    data_dir, out = tmp_path / "fmnist", str(tmp_path / "out")
    _fake_idx(data_dir)
    args = ["--quick", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--output-dir", out, "--epochs", "2"]
    _load("feature_selection").main(args + ["--depths", "3", "--lams", "0.01"])
    rows = _read(out, "fashion-mnist")
    assert rows[0]["total_features"] == 784 and 0.0 <= rows[0]["test_acc"] <= 1.0
    # the same run trained by hf_dgate.DGateTrainer
    _load("feature_selection").main(args + ["--depths", "3", "--lams", "0.01", "--trainer"])
    rows_t = _read(out, "fashion-mnist_trainer")
    assert rows_t[0]["total_features"] == 784 and 0.0 <= rows_t[0]["test_acc"] <= 1.0


def test_feature_selection_offline_without_data_dir_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="--data-dir"):
        _load("feature_selection").main(["--quick", "--dataset", "fashion-mnist"])


def test_vision_filters(tmp_path):
    out = str(tmp_path)
    _load("vision_filters").main(["--quick", "--lams", "0.04", "--output-dir", out])  # one of --quick's three
    (row,) = _read(out, "vgg16_digits")
    assert 0.15 * row["filters_total"] < row["filters_zero"] < row["filters_total"]  # visible sparsity (84 of 264)
    assert row["speedup"] > 1.5 and row["flops_pruned"] > 0 and row["test_acc"] > 0.85
    assert row["export_max_abs_diff"] < 0.05  # the exported model computes what the gated one does (logits ~10)
    assert row["test_acc_exported"] == row["test_acc"]
    assert row["surgery_max_abs_diff"] < 1e-4 and 0.0 <= row["test_acc_exported"] <= 1.0
    _png(out, "vgg16_digits")


def test_vision_filters_prunes_under_a_strong_penalty(tmp_path):
    """A large lam must zero filters, and the FLOP count must drop accordingly."""
    out = str(tmp_path)
    args = ["--quick", "--lams", "10", "--epochs", "3", "--train-subset", "512", "--threshold-mode", "absolute"]
    _load("vision_filters").main([*args, "--output-dir", out])
    (row,) = _read(out, "vgg16_digits")
    assert row["filters_zero"] > 0 and row["speedup"] > 1.0
    assert row["surgery_max_abs_diff"] < 1e-4  # removing the zeroed filters is exact


def test_node_trees(tmp_path):
    out = str(tmp_path)
    _load("node_trees").main(["--quick", "--output-dir", out])
    rows = _read(out, "wine")
    for r in rows:
        assert r["metric"] == "accuracy" and 0.0 <= r["test_metric"] <= 1.0
        assert 0 <= r["active_trees"] <= r["total_trees"] == 50
        assert abs(r["test_metric"] - r["test_metric_exported"]) <= 0.03
    sparse = max(rows, key=lambda r: r["lam"])  # lam 0.02 keeps 1 of 50 trees at 0.97-1.0 (seeds 0-2)
    assert sparse["active_trees"] <= 10 and sparse["test_metric"] > 0.85
    _png(out, "wine")


def test_sparse_nam(tmp_path):
    out = str(tmp_path)
    _load("sparse_nam").main(["--quick", "--output-dir", out])
    rows = _read(out, "summary")
    assert {r["method"] for r in rows} == {"dgate", "direct"}
    for r in rows:
        assert math.isfinite(r["test_mse"]) and r["test_mse"] > 0
        assert 0 <= r["selected"] <= 20 and r["true_positives"] <= 5
    sparse = [r for r in rows if r["method"] == "dgate" and r["lam"] == max(x["lam"] for x in rows)][0]
    assert sparse["selected"] <= 17 and sparse["true_positives"] == 5 and sparse["test_mse"] < 1.2  # 14, 5, 0.78
    _png(out, "sparse_nam")


def test_late_fusion(tmp_path):
    out = str(tmp_path)
    _load("late_fusion").main(["--quick", "--output-dir", out])
    (row,) = _read(out, "digits")
    assert math.isfinite(row["test_mse"]) and row["image_norm"] >= 0 and row["tabular_norm"] >= 0
    assert row["kept"] == "image" and row["tabular_norm"] < 1e-4  # the uninformative head is exactly zero
    assert row["test_mse"] < 0.8  # 0.54; noise variance 0.25
    _png(out, "digits")


def test_node_trees_wine_quality_regression_from_data_file(tmp_path):
    """The paper's Wine Quality task (regression, RMSE) from a local UCI-format CSV (';'-separated, header)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 11))
    quality = np.clip(np.round(5.5 + X[:, 0] - 0.5 * X[:, 1] + 0.3 * rng.normal(size=120)), 3, 8)
    path = tmp_path / "winequality-red.csv"
    header = ";".join(f'"f{i}"' for i in range(11)) + ';"quality"'
    np.savetxt(path, np.column_stack([X, quality]), delimiter=";", header=header, comments="", fmt="%.5f")
    out = str(tmp_path / "out")
    _load("node_trees").main(["--quick", "--dataset", "wine-quality", "--data-file", str(path), "--output-dir", out])
    rows = _read(out, "wine-quality")
    for r in rows:
        assert r["metric"] == "rmse" and 0.0 < r["test_metric"] < 3 * quality.std()
    _png(out, "wine-quality")
