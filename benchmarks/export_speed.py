"""Does removing zero groups buy real speed? Dense vs exported forward latency and generate throughput.

For a GPT-2-small-size model and a small Llama (GQA), a fraction s of the attention heads (key/value groups)
and of the MLP neurons of every layer is forced to zero through the gates, the model is exported with
`hf_dgate.export_pruned`, and the exported model is timed against the dense (gate-folded) one in the same
process. The measured speed-up is reported beside the FLOPs ratio counted by torch.utils.flop_counter;
their quotient ("efficiency") says how much of the theoretical saving the smaller matmuls deliver.

    nice python benchmarks/export_speed.py            # a few minutes on 2 CPU cores
    nice python benchmarks/export_speed.py --quick    # fewer layers, shorter inputs (~1 minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import transformers as T

import hf_dgate
from hf_dgate.flops import count_flops, count_params
from hf_dgate.threads import THREADS_HELP, configure_threads

T.logging.set_verbosity_error()


def gpt2_small(layers: int) -> T.PreTrainedModel:
    return T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_head=12, n_embd=768, n_positions=1024))


def llama_small(layers: int) -> T.PreTrainedModel:
    cfg = T.LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return T.LlamaForCausalLM(cfg)


@torch.no_grad()
def zero_fraction(model: torch.nn.Module, sparsity: float, seed: int) -> None:
    """Zero round(s * n) randomly chosen heads (key/value groups) and neurons in every layer."""
    bank = hf_dgate.get_bank(model)
    gen = torch.Generator().manual_seed(seed)
    for gs, off in zip(bank.group_sets, bank.offsets):
        k = round(sparsity * gs.n_groups)
        dead = torch.randperm(gs.n_groups, generator=gen)[:k]
        bank.gammas[gs.target][0, off + dead] = 0.0


@torch.no_grad()
def latencies(models: list[torch.nn.Module], inputs: dict, rounds: int) -> list[list[float]]:
    """Seconds per forward of each model in every round, after a warm-up; the models alternate within a round so
    load from other processes hits all alike, and each round gives one paired dense/pruned ratio."""
    for m in models:
        m(**inputs)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, m in enumerate(models):
            _sync()
            t0 = time.perf_counter()
            m(**inputs)
            _sync()
            times[i].append(time.perf_counter() - t0)
    return times


def paired(dense: list[float], pruned: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round speed-ups dense / pruned."""
    ratios = sorted(d / p for d, p in zip(dense, pruned))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    return med, q1, q3


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def best_tokens_per_s(models: list[torch.nn.Module], prompt: torch.Tensor, new: int, rounds: int) -> list[float]:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    for m in models:
        m.generate(prompt, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    best = [0.0] * len(models)
    for _ in range(rounds):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m.generate(prompt, **kw)
            best[i] = max(best[i], new / (time.perf_counter() - t0))
    return best


def run(name: str, build, layers: int, seq: int, sparsities: list[float], rounds: int, new_tokens: int,
        device: str = "cpu") -> list[dict]:  # fmt: skip
    torch.manual_seed(0)
    base = build(layers).eval().to(device)
    hf_dgate.apply_dgate(base, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    dense = copy.deepcopy(base)
    hf_dgate.remove_dgate(dense, merge=True)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids.to(device)}
    prompt = inputs["input_ids"][:, :16]
    pruned = []
    for i, s in enumerate(sparsities):
        with torch.no_grad():
            hf_dgate.get_bank(base).gammas["heads"].fill_(1.0)
            hf_dgate.get_bank(base).gammas["neurons"].fill_(1.0)
        zero_fraction(base, s, seed=i)
        with torch.no_grad():
            ref = base(**inputs).logits
            p = hf_dgate.export_pruned(base)
            diff = float((p(**inputs).logits - ref).abs().max())
        pruned.append((s, p, diff))
    models = [dense] + [p for _, p, _ in pruned]
    times = latencies(models, inputs, rounds)
    lat = [min(t) for t in times]
    tps = best_tokens_per_s(models, prompt, new_tokens, max(1, rounds // 2))
    flops = [count_flops(m, inputs) for m in models]
    rows = []
    for j, (s, p, diff) in enumerate(pruned, start=1):
        flops_ratio = flops[0] / flops[j]
        speedup = lat[0] / lat[j]
        med, q1, q3 = paired(times[0], times[j])
        rows.append(
            dict(
                model=name,
                layers=layers,
                seq=seq,
                sparsity=s,
                params_dense=count_params(dense),
                params_pruned=count_params(p),
                flops_ratio=flops_ratio,
                latency_dense_ms=1e3 * lat[0],
                latency_pruned_ms=1e3 * lat[j],
                speedup=speedup,
                speedup_paired_median=med,
                speedup_paired_q1=q1,
                speedup_paired_q3=q3,
                efficiency=speedup / flops_ratio,
                gen_tok_s_dense=tps[0],
                gen_tok_s_pruned=tps[j],
                gen_speedup=tps[j] / tps[0],
                max_logit_diff=diff,
            )
        )
        print(
            f"{name:12s} s={s:.2f}  FLOPs {flops_ratio:.2f}x  forward {speedup:.2f}x "
            f"({1e3 * lat[0]:.1f} -> {1e3 * lat[j]:.1f} ms, eff {speedup / flops_ratio:.2f}; paired median "
            f"{med:.2f}x [{q1:.2f}, {q3:.2f}])  "
            f"generate {tps[0]:.1f} -> {tps[j]:.1f} tok/s  max|diff| {diff:.1e}",
            flush=True,
        )
    return rows


COLUMNS = (
    "Columns: forward ms = the fastest of the timed rounds, dense and pruned alternating after a warm-up (the "
    "minimum: what each model costs when the shared machine leaves it alone); measured speed-up = dense / pruned of "
    "those; paired median [quartiles] = the median of the per-round ratios dense / pruned and its spread (what a busy "
    "machine gives); speed-up / FLOPs ratio = how much of the FLOP saving the smaller matmuls deliver. A speed-up "
    "above the FLOPs ratio cannot come from removing groups and is marked as noise."
)


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | sparsity | params | FLOPs ratio | forward ms (dense -> pruned) | measured speed-up | "
        "paired median [quartiles] | "
        "speed-up / FLOPs ratio | generate tok/s (dense -> pruned) | max abs logit diff |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['layers']} layers, seq {r['seq']}) | {100 * r['sparsity']:.0f}% | "
            f"{r['params_dense'] / 1e6:.1f}M -> {r['params_pruned'] / 1e6:.1f}M | {r['flops_ratio']:.2f}x | "
            f"{r['latency_dense_ms']:.1f} -> {r['latency_pruned_ms']:.1f} | {r['speedup']:.2f}x"
            f"{' (above the FLOPs ratio: noise)' if r['speedup'] > r['flops_ratio'] else ''} | "
            f"{r['speedup_paired_median']:.2f}x [{r['speedup_paired_q1']:.2f}, {r['speedup_paired_q3']:.2f}] | "
            f"{r['efficiency']:.2f} | {r['gen_tok_s_dense']:.1f} -> {r['gen_tok_s_pruned']:.1f} | "
            f"{r['max_logit_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, sequence 64, fewer repeats.")
    ap.add_argument("--seq", type=int, default=None, help="Tokens per forward pass (default 128; 64 with --quick).")
    ap.add_argument("--rounds", type=int, default=None, help="Timed forward passes per model (best is kept).")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    ap.add_argument("--device", default="cpu", help="cpu or cuda.")
    args = ap.parse_args()
    configure_threads(args.threads)
    layers = 4 if args.quick else 12
    seq = args.seq or (64 if args.quick else 128)
    rounds = args.rounds or (4 if args.quick else 8)
    new_tokens = 16
    sparsities = [0.25, 0.5, 0.75]
    print(
        f"torch {torch.__version__}, transformers {T.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    rows = run("gpt2-small", gpt2_small, layers, seq, sparsities, rounds, new_tokens, args.device)
    rows += run("llama-small", llama_small, max(4, layers * 2 // 3), seq, sparsities, rounds, new_tokens, args.device)
    print()
    print(COLUMNS)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
