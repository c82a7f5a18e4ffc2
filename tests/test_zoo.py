"""A fixed sample of the zoo sweep (hf_dgate/zoo.py; the whole zoo: `python -m hf_dgate.zoo`), and the numerical
check that decides whether a structure found from names and shapes is gated."""

import pytest
import torch
from torch import nn

import hf_dgate
from hf_dgate import zoo

# families in no registry row: found from common names or from shapes, and checked numerically
SAMPLE = [
    ("causal-lm", "glm"),  # no registry row: a fused gate/up found from its width (twice the down projection's inputs)
    ("masked-lm", "camembert"),  # post-norm: layers refused for that named reason
    ("image-classification", "data2vec-vision"),  # no registry row: a vision encoder found by names, checked
    ("seq2seq-lm", "bart"),  # encoder-decoder from the registry
]


@pytest.mark.parametrize("mapping,family", SAMPLE)
def test_zoo_sample_is_exact_or_refused_for_a_named_reason(mapping, family):
    if family not in zoo.model_types(mapping):
        pytest.skip(f"{family} is not in this transformers' {mapping} mapping")
    fam = zoo.run_family(mapping, family)
    assert fam.builds, fam.why
    bad = [c for c in fam.cells if c.outcome not in (zoo.Outcome.EXACT.value, zoo.Outcome.INHERENT.value)]
    assert not bad, bad
    assert any(c.outcome == zoo.Outcome.EXACT.value for c in fam.cells)


def test_refusals_are_classified_by_named_reasons():
    assert zoo.inherent_reason("target='layers' needs pre-norm blocks (x + f(x))") is zoo.Inherent.POST_NORM
    assert zoo.inherent_reason("Could not find the MLP down (second) projection") is None
    from hf_dgate.discover import _check  # noqa: F401 - the check's generic failure is no inherent reason
    generic = ("no block passed (block 0: a zero gate does not equal removing its slices (something else reads them, "
               "e.g. a norm over all heads or a branch beside it))")
    assert zoo.inherent_reason(generic) is None


def test_tiny_config_shrinks_nested_configs_and_keeps_one_layer_of_each_kind():
    cfg = zoo.tiny_config("qwen3_next") if "qwen3_next" in zoo.model_types("causal-lm") else None
    if cfg is None:
        pytest.skip("qwen3_next is not in this transformers")
    assert cfg.hidden_size == zoo.HIDDEN
    assert len(set(cfg.layer_types)) == 2 and cfg.num_hidden_layers == len(cfg.layer_types)


class _QKNormAttention(nn.Module):
    """Attention whose queries are normalised over all heads together (no head can go alone)."""

    def __init__(self, d: int = 32, h: int = 4):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qn = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.qn(self.q(x))), split(self.k(x)), split(self.v(x))
        y = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def test_numerical_check_refuses_a_proposal_that_is_not_removable():
    """A query norm over all heads: a zero head gate does not equal removing the head's rows, so the check says no."""
    from hf_dgate.discover import verify
    from hf_dgate.groups import GroupSet, Site, input_slices, output_slices, slice_index

    torch.manual_seed(0)
    model = _QKNormAttention()
    idx = slice_index(32, 8)
    removable = input_slices("o", model.o, idx) + sum((output_slices(n, getattr(model, n), idx) for n in "qkv"), [])
    gs = GroupSet("heads", 0, 4, [Site("o", "input", -1, idx)], input_slices("o", model.o, idx), removable)
    assert verify(model, [gs], torch.randn(2, 5, 32))
    plain = GroupSet("heads", 0, 4, [Site("o", "input", -1, idx)], input_slices("o", model.o, idx),
                     input_slices("o", model.o, idx) + output_slices("v", model.v, idx))
    assert not verify(model, [plain], torch.randn(2, 5, 32))


def test_a_partial_resweep_merges_into_the_full_sweep(tmp_path):
    def fam(mapping, family, outcome):
        return zoo.Family(mapping, family, True, "", [zoo.Cell(mapping, family, "heads", outcome)])

    full = [fam("causal-lm", "a", "crash"), fam("causal-lm", "b", "exact"), fam("masked-lm", "c", "exact")]
    zoo._dump(tmp_path / "full.json", "5.0", full)
    zoo._dump(tmp_path / "part.json", "5.0", [fam("causal-lm", "a", "exact")])
    zoo.main(["--merge", str(tmp_path / "m.json"), str(tmp_path / "full.json"), str(tmp_path / "part.json")])
    line, merged = zoo.load(tmp_path / "m.json")
    assert line == "5.0" and [(f.family, f.cells[0].outcome) for f in merged] == [("a", "exact"), ("b", "exact"),
                                                                                  ("c", "exact")]
    zoo._dump(tmp_path / "other.json", "4.0", full)
    with pytest.raises(SystemExit, match="one line each"):
        zoo.merge([str(tmp_path / "full.json"), str(tmp_path / "other.json")])


