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


# ---- L0 as its users run it (issue 13, requirement 6): drop-rate init, own log_alpha rate, lam / N, Lagrangian ----
def _l0_lenet(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
    return hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="features", method="l0", **config))


@pytest.mark.parametrize("drop", [0.1, 0.2, 0.5, 0.9])
def test_l0_droprate_init_gives_the_stated_gate_and_expected_l0(drop):
    model = _l0_lenet(l0_droprate_init=drop, lam=1.0)
    bank = hf_dgate.get_bank(model)
    log_alpha = math.log((1 - drop) / drop)
    torch.testing.assert_close(bank.gammas["features"], torch.full((1, 20), log_alpha))
    # the config's help text: test-time gate (1 - d) 1.2 - 0.1, P(gate != 0) = sigmoid(logit(1 - d) + (2/3) log 11)
    gate = min(1.0, (1 - drop) * 1.2 - 0.1)
    torch.testing.assert_close(bank.scale("features"), torch.full((20,), gate))
    p_nonzero = 1 / (1 + math.exp(-(log_alpha + 2 / 3 * math.log(11))))
    assert math.isclose(hf_dgate.penalty(model).item(), 20 * p_nonzero, rel_tol=1e-5)
    assert math.isclose(bank.l0_expected_sparsity().item(), 1 - p_nonzero, rel_tol=1e-5, abs_tol=1e-6)
    if drop == G.L0_DROPRATE_INIT:
        assert math.isclose(log_alpha, G.L0_INIT_LOG_ALPHA, rel_tol=1e-12)


def test_l0_train_size_divides_the_penalty_by_n():
    plain, per_example = _l0_lenet(lam=2.0), _l0_lenet(lam=2.0, l0_train_size=500)
    torch.testing.assert_close(hf_dgate.penalty(per_example), hf_dgate.penalty(plain) / 500)


def test_l0_optimizer_gives_log_alpha_its_own_adam_group():
    from hf_dgate.optim import L0_GROUP_KEY, l0_optimizer

    model = _l0_lenet(lam=1.0)  # the penalty gives every log_alpha a gradient (a clipped sample gives none)
    bank = hf_dgate.get_bank(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    assert l0_optimizer(opt, model, lr=0.1) is opt and type(opt) is torch.optim.Adam
    rest, mine = opt.param_groups
    assert mine[L0_GROUP_KEY] and mine["lr"] == 0.1 and mine["weight_decay"] == 0.0
    assert [id(p) for p in mine["params"]] == [id(bank.gammas["features"])]
    assert rest["lr"] == 1e-3 and rest["weight_decay"] == 1e-4 and len(rest["params"]) == 6  # 3 Linear layers
    before = {id(p): p.detach().clone() for p in model.parameters()}
    x, y = _feature_data()
    (torch.nn.functional.cross_entropy(model(x), y) + hf_dgate.penalty(model)).backward()
    opt.step()  # Adam's first step moves every coordinate with a gradient by lr: 0.1 for log_alpha, 1e-3 the rest
    la_step = (bank.gammas["features"] - before[id(bank.gammas["features"])]).abs()
    torch.testing.assert_close(la_step, torch.full_like(la_step, 0.1), rtol=1e-3, atol=1e-6)
    w_step = (model.fc1.weight - before[id(model.fc1.weight)]).abs().max()
    assert 5e-4 < w_step.item() < 2e-3
    with pytest.raises(ValueError, match="twice|first step"):
        l0_optimizer(opt, model)
    for bad in (0.0, -1.0, "0.1", True):
        with pytest.raises(ValueError, match="lr="):
            l0_optimizer(torch.optim.Adam(model.parameters()), model, lr=bad)
    dgate = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
    hf_dgate.apply_dgate(dgate, hf_dgate.DGateConfig(target="features"))
    with pytest.raises(ValueError, match="method='l0'"):
        l0_optimizer(torch.optim.Adam(dgate.parameters()), dgate)


def test_l0_lagrangian_multipliers_ascend_until_the_target_is_met():
    from hf_dgate.optim import l0_optimizer

    model = _l0_lenet(l0_target_sparsity=0.5, l0_droprate_init=0.5)  # expected sparsity 0.17 at init: below
    bank = hf_dgate.get_bank(model)
    assert torch.equal(bank.l0_multipliers, torch.zeros(2)) and hf_dgate.penalty(model).item() == 0.0
    gap = bank.l0_expected_sparsity().item() - 0.5
    hf_dgate.penalty(model).backward()  # d/d(l1, l2) = (s - t, (s - t)^2), negated so that descent ascends
    torch.testing.assert_close(bank.l0_multipliers.grad, torch.tensor([-gap, -(gap**2)]))
    opt = l0_optimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, lr=1.0)
    opt.zero_grad()
    penalties, sparsity = [], []
    for _ in range(30):  # the penalty alone: the multipliers grow, and push the expected sparsity up
        pen = hf_dgate.penalty(model)
        penalties.append(pen.item())
        sparsity.append(bank.l0_expected_sparsity().item())
        opt.zero_grad()
        pen.backward()
        opt.step()
    l1, l2 = bank.l0_multipliers.tolist()
    assert l1 < 0 < l2
    assert all(b > a for a, b in zip(penalties[:10], penalties[1:11]))  # below the target the term grows
    assert sparsity[-1] > sparsity[0] + 0.1
    with torch.no_grad():  # above the target, l1 ascends the other way
        bank.gammas["features"].fill_(-8.0)
    opt.zero_grad()
    hf_dgate.penalty(model).backward()
    assert bank.l0_multipliers.grad[0] < 0  # descent on -(s - t) < 0 raises l1


