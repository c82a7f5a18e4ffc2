"""Per-layer shapes the config itself can say: an export writes them that way only where the installed
transformers builds them (checked by a build on the meta device), and a plain `from_pretrained` then loads it.

Two forms exist: a family's own per-layer list field (Gemma 3n's `intermediate_size`, both transformers lines) and
5.x `per_layer_config` overrides, which only families whose modeling code reads them honour."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T
from torch import nn

import hf_dgate
from hf_dgate.compat import HAS_PER_LAYER_CONFIG, config_value
from hf_dgate.export import pruned_structure

V = 64


def _gemma3n(**kw) -> nn.Module:
    cfg = dict(vocab_size=V, vocab_size_per_layer_input=V, hidden_size=32, hidden_size_per_layer_input=8,
               intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               num_kv_shared_layers=0, laurel_rank=4, activation_sparsity_pattern=[0.0] * 3, pad_token_id=0,
               sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"])  # fmt: skip
    torch.manual_seed(0)
    return T.Gemma3nForCausalLM(T.Gemma3nTextConfig(**{**cfg, **kw})).eval()


def _zero(model: nn.Module, target: str, per_layer: list[int]) -> None:
    """Zero the first `per_layer[i]` groups of layer i."""
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        for off, n in zip(bank.offsets, per_layer):
            bank.gammas[target][:, off : off + n] = 0


def _export(
    model: nn.Module, target: str, pattern: list[int], path, native: bool = True, also: tuple = (), **dconfig
) -> tuple:
    """Gate `target` (and `also`), zero `pattern` of it, export (native or not, as expected) and save plainly:
    (pruned model, saved config.json, probe batch, gated logits)."""
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[target, *also], **dconfig))
    _zero(model, target, pattern)
    x = torch.randint(1, V, (2, 7))
    with torch.no_grad():
        gated = model(input_ids=x).logits
    pruned = hf_dgate.export_pruned(model, example_inputs={"input_ids": x})
    assert pruned_structure(pruned)["native"] is native
    pruned.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    assert "auto_map" not in saved and not saved["model_type"].startswith("dgate_pruned_")
    return pruned, saved, x, gated


def _assert_same(again: nn.Module, x: torch.Tensor, gated: torch.Tensor) -> None:
    with torch.no_grad():
        assert (again.eval()(input_ids=x).logits - gated).abs().max() <= 1e-5


def test_gemma3n_neurons_export_as_its_own_per_layer_list(tmp_path):
    # a layer without units, and two different widths
    _, saved, x, gated = _export(_gemma3n(), "neurons", [48, 10, 30], tmp_path)
    assert saved["intermediate_size"] == [0, 38, 18]
    _assert_same(T.AutoModelForCausalLM.from_pretrained(tmp_path), x, gated)  # plain transformers, no hf_dgate


def test_gemma3n_refuses_what_it_cannot_remove_exactly():
    shared = _gemma3n(num_hidden_layers=4, num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
                      layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        hf_dgate.apply_dgate(shared, hf_dgate.DGateConfig(target="heads"))
    with pytest.raises(ValueError, match=r"layers \[0\].*activation_sparsity_pattern"):
        hf_dgate.apply_dgate(shared, hf_dgate.DGateConfig(target="neurons"))
    with pytest.raises(ValueError, match="AltUp"):
        hf_dgate.apply_dgate(_gemma3n(), hf_dgate.DGateConfig(target="layers"))


def test_a_family_that_ignores_per_layer_config_gets_none_written(tmp_path):
    """Llama builds every layer from the global config: the per-layer candidate fails the meta build, the export
    falls back to AutoPrunedModel, and the config is left exactly as it was (no stray overrides)."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()  # fmt: skip
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    _zero(model, "heads", [1, 0, 1])
    pruned = hf_dgate.export_pruned(model, example_inputs={"input_ids": torch.randint(1, V, (2, 5))})
    assert pruned_structure(pruned)["native"] is False
    assert not getattr(pruned.config, "is_heterogeneous", False)
    assert config_value(pruned.config, "num_attention_heads") == 4
    pruned.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert not json.load(f).get("per_layer_config")