def test_an_alias_family_reloads_under_its_own_model_type():
    """EXAONE runs LlamaForCausalLM on its own ExaoneConfig, whose checkpoint key renames are keyed by 'exaone': the
    export is saved under that model type (not the class's 'llama'), so the reload renames its keys back (before: 20
    tensors missing on reload)."""
    if "exaone" not in zoo.model_types("causal-lm"):
        pytest.skip("exaone is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", "exaone", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_dead_blocks_the_family_cannot_lose_stay_as_identity_blocks():
    """RWKV's weight init divides by (layers - 1), OLMo-Hybrid's config needs a linear-attention layer, an empty
    stack does not build for many families: where the drop's config would not load back (the reload rehearsal) or
    the export would not run, the fewest dead blocks stay in place, their branches zero, and the record lists them
    (before: refused by the rehearsal)."""
    from hf_dgate.export import pruned_structure

    for family in ("rwkv", "olmo_hybrid"):
        if family not in zoo.model_types("causal-lm"):
            continue
        cell = zoo.run_cell("causal-lm", family, "layers")
        assert cell.outcome == zoo.Outcome.EXACT.value, cell
    model, batch = zoo.build("causal-lm", "rwkv")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="layers"), example_inputs=batch)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["layers"].zero_()
        gated = zoo.run(model, batch)
    pruned = hf_dgate.export_pruned(model, example_inputs=batch)
    assert pruned.dgate_verification.exact and pruned.config.num_hidden_layers == 2  # (block 0 is not gated)
    assert pruned_structure(pruned)["dead_layers_kept"] == [1]
    torch.testing.assert_close(zoo.run(pruned, batch), gated)


def test_a_layer_drop_slices_the_per_layer_input_embeddings():
    """Gemma 4 packs one slice of per-layer inputs per layer into an embedding and a projection outside the stack:
    a dropped layer's slices go with it (before: the export failed on the probe)."""
    if "gemma4_text" not in zoo.model_types("causal-lm"):
        pytest.skip("gemma4_text is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", "gemma4_text", "layers")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


