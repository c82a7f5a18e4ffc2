"""Gated models on the engines people train with: torch.compile, bf16, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model

import hf_dgate


def _step(model, inputs):
    out = model(**inputs, labels=inputs["input_ids"])
    return out.loss + hf_dgate.penalty(model)


def test_no_graph_break_from_gates_under_torch_compile():
    model, inputs = make_model("llama"), make_inputs("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons", "layers"]))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 1] = 0.3
    explained = torch._dynamo.explain(lambda ids: _step(model, {"input_ids": ids}))(inputs["input_ids"])
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(lambda ids: _step(model, {"input_ids": ids}), fullgraph=True, backend="eager")
    loss = compiled(inputs["input_ids"])
    torch.testing.assert_close(loss, _step(model, inputs))
    loss.backward()
    assert hf_dgate.get_bank(model).gammas["heads"].grad.abs().sum() > 0


@pytest.mark.parametrize("weight_side", [True, False])
def test_bf16_autocast_training_keeps_gates_and_penalty_in_fp32(weight_side):
    model, inputs = make_model("llama"), make_inputs("llama", batch=4, seq=16)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=1e-2, weight_side=weight_side))
    bank = hf_dgate.get_bank(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs, labels=inputs["input_ids"])
        penalty = hf_dgate.penalty(model)
        assert penalty.dtype == torch.float32
        loss = out.loss.float() + penalty
        opt.zero_grad()
        loss.backward()
        assert all(g.grad.dtype == torch.float32 and torch.isfinite(g.grad).all() for g in bank.gammas.values())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.to(torch.bfloat16)  # a half-precision model still keeps fp32 gates
    assert all(g.dtype == torch.float32 for g in bank.gammas.values())
    assert model.model.layers[0].self_attn.v_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("method", ["dgate", "l0"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for checkpointing in (False, True):
        model, inputs = make_model("llama"), make_inputs("llama")
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], method=method))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)  # same L0 samples in both runs
        _step(model, inputs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("dgate" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
