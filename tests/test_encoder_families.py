"""Encoder families whose attention is not plain: BigBird swaps block-sparse for full attention at run time
(short inputs), building the new attention from the config; a pruned export must keep its head counts across the
swap, both ways, and reload exactly with either."""

import warnings

import pytest
import torch

import hf_dgate
from hf_dgate.loading import AutoPrunedModel, save_pruned

transformers = pytest.importorskip("transformers")
# block size 4 and one random block: block-sparse attention runs from (5 + 2) * 4 = 28 tokens on
SPARSE = dict(vocab_size=64, max_position_embeddings=128, block_size=4, num_random_blocks=1,
              attention_type="block_sparse")


def _bigbird(family):
    torch.manual_seed(0)
    if family == "big_bird":
        cfg = transformers.BigBirdConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, **SPARSE)
        return transformers.BigBirdForMaskedLM(cfg).eval(), "AutoModelForMaskedLM"
    cfg = transformers.BigBirdPegasusConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                            **SPARSE)
    return transformers.BigBirdPegasusForConditionalGeneration(cfg).eval(), "AutoModelForSeq2SeqLM"


def _batch(n, seq2seq):
    ids = torch.randint(3, 60, (2, n), generator=torch.Generator().manual_seed(n))
    return {"input_ids": ids, **({"decoder_input_ids": ids[:, :4]} if seq2seq else {})}


def _logits(model, batch, kind):
    next(m for m in model.modules() if hasattr(m, "set_attention_type")).set_attention_type(kind)  # the outermost
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("target", ["heads", "neurons"])
@pytest.mark.parametrize("family", ["big_bird", "bigbird_pegasus"])
def test_bigbird_export_is_exact_with_full_and_block_sparse_attention(tmp_path, family, target):
    model, auto = _bigbird(family)
    seq2seq = family == "bigbird_pegasus"
    short, long = _batch(8, seq2seq), _batch(64, seq2seq)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target), example_inputs=short)
    attention = [m for m in model.modules() if hasattr(m, "set_attention_type")]
    assert {m.attention_type for m in attention} == {"original_full"}  # the probe's short batch switched them
    with torch.no_grad():
        bank = hf_dgate.get_bank(model)
        gammas = bank.gammas[target]
        gammas[:, : bank.group_sets[0].n_groups] = 0  # every group of the first layer
        gammas[:, -1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = hf_dgate.export_pruned(model, example_inputs=short)
        assert save_pruned(pruned, tmp_path) == auto
        again = AutoPrunedModel.from_pretrained(tmp_path).eval()
        remote = getattr(transformers, auto).from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert next(m for m in again.modules() if hasattr(m, "set_attention_type")).attention_type == "block_sparse"
    for kind, batch in (("block_sparse", long), ("original_full", short), ("original_full", long)):
        want = _logits(model, batch, kind)
        for m in (pruned, again, remote):
            assert torch.allclose(_logits(m, batch, kind), want, atol=1e-5), (kind, batch["input_ids"].shape)
    # a fresh load meets a short input first: its forward swaps in full attention built from the config
    again = AutoPrunedModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(**short).logits, _logits(model, short, "original_full"), atol=1e-5)
    if target == "heads":
        heads = [m.num_attention_heads for m in again.modules() if type(m).__name__.endswith("SelfAttention")]
        assert heads[:2] == [0, 4 - (family == "big_bird")], heads


def test_the_reload_rehearsal_refuses_other_modules_or_lost_head_counts(monkeypatch):
    """The rehearsal rebuilds the export as a loader would and switches its run-time attention where the export's
    was switched; it refuses an export holding another class than its config builds, and one whose attention,
    rebuilt from the config by that switch, would lose the pruned head counts (before: a crash on the first short
    input after loading)."""
    from hf_dgate import pruned_modules
    from hf_dgate.native import reload_problem
    from hf_dgate.pruned_modules import KeepsPrunedAttention
    from hf_dgate.record import RECORD_KEY

    model, _ = _bigbird("big_bird")
    short = _batch(8, False)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs=short)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, :5] = 0
    pruned = hf_dgate.export_pruned(model, example_inputs=short)
    assert reload_problem(pruned) is None
    for m in pruned.modules():  # as if neither the export nor its rebuild kept the head counts across the switch
        if isinstance(m, KeepsPrunedAttention):
            m.__class__ = type(m).__mro__[1]
    assert getattr(pruned.config, RECORD_KEY)["rebuild"].pop("keep_on_switch")
    monkeypatch.setattr(pruned_modules, "keep_pruned_on_switch", lambda module: None)
    why = reload_problem(pruned)
    assert "'bert.encoder.layer.0.attention.self' would have {'num_attention_heads': 4" in why, why
    assert "after NoHeadBigBirdSelfAttention is rebuilt at run time" in why

    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    attn = bert.bert.encoder.layer[0].attention
    attn.self.__class__ = type("OtherSelfAttention", (type(attn.self),), {})
    built = type(attn.self).__mro__[1].__name__  # (4.57 builds BertSdpaSelfAttention)
    assert reload_problem(bert) == (
        f"its config builds {built} at 'bert.encoder.layer.0.attention.self' where the export has OtherSelfAttention")