class _StackedExperts(nn.Module):
    """Routed experts as stacked tensors, every expert weighted by a softmax router (dense routing keeps it simple):
    `interleaved` stores gate and up rows alternating instead of as [gate | up] halves."""

    def __init__(self, d: int = 16, units: int = 8, n_exp: int = 3, interleaved: bool = False):
        super().__init__()
        self.interleaved = interleaved
        self.router = nn.Linear(d, n_exp)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(n_exp, 2 * units, d) / 4)
        self.experts.down_proj = nn.Parameter(torch.randn(n_exp, d, units) / 4)

    def forward(self, x):
        gu = torch.einsum("btd,eud->bteu", x, self.experts.gate_up_proj)
        gate, up = (gu[..., 0::2], gu[..., 1::2]) if self.interleaved else gu.chunk(2, dim=-1)
        y = torch.einsum("bteu,edu->bted", nn.functional.silu(gate) * up, self.experts.down_proj)
        return x + (torch.softmax(self.router(x), -1).unsqueeze(-1) * y).sum(2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_experts_found_from_shapes_are_gated_only_where_the_check_confirms_the_layout(interleaved):
    """Stacked expert tensors in no registry row are proposed from their shapes ((E, H, I) writing the hidden size,
    (E, 2I, H) beside it, a router with one output per expert) as [gate | up] halves; the numerical check, which
    scales the gated tensor itself, accepts them where they are halves, and where rows alternate (zeroing rows j and
    I + j hits two units) refuses them and accepts the alternating layout instead."""
    from types import SimpleNamespace

    from hf_dgate.discover import propose_experts, verify
    from hf_dgate.targets.neurons import _expert_unit_set, alternating_expert_unit_set

    torch.manual_seed(0)
    block = _StackedExperts(interleaved=interleaved)
    cfg = SimpleNamespace(hidden_size=16)
    moe = propose_experts(block, cfg)
    assert (moe.experts, moe.down, moe.gate_up, moe.router) == ("experts", "down_proj", "gate_up_proj", "router")
    gs = _expert_unit_set(0, "", block, moe)
    gs.info.guessed = True
    x = torch.randn(2, 5, 16)
    assert bool(verify(block, [gs], x)) == interleaved
    alt = alternating_expert_unit_set(gs, "", block, cfg)
    assert alt is not None and bool(verify(block, [alt], x)) != interleaved


class _TwoModuleExperts(nn.Module):
    """GPT-OSS's layout in two sibling modules of `moe`: `up.w` (E, H, 2I) with alternating gate/up columns and an
    (E, 2I) bias, `down.w` (E, I, H) with an (E, H) bias; dense softmax routing."""

    def __init__(self, d: int = 16, units: int = 8, n_exp: int = 3):
        super().__init__()
        self.moe = nn.Module()
        self.moe.gate = nn.Linear(d, n_exp)
        self.moe.up, self.moe.down = nn.Module(), nn.Module()
        self.moe.up.w = nn.Parameter(torch.randn(n_exp, d, 2 * units) / 4)
        self.moe.up.b = nn.Parameter(torch.randn(n_exp, 2 * units) / 4)
        self.moe.down.w = nn.Parameter(torch.randn(n_exp, units, d) / 4)
        self.moe.down.b = nn.Parameter(torch.randn(n_exp, d) / 4)

    def forward(self, x):
        m = self.moe
        gu = torch.einsum("btd,edu->bteu", x, m.up.w) + m.up.b
        h = nn.functional.silu(gu[..., 0::2]) * gu[..., 1::2]
        y = torch.einsum("bteu,eud->bted", h, m.down.w) + m.down.b
        return x + (torch.softmax(m.gate(x), -1).unsqueeze(-1) * y).sum(2)


def test_transposed_experts_in_two_modules_are_found_checked_and_removed_exactly():
    """Transposed expert tensors split over two sibling modules, alternating gate/up columns and an (E, 2I) bias:
    found from shapes, the alternating layout confirmed by the check, and removing dead units (each expert repacked
    to the fullest one's count, padded with zero units) computes what the gated block computes."""
    from types import SimpleNamespace

    from hf_dgate.discover import propose_experts, verify
    from hf_dgate.targets.neurons import _expert_unit_set, alternating_expert_unit_set, prune_expert_unit_group_set

    torch.manual_seed(0)
    block, cfg, x = _TwoModuleExperts(), SimpleNamespace(hidden_size=16), torch.randn(2, 5, 16)
    moe = propose_experts(block, cfg)
    got = (moe.experts, moe.down, moe.gate_up, moe.bias, moe.router, moe.transposed)
    assert got == ("moe", "down.w", "up.w", "up.b", "moe.gate", True)
    gs = _expert_unit_set(0, "", block, moe)
    gs.info.guessed = True
    assert verify(block, [gs], x)  # as halves: refused
    alt = alternating_expert_unit_set(gs, "", block, cfg)
    assert not verify(block, [alt], x)
    dead = torch.zeros(alt.n_groups, dtype=torch.bool)
    dead[torch.randperm(alt.n_groups, generator=torch.Generator().manual_seed(1))[:10]] = True
    dead[8:16] = True  # expert 1 loses every unit
    with torch.no_grad():  # the gated block: dead units' rows of down at zero
        block.moe.down.w.mul_((~dead).reshape(3, 8, 1).float())
        want = block(x)
    prune_expert_unit_group_set(block, alt, dead)
    assert block.moe.down.w.shape == (3, 8, 16) and block.moe.up.w.shape == (3, 16, 16)
    torch.testing.assert_close(block(x), want, rtol=0, atol=1e-6)


def test_a_mixture_of_experts_without_a_registry_row_gates_its_expert_units():
    """GraniteMoE (no registry row) stores its experts stacked (in transformers 4.x as two modules' (E, out, in)
    weights): found from shapes, checked, and its expert units export exactly and reload; GPT-OSS's transposed,
    alternating gate/up tensors with biases likewise."""
    for family in ("granitemoe", "gpt_oss"):
        cell = zoo.run_cell("causal-lm", family, "neurons")
        assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_a_failed_head_check_with_a_norm_over_all_heads_names_that_inherent_reason():
    """OLMo 3 has no registry row; its q_norm/k_norm span every head. The numerical check refuses its heads, and the
    refusal names the norm (a named inherent reason), not a generic mismatch."""
    if "olmo3" not in zoo.model_types("causal-lm"):
        pytest.skip("olmo3 is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", "olmo3", "heads")
    assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.QK_NORM.value), cell


