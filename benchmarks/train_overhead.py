"""Training overhead of D-Gating: step time and memory of vanilla against gated training, in one process.

    python benchmarks/train_overhead.py            # GPT-2-small size and a small Llama, 1k and 4k tokens/step
    python benchmarks/train_overhead.py --quick    # 2 small layers: a smoke run of the script (seconds)

Vanilla and gated steps (heads + neurons, D = 3, AdamW) alternate in ABBA order so noise and order effects hit
both alike; the table prints median step times and the median of the per-round ratios (gated step over the
vanilla step beside it). Memory: on CUDA the peak allocated bytes; on CPU the bytes autograd saves for
the backward pass (activations, distinct storages) plus parameters, gradients and AdamW state. A profile
section counts the operators hf_dgate runs per penalty call for two group counts: the count does not grow with
the number of groups (no per-group Python work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T

import hf_dgate
from hf_dgate.flops import penalty_op_counts
from hf_dgate.threads import THREADS_HELP, configure_threads


def build(kind: str, layers: int, small: bool = False) -> torch.nn.Module:
    """GPT-2-small / a small Llama at full width; `small` (--quick): width 128 and a 1000-token vocabulary."""
    width, vocab = (128, 1000) if small else (768, None)
    if kind == "gpt2":
        cfg = T.GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=4 if small else 12,
            vocab_size=vocab or 50257,
            bos_token_id=0 if small else 50256,
            eos_token_id=0 if small else 50256,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = T.GPT2LMHeadModel(cfg)
        model.loss_type = "ForCausalLM"  # transformers cannot tell from the name GPT2LMHeadModel and warns
        return model
    cfg = T.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=2048 if not small else 256,
        num_attention_heads=4 if small else 12,
        num_key_value_heads=2 if small else 4,
        vocab_size=vocab or 32000,
    )
    return T.LlamaForCausalLM(cfg)


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps between forward and backward."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


def state_bytes(model: torch.nn.Module) -> int:
    """Parameters + gradients + AdamW's two moments."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def make_step(model, ids, gated: bool, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    forward = torch.compile(model) if compiled else model

    def loss_fn():
        loss = forward(input_ids=ids, labels=ids).loss
        return loss + hf_dgate.penalty(model) if gated else loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step, loss_fn


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(
    kind: str, layers: int, batch: int, seq: int, steps: int, device, compiled: bool, small: bool = False
) -> dict:
    torch.manual_seed(0)
    vanilla = build(kind, layers, small).to(device)
    torch.manual_seed(0)
    gated = hf_dgate.apply_dgate(
        build(kind, layers, small).to(device), hf_dgate.DGateConfig(target=["heads", "neurons"], depth=3, lam=1e-4)
    )
    ids = torch.randint(0, 1000, (batch, seq), device=device)
    runs = {"vanilla": make_step(vanilla, ids, False, compiled), "gated": make_step(gated, ids, True, compiled)}
    mem = {}
    for name, (step, loss_fn) in runs.items():
        step()  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            mem[name] = torch.cuda.max_memory_allocated()
        else:
            model = vanilla if name == "vanilla" else gated
            mem[name] = saved_bytes(loss_fn) + state_bytes(model)
    times = {name: [] for name in runs}
    order = list(runs)
    for i in range(steps):  # ABBA order: whichever runs second in a round is measurably slower on a busy CPU
        for name in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(runs[name][0], device))
    t_v, t_g = statistics.median(times["vanilla"]), statistics.median(times["gated"])
    ratios = [g / v for g, v in zip(times["gated"], times["vanilla"])]
    return {
        "model": kind,
        "layers": layers,
        "tokens": batch * seq,
        "compiled": compiled,
        "t_vanilla": t_v,
        "t_gated": t_g,
        # paired: each round's gated step over the vanilla step next to it, so slow drifts of a shared machine cancel
        "time_ratio": statistics.median(ratios),
        "time_ratio_middle_half": _middle_half(ratios),
        "mem_vanilla": mem["vanilla"],
        "mem_gated": mem["gated"],
        "mem_ratio": mem["gated"] / mem["vanilla"],
    }


def _middle_half(values: list[float]) -> tuple[float, float]:
    """25th and 75th percentiles (the whole range for fewer than 4 values)."""
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


COLUMNS = """\
columns: vanilla s / gated s = median seconds per step of each model on its own (unpaired); time x = median over
rounds of (gated step / the vanilla step beside it), paired and ABBA-ordered, with its middle half (25th-75th
percentile) in brackets. On a busy machine the unpaired medians drift with the load, so their quotient can differ
from time x: read time x. vanilla MB / gated MB = peak CUDA memory, or on CPU the bytes autograd saves plus
parameters, gradients and AdamW state; mem x = gated / vanilla."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 layers of width 128, 256 tokens, 3 rounds: a smoke run of the script (seconds; at that size the "
        "ratios say nothing about GPT-2-small scale)",
    )
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (default 12)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per step (default 1024 4096)")
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args()
    configure_threads(args.threads)
    layers = args.layers or (2 if args.quick else 12)
    steps = args.steps or (3 if args.quick else 5)
    token_counts = args.tokens or ([256] if args.quick else [1024, 4096])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {layers} layers, "
        f"{steps} ABBA rounds"
    )
    print(COLUMNS)
    print(
        f"{'model':6} {'tokens':>6} {'compiled':>8} {'vanilla s':>10} {'gated s':>9} {'time x [middle half]':>22} "
        f"{'vanilla MB':>11} {'gated MB':>9} {'mem x':>6}"
    )
    for kind in args.models:
        for tokens in token_counts:
            for compiled in [False, True] if args.compile else [False]:
                batch, seq = max(1, tokens // args.seq), min(args.seq, tokens)
                r = measure(kind, layers, batch, seq, steps, device, compiled, small=args.quick)
                lo, hi = r["time_ratio_middle_half"]
                ratio = f"{r['time_ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
                print(
                    f"{kind:6} {r['tokens']:>6} {str(compiled):>8} {r['t_vanilla']:>10.3f} {r['t_gated']:>9.3f} "
                    f"{ratio:>22} {r['mem_vanilla'] / 2**20:>11.1f} {r['mem_gated'] / 2**20:>9.1f} "
                    f"{r['mem_ratio']:>6.3f}",
                    flush=True,
                )
    print(
        "penalty (groups -> aten ops dispatched per call, hf_dgate.flops.penalty_op_counts):",
        ", ".join(f"{g} -> {n}" for g, n in penalty_op_counts(layers)),
    )


if __name__ == "__main__":
    main()
