"""The baselines as peers of D-Gating: direct penalty, L0 hard-concrete gates, network slimming, magnitude pruning."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs, make_model

import hf_dgate
from hf_dgate import gates as G
from hf_dgate.models import VGG16, LeNet300100
from hf_dgate.pruning import magnitude_prune
from hf_dgate.surgery import prune_torch_model


def test_expected_l0_matches_monte_carlo():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0])
    n = 200_000
    samples = G.hard_concrete_sample(log_alpha.expand(n, -1))
    nonzero = (samples > 0).double().mean(0)
    expected = G.expected_l0(log_alpha).double()
    tol = 4 * (expected * (1 - expected) / n).sqrt() + 1e-4
    assert ((nonzero - expected).abs() <= tol).all(), (nonzero, expected)
    assert samples.min() >= 0 and samples.max() <= 1 and (samples == 0).any() and (samples == 1).any()


def test_hard_concrete_deterministic_gate():
    la = torch.tensor([-10.0, 0.0, 10.0])
    expected = [0.0, 0.5 * 1.2 - 0.1, 1.0]
    torch.testing.assert_close(G.hard_concrete_deterministic(la), torch.tensor(expected))


def test_l0_samples_in_training_and_is_deterministic_in_eval():
    model, inputs = make_model("llama"), make_inputs("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "layers"], method="l0", lam=0.1))
    bank = hf_dgate.get_bank(model)
    model.train()
    a, b = model(**inputs).logits, model(**inputs).logits
    assert not torch.allclose(a, b)  # fresh gates each forward
    model.eval()
    torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits)
    p = hf_dgate.penalty(model)
    expected = 0.1 * G.expected_l0(torch.tensor(G.L0_INIT_LOG_ALPHA)).item() * (4 + 2)
    assert math.isclose(p.item(), expected, rel_tol=1e-5)
    p.backward()
    assert bank.gammas["heads"].grad is not None
    with torch.no_grad():
        bank.gammas["heads"][0, 0] = -10.0  # the deterministic gate is exactly 0
    assert hf_dgate.sparsity_report(model).targets["heads"].zero == 1


def _train(model, x, y, steps, lr=0.2):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y) + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _feature_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 20, generator=g), torch.randint(0, 3, (256,), generator=g)
    x[:, :5] += y.unsqueeze(1).float()
    return x, y


def test_direct_penalty_does_not_reach_exact_zeros_but_dgate_does():
    """The paper's point (Fig. 1, 7): subgradient steps on the non-smooth penalty oscillate around zero."""
    x, y = _feature_data()
    zeros = {}
    for method in ("direct", "dgate"):
        torch.manual_seed(0)
        model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
        cfg = hf_dgate.DGateConfig(target="features", method=method, depth=2, lam=0.1, threshold=1e-4)
        hf_dgate.apply_dgate(model, cfg)
        _train(model, x, y, 600, lr=0.5)
        norms = hf_dgate.effective_norms(model, "features").detach()
        zeros[method] = int((norms < 1e-4).sum())
        if method == "direct":
            assert norms.min() > 0  # shrunk, never exactly zero
    assert zeros["direct"] == 0 and zeros["dgate"] >= 10


def test_slimming_penalises_batchnorm_scales_and_prunes_a_cnn():
    torch.manual_seed(0)
    model = VGG16(num_classes=3, in_channels=1, width=1.0, cfg=(8, "M", 16, "M"))
    cfg = hf_dgate.DGateConfig(target="filters", method="slimming", lam=0.01, example_input_shape=[1, 1, 8, 8])
    hf_dgate.apply_dgate(model, cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = 0.01 * sum(bn.weight.abs().sum() for bn in bns)
    torch.testing.assert_close(hf_dgate.penalty(model), expected)
    assert not hf_dgate.get_bank(model).gammas["filters"].requires_grad
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    _train(model, x, y, 20, lr=0.05)
    assert magnitude_prune(model, 0.5, "filters", scope="layer") == {"filters": 12}
    model.eval()
    out = model(x)
    small = prune_torch_model(model)
    torch.testing.assert_close(small(x), out, rtol=1e-5, atol=1e-5)
    assert [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)] == [4, 8]
    with pytest.raises(ValueError, match="BatchNorm"):
        hf_dgate.apply_dgate(LeNet300100(), hf_dgate.DGateConfig(target="features", method="slimming"))


@pytest.mark.parametrize("method", ["dgate", "direct", "l0"])
def test_magnitude_prune_then_export_for_every_method(method):
    torch.manual_seed(0)
    model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8)).eval()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="features", method=method))
    assert magnitude_prune(model, 0.25) == {"features": 5}
    report = hf_dgate.sparsity_report(model)
    assert report.targets["features"].zero == 5
    x = torch.randn(4, 20)
    out = model(x)
    small = prune_torch_model(model)
    assert small.fc1.in_features == 15
    torch.testing.assert_close(small(x[:, small.dgate_kept_features]), out, rtol=1e-5, atol=1e-5)


def test_magnitude_prune_global_ranks_across_layers():
    model = make_model("gpt2")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight.mul_(10)  # layer 1 heads are all larger
    magnitude_prune(model, 0.5, scope="global")
    assert hf_dgate.sparsity_report(model).targets["heads"].per_layer == {"0": [0, 4], "1": [4, 4]}
    with pytest.raises(ValueError, match="ratio"):
        magnitude_prune(model, 1.5)