class _OneValueMixer(nn.Module):
    """A linear-attention-like mixer whose forward returns its output alone (not (output, weights))."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden_states, **kwargs):
        def helper(x):
            return x, x  # a nested function's tuple does not count

        return self.out_proj(helper(self.in_proj(hidden_states))[0])


def test_an_attention_left_without_heads_returns_what_its_forward_returned():
    """A layer whose heads all go gets a forward returning the output projection's bias; it returns one value where
    the original forward did (hybrids' linear attention: the block adds it to the residual directly, and a tuple
    failed the export), and (output, None) where the original returned a tuple."""
    from hf_dgate.pruned_modules import make_no_head, returns_one_value

    assert returns_one_value(_OneValueMixer)
    mixer = _OneValueMixer()
    mixer.out_proj.weight = nn.Parameter(torch.empty(8, 0))  # what removing every head leaves
    make_no_head(mixer, "out_proj")
    out = mixer(torch.randn(2, 3, 8))
    assert isinstance(out, torch.Tensor) and torch.equal(out, mixer.out_proj.bias.expand(2, 3, 8))

    class _Pair(_OneValueMixer):
        def forward(self, hidden_states, **kwargs):
            return self.out_proj(hidden_states), None

    pair = _Pair()
    pair.out_proj.weight = nn.Parameter(torch.empty(8, 0))
    make_no_head(pair, "out_proj")
    assert isinstance(pair(torch.randn(2, 3, 8)), tuple)

    class _WithBias(_OneValueMixer):  # returns (output, weights, a bias its block adds itself: GPT-NeoX-Japanese)
        def forward(self, hidden_states, **kwargs):
            return self.out_proj(hidden_states), None, self.dense_bias

    three = _WithBias()
    three.dense_bias = nn.Parameter(torch.randn(8))
    three.out_proj.weight = nn.Parameter(torch.empty(8, 0))
    make_no_head(three, "out_proj")
    out = three(torch.randn(2, 3, 8))
    assert len(out) == 3 and out[1] is None and out[2] is three.dense_bias


def test_per_head_vectors_of_the_attention_go_with_their_heads():
    """GPT-OSS (no registry row for its heads' sinks) keeps one learned attention sink per query head on the attention
    module: a removed head takes its sink along (before: the export failed on the probe, 4 sinks for 2 heads)."""
    if "gpt_oss" not in zoo.model_types("causal-lm"):
        pytest.skip("gpt_oss is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", "gpt_oss", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_heads_next_to_a_shared_position_bias_or_a_per_head_convolution():
    """MPNet's relative position bias (an embedding with one column per head, outside the blocks) is computed once for
    every layer: heads are refused for that named inherent reason (before: the export failed on the probe).
    Nystromformer convolves each head's values with its own depthwise filter: the filter goes with its head."""
    cell = zoo.run_cell("masked-lm", "mpnet", "heads")
    assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.SHARED_POSITION_BIAS.value), cell
    cell = zoo.run_cell("masked-lm", "nystromformer", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_a_per_head_output_gate_beside_name_found_projections_goes_with_its_heads():
    """AFMoE's attention has q/k/v/o found by their names plus a gate_proj with one block of outputs per query head
    (no registry row says so): it is found from its width, removed with its heads and checked (before: the export
    failed on the probe)."""
    if "afmoe" not in zoo.model_types("causal-lm"):
        pytest.skip("afmoe is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", "afmoe", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


@pytest.mark.parametrize("family", ["recurrent_gemma", "glm4_moe", "nemotron_h"])
def test_a_layer_drop_rewrites_the_config_patterns_of_the_kept_layers(family):
    """RecurrentGemma cycles `block_types` over the layers, GLM-4-MoE (4.x) makes its first `first_k_dense_replace`
    layers dense, Nemotron-H lists `layers_block_type`: after a drop each is written for the kept layers, and the
    reload builds the export's own modules (before: refused by the reload rehearsal, or the export failed on the
    probe)."""
    if family not in zoo.model_types("causal-lm"):
        pytest.skip(f"{family} is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", family, "layers")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_a_recurrent_mixer_is_named_where_heads_or_an_mlp_were_sought():
    """RWKV's time mixing keeps one decay per channel and its config has no head count: 'no attention heads'.
    FalconMamba (no registry row) has in_proj/out_proj shaped like a fused MLP around a convolution along the sequence
    and a state update: its blocks have no MLP. Both are named inherent reasons; a Llama block has no such mixer."""
    from hf_dgate.discover import recurrent_mixer

    cell = zoo.run_cell("causal-lm", "rwkv", "heads")
    assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.NO_HEADS.value), cell
    if "falcon_mamba" in zoo.model_types("causal-lm"):
        cell = zoo.run_cell("causal-lm", "falcon_mamba", "neurons")
        assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.NO_MLP.value), cell
    llama, _ = zoo.build("causal-lm", "llama")
    assert recurrent_mixer(llama.model.layers[0], llama.config) is None


