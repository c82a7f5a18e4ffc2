"""The penalty identities of D-Gating on hand-made numbers and random draws."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_dgate
from hf_dgate import gates as G


def _gated_rows(weight, gammas, lam, depth):
    """A Linear whose output rows are the groups, with given weights and gates."""
    weight = torch.as_tensor(weight, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)).double()
    rule = hf_dgate.GroupRule("rows", r"^0$", kind="out")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[], groups=[rule], depth=depth, lam=lam))
    with torch.no_grad():
        model[0].weight.copy_(weight)
        hf_dgate.get_bank(model).gammas["rows"].copy_(torch.as_tensor(gammas, dtype=torch.float64))
    return model


def test_penalty_closed_form_by_hand():
    model = _gated_rows([[1, 2], [0, 3], [2, 2]], [[1, 0.5, 2], [2, 1, 0]], lam=0.3, depth=3)
    # ||w||^2 = 5, 9, 8; gates^2 sum to 10.25; R = 0.3/3 * 32.25
    assert math.isclose(hf_dgate.penalty(model).item(), 3.225, rel_tol=1e-12)
    # s = 2, 0.5, 0 -> ||theta|| = 2*sqrt(5), 1.5, 0
    induced = 0.3 * ((2 * math.sqrt(5)) ** (2 / 3) + 1.5 ** (2 / 3))
    assert math.isclose(hf_dgate.induced_penalty(model).item(), induced, rel_tol=1e-12)
    assert math.isclose(hf_dgate.misalignment(model).item(), 3.225 - induced, rel_tol=1e-12)
    torch.testing.assert_close(
        hf_dgate.effective_norms(model, "rows"), torch.tensor([2 * math.sqrt(5), 1.5, 0.0], dtype=torch.float64)
    )


def test_penalty_gradient_is_weight_decay_on_primary_weights():
    model = _gated_rows([[1.0, -2.0], [0.5, 3.0]], [[1.0, 1.0], [1.0, 1.0]], lam=0.6, depth=3)
    hf_dgate.penalty(model).backward()
    torch.testing.assert_close(model[0].weight.grad, (2 * 0.6 / 3) * model[0].weight.detach())


def test_direct_method_penalises_theta_without_gates():
    model = _gated_rows([[3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0]], lam=0.5, depth=2)
    bank = hf_dgate.get_bank(model)
    assert bank.gammas["rows"].requires_grad
    direct = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False)).double()
    rule = hf_dgate.GroupRule("rows", r"^0$", kind="out")
    hf_dgate.apply_dgate(direct, hf_dgate.DGateConfig(target=[], groups=[rule], depth=2, lam=0.5, method="direct"))
    with torch.no_grad():
        direct[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    p = hf_dgate.penalty(direct)
    assert math.isclose(p.item(), 0.5 * 5.0)
    p.backward()  # the zero group gets subgradient 0, not NaN
    assert torch.isfinite(direct[0].weight.grad).all()
    assert not hf_dgate.get_bank(direct).gammas["rows"].requires_grad


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(2, 5),
    n_groups=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    lam=st.floats(0.01, 10.0),
)
def test_am_gm_bound_and_balance(depth, n_groups, seed, lam):
    g = torch.Generator().manual_seed(seed)
    w_sq = torch.rand(n_groups, generator=g, dtype=torch.float64) * 4
    gammas = torch.randn(depth - 1, n_groups, generator=g, dtype=torch.float64) * 2
    surrogate = G.surrogate_penalty(w_sq.sum(), gammas, lam, depth)
    induced = G.induced_penalty(G.effective_norms(w_sq, gammas), lam, depth)
    mis = G.misalignment(w_sq, gammas, lam, depth)
    assert mis.item() >= -1e-12 * max(1.0, surrogate.item())
    assert math.isclose(mis.item(), (surrogate - induced).item(), rel_tol=1e-9, abs_tol=1e-12)
    # balanced: every gate^2 equals ||w||^2 (signs free) -> no misalignment
    balanced = w_sq.sqrt().expand(depth - 1, -1) * torch.sign(gammas)
    assert abs(G.misalignment(w_sq, balanced, lam, depth).item()) <= 1e-12 * max(1.0, surrogate.item())
