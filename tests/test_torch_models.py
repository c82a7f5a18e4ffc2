"""Generic gating of plain torch models: the paper's vision/tabular networks, gated and exported exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import hf_dgate
from hf_dgate.models import NAM, NODE, VGG16, LateFusion, LeNet300100, ResNet18
from hf_dgate.surgery import prune_torch_model


def _flops(model, *inputs):
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def _gate_randomly(model, target, dead):
    with torch.no_grad():
        g = hf_dgate.get_bank(model).gammas[target]
        g.uniform_(0.5, 1.5)
        g[:, dead] = 0.0


@pytest.mark.parametrize("cls,shape", [(ResNet18, [2, 3, 16, 16]), (VGG16, [2, 1, 28, 28])])
def test_filters_exact_at_init_and_after_export(cls, shape):
    torch.manual_seed(0)
    model, x = cls(width=0.125, in_channels=shape[1]).eval(), torch.randn(*shape)
    ref = model(x)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="filters", example_input_shape=[1, *shape[1:]]))
    assert torch.equal(model(x), ref)
    n = hf_dgate.get_bank(model).sizes["filters"]
    _gate_randomly(model, "filters", slice(0, n, 3))
    gated = model(x)
    report = hf_dgate.sparsity_report(model)
    small = prune_torch_model(model)
    torch.testing.assert_close(small(x), gated, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) == report.params_kept < report.params_total
    assert _flops(small, x) < 0.6 * _flops(model, x)
    assert hf_dgate.is_gated(model) and not hf_dgate.is_gated(small)  # the gated model is left as it was


def test_batchnorm_carries_the_gate_and_resnet_stream_channels_are_tied():
    model = ResNet18(width=0.125)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="filters", example_input_shape=[1, 3, 8, 8]))
    sets = {gs.layer: gs for gs in hf_dgate.get_bank(model).group_sets}
    stem = sets["conv1"]  # stem channels = the first stage's residual stream
    assert sorted(s.module for s in stem.sites) == ["bn1", "layers.0.bn2", "layers.1.bn2"]
    assert all(sl.param in ("weight", "bias") and "bn" in sl.module for sl in stem.primary)
    assert {"layers.0.conv1", "layers.1.conv1"} <= {sl.module for sl in stem.removable}
    inner = sets["layers.0.conv1"]
    assert [s.module for s in inner.sites] == ["layers.0.bn1"]


def test_filters_need_an_example_input():
    with pytest.raises(ValueError, match="example_input_shape"):
        hf_dgate.apply_dgate(VGG16(width=0.125), hf_dgate.DGateConfig(target="filters"))


def test_input_features_export_reports_kept_features():
    torch.manual_seed(0)
    model, x = LeNet300100().eval(), torch.randn(3, 784)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="features"))
    _gate_randomly(model, "features", slice(100, 700))
    gated = model(x)
    small = prune_torch_model(model)
    assert small.fc1.in_features == 184
    assert small.dgate_kept_features.tolist() == list(range(100)) + list(range(700, 784))
    torch.testing.assert_close(small(x[:, small.dgate_kept_features]), gated)
    dense = LeNet300100(in_features=6)
    hf_dgate.apply_dgate(dense, hf_dgate.DGateConfig(target="features"))
    assert prune_torch_model(dense).dgate_kept_features.tolist() == list(range(6))  # nothing dropped, still recorded


@pytest.mark.parametrize(
    "make,rule,dead,inputs",
    [
        (
            lambda: NODE(8, 3, n_trees=6, depth=3),
            hf_dgate.GroupRule("trees", r"^trees$", "out"),
            [1, 4],
            lambda: (torch.randn(5, 8),),
        ),
        (
            lambda: NAM(6, 2, hidden=8),
            hf_dgate.GroupRule("shape_functions", r"^first$", "in"),
            [0, 3],
            lambda: (torch.randn(5, 6),),
        ),
        (
            lambda: LateFusion(5, 3),
            hf_dgate.GroupRule("modalities", r"^fusion\.(image|tabular)$", "module"),
            [0],
            lambda: (torch.randn(4, 1, 12, 12), torch.randn(4, 5)),
        ),
    ],
)
def test_tabular_groups_gate_and_export(make, rule, dead, inputs):
    torch.manual_seed(0)
    model, args = make().eval(), inputs()
    ref = model(*args)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[], groups=[rule]))
    assert torch.equal(model(*args), ref)
    _gate_randomly(model, rule.name, dead)
    gated = model(*args)
    report = hf_dgate.sparsity_report(model)
    assert report.targets[rule.name].zero == len(dead)
    small = prune_torch_model(model)
    if isinstance(small, NAM):  # the exported NAM reads only the kept features
        args = (args[0][:, small.kept_features],)
    torch.testing.assert_close(small(*args), gated, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_penalty_drops_into_a_plain_training_loop():
    torch.manual_seed(0)
    model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="features", lam=0.1, depth=3))
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    x[:, :5] += y.unsqueeze(1).float()  # only the first five features carry signal
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y) + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    norms = hf_dgate.effective_norms(model, "features").detach()
    assert norms[:5].min() > 10 * norms[5:].max()
    assert hf_dgate.sparsity_report(model).targets["features"].zero >= 10


def test_relative_threshold_keeps_a_layer_that_shrank_as_a_whole():
    """Before BatchNorm a whole layer can shrink together (the next BN rescales it): an absolute threshold calls
    every filter of that layer zero; threshold_mode='relative' compares each filter with its layer's largest."""
    torch.manual_seed(0)
    base, x = VGG16(width=0.125, in_channels=1).eval(), torch.randn(2, 1, 28, 28)
    reports = {}
    for mode in ("absolute", "relative"):
        model = copy.deepcopy(base)
        cfg = hf_dgate.DGateConfig(target="filters", example_input_shape=[1, 1, 28, 28], threshold_mode=mode)
        hf_dgate.apply_dgate(model, cfg)
        bank = hf_dgate.get_bank(model)
        first = bank.group_sets[0]  # the first conv's filters (their BN channels)
        with torch.no_grad():
            bank.gammas["filters"][:, : first.n_groups] = 1e-2  # D = 3: scale 1e-4 for the whole layer
            bank.gammas["filters"][:, 1] = 0.0  # one filter truly zero
            bank.gammas["filters"][:, first.n_groups + 3] = 0.0  # and one in the next layer
        reports[mode] = hf_dgate.sparsity_report(model).targets["filters"]
    layer, n = str(first.layer), first.n_groups
    assert reports["absolute"].per_layer[layer] == [0, n] and reports["absolute"].zero == n + 1
    assert reports["relative"].per_layer[layer] == [n - 1, n] and reports["relative"].zero == 2
    assert "x its layer's largest" in str(hf_dgate.sparsity_report(model))
    torch.testing.assert_close(prune_torch_model(model)(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="threshold"):
        hf_dgate.sparsity_report(model, threshold=2.0)  # a fraction of the layer's largest: must be below 1