def test_the_sweep_fills_zero_initialised_projections_as_training_would():
    """NeoMME initialises its output and down projections to zero (each branch starts as the identity), which hides
    every group from the probe; the sweep gives such linear layers small random weights, as a trained model has,
    and leaves other zero tensors (embeddings, biases) alone."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Embedding(5, 4))
    with torch.no_grad():
        model[1].weight.zero_()
        model[2].weight.zero_()
    assert zoo.as_if_trained(model) == ["1"]
    assert model[1].weight.abs().max() > 0 and not model[2].weight.any()


def test_a_config_that_refuses_the_new_layer_count_keeps_a_dead_block():
    """NeoMME's strict config takes only a positive num_hidden_layers: with every layer zero, one dead block stays
    as the identity and the export is exact (before: an ExportError; before that, a crash)."""
    if "neomme" not in zoo.model_types("masked-lm"):
        pytest.skip("neomme is not in this transformers' masked-LM mapping")
    from hf_dgate.export import pruned_structure

    model, batch = zoo.build("masked-lm", "neomme")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="layers"), example_inputs=batch)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["layers"].zero_()
        gated = zoo.run(model, batch)
    pruned = hf_dgate.export_pruned(model, example_inputs=batch)
    assert pruned.dgate_verification.exact and pruned.config.num_hidden_layers == 1
    assert len(pruned_structure(pruned)["dead_layers_kept"]) == 1
    torch.testing.assert_close(zoo.run(pruned, batch), gated)


@pytest.mark.parametrize("mapping,family,target", [("causal-lm", "rwkv", "neurons"),
                                                   ("image-classification", "siglip", "neurons")])
def test_a_layer_left_empty_reloads_where_the_family_init_divides_by_its_width(mapping, family, target):
    """RWKV's init divides by a Linear's input width, SigLIP's LeCun init by its fan-in: a layer that lost every
    neuron or head has an empty weight there. The reload marks such modules initialised (their tensors all come from
    the checkpoint), so the export loads back exactly (before: refused by the reload rehearsal on 5.x)."""
    cell = zoo.run_cell(mapping, family, target)
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


class _PerUnitScale(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


def test_a_module_on_the_units_is_sliced_unless_it_normalises_them_together():
    """Between up and down, a module with one parameter per unit is either elementwise (a per-unit scale: its entries
    go with their units) or mixes the units (ConvNeXt V2's global response norm divides each unit by the mean over
    all units: removing one changes the others, a named inherent reason, found with its weight moved off its initial
    zero, where it is the identity)."""
    from hf_dgate.targets.neurons import _mixes_units, _per_unit

    n = 12
    scale, layernorm = _PerUnitScale(n), nn.LayerNorm(n)
    assert _per_unit(scale, n) and _mixes_units(scale, n) is False
    assert _per_unit(layernorm, n) and _mixes_units(layernorm, n) is True
    assert not _per_unit(nn.Linear(n, n), n)
    if "convnextv2" in zoo.model_types("image-classification"):
        model, _ = zoo.build("image-classification", "convnextv2")
        grn = model.convnextv2.encoder.stages[0].layers[0].grn
        assert _mixes_units(grn, grn.weight.shape[-1]) is True
        cell = zoo.run_cell("image-classification", "convnextv2", "neurons")
        assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.UNIT_NORM.value), cell


class _WrappedOutput(nn.Module):
    """BERT/CvT's layout: the query/key/value projections in `attention.inner`, the output projection alone in a
    wrapper `attention.output.dense`."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.attention = nn.Module()
        self.attention.inner = nn.Module()
        for n in ("q", "k", "v"):
            setattr(self.attention.inner, n, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)


