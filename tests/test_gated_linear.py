"""The weight-side gate: exact gradients, same model as the activation hooks, no extra saved activations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_inputs, make_model

import hf_dgate
from hf_dgate.gated_linear import gated_linear


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("use_out,use_in,bias", [(True, False, True), (False, True, True), (True, True, False)])
def test_gradcheck(transposed, use_out, use_in, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g) if transposed else torch.randn(4, 5, dtype=torch.float64)
    w.requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    s_out = torch.randn(4, dtype=torch.float64, requires_grad=True) if use_out else None
    s_in = torch.randn(5, dtype=torch.float64, requires_grad=True) if use_in else None
    assert torch.autograd.gradcheck(lambda *a: gated_linear(*a, transposed=transposed), (x, w, b, s_out, s_in))


def _grads(model, inputs):
    model.zero_grad()
    out = model(**inputs).logits
    (out.pow(2).mean() + hf_dgate.penalty(model)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,side", [("gpt2", "value"), ("llama", "output"), ("gpt_neox", "value")])
def test_weight_side_equals_activation_hooks(family, side):
    inputs = make_inputs(family)
    results = []
    for weight_side in (True, False):
        model = make_model(family)
        cfg = hf_dgate.DGateConfig(target=["heads", "neurons", "layers"], head_side=side, weight_side=weight_side)
        hf_dgate.apply_dgate(model, cfg)
        with torch.no_grad():
            for t, gam in hf_dgate.get_bank(model).gammas.items():
                gam.copy_(torch.rand(gam.shape, generator=torch.Generator().manual_seed(len(t))) + 0.5)
        results.append(_grads(model, inputs))
    (out_w, grads_w), (out_h, grads_h) = results
    torch.testing.assert_close(out_w, out_h, rtol=1e-5, atol=1e-6)
    assert grads_w.keys() == grads_h.keys()
    for name in grads_w:
        torch.testing.assert_close(grads_w[name], grads_h[name], rtol=1e-4, atol=1e-6, msg=name)


def _saved_bytes(model, inputs):
    """Bytes of distinct storages autograd keeps for the backward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).logits.sum().backward()
    return sum(storages.values())


def test_weight_side_saves_no_extra_activations():
    inputs = make_inputs("llama", batch=8, seq=64)
    plain = _saved_bytes(make_model("llama"), inputs)
    sizes = {}
    for weight_side in (True, False):
        model = make_model("llama")
        cfg = hf_dgate.DGateConfig(target=["heads", "neurons"], weight_side=weight_side)
        sizes[weight_side] = _saved_bytes(hf_dgate.apply_dgate(model, cfg), inputs)
    assert sizes[True] <= plain * 1.01  # only the tiny gate vectors
    assert sizes[False] > plain * 1.1  # hooks keep the unscaled activations alive


def test_deepcopy_is_independent_of_the_original():
    model, inputs = make_model("gpt2"), make_inputs("gpt2")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 0] = 0.0
    gated = model(**inputs).logits
    clone = copy.deepcopy(model)
    hf_dgate.remove_dgate(clone, merge=False)  # must not touch the original's gates
    torch.testing.assert_close(model(**inputs).logits, gated)
    assert not torch.allclose(clone(**inputs).logits, gated)
