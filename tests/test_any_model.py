"""Three models in no registry and no fixture, written as plain nn.Modules with unusual names and layouts: hf_dgate
finds their heads, neurons and layers from shapes and a numerical check, gates and exports them exactly on the first
try (issue 20, item 5). Nothing here names a module for hf_dgate."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hf_dgate

D, H, V = 32, 4, 50


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Mixer(nn.Module):
    """One fused projection with heads interleaved: per head [q_h | k_h | v_h]; the output is called `merge`."""

    def __init__(self):
        super().__init__()
        self.n_heads = H
        self.mix = nn.Linear(D, 3 * D)
        self.merge = nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.mix(x).view(b, t, self.n_heads, 3, D // H).permute(3, 0, 2, 1, 4)
        return self.merge(_attend(q, k, v).transpose(1, 2).reshape(b, t, -1))


class FF(nn.Module):
    def __init__(self, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.w_in = nn.Linear(D, (2 if gated else 1) * 48)  # gated: [gate | up] halves in one layer
        self.w_out = nn.Linear(48, D)

    def forward(self, x):
        h = self.w_in(x)
        if self.gated:
            g, u = h.chunk(2, -1)
            h = F.silu(g) * u
        return self.w_out(F.gelu(h) if not self.gated else h)


class Cell(nn.Module):
    def __init__(self, attention: nn.Module, gated: bool = False):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.talk, self.ff = attention, FF(gated)

    def forward(self, x):
        x = x + self.talk(self.n1(x))
        return x + self.ff(self.n2(x))


class Grouped(nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads kept in one `kv` layer, [k_g | v_g] per group."""

    def __init__(self):
        super().__init__()
        self.n_heads, self.n_kv_heads = H, 2
        self.ask = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * 2 * (D // H), bias=False)
        self.back = nn.Linear(D, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        hd, rep = D // H, self.n_heads // self.n_kv_heads
        q = self.ask(x).view(b, t, self.n_heads, hd).transpose(1, 2)
        k, v = self.kv(x).view(b, t, self.n_kv_heads, 2, hd).permute(3, 0, 2, 1, 4)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return self.back(_attend(q, k, v).transpose(1, 2).reshape(b, t, -1))


class Recurrence(nn.Module):
    """A token mixer without heads (a causal running mean, gated): the hybrid's other kind of block."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        u, g = self.inp(x).chunk(2, -1)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device).view(1, -1, 1)
        return self.out(torch.sigmoid(g) * u.cumsum(1) / steps)


class Net(nn.Module):
    def __init__(self, cells: list[nn.Module], where: str):
        super().__init__()
        self.where = where
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        setattr(self, where, nn.ModuleList(cells))

    def forward(self, ids):
        x = self.emb(ids)
        for cell in getattr(self, self.where):
            x = cell(x)
        return self.head(x)


MODELS = {
    # fused qkv with interleaved heads, MLP ff.w_in/ff.w_out, blocks under `trunk`
    "interleaved": lambda: Net([Cell(Mixer()) for _ in range(3)], "trunk"),
    # grouped-query attention with a fused key/value layer, a fused gated MLP, blocks under `tower`
    "grouped": lambda: Net([Cell(Grouped(), gated=True) for _ in range(3)], "tower"),
    # a hybrid: attention cells and head-less recurrent cells, blocks under `cells`
    "hybrid": lambda: Net([Cell(Mixer()), Cell(Recurrence()), Cell(Mixer())], "cells"),
}


@pytest.mark.parametrize("target", ["heads", "neurons", "layers"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_unnamed_model_gates_and_exports_exactly(kind, target):
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        ref = model(ids)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target), example_inputs=ids)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
        gates = bank.gammas[target]
        gates[:, torch.arange(gates.shape[1]) % 2 == 0] = 0  # every other group
        gated = model(ids)
    pruned = hf_dgate.export_pruned(model, example_inputs=ids)
    assert pruned.dgate_verification.exact
    n_before = sum(p.numel() for n, p in model.named_parameters() if "dgate" not in n)
    assert sum(p.numel() for p in pruned.parameters()) < n_before  # something was removed
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), gated, atol=1e-5, rtol=1e-5)
    if kind == "hybrid" and target == "heads":  # the recurrent cell has no heads: it stays dense, the others not
        assert [gs.layer for gs in bank.group_sets] == [0, 2]
        assert bank.group_sets[0].info.dense_blocks == (1,)


class GatedMixer(Mixer):
    """Mixer whose output is gated per feature by a layer registered after `merge` that also writes the hidden size:
    the last layer registered is not the last in the data flow."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, D)

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(self.gate(x))


class Routed(nn.Module):
    """A mixture of experts: stacked experts in the (E, in, out) layout with a per-expert output bias, softmax-routed,
    beside an always-on shared expert (a plain FF)."""

    def __init__(self, n_exp: int = 3, units: int = 8):
        super().__init__()
        self.router = nn.Linear(D, n_exp, bias=False)
        self.experts = nn.Module()
        self.experts.w_in = nn.Parameter(torch.randn(n_exp, D, 2 * units) / 4)
        self.experts.w_out = nn.Parameter(torch.randn(n_exp, units, D) / 4)
        self.experts.w_out_bias = nn.Parameter(torch.randn(n_exp, D) / 4)
        self.shared = FF(gated=True)

    def forward(self, x):
        g, u = torch.einsum("btd,edu->bteu", x, self.experts.w_in).chunk(2, -1)
        y = torch.einsum("bteu,eud->bted", F.silu(g) * u, self.experts.w_out) + self.experts.w_out_bias
        return (torch.softmax(self.router(x), -1).unsqueeze(-1) * y).sum(2) + self.shared(x)


def test_layers_of_an_unnamed_mixture_of_experts_fold_into_the_weights_the_check_finds():
    """A whole-layer gate folds into each branch's last layers. Here the last layer registered is an output gate
    (a sigmoid follows it) and the MoE branch ends in stacked (E, in, out) experts with a bias beside a shared expert:
    the weights that carry each branch's scale are found numerically, and gates left at 0.5 fold exactly (before:
    'no block passed', as for GPT-OSS, Llama 4, AFMoE)."""
    torch.manual_seed(0)
    cells = []
    for _ in range(3):
        cell = Cell(GatedMixer())
        cell.ff = Routed()
        cells.append(cell)
    model = Net(cells, "stack").eval()
    ids = torch.randint(0, V, (2, 9))
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="layers"), example_inputs=ids)
    with torch.no_grad():
        gates = hf_dgate.get_bank(model).gammas["layers"]
        gates[:, 0] = 0
        gates[:, 1:] = 0.5 ** (1 / gates.shape[0])  # a kept layer's gate of 0.5 folds into its weights
        gated = model(ids)
    pruned = hf_dgate.export_pruned(model, example_inputs=ids)
    assert pruned.dgate_verification.exact and len(pruned.stack) == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), gated, atol=1e-5, rtol=1e-5)