def test_an_output_projection_alone_in_a_wrapper_is_proposed_with_its_siblings_one_level_up():
    """CvT's output projection sits alone in a wrapper beside the module holding its query/key/value projections: the
    shapes propose it with the siblings one level up (before: the value projection was taken for the output), and
    the module whose head counts follow is the one holding them all."""
    from types import SimpleNamespace

    from hf_dgate.discover import propose_attention
    from hf_dgate.targets.heads import discovered_core

    parts = propose_attention(_WrappedOutput(), SimpleNamespace(hidden_size=16), 4, 4)
    assert parts["o"] == "attention.output.dense"
    assert set(parts["per_head"]) == {"attention.inner.q", "attention.inner.k", "attention.inner.v"}
    assert discovered_core(parts["o"], parts["per_head"], parts["per_kv_head"]) == "attention"


def test_a_stage_whose_every_block_is_dead_keeps_one_as_an_identity():
    """A Hiera stage returns its last block's attention weights, so it cannot run empty: where every block of a
    stage is dead, the export keeps one (its zero branches make it the identity; export._dead_blocks_to_keep),
    exact and reloading."""
    import tempfile

    import transformers as T

    import hf_dgate

    cfg = T.HieraConfig(embed_dim=8, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
                        patch_padding=[3, 3], masked_unit_size=[8, 8], depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 2])
    model = T.HieraForImageClassification(cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="layers"), example_inputs=x)
    bank = hf_dgate.get_bank(model)
    assert bank.group_sets[0].info.stack == "hiera.encoder.stages.0.layers"
    with torch.no_grad():
        bank.gammas["layers"][:, 0] = 0
        want = model(**x).logits
    pruned = hf_dgate.export_pruned(model, example_inputs=x)
    assert len(pruned.hiera.encoder.stages[0].layers) == 1
    torch.testing.assert_close(pruned(**x).logits, want, rtol=0, atol=1e-5)
    with tempfile.TemporaryDirectory() as d:
        pruned.save_pretrained(d)
        torch.testing.assert_close(hf_dgate.AutoPrunedModel.from_pretrained(d)(**x).logits, want, rtol=0, atol=1e-5)


def test_a_family_whose_construction_reads_a_buffer_is_rehearsed_with_real_buffers():
    """Apertus' xIELU activation (transformers 4.x) reads a value off a buffer it has just made, which the meta device
    cannot give: the reload rehearsal builds it with parameters on meta and buffers real, as transformers' loader
    does, instead of refusing an export that loads fine."""
    from hf_dgate.compat import TRANSFORMERS_VERSION

    if int(TRANSFORMERS_VERSION.split(".")[0]) >= 5 or "apertus" not in zoo.model_types("causal-lm"):
        pytest.skip("transformers 5 builds xIELU on the meta device")
    cell = zoo.run_cell("causal-lm", "apertus", "neurons")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


class _SharedMLPBlocks(nn.Module):
    """Two blocks that hold one MLP module (Zamba2's shared transformer block reused by its hybrid layers)."""

    def __init__(self, d: int = 16):
        super().__init__()
        shared = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.norm, block.mlp, block.mix = nn.LayerNorm(d), shared, nn.Linear(d, d)
            self.blocks.append(block)

    def forward(self, x):
        for b in self.blocks:
            x = x + b.mix(x)
            x = x + b.mlp(b.norm(x))
        return x


def test_blocks_sharing_a_module_cannot_lose_its_groups_one_block_at_a_time():
    """A module that two blocks hold is gated once per block: its weights serve both, so one block cannot lose its
    units alone (and two gates would remove each other's). Refused, for that named reason."""
    import hf_dgate

    with pytest.raises(ValueError, match="shared by blocks") as e:
        hf_dgate.apply_dgate(_SharedMLPBlocks(), hf_dgate.DGateConfig(target="neurons"),
                             example_inputs=torch.randn(2, 5, 16))
    assert zoo.inherent_reason(str(e.value)) == zoo.Inherent.SHARED_PARAMS


def test_a_shared_mlp_with_a_per_layer_adapter_beside_its_fused_up_projection():
    """Zamba2 (4.x) adds a per-layer adapter's output to its shared MLP's fused gate_up_proj: the adapter's last layer
    is proposed beside the up projection (its rows go with the units) and the check confirms it; the adapter's
    bottleneck, as wide as the units, is not taken for an up projection."""
    if "zamba2" not in zoo.model_types("causal-lm"):
        pytest.skip("zamba2 is not in this transformers' causal-LM mapping")
    fam = zoo.run_family("causal-lm", "zamba2", ("neurons",))
    if not fam.builds:
        pytest.skip(f"zamba2 does not build tiny here: {fam.why[:80]}")
    assert fam.cells[0].outcome == zoo.Outcome.EXACT.value, fam.cells[0]
