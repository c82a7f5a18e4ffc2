"""Does a pruned export run faster in llama.cpp? Dense vs pruned GGUFs, prompt processing and generation tokens/s.

A small Llama (8 layers, 512 wide, 8 query / 4 key-value heads, 1408 neurons, 32000-token vocabulary: 56M
parameters, random weights: speed does not depend on what they hold) is gated on heads and neurons; for a target
sparsity s in 25 / 50 / 75 % each layer i gets its own fraction s_i (from 0.5 s to 1.5 s across the layers, capped at
90 %) of its key/value groups and neurons set to zero through the gates, so the layers keep different counts. Each
pattern is exported five ways (SHAPES: exact per-layer widths, neurons rounded to 32, to 64 (the GGUF default),
uniform, and 128 neurons / 2 key/value heads), plus a `floor` model that keeps one key/value head and no neurons
(what pruning cannot remove). All are written as f16 GGUF (`hf_dgate.formats.gguf`, llama.cpp's deci architecture)
and checked against PyTorch in llama.cpp, then loaded in one process (llama-cpp-python, 1 thread) and timed in
rounds: each round runs every model once, in alternating order, so load from other processes hits all alike.
Speed-ups are medians (and quartiles) of the per-round ratios to the dense model by llama.cpp's own timers, beside
the FLOPs ratio of what llama.cpp computes (torch.utils.flop_counter: the prompt with logits for its last position,
as a server asks for them; one generated token through the KV cache, attention over its context included).

    nice python benchmarks/serving.py                  # ~4 minutes on a loaded 2-core machine
    nice python benchmarks/serving.py --quick          # 2 layers, 5 rounds (a smoke test, ~1 minute)
    python benchmarks/serving.py --update-docs         # rewrite the tables in README.md and docs/serving.md

Writes results/serving/serving.json and results/serving/serving.md (`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import transformers as T

import hf_dgate
from hf_dgate.flops import count_flops, count_params
from hf_dgate.formats.gguf import write_gguf
from hf_dgate.formats.llama_cpp import compare_with_llama_cpp, load

SHAPES = {
    "non-uniform": {"multiple_of": 1},
    "rounded-32": {"multiple_of": {"neurons": 32}},
    "rounded-64": {"multiple_of": {"neurons": 64}},
    "uniform": {"shape": "uniform"},
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
def zero_pattern(model: torch.nn.Module, fractions: list[float], seed: int = 0, keep_one_head: bool = False) -> None:
    bank = hf_dgate.get_bank(model)
    gen = torch.Generator().manual_seed(seed)
    for gs, off in zip(bank.group_sets, bank.offsets):
        k = round(fractions[int(gs.layer)] * gs.n_groups)
        if keep_one_head and gs.target == "heads" and int(gs.layer) == 0:
            k = min(k, gs.n_groups - 1)
        dead = torch.randperm(gs.n_groups, generator=gen)[:k]
        bank.gammas[gs.target][:, off + dead] = 0.0


@torch.no_grad()
def decode_flops(model: torch.nn.Module, ids: list[int], context: int) -> int:
    """FLOPs of one generated token after `context` tokens: the layers, attention over the cached context and the
    output layer (torch.utils.flop_counter on the model itself, through its KV cache)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x | 4.x
    cache = getattr(model(input_ids=torch.tensor([ids[:context]]), use_cache=True), key)
    return count_flops(model, {"input_ids": torch.tensor([ids[context : context + 1]]), key: cache,
                               "logits_to_keep": 1})  # fmt: skip


