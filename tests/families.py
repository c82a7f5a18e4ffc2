"""The coverage matrix: one tiny random model per family, and what gating, export and reload do with it.

`cell(family, target)` runs one cell and returns its outcome as a short string ("exact, native reload",
"exact, AutoPrunedModel reload" or "refused: <why>"); tests/test_coverage.py checks every cell against the table
in docs/coverage.md, which `python tests/families.py --write` regenerates (run under transformers 4.x it writes the
cells that differ there into docs/transformers_versions.md).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as T

import hf_dgate
from hf_dgate.compat import HAS_HF_PRUNE_HEADS
from hf_dgate.loading import save_pruned

TARGETS = ("heads", "neurons", "layers", "experts")
V = 64  # vocabulary of every tiny model
C = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4)


def _causal(cfg_cls: type, **kw: Any) -> torch.nn.Module:
    return T.AutoModelForCausalLM.from_config(cfg_cls(vocab_size=V, **{**C, **kw}))


def _enc_dec(cfg: Any) -> dict[str, Any]:
    return dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40, pad_token_id=1, bos_token_id=0,
                eos_token_id=2, decoder_start_token_id=2, **cfg)


# family -> (builder, kind, extra DGateConfig fields); kind picks the inputs and whether generate is compared
FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], str, dict[str, Any]]] = {
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=3, n_head=4, n_embd=32, n_inner=48, vocab_size=V,
                                                     n_positions=32, bos_token_id=0, eos_token_id=0)), "causal", {}),
    "gptj": (lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=V, n_layer=3, n_embd=32, n_head=4, rotary_dim=4,
                                                     n_inner=48, n_positions=32, bos_token_id=0, eos_token_id=0)),
             "causal", {}),
    "gpt_neox": (lambda: _causal(T.GPTNeoXConfig), "causal", {}),
    "falcon": (lambda: _causal(T.FalconConfig, new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=48),
               "causal", {}),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, num_hidden_layers=3, hidden_size=32, ffn_dim=48,
                                                 num_attention_heads=4, word_embed_proj_dim=32)), "causal", {}),
    "llama": (lambda: _causal(T.LlamaConfig, num_key_value_heads=2), "causal", {}),
    "mistral": (lambda: _causal(T.MistralConfig, num_key_value_heads=2), "causal", {}),
    "mixtral": (lambda: _causal(T.MixtralConfig, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
                "causal", {}),
    "phimoe": (lambda: _causal(T.PhimoeConfig, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
               "causal", {}),
    "qwen2": (lambda: _causal(T.Qwen2Config, num_key_value_heads=1), "causal", {}),
    "qwen3": (lambda: _causal(T.Qwen3Config, num_key_value_heads=2, head_dim=8), "causal", {}),
    "qwen3_moe": (lambda: _causal(T.Qwen3MoeConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=24, head_dim=8), "causal", {}),
    "qwen2_moe": (lambda: _causal(T.Qwen2MoeConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=24, shared_expert_intermediate_size=40), "causal", {}),
    "olmoe": (lambda: _causal(T.OlmoeConfig, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                              pad_token_id=0), "causal", {}),
    "gemma": (lambda: _causal(T.GemmaConfig, num_key_value_heads=2, head_dim=8), "causal", {}),
    "gemma2": (lambda: _causal(T.Gemma2Config, num_key_value_heads=2, head_dim=8), "causal", {}),
    "gemma3": (lambda: _causal(T.Gemma3TextConfig, num_key_value_heads=2, head_dim=8), "causal", {}),
    # per-layer MLP widths are native (a list); no shared key/value layers or activation sparsity in this tiny one
    "gemma3n": (lambda: _causal(T.Gemma3nTextConfig, num_key_value_heads=2, head_dim=8, vocab_size_per_layer_input=V,
                                hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4,
                                activation_sparsity_pattern=[0.0] * 3, pad_token_id=0, sliding_window=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
                "causal", {}),
    # Step 3.7 builds each attention from `per_layer_config` (5.x); its text stack, chosen by name (the vision tower
    # has no registry entry); one dense and two routed-expert layers
    "step3p7[text]": (lambda: T.Step3p7ForConditionalGeneration(T.Step3p7Config(
        text_config=dict(vocab_size=V, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
                         num_experts_per_tok=2, share_expert_dim=16, pad_token_id=0, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         mlp_layer_types=["dense", "sparse", "sparse"], **C),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))), "causal", {"module_names": {"layers":
                                                                                        "model.language_model.layers"}}),
    "phi": (lambda: _causal(T.PhiConfig), "causal", {}),
    "phi3": (lambda: _causal(T.Phi3Config, num_key_value_heads=2, pad_token_id=0), "causal", {}),
    "olmo2": (lambda: _causal(T.Olmo2Config, num_key_value_heads=2, pad_token_id=0), "causal", {}),
    "granite": (lambda: _causal(T.GraniteConfig, num_key_value_heads=2), "causal", {}),
    "smollm3": (lambda: _causal(T.SmolLM3Config, num_key_value_heads=2, pad_token_id=0), "causal", {}),
    "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                       state_size=4)), "causal", {}),
    # no registry entry: found by common module names (the fallback for unknown families)
    "gpt_bigcode": (lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        vocab_size=V, n_layer=3, n_embd=32, n_head=4, n_inner=48, n_positions=32, multi_query=True)), "causal", {}),
    "bert": (lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=V, **C)), "encoder", {}),
    "roberta": (lambda: T.RobertaForMaskedLM(T.RobertaConfig(vocab_size=V, pad_token_id=1, **C)), "encoder", {}),
    "distilbert": (lambda: T.DistilBertForMaskedLM(T.DistilBertConfig(vocab_size=V, n_layers=3, dim=32, n_heads=4,
                                                                      hidden_dim=48)), "encoder", {}),
    "electra": (lambda: T.ElectraForMaskedLM(T.ElectraConfig(vocab_size=V, embedding_size=32, **C)), "encoder", {}),
    "deberta_v2": (lambda: T.DebertaV2ForMaskedLM(T.DebertaV2Config(vocab_size=V, **C)), "encoder", {}),
    "modernbert": (lambda: T.ModernBertForMaskedLM(T.ModernBertConfig(vocab_size=V, pad_token_id=0, **C)),
                   "encoder", {}),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_labels=3, **C)),
            "image", {}),
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48),
        vision_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=40,
                           image_size=16, patch_size=8))), "clip", {}),
    "clip[vision]": ("clip", "clip", {"stacks": ["vision"]}),
    "llava": (lambda: T.LlavaForConditionalGeneration(T.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=40, image_size=16, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48),
        image_token_index=V - 1, vision_feature_layer=-1)), "vlm", {}),
    "llava[text]": ("llava", "vlm", {"stacks": ["text"]}),
    "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3, num_decoder_layers=3,
        decoder_start_token_id=0)), "seq2seq", {}),
    "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(max_position_embeddings=32, **_enc_dec({}))),
             "seq2seq", {}),
    "bart[decoder]": ("bart", "seq2seq", {"stacks": ["decoder"]}),
    "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        num_mel_bins=8, max_source_positions=8, max_target_positions=32, **_enc_dec({}))), "speech", {}),
    "whisper[decoder]": ("whisper", "speech", {"stacks": ["model.decoder.layers"]}),
}


def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    maker, kind, extra = FAMILIES[family]
    if isinstance(maker, str):  # a variant of another family with a chosen stack
        maker = FAMILIES[maker][0]
    torch.manual_seed(seed)
    return maker().eval(), kind, extra


def inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 7), generator=g)
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "clip":
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "vlm":  # four image tokens (16x16 pixels in 8x8 patches), then text
        image = torch.full((2, 4), V - 1)
        pixels = torch.randn(2, 3, 16, 16, generator=g)
        return {"input_ids": torch.cat([image, ids[:, :5] % (V - 1)], 1), "pixel_values": pixels}
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if kind == "speech":
        return {"input_features": torch.randn(2, 8, 16, generator=g), "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    if hasattr(out, "logits_per_image"):
        return torch.cat([out.text_embeds.flatten(), out.image_embeds.flatten()])
    return out.logits


def zero_pattern(bank: Any, target: str, seed: int = 2) -> None:
    """Zero a whole first layer's groups and about half of the others (for layers: the first and one more)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gates = bank.gammas[target]
        first = bank.group_sets[0].n_groups
        dead = torch.rand(gates.shape[1], generator=g) < 0.5
        dead[:first] = True
        if target == "experts":  # every expert but one in the first layer; at least one left everywhere
            dead[first - 1] = False
            for gs, off in zip(bank.group_sets, bank.offsets):
                if bool(dead[off : off + gs.n_groups].all()):
                    dead[off] = False
        gates[:, dead] = 0


