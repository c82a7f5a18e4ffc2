"""Upload path of an export: only the network calls are intercepted; the files and card are the real ones."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_model
from huggingface_hub import HfApi, ModelCard, RepoUrl

import hf_dgate
from hf_dgate import export_to_dir


@pytest.fixture
def gated_llama():
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons", "layers"], lam=0.01))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas["heads"][0, 0] = 0.0  # layer 0 keeps one of two key/value heads
        bank.gammas["neurons"][0, :40] = 0.0  # layer 0 keeps 8 of 48 neurons
        bank.gammas["layers"][0, 1] = 0.0  # layer 1 goes entirely
    return model


@pytest.fixture
def hub_calls(monkeypatch):
    calls: dict = {"create_repo": [], "uploads": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {f: open(os.path.join(folder_path, f), "rb").read() for f in sorted(os.listdir(folder_path))}
        calls["uploads"].append((repo_id, files))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = open(src, "rb").read() if isinstance(src, str) else src
        calls["uploads"].append((repo_id, files))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # transformers 4.x pushes through huggingface_hub's module-level functions, bound to an HfApi made at import
    import transformers.utils.hub as transformers_hub

    for name, fn in (("create_repo", create_repo), ("create_commit", create_commit)):
        if hasattr(transformers_hub, name):
            monkeypatch.setattr(transformers_hub, name, lambda *a, _fn=fn, **k: _fn(None, *a, **k))
    return calls


def test_export_to_dir_uploads_weights_config_and_card(gated_llama, hub_calls, tmp_path):
    summary = export_to_dir(
        gated_llama, tmp_path / "out", push_to_hub=True, hub_model_id="me/tiny-llama-pruned", seq_len=16,
        base_model="meta-llama/Llama-3.2-1B",
    )  # fmt: skip
    assert [r for r, _ in hub_calls["create_repo"]] == ["me/tiny-llama-pruned"]
    (repo, files), *_ = hub_calls["uploads"]
    assert repo == "me/tiny-llama-pruned" and summary["hub_repo"] == repo
    assert {"model.safetensors", "config.json", "README.md", "dgate_export.json"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["num_hidden_layers"] == 1 and config["dgate_pruning"]["layers"] == [0]
    assert config["dgate_pruning"]["kv_heads"] == [1] and config["dgate_pruning"]["neurons"] == [8]

    card_path = tmp_path / "card.md"
    card_path.write_bytes(files["README.md"])
    card = ModelCard.load(card_path)
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert "hf-dgate" in card.data.tags and card.data.library_name == "transformers"
    text = card.text
    assert f"{summary['params_before']:,}" in text and f"{summary['params_after']:,}" in text
    assert f"{summary['flops_before']:,}" in text and f"{summary['flops_after']:,}" in text
    assert summary["speedup_text"] in text and "paired runs" in text  # the measured speed-up, with its spread
    assert "| 0 (0) | 2: [2, 3] | 1 | 8 |" in text  # per-layer kept heads and neurons
    assert "Layers removed entirely: [1]" in text
    assert '"depth": 3' in text and '"lam": 0.01' in text  # the DGateConfig
    assert summary["params_after"] < summary["params_before"] and summary["flops_after"] < summary["flops_before"]
    assert summary["max_abs_diff"] < 1e-5


def test_push_to_hub_on_the_exported_model(gated_llama, hub_calls, monkeypatch):
    # transformers reads the remote card first: a download, intercepted like the upload
    monkeypatch.setattr(
        "transformers.utils.hub.create_and_tag_model_card", lambda repo_id, *a, **k: ModelCard("card")
    )
    pruned = hf_dgate.export_pruned(gated_llama)
    pruned.push_to_hub("me/pruned")
    (repo, files), *_ = hub_calls["uploads"]
    assert repo == "me/pruned" and "model.safetensors" in files
    assert json.loads(files["config.json"])["dgate_pruning"]["kv_heads"] == [1]


def test_push_needs_a_repo_id(gated_llama, tmp_path):
    with pytest.raises(ValueError, match="hub_model_id"):
        export_to_dir(gated_llama, tmp_path / "o", push_to_hub=True)