def time_model(llm, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """Seconds for one batch of `prompt`, then for `new_tokens` single-token steps: by llama.cpp's own timers (the
    engine alone) and around the Python calls (adding llama-cpp-python's per-call work, e.g. copying logits)."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm.ctx)  # llama.cpp books a decode's time here (a server's sampler calls it)
    pp_wall = time.perf_counter() - t0
    tok = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([tok])
        llama_cpp.llama_synchronize(llm.ctx)
    tg_wall = time.perf_counter() - t0
    perf = llama_cpp.llama_perf_context(llm.ctx)
    assert perf.n_p_eval == len(prompt) and perf.n_eval == new_tokens, (perf.n_p_eval, perf.n_eval)
    return {"pp": perf.t_p_eval_ms / 1e3, "tg": perf.t_eval_ms / 1e3, "pp_wall": pp_wall, "tg_wall": tg_wall}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def command_flags(argv: list[str]) -> list[str]:
    """The flags that shaped the measurement (`--out` only says where it went)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        skip = a == "--out"
        if not skip:
            out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--prompt", type=int, default=128, help="Prompt length (tokens, one batch).")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--logits", choices=["last", "all"], default="last",
                    help="Logits of the prompt's last position (what a server computes) or of every one.")  # fmt: skip
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (off by default).")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/serving")
    ap.add_argument("--update-docs", action="store_true",
                    help="Only rewrite README.md's and docs/serving.md's tables from serving.json.")  # fmt: skip
    args = ap.parse_args()
    if args.update_docs:
        print("rewrote:", update_docs(os.path.join(os.path.dirname(__file__), "..")) or "nothing (up to date)")
        return
    if args.quick:
        args.layers, args.rounds = 2, 5
    T.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dgate-serving-")
    ids = torch.randint(0, 32000, (args.prompt + args.new_tokens,), generator=torch.Generator().manual_seed(1))
    prompt = ids[: args.prompt].tolist()
    prompt_in = {"input_ids": torch.tensor([prompt])}
    if args.logits == "last":
        prompt_in["logits_to_keep"] = 1
    context = args.prompt + args.new_tokens // 2  # attention FLOPs grow linearly: the mean generated token's

    models: dict[str, dict] = {}
    models["dense"] = {"torch": llama_small(args.layers), "sparsity": 0.0, "shape": "dense"}
    for s in args.sparsities:
        gated = hf_dgate.apply_dgate(llama_small(args.layers), hf_dgate.DGateConfig(target=["heads", "neurons"]))
        zero_pattern(gated, layer_fractions(s, args.layers))
        for shape in args.shapes:
            pruned = hf_dgate.export_pruned(gated, example_inputs={"input_ids": prompt_in["input_ids"][:, :32]},
                                            **SHAPES[shape])  # fmt: skip
            assert pruned.dgate_verification.exact, pruned.dgate_verification
            models[f"{int(s * 100)}% {shape}"] = {"torch": pruned, "sparsity": s, "shape": shape}
    # the floor: every neuron and every key/value head zero but one (llama.cpp needs one head to make a context)
    gated = hf_dgate.apply_dgate(llama_small(args.layers), hf_dgate.DGateConfig(target=["heads", "neurons"]))
    zero_pattern(gated, [1.0] * args.layers, keep_one_head=True)
    floor = hf_dgate.export_pruned(gated, example_inputs={"input_ids": prompt_in["input_ids"][:, :32]}, multiple_of=1)
    models["floor"] = {"torch": floor, "sparsity": 1.0, "shape": "floor"}
    rows = {}
    for name, m in models.items():
        path = os.path.join(work, name.replace("%", "").replace(" ", "_") + ".gguf")
        info = write_gguf(m["torch"], path, dtype=args.dtype)
        check = compare_with_llama_cpp(m["torch"], path, args.dtype)
        lay = info["layout"]
        rows[name] = {
            "sparsity": m["sparsity"], "shape": m["shape"], "params": count_params(m["torch"]),
            "flops_prompt": count_flops(m["torch"], prompt_in),
            "flops_token": decode_flops(m["torch"], ids.tolist(), context),
            "head_count": lay["head_count"], "head_count_kv": lay["head_count_kv"],
            "feed_forward_length": lay["feed_forward_length"],
            "gguf_bytes": os.path.getsize(path), "llama_cpp_max_abs_diff": check["max_abs_diff"],
            "llama_cpp_argmax_agree": check["argmax_agree"],
        }  # fmt: skip
        m["path"] = path
        print(f"{name:>18}: kv heads {lay['head_count_kv']}, ffn {lay['feed_forward_length']}, "
              f"llama.cpp vs torch {check['max_abs_diff']:.1e}", flush=True)  # fmt: skip
        del m["torch"]
    opts = dict(n_ctx=args.prompt + args.new_tokens + 8, n_threads=args.threads, n_batch=args.prompt,
                logits_all=args.logits == "all", flash_attn=args.flash_attn)  # fmt: skip
    llms = {name: load(m["path"], **opts) for name, m in models.items()}
    names = list(llms)
    for name in names:  # warm-up
        time_model(llms[name], prompt[:16], 2)
    per_round: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    t_start = time.time()
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            per_round[name].append(time_model(llms[name], prompt, args.new_tokens))
        print(f"round {r + 1}/{args.rounds} ({time.time() - t_start:.0f} s)", flush=True)
    dense = per_round["dense"]
    for name in names:
        row, mine = rows[name], per_round[name]
        row["flops_ratio_prompt"] = rows["dense"]["flops_prompt"] / row["flops_prompt"]
        row["flops_ratio_token"] = rows["dense"]["flops_token"] / row["flops_token"]
        for key, n_tok, flops_key in (("pp", args.prompt, "prompt"), ("tg", args.new_tokens, "token")):
            for suffix in ("", "_wall"):
                k = key + suffix
                row[f"{k}_tok_s"] = statistics.median(n_tok / t[k] for t in mine)
                q1, med, q3 = quartiles([d[k] / t[k] for t, d in zip(mine, dense)])  # paired per-round ratios
                row[f"{k}_speedup"], row[f"{k}_speedup_q1"], row[f"{k}_speedup_q3"] = med, q1, q3
                row[f"{k}_efficiency"] = med / row[f"flops_ratio_{flops_key}"]
        row["tg_ms_per_token"] = statistics.median(1e3 * t["tg"] / args.new_tokens for t in mine)
        row["tg_python_ms_per_token"] = statistics.median(1e3 * (t["tg_wall"] - t["tg"]) / args.new_tokens
                                                          for t in mine)  # fmt: skip
    meta = {
        "command": " ".join(["python benchmarks/serving.py", *command_flags(sys.argv[1:])]),
        "layers": args.layers, "rounds": args.rounds, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
        "decode_context": context, "logits": args.logits, "flash_attn": args.flash_attn,
        "dtype": args.dtype, "threads": args.threads, "platform": platform.platform(),
        "load_average": os.getloadavg(), "torch": torch.__version__, "transformers": T.__version__,
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }  # fmt: skip
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    text = markdown(meta, rows)
    with open(os.path.join(args.out, "serving.md"), "w") as f:
        f.write(text)
    print(text)