def test_an_attention_without_heads_returns_tuples_where_its_forward_returned_tuples():
    """I-BERT's attention returns (outputs, scaling factors), each a tuple; a layer left without heads returns the
    same nesting (before: its block indexed the scaling factor None and the export failed on the probe)."""
    from transformers.models.ibert.modeling_ibert import IBertSelfAttention

    from hf_dgate import zoo
    from hf_dgate.pruned_modules import returned_tuples

    assert returned_tuples(IBertSelfAttention) == [True, True]
    assert returned_tuples(transformers.models.bert.modeling_bert.BertSelfAttention) is None
    cell = zoo.run_cell("masked-lm", "ibert", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_funnel_heads_take_their_per_head_blocks_and_a_layer_without_heads_keeps_its_norm():
    """Funnel's relative attention holds per-head blocks (r_w_bias (heads, d_head), r_kernel (d_model, heads,
    d_head), seg_embed (2, heads, d_head)), reads its head count from its config and adds the residual and its
    LayerNorm itself: the blocks go with their heads, each layer gets its own head count, and a layer without heads
    runs its own forward on zero-width heads."""
    from hf_dgate import zoo

    cell = zoo.run_cell("masked-lm", "funnel", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell
    torch.manual_seed(0)
    cfg = transformers.FunnelConfig(vocab_size=64, d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1],
                                    num_decoder_layers=1)
    model = transformers.FunnelForMaskedLM(cfg).eval()
    batch = {"input_ids": _batch(8, False)["input_ids"]}
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs=batch)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, [0, 1, 2, 3, 5]] = 0  # layer 0: none left; layer 1: 3 left
    pruned = hf_dgate.export_pruned(model, example_inputs=batch)
    attn = [b.attention for b in pruned.funnel.encoder.blocks[1]][0]
    assert attn.r_kernel.shape == (32, 3, 8) and attn.seg_embed.shape == (2, 3, 8) and attn.config.n_head == 3
    assert pruned.config.n_head == 4


@pytest.mark.parametrize("relative", [False, True])
def test_deberta_heads_leave_its_fused_in_proj_and_per_head_biases(tmp_path, relative):
    """DeBERTa (v1) fuses q/k/v in one in_proj laid out per head [q_h | k_h | v_h] with separate q_bias and v_bias
    vectors; with relative attention its pos_proj / pos_q_proj have one block of outputs per head too."""
    torch.manual_seed(0)
    extra = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16) if relative else {}
    cfg = transformers.DebertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, **extra)
    model = transformers.DebertaForMaskedLM(cfg).eval()
    batch = {"input_ids": _batch(8, False)["input_ids"]}
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs=batch)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, [0, 1, 2, 3, 6]] = 0
        gated = model(**batch).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = hf_dgate.export_pruned(model, example_inputs=batch)
        save_pruned(pruned, tmp_path)
        again = AutoPrunedModel.from_pretrained(tmp_path).eval()
    attn = pruned.deberta.encoder.layer[1].attention.self
    assert attn.in_proj.weight.shape[0] == 3 * 3 * 8 and attn.q_bias.shape == attn.v_bias.shape == (24,)
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, gated, atol=1e-5)


