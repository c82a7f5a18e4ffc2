"""D-Gating on a PEFT model: base heads gated through LoRA layers, penalty on the effective weights."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import make_inputs, make_model

import hf_dgate
from hf_dgate.patch import merge_adapters


def _lora_llama():
    model = make_model("llama")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def test_lora_model_gates_heads_and_trains_adapters_and_gates():
    model, inputs = _lora_llama(), make_inputs("llama")
    ref = model(**inputs).logits
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons", "layers"], lam=0.1))
    assert torch.equal(model(**inputs).logits, ref)
    bank = hf_dgate.get_bank(model)
    assert bank.group_sets[0].sites[0].module.endswith("self_attn.v_proj")  # the LoRA layer, adapter included
    (model(**inputs).logits.pow(2).mean() + hf_dgate.penalty(model)).backward()
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert v.lora_B["default"].weight.grad.abs().sum() > 0 and v.base_layer.weight.grad is None  # base frozen
    assert all(g.grad.abs().sum() > 0 for g in bank.gammas.values())


def test_penalty_uses_effective_weights_and_fold_scales_adapters():
    model, inputs = _lora_llama(), make_inputs("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.3, depth=3))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        for g in bank.gammas.values():
            g.uniform_(0.5, 1.5)
        bank.gammas["heads"][:, 0] = 0.0
    gated = model(**inputs).logits
    # expected penalty from W + BA of every gated projection
    base = model.base_model.model.model
    w_sq = 0.0
    for layer in base.layers:
        v, d = layer.self_attn.v_proj, layer.mlp.down_proj
        w_sq += (v.base_layer.weight + v.get_delta_weight("default")).pow(2).sum()
        w_sq += v.base_layer.weight.new_tensor(0) if v.base_layer.bias is None else v.base_layer.bias.pow(2).sum()
        w_sq += (d.base_layer.weight + d.get_delta_weight("default")).pow(2).sum()
    gam_sq = sum(g.pow(2).sum() for g in bank.gammas.values())
    torch.testing.assert_close(hf_dgate.penalty(model), 0.3 / 3 * (w_sq + gam_sq))
    hf_dgate.remove_dgate(model, merge=True)
    torch.testing.assert_close(model(**inputs).logits, gated, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(**inputs).logits, gated, rtol=1e-5, atol=1e-5)


def test_merge_adapters_gives_a_plain_gated_model_with_the_same_zeros():
    model, inputs = _lora_llama(), make_inputs("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, [0, 3]] = 0.0
        hf_dgate.get_bank(model).gammas["neurons"][:, :10] = 0.5
    gated = model(**inputs).logits
    zeros = hf_dgate.sparsity_report(model).targets["heads"].zero
    plain = merge_adapters(model)
    assert not isinstance(plain, peft.PeftModel) and hf_dgate.is_gated(plain)
    torch.testing.assert_close(plain(**inputs).logits, gated, rtol=1e-5, atol=1e-5)
    assert hf_dgate.sparsity_report(plain).targets["heads"].zero == zeros == 2


def test_export_merges_adapters_and_prunes():
    model, inputs = _lora_llama(), make_inputs("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, [0, 3]] = 0.0
        hf_dgate.get_bank(model).gammas["neurons"][:, :10] = 0.0
    gated = model(**inputs).logits
    small = hf_dgate.export_pruned(model)
    assert not isinstance(small, peft.PeftModel)
    assert small.model.layers[0].self_attn.v_proj.out_features == 8  # one of two key/value groups left
    assert small.model.layers[0].mlp.down_proj.in_features == 48 - 10
    torch.testing.assert_close(small(**inputs).logits, gated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(**inputs).logits, gated)  # the PEFT model itself is untouched


@pytest.mark.parametrize("depth,expect_zeros", [(2, False), (3, True)])
def test_frozen_weights_need_depth_three_for_sparsity(depth, expect_zeros):
    """Only the gates move when primary weights are frozen: D-1 gates induce |s|^(2/(D-1)), sparse only for D>=3."""
    torch.manual_seed(0)
    model, inputs = make_model("llama"), make_inputs("llama", batch=4, seq=16)
    for p in model.parameters():
        p.requires_grad_(False)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", depth=depth, lam=0.1, threshold=1e-4))
    bank = hf_dgate.get_bank(model)
    opt = torch.optim.SGD(bank.parameters(), lr=0.5)
    for _ in range(150):
        loss = model(**inputs, labels=inputs["input_ids"]).loss + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    zeros = hf_dgate.sparsity_report(model).targets["heads"].zero
    assert (zeros > 0) == expect_zeros, zeros


def test_lora_example_runs(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "lora_head_pruning.py"
    cmd = [sys.executable, str(script), "--steps", "3", "--pretrain-steps", "2", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["max_logit_diff"] < 1e-3 and summary["params_after"] <= summary["params_before"]
    assert (tmp_path / "config.json").is_file()


def _peft_llama(config):
    return peft.get_peft_model(make_model("llama"), config)


@pytest.mark.parametrize(
    "config,kind",
    [
        (peft.LoraConfig(r=4, target_modules=["v_proj"], use_dora=True), "DoRA"),
        (peft.LoraConfig(r=4, target_modules=["down_proj"], use_dora=True), "DoRA"),
        (peft.LoraConfig(r=4, target_modules=["v_proj"], lora_bias=True), "lora_bias=True"),
        (peft.IA3Config(target_modules=["v_proj"], feedforward_modules=[]), "ia3"),
        (peft.LoHaConfig(r=4, target_modules=["v_proj"]), "loha"),
        (peft.AdaLoraConfig(init_r=4, target_modules=["v_proj"], total_step=10), "adalora"),
    ],
)
def test_adapters_whose_fold_is_not_exact_are_refused_on_gated_layers(config, kind):
    model = _peft_llama(config)
    with pytest.raises(ValueError, match=f"supports plain LoRA adapters only.*{kind}"):
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    assert not hf_dgate.is_gated(model)


@torch.no_grad()
def test_dora_on_a_layer_no_gate_touches_exports_exactly():
    """DoRA on q/k (removable, never scaled by a gate) is merged before pruning: the export stays exact."""
    model = _peft_llama(peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], use_dora=True))
    inputs = make_inputs("llama")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)  # a non-zero adapter, so the DoRA rescaling matters
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    bank = hf_dgate.get_bank(model)
    bank.gammas["heads"][:, [0, 3]] = 0.0
    bank.gammas["neurons"].uniform_(0.5, 1.5)
    gated = model(**inputs).logits
    small = hf_dgate.export_pruned(model)
    assert small.model.layers[0].self_attn.v_proj.out_features == 8
    torch.testing.assert_close(small(**inputs).logits, gated, rtol=1e-5, atol=1e-5)


def test_a_whole_module_group_on_a_lora_layer_is_refused():
    model = _peft_llama(peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    rule = hf_dgate.GroupRule("vproj", r"v_proj$", "module")
    with pytest.raises(ValueError, match="folding it would skip the adapter"):
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[], groups=[rule]))


def test_adapters_added_after_gating_are_refused_on_merge():
    base = make_model("llama")
    hf_dgate.apply_dgate(base, hf_dgate.DGateConfig(target="heads"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="added after apply_dgate"):
        hf_dgate.export_pruned(model)
