"""Exports that serving engines run: uniform / rounded shapes (plain transformers), GGUF for llama.cpp's `deci`
architecture (read back with gguf's own reader; run in llama.cpp where llama-cpp-python is installed) and vLLM's
DeciLM block_configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T

import hf_dgate
from hf_dgate.errors import ExportError
from hf_dgate.export import pruned_structure
from hf_dgate.formats.shape import parse_multiple_of

V = 64
HEADS = [1, 2, 0]  # key/value groups zeroed per layer (of 2): layer 1 loses every head
NEURONS = [10, 40, 48]  # neurons zeroed per layer (of 48): layer 2 loses every neuron


def _tiny(family: str = "llama", **kw) -> torch.nn.Module:
    cfgs = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
    }
    cfg_cls, cls = cfgs[family]
    args = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = cls(cfg_cls(**{**args, **kw})).eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm placement shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.1)
    return model


def _gated(model: torch.nn.Module, heads=HEADS, neurons=NEURONS) -> torch.nn.Module:
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        for target, pattern in (("heads", heads), ("neurons", neurons)):
            offsets = [o for o, gs in zip(bank.offsets, bank.group_sets) if gs.target == target]
            for off, n in zip(offsets, pattern):
                bank.gammas[target][:, off : off + n] = 0
    return model


def _probe() -> torch.Tensor:
    return torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))


# ---- uniform and rounded exports -------------------------------------------------------------------------------
def test_uniform_export_is_exact_and_loads_with_plain_transformers(tmp_path):
    model = _gated(_tiny())
    x = _probe()
    with torch.no_grad():
        gated = model(input_ids=x).logits
    free = hf_dgate.export_pruned(model, example_inputs={"input_ids": x})
    assert pruned_structure(free)["kv_heads"] == [1, 0, 2] and not pruned_structure(free)["native"]
    uni = hf_dgate.export_pruned(model, example_inputs={"input_ids": x}, shape="uniform")
    rec = pruned_structure(uni)
    assert rec["kv_heads"] == [2, 2, 2] and rec["neurons"] == [38, 38, 38] and rec["native"]
    assert uni.dgate_padding["kept"] == {"heads": [1, 0, 2], "neurons": [38, 8, 0]}
    # the padding's parameters: 3 kv groups (q 2x8 rows, k 8, v 8, o 2x8 columns of width 32) and 30 + 38 neurons
    assert uni.dgate_padding["params_added"] == 3 * (16 + 8 + 8 + 16) * 32 + (30 + 38) * 3 * 32
    uni.save_pretrained(tmp_path)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, no hf_dgate
    with torch.no_grad():
        assert (again(input_ids=x).logits - gated).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gpt2"])
def test_uniform_is_native_wherever_the_config_has_one_count(tmp_path, family):
    if family == "gpt2":  # GPT-2 derives the head size from hidden_size / n_head: uniform neurons only
        torch.manual_seed(0)
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_inner=48)).eval()
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="neurons"))
        bank = hf_dgate.get_bank(model)
        with torch.no_grad():
            for off, n in zip(bank.offsets, NEURONS):
                bank.gammas["neurons"][:, off : off + n] = 0
    else:
        model = _gated(_tiny(family))
    x = _probe()
    with torch.no_grad():
        gated = model(input_ids=x).logits
    uni = hf_dgate.export_pruned(model, example_inputs={"input_ids": x}, shape="uniform")
    assert pruned_structure(uni)["native"]
    uni.save_pretrained(tmp_path)
    with torch.no_grad():
        again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(input_ids=x).logits
    assert (again - gated).abs().max() <= 1e-5


def test_multiple_of_rounds_up_and_stops_at_the_layer_width():
    model = _gated(_tiny())
    x = _probe()
    per = hf_dgate.export_pruned(model, example_inputs={"input_ids": x}, multiple_of=16)
    assert pruned_structure(per)["neurons"] == [48, 16, 0]  # 38 -> 48, 8 -> 16, 0 stays 0
    both = hf_dgate.export_pruned(
        model, example_inputs={"input_ids": x}, shape="uniform", multiple_of={"neurons": 32, "heads": 2}
    )
    rec = pruned_structure(both)
    assert rec["neurons"] == [48, 48, 48] and rec["kv_heads"] == [2, 2, 2]  # 64 would exceed the 48 a layer has
    assert both.dgate_verification.exact


def test_multiple_of_and_shape_are_checked():
    assert parse_multiple_of("neurons=128,heads=2") == {"neurons": 128, "heads": 2}
    assert parse_multiple_of("64") == {"neurons": 64}
    for bad in ("experts=2", "neurons=0", "neurons=x", 0, True):
        with pytest.raises(ExportError):
            parse_multiple_of(bad)
    with pytest.raises(ExportError, match="shape="):
        hf_dgate.export_pruned(_gated(_tiny()), shape="square")


def test_export_to_dir_states_the_padding_cost(tmp_path):
    from hf_dgate.hub import export_to_dir

    summary = export_to_dir(_gated(_tiny()), tmp_path / "u", shape="uniform", measure=False, seq_len=16)
    pad = summary["padding"]
    assert summary["native"] and pad["params_unpadded"] < summary["params_after"]
    assert pad["flops_unpadded"] < summary["flops_after"]
    card = (tmp_path / "u" / "README.md").read_text()
    assert "Cost versus the non-uniform export" in card and f"{pad['params_unpadded']:,}" in card


# ---- GGUF ------------------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf", reason="the gguf package is in the test extra: pip install 'hf-dgate[test]'")


def _fields(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _unpermute(w, n_heads: int):
    """llama.cpp's rope row order back to transformers' (the inverse of the export's permutation)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_has_per_layer_shapes_and_the_weights(tmp_path):
    from hf_dgate.formats.gguf import write_gguf

    pruned = hf_dgate.export_pruned(_gated(_tiny()), example_inputs={"input_ids": _probe()})
    info = write_gguf(pruned, tmp_path / "m.gguf", dtype="f32")
    fields, tensors = _fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [2, 0, 4]
    assert fields["deci.attention.head_count_kv"] == [1, 0, 2]
    # layer 2 has heads but no neuron left: one zero neuron, since llama.cpp drops an FFN-free layer's attention
    assert fields["deci.feed_forward_length"] == [38, 8, 1] and info["layout"]["zero_neuron_layers"] == [2]
    assert fields["deci.attention.key_length"] == 8 and fields["deci.rope.dimension_count"] == 8
    assert len(fields["tokenizer.ggml.tokens"]) == V and info["vocab"].startswith("placeholder")
    assert "blk.1.attn_q.weight" not in tensors and "blk.1.ffn_gate.weight" in tensors  # attention-free layer
    layer = pruned.model.layers[0]
    q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy())
    assert torch.equal(_unpermute(q, 2), layer.self_attn.q_proj.weight)
    k = torch.from_numpy(tensors["blk.0.attn_k.weight"].data.copy())
    assert torch.equal(_unpermute(k, 1), layer.self_attn.k_proj.weight)
    assert not tensors["blk.2.ffn_down.weight"].data.any()


