"""What differs between transformers 4.57 and 5.x (docs/transformers_versions.md), checked on the installed line.

On 4.x the families with their own `prune_heads` export heads through it: config.json records `pruned_heads` and a
plain `AutoModel*.from_pretrained` rebuilds the non-uniform model. On 5.x (no `prune_heads`) the same export
reloads through `hf_dgate.AutoPrunedModel` or the generated remote code, and a plain load fails loudly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

import pytest
import torch
import transformers as T

import hf_dgate
from hf_dgate.compat import HAS_HF_PRUNE_HEADS, build_on_meta, hf_prune_heads
from hf_dgate.registry import SPECS, spec_for

sys.path.insert(0, os.path.dirname(__file__))
from families import build, inputs, output  # noqa: E402

HF_PRUNE_FAMILIES = ["gpt2", "bert", "roberta", "distilbert", "electra", "vit"]  # their own prune_heads on 4.x
AUTO = {"causal": T.AutoModelForCausalLM, "encoder": T.AutoModelForMaskedLM, "image": T.AutoModelForImageClassification}
# 4 heads per layer; keep 3, 2 and 1 (a different count in every layer)
DEAD = {0: [0], 1: [0, 1], 2: [0, 1, 2]}


def _gated(family: str, target: str | list[str] = "heads"):
    model, kind, _ = build(family)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        for layer, heads in DEAD.items():
            bank.gammas["heads"][:, [4 * layer + h for h in heads]] = 0
    return model, kind


@pytest.mark.parametrize("family", HF_PRUNE_FAMILIES)
def test_non_uniform_heads_round_trip(family, tmp_path):
    model, kind = _gated(family)
    batch = inputs(kind)
    with torch.no_grad():
        ref = output(model, batch)
    summary = hf_dgate.export_to_dir(model, tmp_path / "out", seq_len=8, measure=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dgate_pruning"]["heads"] == [[1, 2, 3], [2, 3], [3]]
    if HAS_HF_PRUNE_HEADS:  # transformers' own contract: pruned_heads in the config, plain Auto class reloads
        assert {int(k): sorted(v) for k, v in config["pruned_heads"].items()} == DEAD
        assert summary["native"] and config["dgate_pruning"]["hf_pruned_heads"]
        loaded = AUTO[kind].from_pretrained(tmp_path / "out")
    else:  # 5.x: no pruned_heads; hf_dgate's loader (or trust_remote_code) rebuilds the shapes
        assert not config.get("pruned_heads") and not summary["native"]
        loaded = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert (output(loaded.eval(), batch) - ref).abs().max().item() <= 1e-5


def test_dropped_layers_move_the_pruned_heads_with_them(tmp_path):
    """GPT-2 with heads and layers: config.pruned_heads is keyed by layer position, so dropping layer 1 moves
    layer 2's entry to position 1."""
    model, kind = _gated("gpt2", ["heads", "layers"])
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas["layers"][:, 1] = 0
        ref = output(model, inputs(kind))
    summary = hf_dgate.export_to_dir(model, tmp_path / "out", seq_len=8, measure=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_layer"] == 2 and config["dgate_pruning"]["layers"] == [0, 2]
    if HAS_HF_PRUNE_HEADS:
        assert {int(k): sorted(v) for k, v in config["pruned_heads"].items()} == {0: [0], 1: [0, 1, 2]}
        assert summary["native"]
        loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    else:
        loaded = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert (output(loaded.eval(), inputs(kind)) - ref).abs().max().item() <= 1e-5


def test_heads_with_non_uniform_neurons_load_both_ways(tmp_path):
    """Heads through pruned_heads (4.x) next to neurons the config cannot express: AutoPrunedModel and the
    generated remote code rebuild only the neurons, transformers re-applies the heads."""
    model, kind = _gated("bert", ["heads", "neurons"])
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["neurons"][:, :30] = 0  # layer 0 keeps 18 of 48, the others all
        ref = output(model, inputs(kind))
    summary = hf_dgate.export_to_dir(model, tmp_path / "out", seq_len=8, measure=False)
    assert not summary["native"] and summary["remote_code"] == "AutoModelForMaskedLM"
    for loaded in (
        hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "out"),
        T.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", trust_remote_code=True),
    ):
        with torch.no_grad():
            assert (output(loaded.eval(), inputs(kind)) - ref).abs().max().item() <= 1e-5


