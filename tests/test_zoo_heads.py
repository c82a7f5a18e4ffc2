"""Head surgery of zoo families whose attention needs more than its projections sliced (issue 20): an ALiBi bias
built once from the config's head count, an attention module that adds the residual itself."""

import pytest
import torch

from hf_dgate import zoo


def _exact(family: str) -> zoo.Cell:
    if family not in zoo.model_types("causal-lm"):
        pytest.skip(f"{family} is not in this transformers' causal-LM mapping")
    return zoo.run_cell("causal-lm", family, "heads")


@pytest.mark.parametrize("family", ["bloom", "mpt", "cpmant"])
def test_layers_take_their_kept_heads_share_of_a_bias_built_once(family):
    """BLOOM and MPT build one ALiBi bias for all layers from the config's head count (BLOOM's `alibi`, MPT's
    `position_bias`, heads folded into dim 0), CPM-Ant one learned segment bias (batch, heads, q, k): a layer with
    fewer heads takes its kept heads' share, recorded in the rebuild spec so AutoPrunedModel and the generated loader
    select it too (before: the export failed on the probe, 8 bias rows for 4 heads). BLOOM's attention adds the
    residual itself: a layer without heads keeps it."""
    cell = _exact(family)
    assert cell.outcome == zoo.Outcome.EXACT.value and cell.reload.startswith("AutoPrunedModel"), cell


def test_head_selection_of_an_outside_bias_composes_and_is_checked_as_data():
    from hf_dgate.pruned_modules import select_head_inputs, shrink

    class Attn(torch.nn.Module):
        def forward(self, x, alibi=None):
            return alibi

    m = Attn()
    select_head_inputs(m, ["alibi"], [0, 2, 3], 4)
    select_head_inputs(m, ["alibi"], [0, 2], 4)  # a second export of the pruned module: heads 0 and 3 of the 4
    assert m._dgate_head_inputs["heads"] == [0, 3]
    bias = torch.arange(8.0).reshape(8, 1)  # batch 2 x 4 heads
    assert m(None, bias).flatten().tolist() == [0, 3, 4, 7]
    assert m(None, alibi=bias).flatten().tolist() == [0, 3, 4, 7]
    four = torch.arange(8.0).reshape(2, 4, 1, 1)  # (batch, heads, queries, keys)
    assert m(None, four).flatten().tolist() == [0, 3, 4, 7]
    spec = {"shapes": {}, "attrs": {}, "no_head": {}, "no_input": [], "head_inputs": {"": {"args": ["alibi"],
                                                                                          "heads": [5], "of": 4}}}
    with pytest.raises(ValueError, match="beyond"):
        shrink(Attn(), spec)


@pytest.mark.parametrize("family", ["openai-gpt", "doge"])
def test_heads_whose_attention_returns_a_list_or_has_per_head_mask_parts(family):
    """OpenAI GPT's attention returns a list its block extends with `+`: a layer left without heads returns a list
    too (before: 'can only concatenate list (not "Tensor") to list'). Doge's dynamic mask reads every key/value
    head's values through dt_proj and writes one mask row per key/value head, scaled by a per-head vector A: a
    removed head takes its dt_proj columns and row and its entry of A (before: the export failed on the probe)."""
    cell = _exact(family)
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_projections_wrapped_in_a_module_of_their_name_are_found():
    """Moshi wraps each projection in a MoshiLinear (q_proj.linear): the common names find the wrapped Linear, and
    the attention module is the wrapper's parent (before: the MLP was proposed as heads and failed its check)."""
    cell = _exact("moshi")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_an_mlp_is_never_proposed_as_heads():
    """XLNet's attention keeps its projections as raw parameters; the MLP beside it (ff.layer_2 reads the config's
    d_inner) was proposed as 4 'heads' of 1024 units. Now no attention is found, and a Mamba mixer's out_proj alone
    is no attention either: Jamba's Mamba layers stay dense and its attention layers are gated."""
    from hf_dgate.discover import propose_attention

    if "xlnet" in zoo.model_types("causal-lm"):
        model, _ = zoo.build("causal-lm", "xlnet")
        block = model.transformer.layer[0]
        assert propose_attention(block, model.config, model.config.n_head, model.config.n_head) is None
    if "jamba" not in zoo.model_types("causal-lm"):
        return
    try:
        zoo.run(*zoo.build("causal-lm", "jamba"))
    except ValueError:  # transformers 4.57's Jamba asks for CUDA Mamba kernels
        return
    cell = _exact("jamba")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