def _dead_layer_export() -> torch.nn.Module:
    """4 layers; layers 2 and 3 (the last) keep neither heads nor neurons (identity layers)."""
    gated = _gated(_tiny(num_hidden_layers=4), heads=[1, 2, 2, 2], neurons=[10, 40, 48, 48])
    return hf_dgate.export_pruned(gated, example_inputs={"input_ids": _probe()})


def test_gguf_writes_a_layer_with_nothing_left_as_tensorless(tmp_path):
    from hf_dgate.formats.gguf import write_gguf

    write_gguf(_dead_layer_export(), tmp_path / "m.gguf", dtype="f32")
    fields, tensors = _fields(tmp_path / "m.gguf")
    assert fields["deci.attention.head_count"] == [2, 0, 0, 0] and fields["deci.feed_forward_length"] == [38, 8, 0, 1]
    # llama.cpp passes such a layer's input on and refuses a file holding tensors it does not read (an ffn_norm);
    # the last layer keeps one zero neuron, since llama.cpp selects the output rows there
    assert not [n for n in tensors if n.startswith("blk.2.")] and "blk.1.ffn_norm.weight" in tensors
    assert not tensors["blk.3.ffn_down.weight"].data.any() and "blk.3.attn_q.weight" not in tensors
    headless = hf_dgate.export_pruned(_gated(_tiny(), heads=[2, 2, 2]), example_inputs={"input_ids": _probe()})
    with pytest.raises(ExportError, match="No layer keeps an attention head; llama.cpp cannot run"):
        write_gguf(headless, tmp_path / "h.gguf", dtype="f32")