def markdown(meta: dict, rows: dict) -> str:
    lines = [
        f"`{meta['command']}`: {meta['layers']} layers, {meta['dtype']} GGUF, llama-cpp-python "
        f"{meta['llama_cpp_python']}, {meta['threads']} thread{'s' if meta['threads'] != 1 else ''}"
        f"{', flash attention' if meta.get('flash_attn') else ''}, "
        f"{meta['rounds']} rounds; prompt {meta['prompt_tokens']}"
        f" tokens in one batch (logits of {'the last position' if meta['logits'] == 'last' else 'every position'}),"
        f" then {meta['new_tokens']} generated tokens; load average at the end {meta['load_average'][0]:.1f}. "
        "Speed-ups are by llama.cpp's own timers: medians [quartiles] of the per-round ratios to the dense model. "
        "FLOPs (torch.utils.flop_counter): the prompt as llama.cpp computes it, and one generated token after "
        f"{meta['decode_context']} tokens (attention over the cache and the output layer included).",
        "",
        "| model | params | kv heads per layer | FFN widths | prompt tok/s | prompt speed-up | FLOPs ratio "
        "| speed-up / FLOPs | generate tok/s | generate speed-up | FLOPs ratio (token) | speed-up / FLOPs "
        "| speed-up / FLOPs, Python wall time (prompt, generate) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.1f}M | {r['head_count_kv']} | {r['feed_forward_length']} | "
            f"{r['pp_tok_s']:.0f} | {r['pp_speedup']:.2f}x [{r['pp_speedup_q1']:.2f}, {r['pp_speedup_q3']:.2f}] | "
            f"{r['flops_ratio_prompt']:.2f}x | **{r['pp_efficiency']:.2f}** | {r['tg_tok_s']:.1f} | "
            f"{r['tg_speedup']:.2f}x [{r['tg_speedup_q1']:.2f}, {r['tg_speedup_q3']:.2f}] | "
            f"{r['flops_ratio_token']:.2f}x | **{r['tg_efficiency']:.2f}** | "
            f"{r['pp_wall_efficiency']:.2f}, {r['tg_wall_efficiency']:.2f} |"
        )
    if "floor" in rows:
        f, d = rows["floor"], rows["dense"]
        lines += [
            "",
            f"What pruning cannot remove (`floor`: every neuron and all key/value heads but one zero, leaving the "
            f"embeddings, norms and output layer): {100 / f['pp_speedup']:.0f}% of the dense prompt time and "
            f"{100 / f['tg_speedup']:.0f}% of the dense generation time, for {100 / f['flops_ratio_prompt']:.1f}% and "
            f"{100 / f['flops_ratio_token']:.0f}% of the FLOPs. llama-cpp-python adds "
            f"{d['tg_python_ms_per_token']:.2f} ms per generated token around llama.cpp's "
            f"{d['tg_ms_per_token']:.2f} ms (dense).",
        ]
    return "\n".join(lines) + "\n"