@pytest.mark.parametrize("target", ["heads", "neurons"])
def test_an_rms_norm_over_all_heads_or_units_is_rescaled_with_them(target):
    """BitNet normalises all heads' outputs (attn_sub_norm) and all MLP units (ffn_sub_norm) with one RMSNorm before
    the output projection. A dead head or unit reaches the norm as zero (heads gated at the values, units at the up
    projection's output), so removing it only changes the mean's count: the norm's weight grows by sqrt(n / kept) and
    its epsilon by n / kept, recorded in the rebuild spec (before: the export failed on the probe, and neurons were
    refused by the numerical check)."""
    if "bitnet" not in zoo.model_types("causal-lm"):
        pytest.skip("bitnet is not in this transformers' causal-LM mapping")
    cell = zoo.run_cell("causal-lm", "bitnet", target)
    assert cell.outcome == zoo.Outcome.EXACT.value and cell.reload.startswith("AutoPrunedModel"), cell


def test_rescaling_an_rms_norm_is_exact_and_a_layer_norm_is_not_taken():
    from hf_dgate.targets.base import rescale_rms_norm, rms_eps

    class RMS(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.rand(n) + 0.5), 1e-2

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    norm = RMS(8)
    x = torch.randn(5, 8)
    x[:, [1, 4, 6]] = 0  # dead units arrive as zeros
    keep = torch.tensor([0, 2, 3, 5, 7])
    want = norm(x)[:, keep]
    norm.weight = torch.nn.Parameter(norm.weight.data[keep])
    rescale_rms_norm(norm, 8, 5)
    assert torch.allclose(norm(x[:, keep]), want, atol=1e-6) and norm.variance_epsilon == pytest.approx(1.6e-2)
    assert rms_eps(torch.nn.LayerNorm(8, bias=False)) is None  # centres: its dead units do not stay zero
    from hf_dgate.pruned_modules import shrink

    spec = {"shapes": {}, "attrs": {"": {"variance_epsilon": 7.0}}, "no_head": {}, "no_input": []}
    with pytest.raises(ValueError, match="epsilon"):
        shrink(RMS(8), spec)


@pytest.mark.parametrize("family", ["ergo", "lfm3", "minicpm5_moe", "inkling_text"])
def test_heads_counted_in_the_config_or_gated_per_head(family):
    """Ergo splits its fused qkv by the counts in self.config at run time: a layer with fewer heads gets a config of
    its own (found in the forward's source). LFM3 gates each head's output with one sigmoid per head (g_proj, one
    output per head) and MiniCPM5-MoE computes [query | gate] per head in q_gate_proj: both go with their heads.
    Inkling convolves each key/value channel with its own filter (k_sconv, v_sconv): a removed head takes its
    channels (before: each export failed on the probe)."""
    cell = _exact(family)
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_a_fixed_shard_count_of_the_fused_qkv_is_refused_by_name():
    """CodeGen's attention in transformers 4.x splits its fused qkv into `mp_num = 4` shards, each an equal share of
    the heads: it cannot run with the heads left after a removal, refused for that named reason (before: the export
    failed on the probe). transformers 5 rewrote the module: there the heads export exactly."""
    import transformers

    cell = _exact("codegen")
    if int(transformers.__version__.split(".")[0]) < 5:
        assert (cell.outcome, cell.detail) == (zoo.Outcome.INHERENT.value, zoo.Inherent.OLD_TRANSFORMERS.value), cell
    else:
        assert cell.outcome == zoo.Outcome.EXACT.value, cell


def test_differential_attention_removes_paired_heads_exactly():
    """DiffLlama splits its values in two halves along the key/value heads and subtracts paired heads' outputs:
    key/value heads j and j + n_kv/2 form one group with the query heads reading them and the output pairs they
    write (found from the forward's source). With 4 key/value heads (2 groups), removing one group per layer and
    scaling another is exact, reloads and generates the same tokens (before: the numerical check refused every
    block)."""
    import tempfile

    import transformers

    import hf_dgate
    from hf_dgate.loading import save_pruned

    if not hasattr(transformers, "DiffLlamaConfig"):
        pytest.skip("no DiffLlama in this transformers")
    torch.manual_seed(0)
    cfg = transformers.DiffLlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    model = transformers.DiffLlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs={"input_ids": ids})
    with torch.no_grad():
        gammas = hf_dgate.get_bank(model).gammas["heads"]
        assert gammas.shape[1] == 4  # 2 groups per layer
        gammas[:, [0, 3]] = 0
        gammas[:, 1] *= 0.7
        gated = model(ids).logits
    pruned = hf_dgate.export_pruned(model, example_inputs={"input_ids": ids})
    assert pruned.config.dgate_pruning["heads"] == [[2, 3, 6, 7], [0, 1, 4, 5]]
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        save_pruned(pruned, d)
        again = hf_dgate.AutoPrunedModel.from_pretrained(d).eval()
        assert torch.allclose(again(ids).logits, gated, atol=1e-5)
        tokens = again.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(tokens, pruned.generate(ids, max_new_tokens=3, do_sample=False))