def cell(family: str, target: str) -> str:
    """Gate, check outputs at init, zero a pattern, export, compare, reload, compare, generate."""
    try:
        model, kind, extra = build(family)
    except AttributeError:  # a family newer than the installed transformers
        return "n/a (not in this transformers)"
    batch = inputs(kind)
    with torch.no_grad():
        ref = output(model, batch)
    try:
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target, **extra))
    except ValueError as e:
        return "refused: " + _why(e)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        assert torch.equal(output(model, batch), ref), "outputs changed at init"
        zero_pattern(bank, target)
        gated = output(model, batch)
        routed = target == "experts"  # fewer experts change top-k routing: measured and stated, not exact
        if routed:  # the export's own verification refuses an inexact export unless told to go ahead
            with pytest.raises(hf_dgate.errors.ExportError, match="not exact"):
                hf_dgate.export_pruned(model, example_inputs=batch)
        pruned = hf_dgate.export_pruned(model, allow_inexact=routed, example_inputs=batch)
        assert pruned.dgate_verification.exact == (not routed)
        diff = (output(pruned, batch) - gated).abs().max().item()
        exported = output(pruned, batch)
    assert routed or diff <= 1e-5, f"export differs by {diff:.2e}"
    native = bool((hf_dgate.export.pruned_structure(pruned) or {}).get("native"))
    remote = None
    with tempfile.TemporaryDirectory() as d:
        remote = save_pruned(pruned, d)  # non-native: with the generated loader for people without hf_dgate
        loaders = [type(pruned).from_pretrained if native else hf_dgate.AutoPrunedModel.from_pretrained]
        if remote:
            loaders.append(lambda path: getattr(T, remote).from_pretrained(path, trust_remote_code=True))
        for load in loaders:
            again = load(d).eval()
            theirs = again.state_dict()  # every tensor comes back as exported (outputs may not read them all)
            lost = [k for k, v in pruned.state_dict().items() if k not in theirs or not torch.equal(theirs[k], v)]
            assert not lost, f"reload lost {len(lost)} tensors, e.g. {lost[:2]}"
            with torch.no_grad():
                again_diff = (output(again, batch) - exported).abs().max().item()
            assert again_diff <= 1e-5, f"reloaded export differs by {again_diff:.2e}"
    if kind in ("causal", "seq2seq", "speech"):
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        prompt = {k: v for k, v in batch.items() if k in ("input_ids", "input_features")}
        reference = again if routed else model  # routed: the reloaded export must generate like the export
        a, b = reference.generate(**prompt, **gen), pruned.generate(**prompt, **gen)
        assert torch.equal(a, b), "greedy generate differs"
    reload = "native reload" if native else "AutoPrunedModel" + (" + remote code" if remote else "") + " reload"
    return (f"routing changes (max diff {diff:.0e}), " if routed and diff > 1e-5 else "exact, ") + reload


