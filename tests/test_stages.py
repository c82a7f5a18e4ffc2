"""Hierarchical vision models: each stage's list of blocks is a stack with its own width and head count (read per
stage from the config's lists), gated, exported and reloaded; and an export that a reload could not rebuild is
refused before it is written."""

import warnings

import pytest
import torch

import hf_dgate
from hf_dgate.errors import ExportError
from hf_dgate.loading import AutoPrunedModel, save_pruned

transformers = pytest.importorskip("transformers")


def _segformer():
    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.SegformerForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _convnext():
    cfg = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 2], layer_scale_init_value=0.5, num_labels=3
    )
    torch.manual_seed(0)
    return transformers.ConvNextForImageClassification(cfg).eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _gate_zero_export(model, batch, target):
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target), example_inputs=batch)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        gates = bank.gammas[target]
        gates[:, : bank.group_sets[0].n_groups] = 0  # all of the first stage's first block, and every other group
        gates[:, 1::2] = 0
        gated = model(**batch).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_dgate.export_pruned(model, example_inputs=batch), gated


@pytest.mark.parametrize("build,target", [(_segformer, "heads"), (_segformer, "neurons"), (_segformer, "layers"),
                                          (_convnext, "neurons"), (_convnext, "layers")])
def test_stages_are_gated_exported_and_reloaded_exactly(tmp_path, build, target):
    model, batch = build()
    stacks = [st.path for st in hf_dgate.architectures.block_stacks(model, hf_dgate.DGateConfig(target=target))]
    assert len(stacks) == 2 and all(".0" in p or ".1" in p for p in stacks), stacks  # one stack per stage
    pruned, gated = _gate_zero_export(model, batch, target)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    out = pruned(**batch).logits
    assert torch.allclose(out, gated, atol=1e-5), float((out - gated).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pruned(pruned, tmp_path)
        again = AutoPrunedModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(**batch).logits, out, atol=1e-6)


def test_layers_of_a_stage_are_counted_in_its_depth():
    model, batch = _segformer()
    pruned, _ = _gate_zero_export(model, batch, "layers")
    assert sum(pruned.config.depths) < 3 and len(pruned.config.depths) == 2
    stacks = hf_dgate.architectures.find_stacks(pruned)
    assert [len(blocks) for _, blocks in stacks] == pruned.config.depths


def test_an_export_a_reload_cannot_rebuild_is_refused(monkeypatch):
    """Neurons of SegFormer are not native (a width per layer): the export is rebuilt from its record before it is
    returned, and a record that does not give the exported shapes is refused there, not at load time."""
    import hf_dgate.loading

    monkeypatch.setattr(hf_dgate.loading, "rebuild_structure", lambda model, *a, **k: model)
    model, batch = _segformer()
    with pytest.raises(ExportError, match="would not load back"):
        _gate_zero_export(model, batch, "neurons")
