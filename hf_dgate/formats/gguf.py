"""GGUF for llama.cpp: a pruned Llama-like decoder as llama.cpp's `deci` architecture, whose loader reads one query
head count, key/value head count and FFN width per layer (the arrays `deci.attention.head_count`,
`deci.attention.head_count_kv`, `deci.feed_forward_length`). Written with the `gguf` package (llama.cpp's writer).

How llama.cpp runs a `deci` layer (src/models/deci.cpp), and what follows for the export:
- 0 query heads: the layer is attention-free (its input passes straight on), so a layer without heads is written
  with 0 heads and no attention tensors (refused if its output projection has a non-zero bias);
- 0 FFN width: the layer is skipped with `continue` *before* its output becomes the next layer's input, which drops
  the layer's attention output. An FFN-free layer is therefore written with one all-zero neuron (exact: its down
  column is zero), never with width 0. A layer with neither heads nor neurons is the identity, which is what
  llama.cpp computes for 0 heads and width 0 (written without tensors: llama.cpp refuses a file holding tensors it
  does not read), except as the last layer: llama.cpp selects the output positions inside the last layer and
  aborts when that layer skips them, so a dead last layer also gets one zero neuron;
- rope: llama.cpp's `deci` rotates consecutive pairs, transformers' Llama rotates halves, so query and key rows are
  permuted per head (as llama.cpp's own converter does); rope scaling that only rescales frequencies (linear,
  llama3) is written as the `rope_freqs` tensor; other scalings are refused by name;
- no q/k norms and no sliding window in `deci`: Qwen3 is refused by name; a sliding window becomes the context
  length (the two agree within it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from .base import LLAMA_FAMILIES, ExportFormat, check_llama_decoder, register_format, text_config

ARCH = "deci"
FAMILIES = LLAMA_FAMILIES
REFUSED = {  # model type -> why llama.cpp's deci architecture cannot run it
    "qwen3": "its per-head q/k RMSNorms (q_norm/k_norm), which llama.cpp's deci architecture does not apply",
    "qwen3_moe": "q/k norms and experts, which llama.cpp's deci architecture does not have",
    "gemma": "embedding scaling and (1 + weight) norms, which llama.cpp's deci architecture does not apply",
    "gemma2": "soft-capping and post-norms, which llama.cpp's deci architecture does not apply",
    "gemma3": "q/k norms, post-norms and sliding layers, which llama.cpp's deci architecture does not apply",
}
DTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values, each with its own f16 scale
GGUF_NAME = "model-{dtype}.gguf"


@dataclass
class GGUFLayout:
    """Per-layer counts as written (after llama.cpp's needs: an FFN-free layer with attention, or as the last layer,
    gets one zero neuron)."""

    head_count: list[int] = field(default_factory=list)
    head_count_kv: list[int] = field(default_factory=list)
    feed_forward_length: list[int] = field(default_factory=list)
    head_dim: int = 0
    zero_neuron_layers: list[int] = field(default_factory=list)


def _need_gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError(
            "format='gguf' needs the gguf package (llama.cpp's writer): pip install 'hf-dgate[gguf]'."
        ) from None
    return gguf


def check_family(model: nn.Module) -> None:
    """ExportError naming why llama.cpp's `deci` cannot run this model; None for Llama, Mistral, Qwen2 decoders."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt in REFUSED:
        raise ExportError(f"GGUF export cannot write a {mt} model: {REFUSED[mt]}. Use format='native'.")
    cfg = check_llama_decoder(model, "GGUF", "Llama-like decoders", "llama.cpp's deci uses SiLU")
    if (getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ExportError("GGUF export: llama.cpp's deci rotates whole heads; this model uses partial rotary.")
    _rope_factors(model)  # refuses unsupported rope scaling


def _rope_factors(model: nn.Module) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` (divisors of the plain frequencies), None for plain rope; refuses what cannot be
    written that way (scalings with an attention factor, or that change with the sequence length)."""
    rot = getattr(model.model, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise ExportError("GGUF export: this model has no rotary embedding module (model.rotary_emb).")
    kind = getattr(rot, "rope_type", "default")
    scaling = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
    if kind not in ("default", "linear", "llama3") or scaling != 1.0:
        raise ExportError(
            f"GGUF export: rope type {kind!r} (attention scaling {scaling}) cannot be written for llama.cpp's deci; "
            "plain, linear and llama3 rope can."
        )
    base, dim = _rope_theta(model), int(rot.inv_freq.numel() * 2)
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    used = getattr(rot, "original_inv_freq", rot.inv_freq)  # as built (dynamic rope changes inv_freq later)
    factors = plain / used.double()
    if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0):
        return None
    return factors.float().numpy()


def _rope_theta(model: nn.Module) -> float:
    cfg = text_config(model)
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _head_dim(model: nn.Module) -> int:
    cfg = text_config(model)
    from ..export import pruning_record

    rec = pruning_record(model)  # a version-1 record's head size (a multi-stack one has none at the top)
    hd = (rec.single.head_dim if rec is not None else None) or getattr(cfg, "head_dim", None)
    return int(hd or cfg.hidden_size // cfg.num_attention_heads)


def layout(model: nn.Module) -> GGUFLayout:
    """Per-layer head, key/value head and FFN counts as the GGUF will say them, read off the weights."""
    hd = _head_dim(model)
    out = GGUFLayout(head_dim=hd)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q = getattr(attn, "q_proj", None)
        n_q = q.weight.shape[0] // hd if q is not None else 0
        n_kv = attn.k_proj.weight.shape[0] // hd if n_q else 0
        n_ff = layer.mlp.down_proj.weight.shape[1]
        if n_q == 0:
            bias = getattr(getattr(attn, "o_proj", None), "bias", None)
            if bias is not None and bool(bias.abs().max() > 0):
                raise ExportError(
                    f"Layer {i} has no attention heads but a non-zero output bias; llama.cpp's deci drops an "
                    "attention-free layer's bias, so this export cannot be written as GGUF."
                )
        last = i == len(model.model.layers) - 1  # llama.cpp picks the output rows in the last layer's FFN branch
        if n_ff == 0 and (n_q > 0 or last or layer.mlp.down_proj.bias is not None):
            out.zero_neuron_layers.append(i)
            n_ff = 1
        out.head_count.append(n_q)
        out.head_count_kv.append(n_kv)
        out.feed_forward_length.append(n_ff)
    if not any(out.head_count_kv):
        raise ExportError(
            "No layer keeps an attention head; llama.cpp cannot run such a GGUF (its key/value cache would be empty "
            "and creating a context fails). Export with format='native' instead."
        )
    return out


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from transformers' halves layout to llama.cpp's interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensors(model: nn.Module, lay: GGUFLayout) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in transformers' (out, in) layout) for every tensor the deci loader reads."""
    out = [("token_embd.weight", model.model.embed_tokens.weight), ("output_norm.weight", model.model.norm.weight)]
    out.append(("output.weight", model.lm_head.weight))
    factors = _rope_factors(model)
    if factors is not None:
        out.append(("rope_freqs.weight", torch.from_numpy(factors)))
    for i, layer in enumerate(model.model.layers):
        n_q, n_kv, n_ff = lay.head_count[i], lay.head_count_kv[i], lay.feed_forward_length[i]
        p = f"blk.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        if n_q:
            out.append((p + "attn_norm.weight", layer.input_layernorm.weight))
            for name, proj, heads in (("attn_q", attn.q_proj, n_q), ("attn_k", attn.k_proj, n_kv)):
                out.append((p + name + ".weight", _permute(proj.weight, heads)))
                if proj.bias is not None:
                    out.append((p + name + ".bias", _permute(proj.bias, heads)))
            for name, proj in (("attn_v", attn.v_proj), ("attn_output", attn.o_proj)):
                out.append((p + name + ".weight", proj.weight))
                if proj.bias is not None:
                    out.append((p + name + ".bias", proj.bias))
        if n_q == 0 and n_ff == 0:  # nothing left: llama.cpp passes the input on and reads no tensor of the layer
            continue
        out.append((p + "ffn_norm.weight", layer.post_attention_layernorm.weight))
        if n_ff:
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            if i in lay.zero_neuron_layers:  # one zero neuron: llama.cpp keeps the attention output (module doc)
                h = down.weight.shape[0]
                zeros = torch.zeros(1, h, dtype=down.weight.dtype)
                out += [(p + "ffn_gate.weight", zeros), (p + "ffn_up.weight", zeros.clone())]
                out.append((p + "ffn_down.weight", torch.zeros(h, 1, dtype=down.weight.dtype)))
                if down.bias is not None:
                    out.append((p + "ffn_down.bias", down.bias))
                continue
            for name, proj in (("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)):
                out.append((p + name + ".weight", proj.weight))
                if proj.bias is not None:
                    out.append((p + name + ".bias", proj.bias))
    return out


def _qtype(gguf: Any, dtype: str, t: torch.Tensor) -> Any:
    """The file type of one tensor: norms, biases and rope factors (1-D) stay float32, as llama.cpp's converter
    keeps them; with q8_0, a matrix whose rows are not whole blocks of 32 is written f16 (the converter's fallback
    too: with exact FFN widths that is ffn_down)."""
    if t.dim() == 1 or dtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if dtype == "q8_0":
        return gguf.GGMLQuantizationType.Q8_0 if t.shape[-1] % Q8_BLOCK == 0 else gguf.GGMLQuantizationType.F16
    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}[dtype]


def rounded_like_file(model: nn.Module, dtype: str) -> nn.Module:
    """A float32 copy of `model` whose matrices went through the file's dtype: the PyTorch reference for llama.cpp.
    (q8_0 blocks run along a row, so the rope permutation of rows does not change what they round to.)"""
    import copy

    ref = copy.deepcopy(model).float()
    if dtype == "f32":
        return ref.eval()
    gguf = _need_gguf() if dtype == "q8_0" else None
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() < 2 or p.numel() == 0:
                continue
            if dtype == "q8_0" and p.shape[-1] % Q8_BLOCK == 0:
                q8 = gguf.GGMLQuantizationType.Q8_0
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
            else:
                p.copy_(p.to(torch.bfloat16 if dtype == "bf16" else torch.float16).float())
    return ref.eval()


def write_gguf(
    model: nn.Module, path: str | os.PathLike, dtype: str = "f16", tokenizer: Any = None, name: str | None = None
) -> dict[str, Any]:
    """Write a pruned Llama-like causal LM as a `deci` GGUF; returns what was written (layout, tokenizer, dtype).

    `tokenizer` (a transformers tokenizer or a folder holding one) is written when it is a byte-level BPE (Llama 3,
    Qwen2, GPT-2 style) or a tokenizer.json BPE with byte fallback (Llama 2, Mistral); otherwise a placeholder
    vocabulary of the right size is written (llama.cpp needs one) and the summary says so: token ids then still
    mean the same thing."""
    gguf = _need_gguf()
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not a GGUF type written here; choose one of {list(DTYPES)}.")
    check_family(model)
    cfg = text_config(model)
    lay = layout(model)
    w = gguf.GGUFWriter(os.fspath(path), ARCH)
    w.add_name(name or "hf-dgate pruned model")
    types = gguf.LlamaFileType
    w.add_file_type({"f32": types.ALL_F32, "f16": types.MOSTLY_F16, "bf16": types.MOSTLY_BF16,
                     "q8_0": types.MOSTLY_Q8_0}[dtype])  # fmt: skip
    n_ctx = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) is not False and window < n_ctx:
        n_ctx = int(window)
    w.add_context_length(n_ctx)
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(len(lay.head_count))
    w.add_head_count(lay.head_count)
    w.add_head_count_kv(lay.head_count_kv)
    w.add_feed_forward_length(lay.feed_forward_length)
    w.add_key_length(lay.head_dim)
    w.add_value_length(lay.head_dim)
    w.add_rope_dimension_count(lay.head_dim)
    w.add_rope_freq_base(_rope_theta(model))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    vocab = _write_vocab(gguf, w, cfg, tokenizer)
    for tname, t in _tensors(model, lay):
        t = t.detach().float().cpu().contiguous()
        qtype = _qtype(gguf, dtype, t)
        data = t.numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(tname, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(tname, data.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"file": os.path.basename(os.fspath(path)), "dtype": dtype, "architecture": ARCH,
            "context_length": n_ctx, "layout": asdict(lay), "vocab": vocab}  # fmt: skip


def _write_vocab(gguf: Any, w: Any, cfg: Any, tokenizer: Any) -> str:
    """Write the tokenizer; returns "bpe" (byte-level BPE: Llama 3, Qwen2, GPT-2 style), "llama-hf" (SentencePiece-
    style BPE with byte fallback in tokenizer.json: Llama 2, Mistral), or "placeholder: <why>" when a stand-in
    vocabulary was written."""
    n = int(cfg.vocab_size)
    why = "no tokenizer was given"
    folder = os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
    if folder is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a folder without a tokenizer: the placeholder below, said in the summary
            why, tokenizer = f"no tokenizer could be read from the folder ({type(e).__name__})", None
    if tokenizer is not None:
        try:
            _write_bpe(gguf, w, tokenizer, n)
            _special_ids(w, cfg, tokenizer)
            return "bpe"
        except ExportError as e:
            why = str(e)
        try:
            _write_llama_hf(gguf, w, tokenizer, n)
            _special_ids(w, cfg, tokenizer)
            return "llama-hf"
        except ExportError as e:
            why = f"{why}; {e}"
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<dgate_{i}>" for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([gguf.TokenType.NORMAL] * n)
    _special_ids(w, cfg, None)
    return f"placeholder: {why}"


def _write_llama_hf(gguf: Any, w: Any, tok: Any, n: int) -> None:
    """A tokenizer.json BPE with byte fallback, read by gguf's own `LlamaHfVocab` (llama.cpp's "llama" model)."""
    import tempfile
    from pathlib import Path

    if not hasattr(tok, "save_pretrained"):
        raise ExportError("the tokenizer cannot be saved to be read")
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        try:
            vocab = gguf.vocab.LlamaHfVocab(Path(d))
            entries = list(vocab.all_tokens())
        except (FileNotFoundError, TypeError, ValueError, KeyError) as e:
            raise ExportError(f"not a Llama-style BPE with byte fallback either ({type(e).__name__})") from None
    if len(entries) > n:
        raise ExportError(f"the tokenizer has {len(entries)} tokens, more than the model's vocab_size {n}")
    entries += [(f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED) for i in range(len(entries), n)]
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in entries])
    w.add_token_scores([s for _, s, _ in entries])
    w.add_token_types([t for _, _, t in entries])


def _write_bpe(gguf: Any, w: Any, tok: Any, n: int) -> None:
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise ExportError("the tokenizer is not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = any("ByteLevel" in json.dumps(spec.get(k)) for k in ("pre_tokenizer", "decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError("only byte-level BPE tokenizers are written (this one is not)")
    vocab = tok.get_vocab()
    if max(vocab.values(), default=-1) >= n:
        raise ExportError(f"the tokenizer has ids beyond the model's vocab_size {n}")
    by_id = {i: t for t, i in vocab.items()}
    special = {a.content for a in getattr(tok, "added_tokens_decoder", {}).values() if getattr(a, "special", False)}
    added = set(getattr(tok, "added_tokens_encoder", {}) or {})
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in special else
                         gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def _special_ids(w: Any, cfg: Any, tok: Any) -> None:
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):  # fmt: skip
        v = getattr(tok, key, None) if tok is not None else None
        v = getattr(cfg, key, None) if v is None else v
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < int(cfg.vocab_size):
            add(v)
    w.add_add_bos_token(False)


class GGUFFormat(ExportFormat):
    name = "gguf"
    description = "llama.cpp GGUF (deci architecture: per-layer head, key/value-head and FFN counts)"
    loads_with = "llama.cpp / llama-cpp-python"
    # ggml's CPU kernels want an FFN width (the contraction of ffn_down) in whole SIMD steps: exact widths such as
    # 1182 made prompts 2x slower than the FLOPs say, multiples of 32 still left generation at 0.86-0.95 of the
    # FLOPs ratio, multiples of 64 reach 0.99-1.07 (AVX512 dot products step by 64; benchmarks/serving.py,
    # docs/serving.md); the zero neurons add 1-2 % to a generated token's FLOPs, 2-7 % to a prompt's
    default_multiple_of = {"neurons": 64}

    def check(self, model: nn.Module, *, gguf_dtype: str = "f16", **_: Any) -> None:
        _need_gguf()
        if gguf_dtype not in DTYPES:
            raise ExportError(f"gguf_dtype={gguf_dtype!r} is invalid; choose one of {list(DTYPES)}.")
        check_family(model)

    def write(
        self,
        model: nn.Module,
        directory: str | os.PathLike,
        *,
        gguf_dtype: str = "f16",
        tokenizer: Any = None,
        verify_llama_cpp: bool | None = None,
        probe_ids: list[int] | None = None,
        name: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        from .llama_cpp import compare_with_llama_cpp, have_llama_cpp

        path = os.path.join(os.fspath(directory), GGUF_NAME.format(dtype=gguf_dtype))
        info = write_gguf(model, path, dtype=gguf_dtype, tokenizer=tokenizer, name=name)
        if verify_llama_cpp is None:
            verify_llama_cpp = have_llama_cpp()
        if verify_llama_cpp:
            info["llama_cpp"] = compare_with_llama_cpp(model, path, gguf_dtype, probe_ids=probe_ids)
        else:
            info["llama_cpp"] = {"verified": False, "reason": "llama-cpp-python is not installed"}
        return {"gguf": info}


GGUF = register_format(GGUFFormat())
