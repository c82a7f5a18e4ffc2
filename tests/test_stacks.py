"""Every block stack is gated or named: encoder-decoder and two-tower models are never gated in part silently."""

import pytest
import torch
import transformers as T

import hf_dgate
from hf_dgate.architectures import StructureNotFoundError, find_stacks
from hf_dgate.compat import HAS_HF_PRUNE_HEADS


def bart():
    return T.BartForConditionalGeneration(
        T.BartConfig(
            vocab_size=64,
            d_model=32,
            encoder_layers=2,
            decoder_layers=3,
            encoder_attention_heads=4,
            decoder_attention_heads=8,
            encoder_ffn_dim=64,
            decoder_ffn_dim=48,
            max_position_embeddings=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
    )


def whisper():
    return T.WhisperForConditionalGeneration(
        T.WhisperConfig(
            vocab_size=64,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        )
    )


def t5():
    return T.T5ForConditionalGeneration(
        T.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2)
    )


def clip():
    return T.CLIPModel(
        T.CLIPConfig(
            text_config=dict(
                vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=16,
                patch_size=8,
            ),
        )
    )


@pytest.mark.parametrize("build", [bart, whisper, t5, clip])
def test_every_stack_of_a_known_family_is_gated(build):
    model = build()
    stacks = [name for name, _ in find_stacks(model)]
    assert len(stacks) == 2
    hf_dgate.apply_dgate(model, target="neurons")
    gated = {gs.info.stack for gs in hf_dgate.get_bank(model).group_sets}
    assert gated == set(stacks)
    report = hf_dgate.sparsity_report(model)
    assert report.stacks == dict.fromkeys(stacks, True) and not report.ungated_stacks


def test_decoder_blocks_get_cross_attention_heads_of_their_own():
    model = bart()
    hf_dgate.apply_dgate(model, target="heads")
    kinds = [(gs.info.stack_name, gs.info.attention, gs.n_groups) for gs in hf_dgate.get_bank(model).group_sets]
    assert kinds.count(("encoder", "self", 4)) == 2
    assert kinds.count(("decoder", "self", 8)) == 3 and kinds.count(("decoder", "cross", 8)) == 3


class TwoTowers(torch.nn.Module):
    """Two stacks and no registry entry that says how each is configured."""

    def __init__(self):
        super().__init__()
        cfg = T.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32)
        self.config = cfg
        self.left, self.right = T.GPT2Model(cfg), T.GPT2Model(cfg)


def test_unknown_multi_stack_model_is_refused_by_name():
    model = TwoTowers()
    with pytest.raises(StructureNotFoundError) as err:
        hf_dgate.apply_dgate(model, target="heads")
    assert "'left.h'" in str(err.value) and "'right.h'" in str(err.value) and "module_names" in str(err.value)
    assert not hf_dgate.is_gated(model)
    hf_dgate.apply_dgate(model, target="heads", module_names={"layers": "right.h"})
    assert hf_dgate.sparsity_report(model).ungated_stacks == ["left.h"]


def test_chosen_decoder_stack_with_its_own_head_count_exports_exactly(tmp_path):
    torch.manual_seed(0)
    model = bart().eval()
    ids = torch.randint(3, 64, (2, 7))
    ref = model(input_ids=ids, decoder_input_ids=ids).logits
    hf_dgate.apply_dgate(model, target=["heads", "neurons"], module_names={"layers": "model.decoder.layers"})
    bank = hf_dgate.get_bank(model)
    # decoder_attention_heads (8, not the encoder's 4), self- and cross-attention
    assert bank.sizes == {"heads": 2 * 3 * 8, "neurons": 3 * 48}
    assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, ref)
    with torch.no_grad():
        bank.gammas["heads"][:, [0, 3, 9, 17]] = 0
        bank.gammas["neurons"][:, :60] = 0
    gated = model(input_ids=ids, decoder_input_ids=ids).logits
    pruned = hf_dgate.export_pruned(model)
    assert torch.allclose(pruned(input_ids=ids, decoder_input_ids=ids).logits, gated, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    again = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path)
    assert torch.allclose(again(input_ids=ids, decoder_input_ids=ids).logits, gated, atol=1e-5)
    report = hf_dgate.sparsity_report(model)
    assert report.ungated_stacks == ["model.encoder.layers"]
    assert "model.encoder.layers (dense)" in str(report)


def test_chosen_vision_tower_uses_the_vision_config():
    model = clip()
    if HAS_HF_PRUNE_HEADS:  # CLIP's attention in transformers 4.x cannot lose heads (docs/transformers_versions.md)
        with pytest.raises(ValueError, match="width of its input"):
            hf_dgate.apply_dgate(clip(), target="heads", module_names={"layers": "vision_model.encoder.layers"})
        hf_dgate.apply_dgate(model, target="neurons", module_names={"layers": "vision_model.encoder.layers"})
        assert hf_dgate.get_bank(model).sizes["neurons"] == 3 * 64  # vision_config: 3 layers x 64 neurons
        return
    hf_dgate.apply_dgate(model, target="heads", module_names={"layers": "vision_model.encoder.layers"})
    assert hf_dgate.get_bank(model).sizes["heads"] == 3 * 2  # vision_config: 3 layers x 2 heads


def test_layers_refused_with_an_ungated_cross_attention_branch():
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, add_cross_attention=True))
    with pytest.raises(ValueError, match="attention branches"):
        hf_dgate.apply_dgate(gpt2, target="layers")
    hf_dgate.apply_dgate(gpt2, target="heads")  # heads of the self-attention stay possible


def test_post_norm_encoder_decoder_layers_refused():
    decoder_only = T.BartForCausalLM(bart().config)
    assert len(find_stacks(decoder_only)) == 1
    with pytest.raises(ValueError, match="pre-norm"):
        hf_dgate.apply_dgate(decoder_only, target="layers")
