from __future__ import annotations

import torch
from conftest import make_model

import hf_dgate


def _zero(model, target, groups):
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas[target][:, groups] = 0.0


def test_report_counts_zero_groups_and_parameters_removed():
    model = make_model("gpt2")  # d=32, 4 heads of 8, MLP 48, 2 layers
    total = sum(p.numel() for p in model.parameters())
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons", "layers"]))
    rep = hf_dgate.sparsity_report(model)
    assert rep.params_total == total and rep.params_kept == total
    assert rep.targets["heads"].groups == 8 and rep.targets["neurons"].groups == 96

    _zero(model, "heads", [1])  # layer 0, head 1: q/k/v rows (+bias) and c_proj columns
    rep = hf_dgate.sparsity_report(model)
    per_head = 3 * 8 * (32 + 1) + 8 * 32
    assert rep.params_kept == total - per_head
    assert rep.targets["heads"].zero == 1 and rep.sparsity("heads") == 1 / 8
    assert rep.targets["heads"].per_layer == {"0": [3, 4], "1": [4, 4]}

    _zero(model, "neurons", [0, 1, 2])  # c_fc rows (+bias) and c_proj rows
    per_neuron = (32 + 1) + 32
    assert hf_dgate.sparsity_report(model).params_kept == total - per_head - 3 * per_neuron

    _zero(model, "layers", [0])  # the whole first block; its dead head/neurons are not counted twice
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    rep = hf_dgate.sparsity_report(model)
    assert rep.params_kept == total - block
    text = str(rep)
    assert "heads: 1/8 zero" in text and "layers: 1/2 zero" in text and f"{rep.params_kept:,}" in text
    assert rep.to_dict()["targets"]["layers"]["sparsity"] == 0.5


def test_threshold_reads_effective_norms():
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", threshold=1e-3))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 0] = 1e-3  # ||theta|| = 1e-6 * ||w|| : tiny but not 0
    assert hf_dgate.sparsity_report(model).targets["heads"].zero == 1
    assert hf_dgate.sparsity_report(model, threshold=1e-12).targets["heads"].zero == 0


def test_relative_threshold_compares_within_a_layer_and_single_groups_across_layers():
    model = make_model("gpt2")  # 2 layers of 4 heads
    cfg = hf_dgate.DGateConfig(target=["heads", "layers"], threshold=0.1, threshold_mode="relative")
    hf_dgate.apply_dgate(model, cfg)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas["heads"][:, 4:] = 1e-3  # layer 1 shrank as a whole: alive relative to itself
        bank.gammas["heads"][:, 5] = 1e-5  # ... except one head, 1e-4 of its neighbours
        bank.gammas["heads"][:, 0] = 0.2  # layer 0: one head at 0.04 of the others -> zero
        bank.gammas["layers"][:, 1] = 0.05  # whole layers (one group each) compare with each other
    assert bank.zero_groups("heads").tolist() == [True, False, False, False, False, True, False, False]
    assert bank.zero_groups("layers").tolist() == [False, True]
    absolute = bank.effective_norms("heads") < 0.1
    assert absolute[4:].all()  # what the absolute rule would have said about layer 1
