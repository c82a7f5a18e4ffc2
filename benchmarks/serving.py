"""Does a pruned export run faster in llama.cpp? Dense vs pruned GGUFs, prompt processing and generation tokens/s.

A small Llama (8 layers, 512 wide, 8 query / 4 key-value heads, 1408 neurons, 32000-token vocabulary: 56M
parameters, random weights: speed does not depend on what they hold) is gated on heads and neurons; for a target
sparsity s in 25 / 50 / 75 % each layer i gets its own fraction s_i (from 0.5 s to 1.5 s across the layers, capped at
90 %) of its key/value groups and neurons set to zero through the gates, so the layers keep different counts. Each
pattern is exported four ways: non-uniform (the per-layer counts), uniform (`shape="uniform"`: every layer as
many as the fullest), rounded-32 (`multiple_of=32`: neurons) and rounded (`multiple_of={"neurons": 128,
"heads": 2}`), written as f16 GGUF
(`hf_dgate.formats.gguf`, llama.cpp's deci architecture) and checked against PyTorch in llama.cpp. All GGUFs are
loaded in one process (llama-cpp-python, 1 thread) and timed in rounds: each round runs every model once, in
alternating order, so load from other processes hits all alike; speed-ups are medians of the per-round ratios to
the dense model, beside the FLOPs ratio (torch.utils.flop_counter: the 128-token prompt for prompt processing, one
token for generation).

    nice python benchmarks/serving.py                  # ~5 minutes on a loaded 2-core machine
    nice python benchmarks/serving.py --quick          # 2 layers, 5 rounds (a smoke test, ~1-2 minutes)

Writes results/serving/serving.json and results/serving/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import transformers as T

import hf_dgate
from hf_dgate.flops import count_flops, count_params
from hf_dgate.formats.gguf import write_gguf
from hf_dgate.formats.llama_cpp import compare_with_llama_cpp, load

T.logging.set_verbosity_error()

SHAPES = {
    "non-uniform": {},
    "uniform": {"shape": "uniform"},
    "rounded-32": {"multiple_of": {"neurons": 32}},
    "rounded": {"multiple_of": {"neurons": 128, "heads": 2}},
}


def llama_small(layers: int) -> T.PreTrainedModel:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)  # fmt: skip
    return T.LlamaForCausalLM(cfg).eval()


def layer_fractions(sparsity: float, layers: int) -> list[float]:
    """s_i from 0.5 s to 1.5 s across the layers (mean s), capped at 0.9."""
    if layers == 1:
        return [sparsity]
    return [min(0.9, sparsity * (0.5 + i / (layers - 1))) for i in range(layers)]


@torch.no_grad()
def zero_pattern(model: torch.nn.Module, fractions: list[float], seed: int = 0) -> None:
    bank = hf_dgate.get_bank(model)
    gen = torch.Generator().manual_seed(seed)
    for gs, off in zip(bank.group_sets, bank.offsets):
        k = round(fractions[int(gs.layer)] * gs.n_groups)
        dead = torch.randperm(gs.n_groups, generator=gen)[:k]
        bank.gammas[gs.target][:, off + dead] = 0.0


def time_model(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, float, float]:
    """Prompt and generated tokens/s for one batch of `prompt`, then `new_tokens` single-token steps: measured
    around the Python calls (what an application sees) and by llama.cpp's own timers (the engine alone, without
    llama-cpp-python's per-call work such as copying the 32000 logits)."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp = len(prompt) / (time.perf_counter() - t0)
    tok = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([tok])
    tg = new_tokens / (time.perf_counter() - t0)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return pp, tg, 1e3 * perf.n_p_eval / perf.t_p_eval_ms, 1e3 * perf.n_eval / perf.t_eval_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompt", type=int, default=128, help="Prompt length (tokens, one batch).")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/serving")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.rounds = 2, 5
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dgate-serving-")
    prompt = torch.randint(0, 32000, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    flops_in = {"input_ids": torch.tensor([prompt])}
    one_in = {"input_ids": torch.tensor([prompt[:1]])}

    models: dict[str, dict] = {}
    dense = llama_small(args.layers)
    models["dense"] = {"torch": dense, "sparsity": 0.0, "shape": "dense"}
    for s in (0.25, 0.5, 0.75):
        gated = hf_dgate.apply_dgate(llama_small(args.layers), hf_dgate.DGateConfig(target=["heads", "neurons"]))
        zero_pattern(gated, layer_fractions(s, args.layers))
        for shape, kw in SHAPES.items():
            pruned = hf_dgate.export_pruned(gated, example_inputs={"input_ids": flops_in["input_ids"][:, :32]}, **kw)
            assert pruned.dgate_verification.exact, pruned.dgate_verification
            models[f"{int(s * 100)}% {shape}"] = {"torch": pruned, "sparsity": s, "shape": shape}
    rows = {}
    for name, m in models.items():
        path = os.path.join(work, name.replace("%", "").replace(" ", "_") + ".gguf")
        info = write_gguf(m["torch"], path, dtype=args.dtype)
        check = compare_with_llama_cpp(m["torch"], path, args.dtype)
        lay = info["layout"]
        rows[name] = {
            "sparsity": m["sparsity"], "shape": m["shape"], "params": count_params(m["torch"]),
            "flops_prompt": count_flops(m["torch"], flops_in), "flops_token": count_flops(m["torch"], one_in),
            "head_count_kv": lay["head_count_kv"], "feed_forward_length": lay["feed_forward_length"],
            "gguf_bytes": os.path.getsize(path), "llama_cpp_max_abs_diff": check["max_abs_diff"],
            "llama_cpp_argmax_agree": check["argmax_agree"],
        }  # fmt: skip
        m["path"] = path
        print(f"{name:>18}: kv heads {lay['head_count_kv']}, ffn {lay['feed_forward_length']}, "
              f"llama.cpp vs torch {check['max_abs_diff']:.1e}", flush=True)  # fmt: skip
        del m["torch"]
    llms = {name: load(m["path"], n_ctx=args.prompt + args.new_tokens + 8, n_threads=args.threads,
                       n_batch=args.prompt) for name, m in models.items()}  # fmt: skip
    names = list(llms)
    for name in names:  # warm-up
        time_model(llms[name], prompt[:16], 2)
    per_round: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in names}
    t_start = time.time()
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            per_round[name].append(time_model(llms[name], prompt, args.new_tokens))
        print(f"round {r + 1}/{args.rounds} ({time.time() - t_start:.0f} s)", flush=True)
    dense = list(zip(*per_round["dense"]))
    for name in names:
        pps, tgs, pps_engine, tgs_engine = zip(*per_round[name])
        row = rows[name]
        row.update(
            pp_tok_s=statistics.median(pps),
            tg_tok_s=statistics.median(tgs),
            pp_speedup=statistics.median(p / d for p, d in zip(pps, dense[0])),
            tg_speedup=statistics.median(t / d for t, d in zip(tgs, dense[1])),
            pp_speedup_engine=statistics.median(p / d for p, d in zip(pps_engine, dense[2])),
            tg_speedup_engine=statistics.median(t / d for t, d in zip(tgs_engine, dense[3])),
            flops_ratio_prompt=rows["dense"]["flops_prompt"] / row["flops_prompt"],
            flops_ratio_token=rows["dense"]["flops_token"] / row["flops_token"],
        )
        row["pp_efficiency"] = row["pp_speedup"] / row["flops_ratio_prompt"]
        row["tg_efficiency"] = row["tg_speedup"] / row["flops_ratio_token"]
        row["tg_efficiency_engine"] = row["tg_speedup_engine"] / row["flops_ratio_token"]
    meta = {
        "command": "python benchmarks/serving.py" + (" --quick" if args.quick else ""),
        "layers": args.layers, "rounds": args.rounds, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
        "dtype": args.dtype, "threads": args.threads, "platform": platform.platform(),
        "load_average": os.getloadavg(), "torch": torch.__version__, "transformers": T.__version__,
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }  # fmt: skip
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [
        f"`{meta['command']}`: {args.layers} layers, {args.dtype} GGUF, llama-cpp-python {meta['llama_cpp_python']}, "
        f"{args.threads} thread, {args.rounds} rounds (medians of per-round ratios), prompt {args.prompt} tokens, "
        f"{args.new_tokens} generated tokens; load average at the end {meta['load_average'][0]:.1f}.",
        "",
        "| model | params | kv heads per layer | FFN widths | prompt tok/s | prompt speed-up | FLOPs ratio (prompt) "
        "| speed-up / FLOPs | generate tok/s | generate speed-up | FLOPs ratio (token) | speed-up / FLOPs "
        "| generate speed-up, llama.cpp's timer | speed-up / FLOPs, llama.cpp's timer |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['params'] / 1e6:.1f}M | {row['head_count_kv']} | {row['feed_forward_length']} | "
            f"{row['pp_tok_s']:.0f} | {row['pp_speedup']:.2f}x | {row['flops_ratio_prompt']:.2f}x | "
            f"{row['pp_efficiency']:.2f} | {row['tg_tok_s']:.1f} | {row['tg_speedup']:.2f}x | "
            f"{row['flops_ratio_token']:.2f}x | {row['tg_efficiency']:.2f} | {row['tg_speedup_engine']:.2f}x | "
            f"{row['tg_efficiency_engine']:.2f} |"
        )
    with open(os.path.join(args.out, "serving.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
