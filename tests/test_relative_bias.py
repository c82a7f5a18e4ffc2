"""T5-style blocks in no registry row (UMT5, LongT5): sub-layer lists are residual branches, a per-layer relative
position bias loses the removed heads' columns, and a bias that the first block computes for all is a named
refusal for heads and layers."""

import warnings

import pytest
import torch

import hf_dgate
from hf_dgate.loading import AutoPrunedModel, save_pruned

transformers = pytest.importorskip("transformers")
SIZES = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
             decoder_start_token_id=0, pad_token_id=0)


def _batch():
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


@pytest.mark.parametrize("target", ["heads", "neurons", "layers"])
def test_umt5_is_gated_exported_and_reloaded_exactly(tmp_path, target):
    torch.manual_seed(0)
    model = transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(**SIZES)).eval()
    batch = _batch()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target), example_inputs=batch)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas[target][:, ::2] = 0
        gated = model(**batch).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = hf_dgate.export_pruned(model, example_inputs=batch)
        save_pruned(pruned, tmp_path)
        again = AutoPrunedModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(pruned(**batch).logits, gated, atol=1e-5)
    assert torch.allclose(again(**batch).logits, gated, atol=1e-5)
    if target == "heads":  # each layer's own bias keeps one column per kept head
        bias = pruned.encoder.block[1].layer[0].SelfAttention.relative_attention_bias
        assert bias.weight.shape[1] == pruned.encoder.block[1].layer[0].SelfAttention.n_heads < 4


@pytest.mark.parametrize("target", ["heads", "layers"])
def test_a_position_bias_the_first_block_shares_is_a_named_refusal(target):
    from hf_dgate import zoo

    model = transformers.LongT5ForConditionalGeneration(transformers.LongT5Config(**SIZES)).eval()
    with pytest.raises(ValueError, match="position bias shared") as e:
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target), example_inputs=_batch())
    assert zoo.inherent_reason(str(e.value)) is zoo.Inherent.SHARED_POSITION_BIAS