# ---- a family whose modeling reads `per_layer_config` (transformers 5.x) -------------------------------------------
def _per_layer_llama() -> tuple[type, type]:
    """In 5.25 the families that build attention from `config.per_layer_config[i]` (Step 3.7, Dots 3) are large
    multimodal models outside the registry; this stand-in validates and builds each Llama block from its layer's
    config the way they do, so the test runs transformers' real per-layer machinery (validation, save, reload)."""
    from huggingface_hub.dataclasses import strict

    @strict
    class PerLayerLlamaConfig(T.LlamaConfig):
        model_type = "dgate_test_per_layer_llama"

        def validate_architecture(self):
            for layer in self.per_layer_config:  # each layer's own counts (Llama's check reads the global ones)
                if layer.num_attention_heads % layer.num_key_value_heads:
                    raise ValueError("num_attention_heads must be a multiple of num_key_value_heads in every layer")

    class PerLayerLlamaForCausalLM(T.LlamaForCausalLM):
        config_class = PerLayerLlamaConfig

        def __init__(self, config):
            config.allow_global_per_layer_attribute_access = True  # LlamaModel reads the global counts first
            super().__init__(config)
            config.allow_global_per_layer_attribute_access = False
            layers = [T.models.llama.modeling_llama.LlamaDecoderLayer(config.per_layer_config[i], i)
                      for i in range(config.num_hidden_layers)]  # fmt: skip
            self.model.layers = nn.ModuleList(layers)
            self.post_init()

    T.AutoConfig.register(PerLayerLlamaConfig.model_type, PerLayerLlamaConfig, exist_ok=True)
    T.AutoModelForCausalLM.register(PerLayerLlamaConfig, PerLayerLlamaForCausalLM, exist_ok=True)
    return PerLayerLlamaConfig, PerLayerLlamaForCausalLM


@pytest.mark.skipif(not HAS_PER_LAYER_CONFIG, reason="transformers without per_layer_config (4.x)")
def test_per_layer_config_is_written_where_the_family_reads_it(tmp_path):
    config_class, model_class = _per_layer_llama()
    torch.manual_seed(0)
    cfg = config_class(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    _, saved, x, gated = _export(model_class(cfg).eval(), "heads", [1, 0, 1], tmp_path)  # 2, 4, 2 heads left
    layers = {int(k): v for k, v in saved["per_layer_config"].items()}
    assert layers[0]["num_attention_heads"] == 2 and layers[0]["num_key_value_heads"] == 1
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers
    assert type(again) is model_class
    assert again.model.layers[0].self_attn.q_proj.out_features == 16
    _assert_same(again, x, gated)
    # the exported model can be gated again: each block is read with its own layer's counts
    hf_dgate.apply_dgate(again, hf_dgate.DGateConfig(target="heads"))
    assert [gs.n_groups for gs in hf_dgate.get_bank(again).group_sets] == [1, 2, 1]


@pytest.mark.skipif(not hasattr(T, "Step3p7ForConditionalGeneration"), reason="transformers without Step 3.7")
def test_step3p7_heads_export_as_per_layer_config(tmp_path):
    """A real family that reads `per_layer_config`: different head counts per layer (with the per-head output
    gate g_proj shrinking alongside) reload with a plain from_pretrained, vision tower included."""
    import families

    model, _, extra = families.build("step3p7[text]")
    pruned, saved, x, gated = _export(model, "heads", [1, 0, 1], tmp_path, **extra)
    assert saved["text_config"]["per_layer_config"]
    again = T.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert again.model.language_model.layers[0].self_attn.g_proj.out_features == 2
    for name, p in pruned.state_dict().items():  # every tensor came back, not re-initialised
        assert torch.equal(again.state_dict()[name], p), name
    _assert_same(again, x, gated)


@pytest.mark.skipif(not hasattr(T, "Step3p7ForConditionalGeneration"), reason="transformers without Step 3.7")
@pytest.mark.parametrize("pattern, native", [([1, 0, 1], True), ([2, 0, 0], False)])
def test_step3p7_config_that_already_varies_per_layer(tmp_path, pattern, native):
    """Released Step 3.7 configs give sliding layers their own head count through `per_layer_config`: gating reads
    each layer's own counts, the export merges its overrides with the config's, and a layer left without heads
    (hf_dgate's bias-only attention) falls back to AutoPrunedModel."""
    import families

    builder = families.FAMILIES["step3p7[text]"][0]
    torch.manual_seed(0)
    base = builder()
    cfg = base.config.to_dict()
    cfg["text_config"]["per_layer_config"] = {0: {"num_attention_heads": 2}, 2: {"num_attention_heads": 2}}
    model = T.Step3p7ForConditionalGeneration(T.Step3p7Config(**cfg)).eval()
    assert [b.self_attn.q_proj.out_features for b in model.model.language_model.layers] == [16, 32, 16]
    names = {"layers": "model.language_model.layers"}
    _, _, x, gated = _export(model, "heads", pattern, tmp_path, native, ("neurons",), module_names=names)
    load = T.AutoModelForImageTextToText if native else hf_dgate.AutoPrunedModel
    _assert_same(load.from_pretrained(tmp_path), x, gated)