def _llama_with_one_head_group_pruned():
    """Llama (no prune_heads in either line): never native with different head counts."""
    model, kind, _ = build("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 0] = 0  # layer 0 keeps one of its two key/value groups
    return model, kind


@contextlib.contextmanager
def _transformers_warnings():
    """transformers' logged warnings (its root logger does not propagate, so caplog misses them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _type_mismatch(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if "You are using a model of type" in r.getMessage()]


def test_a_plain_load_of_a_non_native_export_stops_before_reading_weights(tmp_path):
    """What docs/transformers_versions.md promises: the export is saved under its own model type, so a plain Auto
    load (or a pipeline) asks for trust_remote_code=True before any weight is read, never a size mismatch that
    invites ignore_mismatched_sizes; the folder it points to opens with both loaders; the model kept in memory and
    AutoPrunedModel's result keep the family's own model type, and both loaders give the pruned model's outputs."""
    model, kind = _llama_with_one_head_group_pruned()
    with torch.no_grad():
        ref = output(model, inputs(kind))
    out = tmp_path / "out"
    summary = hf_dgate.export_to_dir(model, out, seq_len=8, measure=False)
    assert not summary["native"] and model.config.model_type == "llama"
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "dgate_pruned_llama" and saved["dgate_pruning"]["base_model_type"] == "llama"
    assert saved["auto_map"]["AutoConfig"] == "modeling_dgate_pruned.DGatePrunedLlamaForCausalLMConfig"
    (out / "model.safetensors").rename(tmp_path / "weights")  # nothing below may get as far as the weights
    plain = (
        T.AutoModelForCausalLM.from_pretrained,
        T.AutoConfig.from_pretrained,
        lambda path: T.pipeline("text-generation", model=str(path)),
    )
    for load in plain:
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load(out)
    (tmp_path / "weights").rename(out / "model.safetensors")
    card = (out / "README.md").read_text()
    first = card.split("## ")[1]  # the first section after the title
    assert first.startswith("How to load") and "hf_dgate.AutoPrunedModel.from_pretrained" in first
    assert "trust_remote_code=True" in first
    with _transformers_warnings() as records:
        again = hf_dgate.AutoPrunedModel.from_pretrained(out)
    assert not _type_mismatch(records)  # the config is read as the base type, not instantiated across types
    assert type(again.config) is T.LlamaConfig and again.config.model_type == "llama"
    trusted = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(trusted).__name__ == "DGatePrunedLlamaForCausalLM"
    assert trusted.config.model_type == "dgate_pruned_llama"
    with torch.no_grad():
        for loaded in (again, trusted):
            assert (output(loaded.eval(), inputs(kind)) - ref).abs().max().item() <= 1e-5
    assert spec_for(trusted.config) is SPECS["llama"]
    hf_dgate.apply_dgate(trusted, hf_dgate.DGateConfig(target="neurons"))  # the family's registry entry still applies


def test_a_class_specific_load_of_a_non_native_export_warns_then_fails_on_the_sizes(tmp_path):
    """LlamaForCausalLM.from_pretrained reads any model type: transformers warns about the type, then refuses the
    shapes (docs/transformers_versions.md says so; nothing hf_dgate writes can stop it earlier)."""
    model, _ = _llama_with_one_head_group_pruned()
    hf_dgate.export_to_dir(model, tmp_path / "out", seq_len=8, measure=False)
    with _transformers_warnings() as records, pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched"):
        T.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert "dgate_pruned_llama" in " ".join(_type_mismatch(records))


def test_exports_without_the_generated_loader_keep_the_family_model_type(tmp_path):
    """A native export (plain transformers loads it) and a non-native one saved with remote_code=False keep
    config.model_type; the latter loads with AutoPrunedModel only."""
    model, kind = _llama_with_one_head_group_pruned()
    with torch.no_grad():
        ref = output(model, inputs(kind))
    summary = hf_dgate.export_to_dir(model, tmp_path / "bare", seq_len=8, measure=False, remote_code=False)
    saved = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert not summary["native"] and saved["model_type"] == "llama" and "auto_map" not in saved
    with torch.no_grad():
        loaded = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "bare")
        assert (output(loaded.eval(), inputs(kind)) - ref).abs().max().item() <= 1e-5

    native, kind, _ = build("llama")
    hf_dgate.apply_dgate(native, hf_dgate.DGateConfig(target="layers"))
    with torch.no_grad():
        hf_dgate.get_bank(native).gammas["layers"][:, 1] = 0
        ref = output(native, inputs(kind))
    summary = hf_dgate.export_to_dir(native, tmp_path / "native", seq_len=8, measure=False)
    saved = json.loads((tmp_path / "native" / "config.json").read_text())
    assert summary["native"] and saved["model_type"] == "llama" and "auto_map" not in saved
    with torch.no_grad():
        loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "native")
        assert (output(loaded.eval(), inputs(kind)) - ref).abs().max().item() <= 1e-5


def test_a_pruned_model_type_that_disagrees_with_its_record_is_refused(tmp_path):
    model, _ = _llama_with_one_head_group_pruned()
    out = tmp_path / "out"
    hf_dgate.export_to_dir(model, out, seq_len=8, measure=False)
    saved = json.loads((out / "config.json").read_text())
    saved["dgate_pruning"]["base_model_type"] = "gpt2"
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(hf_dgate.errors.ExportError, match="records base model type 'gpt2'"):
        hf_dgate.AutoPrunedModel.from_pretrained(out)


def test_a_family_that_leaves_prune_heads_unimplemented_falls_back():
    """DeBERTa-v2 has `_prune_heads` on 4.x but raises NotImplementedError: hf_dgate's own implementation is used
    instead and config.pruned_heads stays as it was; GPT-2's is used on 4.x."""
    model, _, _ = build("deberta_v2")
    assert not hf_prune_heads(model, {0: [1]})
    assert not getattr(model.config, "pruned_heads", None)
    gpt2, _, _ = build("gpt2")
    assert hf_prune_heads(gpt2, {0: [1]}) == HAS_HF_PRUNE_HEADS


def test_meta_build_applies_pruned_heads():
    """Shape checks build the model on the meta device; a 4.x config with pruned_heads prunes there too."""
    model, _, _ = build("bert")
    if HAS_HF_PRUNE_HEADS:
        model.prune_heads({1: [0, 2]})
    fresh = build_on_meta(type(model), model.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert next(fresh.parameters()).device.type == "meta"