def _why(e: Exception) -> str:
    msg = str(e)
    for key, short in (
        ("block stacks", "several block stacks; choose one with module_names['layers']"),
        ("pre-norm", "post-norm blocks"),
        ("attention branches", "self- and cross-attention branches"),
        ("several", "one stack of several"),
        ("relative position bias", "shared relative position bias (T5)"),
        ("no routed experts", "n/a (no routed experts)"),
        ("vision_feature_layer", "the language model reads vision hidden states by layer index"),
        ("RMSNorm spans", "query/key norm spans all heads (no exact removal)"),
        ("no attention heads", "no attention"),
        ("no MLP", "no MLP"),
        ("sparsemixer", "its router always picks two experts (sparsemixer)"),
        ("AltUp", "AltUp and LAuReL branches beside attention and MLP"),
        ("list of modules", "experts stored as a list of modules (transformers 4.x)"),
        ("Could not find the routed experts", "routed experts not found (Mixtral in transformers 4.x)"),
        ("width of its input", "attention reshapes to its input width (transformers 4.x)"),
    ):
        if key in msg:
            return short
    return msg.splitlines()[0][:80]


TABLE_START, TABLE_END = "<!-- coverage:start -->", "<!-- coverage:end -->"
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "coverage.md")
# the cells that differ on transformers 4.x live with the other differences between the lines
LINE4_START, LINE4_END = "<!-- coverage-4x:start -->", "<!-- coverage-4x:end -->"
VERSIONS_DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "transformers_versions.md")
LINE4 = HAS_HF_PRUNE_HEADS  # the installed transformers is of the 4.x line


