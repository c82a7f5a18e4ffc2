"""apply_dgate / remove_dgate on every covered family: exact at init, trainable, foldable."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, POST_NORM, logits, make_inputs, make_model

import hf_dgate
from hf_dgate.architectures import StructureNotFoundError

TARGETS = ["heads", "neurons", "layers"]
CASES = [(f, t) for f in FAMILIES for t in TARGETS if not (t == "layers" and f in POST_NORM)]


@pytest.mark.parametrize("family,target", CASES)
def test_outputs_unchanged_at_init_and_after_merge(family, target):
    model, inputs = make_model(family), make_inputs(family)
    ref = logits(model, inputs)
    keys = set(model.state_dict())
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target, lam=0.1))
    assert torch.equal(logits(model, inputs), ref)  # gates are exactly 1
    assert set(model.state_dict()) == keys | {f"dgate.gammas.{target}"}

    bank = hf_dgate.get_bank(model)
    with torch.no_grad():  # random gates, some exactly zero
        g = bank.gammas[target]
        g.copy_(torch.rand_like(g) + 0.5)
        g[:, 0] = 0.0
    gated = logits(model, inputs)
    assert not torch.allclose(gated, ref)
    hf_dgate.remove_dgate(model, merge=True)
    assert not hasattr(model, "dgate")
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(logits(model, inputs), gated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "gpt_neox"])
def test_gradients_reach_gates_and_primary_weights(family):
    model, inputs = make_model(family), make_inputs(family)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.1))
    out = logits(model, inputs)
    (out.pow(2).mean() + hf_dgate.penalty(model)).backward()
    bank = hf_dgate.get_bank(model)
    for t in ("heads", "neurons"):
        assert bank.gammas[t].grad is not None and bank.gammas[t].grad.abs().sum() > 0
    for gs in bank.group_sets:
        for sl in gs.primary:
            w = model.get_submodule(sl.module).get_parameter(sl.param)
            assert w.grad is not None and w.grad.abs().sum() > 0, (sl.module, sl.param)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "bert"])
def test_value_and_output_side_remove_the_same_unit(family):
    """A zero gate on either side silences the same key/value group, so both models compute the same."""
    inputs = make_inputs(family)
    outs = []
    for side in ("value", "output"):
        model = make_model(family)
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", head_side=side))
        bank = hf_dgate.get_bank(model)
        assert bank.group_sets[0].info.side == side
        with torch.no_grad():
            bank.gammas["heads"][:, 0] = 0.0
            bank.gammas["heads"][:, -1] = 0.0
        outs.append(logits(model, inputs))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_gqa_groups_are_key_value_heads():
    model = make_model("llama")  # 4 query heads, 2 key/value heads
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    bank = hf_dgate.get_bank(model)
    assert bank.sizes["heads"] == 2 * 2  # 2 layers x 2 kv groups
    gs = bank.group_sets[0]
    q = next(sl for sl in gs.removable if sl.module.endswith("q_proj") and sl.param == "weight")
    assert q.index.tolist() == [0] * 16 + [1] * 16  # query heads 0,1 -> group 0; 2,3 -> group 1


def test_gpt2_fused_qkv_gates_only_value_columns():
    model = make_model("gpt2")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    gs = hf_dgate.get_bank(model).group_sets[0]
    (site,) = gs.sites
    assert site.module == "transformer.h.0.attn.c_attn"
    assert (site.index[:64] == -1).all() and site.index[64:].tolist() == [h for h in range(4) for _ in range(8)]
    assert gs.primary[0].axis == 1  # Conv1D stores (in, out)


def test_layers_target_rejected_for_post_norm():
    with pytest.raises(ValueError, match="pre-norm"):
        hf_dgate.apply_dgate(make_model("bert"), hf_dgate.DGateConfig(target="layers"))


def test_target_modules_limits_layers():
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", target_modules=r"layers\.1\."))
    bank = hf_dgate.get_bank(model)
    assert [gs.layer for gs in bank.group_sets] == [1]
    with pytest.raises(ValueError, match="matches none"):
        hf_dgate.apply_dgate(make_model("llama"), hf_dgate.DGateConfig(target="heads", target_modules="nope"))


def test_double_gating_and_ungated_model_errors():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="not gated"):
        hf_dgate.penalty(model)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig())
    with pytest.raises(ValueError, match="already gated"):
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig())


class Block(torch.nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.mix_q, self.mix_k, self.to_values, self.proj = (torch.nn.Linear(d, d) for _ in range(4))
        self.ff_in, self.ff_out = torch.nn.Linear(d, 32), torch.nn.Linear(32, d)
        self.h = h

    def forward(self, x):
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(
            split(self.mix_q(x)), split(self.mix_k(x)), split(self.to_values(x))
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff_out(torch.relu(self.ff_in(x)))


class Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"num_attention_heads": 2, "num_hidden_layers": 2})()
        self.stack = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for blk in self.stack:
            x = blk(x)
        return x


def test_unknown_structure_error_says_how_to_name_modules():
    with pytest.raises(StructureNotFoundError) as err:
        hf_dgate.apply_dgate(Custom(), hf_dgate.DGateConfig(target="heads"))
    msg = str(err.value)
    assert "stack.0" in msg and "module_names" in msg and "to_values" in msg


def test_explicit_module_names_gate_a_custom_model():
    torch.manual_seed(0)
    model, x = Custom(), torch.randn(2, 5, 16)
    ref = model(x)
    names = {
        "layers": "stack",
        "value": "to_values",
        "query": "mix_q",
        "key": "mix_k",
        "out": "proj",
        "up": ["ff_in"],
        "down": "ff_out",
    }
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons", "layers"], module_names=names))
    assert torch.equal(model(x), ref)
    bank = hf_dgate.get_bank(model)
    assert bank.sizes == {"heads": 4, "neurons": 64, "layers": 2}
    with torch.no_grad():
        bank.gammas["layers"][:, 1] = 0.0  # the second block becomes the identity
    torch.testing.assert_close(model(x), model.stack[0](x))


def test_generic_group_rule_on_plain_torch_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(4, 6)
    ref = model(x)
    rule = hf_dgate.GroupRule("features", r"^0$", kind="in", size=2)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[], groups=[rule]))
    assert torch.equal(model(x), ref)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas["features"][:, 1] = 0.0  # features 2 and 3 are ignored now
    x2 = x.clone()
    x2[:, 2:4] = 123.0
    torch.testing.assert_close(model(x), model(x2))
    assert hf_dgate.sparsity_report(model).targets["features"].zero == 1


def test_group_sets_carry_typed_info_and_split_per_group_vectors():
    """Each group set's description is a typed dataclass (the old dict view is read-only), and `per_set` hands
    every set its own part of a per-target vector, as views."""
    from hf_dgate.groups import HeadInfo, LayerInfo

    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "layers"], lam=0.1))
    bank = hf_dgate.get_bank(model)
    heads = [gs for gs in bank.group_sets if gs.target == "heads"]
    assert all(isinstance(gs.info, HeadInfo) and gs.info.n_kv == gs.n_groups for gs in heads)
    assert all(isinstance(gs.info, LayerInfo) for gs in bank.group_sets if gs.target == "layers")
    assert heads[0].meta["n_heads"] == heads[0].info.n_heads and heads[0].info.attention == "self"
    with pytest.raises(TypeError):
        heads[0].meta["n_heads"] = 1  # writes go to `info`, never to a copy nobody reads
    values = torch.arange(bank.sizes["heads"])
    parts = bank.per_set(values, "heads")
    assert [gs for gs, _ in parts] == heads and torch.equal(torch.cat([p for _, p in parts]), values)
    parts[1][1][0] = -1
    assert values[heads[0].n_groups] == -1  # a view
    everything = bank.per_set({t: torch.zeros(n) for t, n in bank.sizes.items()})
    assert [gs for gs, _ in everything] == bank.group_sets
    assert [len(p) for _, p in everything] == [gs.n_groups for gs in bank.group_sets]


def test_every_builtin_target_implements_the_whole_contract():
    """Targets are the extension point: removal is abstract, and every built-in answers what export, reload, the
    trainer and the CLI ask it (no caller tests a target's name)."""
    from hf_dgate.targets import BUILTIN
    from hf_dgate.targets.base import Target

    class NoRemoval(Target):
        name = "incomplete"

    with pytest.raises(TypeError):
        NoRemoval()
    for name, target in BUILTIN.items():
        method = "find_in_block" if target.per_block else "find"
        assert getattr(type(target), method) is not getattr(Target, method), name  # overridden
        assert target.description and target.metric_name().endswith("_sparsity")
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons", "layers"], lam=0.1))
    fields = {gs.target: BUILTIN[gs.target].record_field(gs) for gs in hf_dgate.get_bank(model).group_sets}
    assert fields == {"heads": "kv_heads", "neurons": "neurons", "layers": None}
    heads = hf_dgate.get_bank(model).group_sets[0]
    assert BUILTIN["heads"].rebuild_dead(heads, heads.n_groups) is None
    assert BUILTIN["heads"].rebuild_dead(heads, 1).tolist() == [False] + [True] * (heads.n_groups - 1)
    with pytest.raises(hf_dgate.export.ExportError, match="config does not match the weights"):
        BUILTIN["heads"].rebuild_dead(heads, heads.n_groups + 1)