@pytest.mark.parametrize("dtype,kind", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_gguf_half_types(tmp_path, dtype, kind):
    from hf_dgate.formats.gguf import write_gguf

    pruned = hf_dgate.export_pruned(_gated(_tiny()), example_inputs={"input_ids": _probe()})
    write_gguf(pruned, tmp_path / "m.gguf", dtype=dtype)
    _, tensors = _fields(tmp_path / "m.gguf")
    assert tensors["blk.0.attn_v.weight"].tensor_type.name == kind
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # 1-D tensors stay float32
    if dtype == "q8_0":  # rows of 38 (the exact FFN width) are no whole q8_0 blocks: f16, as llama.cpp converts them
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"


def test_gguf_qwen2_biases_are_permuted_and_qwen3_is_refused_by_name(tmp_path):
    from hf_dgate.formats.gguf import write_gguf

    pruned = hf_dgate.export_pruned(_gated(_tiny("qwen2")), example_inputs={"input_ids": _probe()})
    write_gguf(pruned, tmp_path / "q.gguf", dtype="f32")
    _, tensors = _fields(tmp_path / "q.gguf")
    bq = torch.from_numpy(tensors["blk.0.attn_q.bias"].data.copy())
    assert torch.equal(_unpermute(bq, 2), pruned.model.layers[0].self_attn.q_proj.bias)
    with pytest.raises(ExportError, match="qwen3.*q_norm"):
        write_gguf(_tiny("qwen3"), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="rope type 'yarn'"):
        write_gguf(_tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0}), tmp_path / "y.gguf")