def test_l0_multipliers_are_saved_and_restored(tmp_path):
    model = make_model("llama")
    config = hf_dgate.DGateConfig(target="heads", method="l0", l0_droprate_init=0.5, l0_target_sparsity=0.25)
    hf_dgate.apply_dgate(model, config)
    with torch.no_grad():
        model.dgate.l0_multipliers.copy_(torch.tensor([-1.5, 2.5]))
        model.dgate.gammas["heads"].uniform_(-3, 3)
    hf_dgate.save_gated(model, tmp_path / "gated")
    loaded = hf_dgate.load_gated(tmp_path / "gated")
    assert hf_dgate.get_bank(loaded).config == config
    assert torch.equal(loaded.dgate.l0_multipliers, model.dgate.l0_multipliers)
    assert torch.equal(loaded.dgate.gammas["heads"], model.dgate.gammas["heads"])
    torch.testing.assert_close(hf_dgate.penalty(loaded), hf_dgate.penalty(model))


def test_l0_multipliers_are_reset_when_materialised_from_meta():
    with torch.device("meta"):
        model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
    config = hf_dgate.DGateConfig(target="features", method="l0", l0_droprate_init=0.5, l0_target_sparsity=0.5)
    hf_dgate.apply_dgate(model, config)
    model.to_empty(device="cpu")
    assert torch.equal(model.dgate.l0_multipliers, torch.zeros(2))
    assert torch.equal(model.dgate.gammas["features"], torch.zeros(1, 20))  # logit(1 - 0.5)


def test_a_method_is_one_registered_class():
    """The methods' contract: a new penalty is a `Method` subclass plus `register_method`; config, bank, penalty,
    scale, trainer policy and saving all take it from there, and its own options stay None under other methods."""
    from hf_dgate.methods import METHODS, Method, register_method

    class HalfGates(Method):  # gates start at 0.5, penalty lam * sum of gate squares
        name = "half_gates_test"

        def init_gates(self, config, n_groups):
            return torch.full((config.depth - 1, n_groups), 0.5)

        def penalty(self, bank, lam):
            return lam * sum(bank.gates(t).pow(2).sum() for t in bank.targets)

    register_method(HalfGates)
    try:
        model, inputs = make_model("llama"), make_inputs("llama")
        dense = model(**inputs).logits
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", method="half_gates_test", lam=2.0, depth=3))
        bank = hf_dgate.get_bank(model)
        n = bank.sizes["heads"]
        assert math.isclose(hf_dgate.penalty(model).item(), 2.0 * 2 * n * 0.25, rel_tol=1e-6)
        torch.testing.assert_close(bank.scale("heads"), torch.full((n,), 0.25))  # the default scale: the product
        assert not torch.allclose(model(**inputs).logits, dense)  # the gates act
        assert hf_dgate.misalignment(model).item() == 0.0
        with pytest.raises(ValueError, match="None unless method='l0'"):
            hf_dgate.DGateConfig(method="half_gates_test", l0_train_size=10)
    finally:
        del METHODS["half_gates_test"]
    with pytest.raises(ValueError, match="method"):
        hf_dgate.DGateConfig(method="half_gates_test")
    with pytest.raises(TypeError, match="Method subclass"):
        register_method(object)