def test_albert_heads_of_its_shared_layer_and_an_attention_that_norms_its_own_sum():
    """ALBERT applies one layer at every depth: its heads are one group set, gated once, and removed from the
    shared layer. Its attention ends with LayerNorm(input + output): one left without heads returns that norm of its
    input plus the output projection's bias (before: the projection's bias alone, an inexact export)."""
    from transformers.models.albert.modeling_albert import AlbertAttention

    from hf_dgate import zoo
    from hf_dgate.pruned_modules import post_norm_inside

    assert post_norm_inside(AlbertAttention) == "LayerNorm"
    assert post_norm_inside(transformers.models.bert.modeling_bert.BertSelfAttention) is None
    cell = zoo.run_cell("masked-lm", "albert", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_convbert_heads_are_refused_because_its_convolution_kernels_mix_them():
    """ConvBERT computes every head's dynamic-convolution kernel from all heads' query channels (conv_kernel_layer):
    no head can go without changing the others, an inherent reason named at apply_dgate; a BERT attention has no
    such projection."""
    from hf_dgate import zoo

    cell = zoo.run_cell("masked-lm", "convbert", "heads")
    assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.HEADS_MIXED.value), cell
    torch.manual_seed(0)
    cfg = transformers.ConvBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, embedding_size=32)
    with pytest.raises(ValueError, match=r"mixes its heads \('attention.self.conv_kernel_layer' computes"):
        hf_dgate.apply_dgate(transformers.ConvBertForMaskedLM(cfg).eval(), hf_dgate.DGateConfig(target="heads"))
    assert zoo.run_cell("masked-lm", "bert", "heads").outcome == zoo.Outcome.EXACT.value


def test_an_attention_that_views_its_output_to_its_input_width_through_a_field_is_named():
    """PEGASUS-X's global-local attention reads the model width off its input into a dimensions record
    (`hidden_dim=token_hidden_states.shape[2]`) and views both outputs to it: it cannot run with fewer heads, the
    refusal names that (before: the export failed on the probe with a KeyError)."""
    from transformers.models.pegasus_x.modeling_pegasus_x import PegasusXGlobalLocalAttention

    from hf_dgate import zoo
    from hf_dgate.compat import input_width_reshape

    attn = PegasusXGlobalLocalAttention(embed_dim=32, num_heads=4, block_size=4)
    assert input_width_reshape(attn)
    assert not input_width_reshape(transformers.models.bert.modeling_bert.BertSelfAttention(
        transformers.BertConfig(hidden_size=32, num_attention_heads=4)))
    cell = zoo.run_cell("seq2seq-lm", "pegasus_x", "heads")
    assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.OLD_TRANSFORMERS.value), cell


def test_heads_whose_context_has_more_than_the_values_are_gated_at_the_output_projection():
    """NeZha adds relative-position values to every head's context, so a zero value row is no zero head: the
    value-side check fails, the same heads gated at the output projection's input pass and export exactly."""
    from hf_dgate import zoo

    if "nezha" not in zoo.model_types("masked-lm"):
        pytest.skip("nezha is not in this transformers' masked-LM mapping")
    cell = zoo.run_cell("masked-lm", "nezha", "heads")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_a_bigbird_rebuild_from_the_per_layer_lists_keeps_its_head_counts_across_the_switch():
    """A spec without keep_on_switch (one translated from the per-layer lists) still makes the attention's parent
    keep the pruned sizes when BigBird swaps its attention at run time."""
    from hf_dgate.pruned_modules import KeepsPrunedAttention, shrink
    from hf_dgate.recording import rebuild_spec

    model, _ = _bigbird("big_bird")
    short = _batch(8, False)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs=short)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, [0, 1, 2, 3, 5]] = 0
    pruned = hf_dgate.export_pruned(model, example_inputs=short)
    spec = rebuild_spec(pruned)
    spec.pop("keep_on_switch")
    fresh, _ = _bigbird("big_bird")
    shrink(fresh, spec)
    fresh.load_state_dict(pruned.state_dict())
    assert isinstance(fresh.bert.encoder.layer[1].attention, KeepsPrunedAttention)
    assert not isinstance(fresh, KeepsPrunedAttention)
    long = _batch(64, False)
    for kind, batch in (("original_full", short), ("block_sparse", long)):
        assert torch.allclose(_logits(fresh, batch, kind), _logits(model, batch, kind), atol=1e-5), kind


def test_squeezebert_layers_are_refused_as_post_norm_blocks():
    """SqueezeBERT's blocks end each branch with LayerNorm(conv1d(x) + x): a zero branch does not remove the
    layer, the named reason (before: its NCW layout hid the branches from the probe, 'not reached')."""
    from hf_dgate import zoo

    cell = zoo.run_cell("masked-lm", "squeezebert", "layers")
    assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.POST_NORM.value), cell