LABELS = {
    "non-uniform": "non-uniform, exact widths (`--multiple-of 1`)",
    "rounded-32": "non-uniform, neurons to 32",
    "rounded-64": "non-uniform, neurons to 64",
    "uniform": "uniform (`--shape uniform`)",
    "rounded": "neurons to 128, kv heads to 2",
}
DOCS = {"README.md": "readme", os.path.join("docs", "serving.md"): "table"}
MARK = "<!-- generated: serving "


def readme_table(meta: dict, rows: dict, default: str) -> str:
    """The README's summary: speed-ups beside FLOPs ratios, from serving.json."""
    d = rows["dense"]
    lines = [
        f"Dense ({meta['dtype']}): {d['params'] / 1e6:.1f}M parameters, {d['pp_tok_s']:.0f} prompt tokens/s, "
        f"{d['tg_tok_s']:.1f} generated tokens/s (llama.cpp's timers, {meta['rounds']} paired rounds, load average "
        f"{meta['load_average'][0]:.1f}).",
        "",
        "| sparsity | export | parameters | prompt speed-up (FLOPs ratio) | generation speed-up (FLOPs ratio) |",
        "|---:|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if name in ("dense", "floor"):
            continue
        label = LABELS[r["shape"]] + (" (`--format gguf` default)" if r["shape"] == default else "")
        lines.append(
            f"| {round(100 * r['sparsity'])}% | {label} | {r['params'] / 1e6:.1f}M | "
            f"{r['pp_speedup']:.2f}x ({r['flops_ratio_prompt']:.2f}x) | "
            f"{r['tg_speedup']:.2f}x ({r['flops_ratio_token']:.2f}x) |"
        )
    lines += ["", "Speed-up divided by the FLOPs ratio (the goal: at least 0.9), lowest to highest over 25/50/75%:", ""]
    for shape, label in LABELS.items():
        eff = [(r["pp_efficiency"], r["tg_efficiency"]) for r in rows.values() if r["shape"] == shape]
        if eff:
            pp, tg = zip(*eff)
            lines.append(f"- {label}: prompt {min(pp):.2f} to {max(pp):.2f}, generation {min(tg):.2f} to {max(tg):.2f}")
    return "\n".join(lines)


def default_shape() -> str:
    """Which SHAPES entry `--format gguf` writes by default (its default rounding)."""
    from hf_dgate.formats.gguf import GGUF

    found = [k for k, v in SHAPES.items() if v.get("multiple_of") == GGUF.default_multiple_of and "shape" not in v]
    return found[0] if found else ""


def update_docs(root: str, check: bool = False) -> list[str]:
    """Rewrite the marked blocks of README.md and docs/serving.md from results/serving/serving.json; with `check`,
    only return the files whose blocks differ."""
    stale = []
    for name, kind in DOCS.items():
        path = os.path.join(root, name)
        with open(path) as f:
            old = f.read()
        lines, out, i = old.split("\n"), [], 0
        while i < len(lines):
            out.append(lines[i])
            if lines[i].startswith(MARK):
                results_dir, kind = lines[i][len(MARK) :].rstrip(" ->").split()
                with open(os.path.join(root, results_dir, "serving.json")) as f:
                    rec = json.load(f)
                j = lines.index("<!-- end generated -->", i)
                block = readme_table(rec["meta"], rec["rows"], default_shape()) if kind == "readme" else (
                    markdown(rec["meta"], rec["rows"]).rstrip("\n"))  # fmt: skip
                out.extend(block.split("\n"))
                out.append(lines[j])
                i = j
            i += 1
        text = "\n".join(out)
        if text != old:
            stale.append(name)
            if not check:
                with open(path, "w") as f:
                    f.write(text)
    return stale


if __name__ == "__main__":
    main()