def test_a_headless_layer_with_an_output_bias_is_refused_by_both_engines_formats(tmp_path):
    from hf_dgate.formats.decilm import write_decilm
    from hf_dgate.formats.gguf import write_gguf

    model = _gated(_tiny(attention_bias=True, mlp_bias=True), heads=[0, 2, 0], neurons=[0, 0, 48])
    pruned = hf_dgate.export_pruned(model, example_inputs={"input_ids": _probe()})  # exact: bias-only attention
    with pytest.raises(ExportError, match="Layer 1 has no attention heads but a non-zero output bias"):
        write_gguf(pruned, tmp_path / "b.gguf")
    with pytest.raises(ExportError, match="Layer 1 has no attention heads but a non-zero output bias"):
        write_decilm(pruned, tmp_path / "d")
    with torch.no_grad():
        pruned.model.layers[1].self_attn.o_proj.bias.zero_()
    with pytest.raises(ExportError, match="Layer 2 has no neurons but a non-zero MLP output bias"):
        write_decilm(pruned, tmp_path / "d")


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "a", "b", "ab", *[f"t{i}" for i in range(40)]])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _llama2_style_tokenizer():
    """A tokenizer.json BPE with byte fallback and "▁" word marks, as Llama 2 and Mistral ship."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for t in ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]:
        vocab[t] = len(vocab)
    merges = [("\u2581", "a"), ("a", "b"), ("\u2581a", "b")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_gguf_writes_a_llama2_style_tokenizer(tmp_path):
    from hf_dgate.formats.gguf import write_gguf

    info = write_gguf(_tiny(vocab_size=272), tmp_path / "t.gguf", dtype="f32", tokenizer=_llama2_style_tokenizer())
    fields, _ = _fields(tmp_path / "t.gguf")
    assert info["vocab"] == "llama-hf" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"][3] == "<0x00>" and fields["tokenizer.ggml.token_type"][3] == 6  # byte
    assert len(fields["tokenizer.ggml.tokens"]) == 272 and fields["tokenizer.ggml.tokens"][-1] == "[PAD271]"


def test_gguf_writes_a_byte_level_bpe_tokenizer(tmp_path):
    from hf_dgate.formats.gguf import write_gguf

    info = write_gguf(_tiny(), tmp_path / "t.gguf", dtype="f32", tokenizer=_byte_level_tokenizer())
    fields, _ = _fields(tmp_path / "t.gguf")
    assert info["vocab"] == "bpe" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"][:5] == ["<s>", "</s>", "a", "b", "ab"]
    assert fields["tokenizer.ggml.merges"] == ["a b"] and fields["tokenizer.ggml.bos_token_id"] == 0


def test_cli_export_gguf_and_uniform(tmp_path, capsys):
    from hf_dgate.cli import main

    model = _gated(_tiny())
    hf_dgate.save_gated(model, tmp_path / "gated")
    assert main(["export", str(tmp_path / "gated"), "--out", str(tmp_path / "g"), "--format", "gguf",
                 "--gguf-dtype", "f32", "--no-measure", "--seq-len", "16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "model-f32.gguf" in out and os.path.isfile(tmp_path / "g" / "model-f32.gguf")
    card = (tmp_path / "g" / "README.md").read_text()
    assert "library_name: gguf" in card and "llama-cli -m model-f32.gguf" in card and "AutoPrunedModel" not in card
    summary = json.loads((tmp_path / "g" / "dgate_export.json").read_text())
    assert summary["format"] == "gguf" and summary["gguf"]["layout"]["head_count"] == [2, 0, 4]
    # GGUF rounds neurons to 64 by default (ggml's SIMD steps; capped at the layer's 48); 1 keeps them exact
    assert summary["gguf"]["layout"]["feed_forward_length"] == [48, 48, 1]
    assert summary["padding"]["multiple_of"] == {"neurons": 64}
    assert main(["export", str(tmp_path / "gated"), "--out", str(tmp_path / "g1"), "--format", "gguf",
                 "--multiple-of", "1", "--no-measure", "--seq-len", "16"]) == 0  # fmt: skip
    exact = json.loads((tmp_path / "g1" / "dgate_export.json").read_text())
    assert exact["gguf"]["layout"]["feed_forward_length"] == [38, 8, 1]
    assert main(["export", str(tmp_path / "gated"), "--out", str(tmp_path / "u"), "--shape", "uniform",
                 "--multiple-of", "neurons=16,heads=2", "--no-measure", "--seq-len", "16"]) == 0  # fmt: skip
    assert "vs the non-uniform export" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "u")]) == 0
    assert "padding (uniform" in capsys.readouterr().out
    assert T.AutoConfig.from_pretrained(tmp_path / "u").intermediate_size == 48
    assert main(["export", str(tmp_path / "gated"), "--out", str(tmp_path / "x"), "--multiple-of", "experts=2",
                 "--no-measure"]) == 2  # fmt: skip


# ---- DeciLM (vLLM) ---------------------------------------------------------------------------------------------
def _vllm_width(ffn: dict, hidden: int) -> int:
    """The FFN width vLLM's DeciLM layer builds from a block config (ffn_mult first, as nemotron_nas.py reads it)."""
    if ffn.get("ffn_mult") is None:
        return ffn["intermediate_size"]
    return -(-int(2 * ffn["ffn_mult"] * hidden / 3) // 256) * 256


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decilm_block_configs_reload_like_the_export(tmp_path, family):
    from hf_dgate.formats.decilm import compare_with_pytorch, load_decilm, write_decilm

    # 8 query heads in 4 key/value groups; layers keep 4, 3, 1 and 0 groups (3 does not divide 8: one zero group)
    tiny = _tiny(family, num_attention_heads=8, num_key_value_heads=4, head_dim=4, num_hidden_layers=4)
    model = _gated(tiny, [0, 1, 3, 4], [10, 48, 0, 0])
    pruned = hf_dgate.export_pruned(model, example_inputs={"input_ids": _probe()})
    info = write_decilm(pruned, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["num_attention_heads"] == 8 and info["kv_heads"] == [4, 4, 1, 0]
    blocks = cfg["block_configs"]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 2, 8, None]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, False, True]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, True, False, False]
    assert [_vllm_width(b["ffn"], 32) for b in blocks if not b["ffn"]["no_op"]] == [256, 256, 256]
    assert all(b["ffn"]["intermediate_size"] == 256 for b in blocks if not b["ffn"]["no_op"])
    assert compare_with_pytorch(pruned, tmp_path)["verified"]
    again = load_decilm(tmp_path)
    x = _probe()
    with torch.no_grad():
        assert (again(input_ids=x).logits - pruned(input_ids=x).logits).abs().max() <= 1e-5
        out = again.generate(x[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        ref = pruned.generate(x[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    # the generated config class gives vLLM's attribute access to block_configs
    ns: dict = {}
    exec((tmp_path / "configuration_decilm.py").read_text(), ns)
    conf = ns["DeciLMConfig"](**{k: v for k, v in cfg.items() if k not in ("model_type", "auto_map")})
    assert conf.block_configs[2].attention.n_heads_in_group == 8 and conf.block_configs[3].attention.no_op
    assert conf.to_dict()["block_configs"] == blocks


def test_decilm_from_the_cli_and_refusals(tmp_path):
    from hf_dgate.cli import main
    from hf_dgate.formats.decilm import write_decilm

    hf_dgate.save_gated(_gated(_tiny()), tmp_path / "gated")
    assert main(["export", str(tmp_path / "gated"), "--out", str(tmp_path / "d"), "--format", "decilm",
                 "--no-measure", "--seq-len", "16"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "d" / "dgate_export.json").read_text())
    assert summary["decilm"]["check"]["verified"] and "zero query heads" in summary["decilm"]["statement"]
    card = (tmp_path / "d" / "README.md").read_text()
    assert "vllm serve" in card and "AutoPrunedModel" not in card
    with pytest.raises(ExportError, match="Llama-family.*'qwen3'"):
        write_decilm(_tiny("qwen3"), tmp_path / "q")


# ---- llama.cpp itself ------------------------------------------------------------------------------------------
def _need_llama_cpp():
    from hf_dgate.formats.llama_cpp import INSTALL, have_llama_cpp

    if not have_llama_cpp():
        pytest.skip(f"llama-cpp-python is not installed ({INSTALL}); GGUF files are checked with gguf's reader only")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_cpp_runs_the_gguf_like_pytorch(tmp_path, family):
    _need_llama_cpp()
    from hf_dgate.formats.gguf import write_gguf
    from hf_dgate.formats.llama_cpp import compare_with_llama_cpp

    pruned = hf_dgate.export_pruned(_gated(_tiny(family)), example_inputs={"input_ids": _probe()})
    for dtype in ("f32", "f16", "q8_0"):
        write_gguf(pruned, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
        result = compare_with_llama_cpp(pruned, tmp_path / f"m-{dtype}.gguf", dtype)
        assert result["verified"] and result["max_abs_diff"] <= result["tolerance"]
        if dtype == "f32":
            assert result["max_abs_diff"] < 1e-3


def test_llama_cpp_runs_a_layer_with_nothing_left(tmp_path):
    _need_llama_cpp()
    from hf_dgate.formats.gguf import write_gguf
    from hf_dgate.formats.llama_cpp import compare_with_llama_cpp

    pruned = _dead_layer_export()
    write_gguf(pruned, tmp_path / "m.gguf", dtype="f32")
    assert compare_with_llama_cpp(pruned, tmp_path / "m.gguf", "f32")["max_abs_diff"] < 1e-3


def test_llama_cpp_check_catches_a_wrong_file(tmp_path, monkeypatch):
    _need_llama_cpp()
    from hf_dgate.formats import gguf as G
    from hf_dgate.formats.llama_cpp import compare_with_llama_cpp

    pruned = hf_dgate.export_pruned(_gated(_tiny()), example_inputs={"input_ids": _probe()})
    monkeypatch.setattr(G, "_permute", lambda w, n: w)  # forget llama.cpp's rope layout
    G.write_gguf(pruned, tmp_path / "bad.gguf", dtype="f32")
    with pytest.raises(ExportError, match="differ from the PyTorch export"):
        compare_with_llama_cpp(pruned, tmp_path / "bad.gguf", "f32")


@pytest.mark.parametrize("kind", ["byte-level", "llama2"])
def test_llama_cpp_tokenizes_like_transformers(tmp_path, kind):
    _need_llama_cpp()
    from llama_cpp import Llama

    from hf_dgate.formats.gguf import write_gguf

    tok = _byte_level_tokenizer() if kind == "byte-level" else _llama2_style_tokenizer()
    write_gguf(_tiny(vocab_size=272), tmp_path / "t.gguf", dtype="f32", tokenizer=tok)
    llm = Llama(model_path=str(tmp_path / "t.gguf"), vocab_only=True, verbose=False)
    for text in ("ab ab", "a b ab", "abab"):
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False).input_ids