def test_a_bias_the_attention_returns_for_its_block_stays_whole():
    """GPT-NeoX-Japanese's attention returns its output bias (dense_bias, as wide as all heads) for the block to add:
    it is no per-head vector and keeps its width."""
    cell = _exact("gpt_neox_japanese")
    assert cell.outcome == zoo.Outcome.EXACT.value, cell


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_multi_head_latent_attention_heads_are_removed_exactly(q_lora_rank, tmp_path):
    """DeepSeek-V3's MLA: a head owns its block of query rows (q_b_proj, or q_proj without a query latent: nope +
    rope per head), of kv_b_proj's rows (its key nope and value, contiguous per head) and its columns of o_proj;
    the latents (q_a_proj, kv_a_proj_with_mqa with the rotary key shared by all heads) and their norms stay whole
    (before: 'a zero gate does not equal removing its slices', the latents were sliced as if per head). The
    export equals the gated model and reloads with its per-layer head counts."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import hf_dgate
    from hf_dgate.loading import save_pruned

    cfg = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    zoo.as_if_trained(model)
    batch = {"input_ids": torch.randint(0, 64, (2, 7))}
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs=batch)
    attn = model.model.layers[0].self_attn
    sliced = {sl.module.rpartition(".")[2] for gs in hf_dgate.get_bank(model).group_sets for sl in gs.removable}
    assert sliced == {"q_proj" if q_lora_rank is None else "q_b_proj", "kv_b_proj", "o_proj"}
    with torch.no_grad():
        gates = hf_dgate.get_bank(model).gammas["heads"]
        gates[:, [0, 2, 5]] = 0  # heads 0 and 2 of layer 0, head 1 of layer 1
    gated = zoo.run(model, batch)
    pruned = hf_dgate.export_pruned(model, example_inputs=batch)
    out = zoo.run(pruned, batch)
    assert float((out - gated).abs().max()) <= 1e-4
    attn = pruned.model.layers[0].self_attn
    assert attn.kv_b_proj.out_features == 2 * (8 + 6) and attn.o_proj.in_features == 2 * 6
    assert attn.kv_a_proj_with_mqa.out_features == 12 + 4  # the shared latent and rotary key: whole
    assert pruned.model.layers[1].self_attn.kv_b_proj.out_features == 3 * (8 + 6)
    save_pruned(pruned, tmp_path)
    again = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path).float().eval()
    assert float((zoo.run(again, batch) - out).abs().max()) <= 1e-4


@pytest.mark.parametrize("family", ["swin", "swinv2"])
def test_window_attention_per_head_position_tables_go_with_their_heads(family):
    """Swin adds a relative position bias from a (positions, heads) table (held by the attention, or on 5.x by a
    bias module in it); Swin v2 scales each head by logit_scale (heads, 1, 1) and computes its bias with an MLP whose
    last Linear writes one output per head. Stages have different head counts. A removed head takes its table
    column, scale and MLP row (found from shapes): the export is exact and reloads (before: the export failed on the
    probe, the bias had the old head count)."""
    import tempfile

    import hf_dgate
    from hf_dgate.loading import save_pruned

    if family not in zoo.model_types("image-classification"):
        pytest.skip(f"{family} is not in this transformers' image-classification mapping")
    torch.manual_seed(0)
    model, inputs = zoo.build("image-classification", family)
    model.eval()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"), example_inputs=inputs)
    with torch.no_grad():
        gammas = hf_dgate.get_bank(model).gammas["heads"]
        gammas[:, [0, 2, 6, 10, gammas.shape[1] - 2]] = 0  # one head of stage 0's, 1's blocks and of the last block
        gammas[:, 5] *= 0.7
        gated = model(**inputs).logits
    pruned = hf_dgate.export_pruned(model, example_inputs=inputs)
    per_head = {n: p.shape for n, p in pruned.named_parameters()
                if n.endswith(("relative_position_bias_table", "logit_scale", "continuous_position_bias_mlp.2.weight"))}
    assert per_head
    heads = [s[1] if n.endswith("table") else s[0] for n, s in per_head.items() if not n.endswith("weight")]
    if family == "swinv2":  # the bias MLP's last Linear has one row per kept head, like logit_scale
        assert [s[0] for n, s in per_head.items() if n.endswith("weight")] == heads
    assert heads[:4] == [1, 1, 3, 3] and heads[-1] == model.config.num_heads[-1] - 1, per_head
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        save_pruned(pruned, d)
        again = hf_dgate.AutoPrunedModel.from_pretrained(d).eval()
        assert torch.allclose(again(**inputs).logits, gated, atol=1e-5)


@pytest.mark.parametrize("family", ["axk2", "glm_moe_dsa"])
def test_latent_attention_with_a_per_head_output_gate_or_an_indexer(family):
    """AXK2's MLA fuses each head's query and its sigmoid output gate in q_gate_proj ([query | gate] per head): a
    removed head takes both (before: not found, the fused width was no known per-head width). Both keep their
    sparse attention's indexer whole (its own heads pick the keys for all heads; before: its one-output-per-head
    weights_proj was sliced as a per-head position table and the export failed on the probe)."""
    cell = _exact(family)
    assert cell.outcome == zoo.Outcome.EXACT.value, cell