def table(rows: dict[str, dict[str, str]]) -> str:
    lines = ["| family | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    lines += [f"| {fam} | " + " | ".join(rows[fam][t] for t in TARGETS) + " |" for fam in rows]
    return "\n".join(lines)


def read_table(path: str = DOC) -> dict[str, dict[str, str]]:
    text = open(path).read()
    body = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip().splitlines()[2:]
    rows = {}
    for line in body:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(TARGETS, cells[1:]))
    return rows


def _between(path: str, start: str, end: str) -> tuple[str, str, str]:
    text = open(path).read()
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i], text[i:j], text[j:]


def read_line4(path: str = VERSIONS_DOC) -> dict[str, dict[str, str]]:
    """The cells that differ on transformers 4.x: {family: {target: cell}}."""
    out: dict[str, dict[str, str]] = {}
    for line in _between(path, LINE4_START, LINE4_END)[1].strip().splitlines()[2:]:
        fam, target, result = (c.strip() for c in line.strip().strip("|").split("|"))
        out.setdefault(fam, {})[target] = result
    return out


def expected() -> dict[str, dict[str, str]]:
    """What every cell should give with the installed transformers."""
    rows = read_table()
    if LINE4:
        for fam, cells in read_line4().items():
            rows[fam] = {**rows[fam], **cells}
    return rows


def write(rows: dict[str, dict[str, str]]) -> None:
    """5.x: the full table in docs/coverage.md; 4.x: the cells that differ from it, in the versions doc."""
    if not LINE4:
        head, _, tail = _between(DOC, TABLE_START, TABLE_END)
        with open(DOC, "w") as f:
            f.write(f"{head}\n{table(rows)}\n{tail}")
        return
    main = read_table()
    diff = [(fam, t, rows[fam][t]) for fam in rows for t in TARGETS if rows[fam][t] != main[fam][t]]
    lines = ["| family | target | transformers 4.57 |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in diff]
    head, _, tail = _between(VERSIONS_DOC, LINE4_START, LINE4_END)
    with open(VERSIONS_DOC, "w") as f:
        f.write(head + "\n" + "\n".join(lines) + "\n" + tail)


if __name__ == "__main__":  # python tests/families.py --write: run every cell, rewrite the table in docs/coverage.md
    T.logging.set_verbosity_error()
    rows = {}
    for fam in FAMILIES:
        rows[fam] = {}
        for target in TARGETS:
            try:
                rows[fam][target] = cell(fam, target)
            except Exception as e:  # noqa: BLE001 - a failing cell is reported, not hidden
                rows[fam][target] = f"FAILS: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]}"
            print(f"{fam:18s} {target:8s} {rows[fam][target]}", flush=True)
    if "--write" in sys.argv:
        write(rows)
