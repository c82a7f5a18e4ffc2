"""examples/nanogpt_shakespeare.py: a few steps on a synthetic text, config handling, clear data errors."""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request

import pytest
import torch

import hf_dgate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "nanogpt_example", os.path.join(ROOT, "examples/nanogpt_shakespeare.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def small_corpus(path) -> str:
    g = torch.Generator().manual_seed(0)
    words = ["thou", "art", "the", "king", "my", "lord", "good", "night", "sweet", "prince"]
    lines = []
    for i in range(300):
        idx = torch.randint(0, len(words), (6,), generator=g).tolist()
        lines.append(f"{'ROMEO' if i % 2 else 'JULIET'}:\n" + " ".join(words[j] for j in idx) + ".\n")
    text = "\n".join(lines)
    path.write_text(text)
    return str(path)


TINY = [
    "--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "4", "--eval-steps", "2", "--eval-samples", "4", "--logging-steps", "2",
    "--sample-chars", "5", "--report-to", "none", "--lam", "0.01",
]  # fmt: skip


def test_a_few_steps_write_results_and_a_loadable_model(example, tmp_path):
    out = tmp_path / "run"
    res = example.main([*TINY, "--data-file", small_corpus(tmp_path / "t.txt"), "--output-dir", str(out)])
    with open(out / "results.json") as f:
        saved = json.load(f)
    for key in ("val_loss", "val_perplexity", "val_char_accuracy", "head_sparsity", "active_per_layer"):
        assert key in saved
    assert saved["steps"] == 4 and res["val_perplexity"] == pytest.approx(torch.tensor(res["val_loss"]).exp().item())
    assert 0.0 <= saved["val_char_accuracy"] <= 1.0
    assert saved["active_per_layer"]["heads"] == {"0": [2, 2]}
    assert (out / "dgate_sparsity.json").is_file()
    model = hf_dgate.load_gated(str(out))
    assert model.dgate.config.lam == 0.01 and model.config.n_head == 2


def test_direct_method_uses_depth_two(example, tmp_path):
    args = example.parse_args(["--method", "direct", "--depth", "4"])
    assert args.depth == 2  # lam * sum ||theta_g||_2: the group lasso on the same groups


def test_config_preset_and_flags_take_precedence_in_order(example, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lam: 0.5\nmax_steps: 7\npresets:\n  quick:\n    max_steps: 3\n    depth: 4\n")
    args = example.parse_args(["--config", str(cfg), "--preset", "quick", "--depth", "2"])
    assert (args.lam, args.max_steps, args.depth) == (0.5, 3, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit, match="no_such_option"):
        example.parse_args(["--config", str(bad)])


def test_offline_without_data_file_stops_at_once_naming_the_flag(example, tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(example, "CACHE_FILE", str(tmp_path / "cache" / "input.txt"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="--data-file"):
        example.read_text(None)


def test_missing_or_empty_data_file_is_a_clear_error(example, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        example.read_text(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SystemExit, match="is empty"):
        example.read_text(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    with pytest.raises(SystemExit, match="too short"):
        example.main(["--data-file", str(short), "--output-dir", str(tmp_path / "o")])
