"""Compress a pretrained small Llama to a share of its block parameters: D-Gating against one-shot peers.

A character-level Llama is pretrained on Shakespeare once (cached in ~/.cache/hf_dgate/compress_bench), then each
method gets the same optimizer steps, batch and schedule (AdamW, cosine) to reach the same parameter budget:
- dgate: `DGateTrainer(target_params=...)` with its defaults (cost-weighted penalty at DGateConfig's lam 1e-4, the
  weakest groups zeroed a few at a time over the first 30% of the steps, the rest a finish that recovers);
- dgate+teacher: the same, distilling from the pretrained model (`teacher=`, logit KL at T = 2);
- dgate-flops: the defaults with `group_cost="flops"` (the penalty priced by FLOPs per token instead of parameters);
- dgate-steered: `budget_schedule="steered"` (the old default: lam steered, one cut at the last tenth);
- magnitude: one-shot, groups with the smallest weight norm (relative to their target's median) removed to the
  budget, then fine-tuned with the removed groups held at exactly zero;
- l0: hard-concrete L0 gates under CoFiPruning's Lagrangian target (`DGateConfig(method="l0",
  l0_target_sparsity=1 - fraction)`, log_alpha in its own group via `hf_dgate.optim.l0_optimizer`, which
  DGateTrainer builds); its target counts groups, not parameters, so its kept share is reported as it lands; the
  groups under the threshold at the last tenth of the steps are held at exactly zero (the finish): an exact export;
- wanda-sp: one-shot activation-aware score in the style of Wanda-sp / FLAP: for every weight a group removes,
  |W_ij| times the norm of input feature j over calibration batches, summed over the group; then the same fine-tune;
- taylor: one-shot first-order importance |dL/ds_g * s_g| of each group's scale on calibration batches (the group
  form of LLM-Pruner's Taylor score), then the same fine-tune;
- magnitude+teacher, taylor+teacher, wanda-sp+teacher: those one-shot cuts, fine-tuned with the same teacher as
  dgate+teacher;
- fisher+teacher: the one-shot form of dgate's default ranking (the sum over calibration batches of
  (s_g dL/ds_g)^2 per parameter of the group, compared across targets), fine-tuned with the teacher: the same
  scores without the gradual cut;
- scratch: the shape the magnitude cut leaves, re-initialised and trained for the same steps;
- dense: the pretrained model, nothing cut, trained for the same steps (one row: what the steps alone give).
Every export is checked exact; validation loss (nats per character) of the exported model on the held-out 10%.

    python benchmarks/compress.py --quick                       # a minute: tiny model, a few steps (a smoke run)
    nice python benchmarks/compress.py --data $DATA/shakespeare.txt --steps 400 --out results/compress
    # what ran on 2 CPU cores (docs/compress.md): --size small --block 64 --pretrain-steps 500 --steps 300 --batch 16
    python benchmarks/compress.py --render-tuning results/compress/tuning   # the schedule/lam tuning table
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers import logging as hf_logging

import hf_dgate
from hf_dgate.budget import budget_cut, group_costs, params_after
from hf_dgate.errors import ExportError
from hf_dgate.finish import FinishRecord, zero_exactly
from hf_dgate.optim import BLOCK_TARGET_LR
from hf_dgate.trainer import DGateTrainer

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hf_dgate", "compress_bench")
METHODS = ("dgate", "dgate+teacher", "dgate-flops", "dgate-steered", "l0", "magnitude", "taylor", "wanda-sp",
           "magnitude+teacher", "taylor+teacher", "wanda-sp+teacher", "fisher+teacher", "scratch", "dense")


def model_config(vocab: int, size: str) -> LlamaConfig:
    if size == "quick":
        return LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    if size == "small":  # what 2 shared CPU cores can pretrain and compress in well under an hour
        return LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=288, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=576, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip


def char_blocks(path: str, block: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if limit:
        text = text[:limit]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text]) if len(text) < 50_000 else _fast_ids(text, chars)
    n_val = len(ids) // 10
    train, val = ids[:-n_val], ids[-n_val:]
    cut = lambda x: x[: (len(x) // block) * block].view(-1, block)  # noqa: E731
    return cut(train), cut(val), len(chars)


def _fast_ids(text: str, chars: list[str]) -> torch.Tensor:
    table = {c: i for i, c in enumerate(chars)}
    return torch.tensor([table[c] for c in text])


def rows(blocks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b, "labels": b} for b in blocks]


def targs(out: str, steps: int, lr: float, batch: int, seed: int = 0) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, report_to=[],
        use_cpu=not torch.cuda.is_available(), save_strategy="no", disable_tqdm=True, logging_steps=max(1, steps // 5),
        seed=seed,
    )  # fmt: skip


@torch.no_grad()
def val_loss(model, val: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(val), batch):
        x = val[i : i + batch]
        total += float(model(input_ids=x, labels=x).loss) * len(x)
    return total / len(val)


def pretrained(cfg: LlamaConfig, train: torch.Tensor, steps: int, tag: str) -> LlamaForCausalLM:
    """The dense model every method starts from, trained once and cached."""
    path = os.path.join(CACHE, tag)
    if os.path.isfile(os.path.join(path, "config.json")):
        return LlamaForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x = train[torch.randint(0, len(train), (32,), generator=g)]
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    model.save_pretrained(path)
    return model


def block_budget(model, fraction: float) -> int:
    """Parameters the export may keep: everything outside the decoder blocks plus `fraction` of the blocks."""
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    return int(total - (1 - fraction) * blocks)


def fisher_scores(model, train: torch.Tensor, batches: int = 8) -> dict[str, torch.Tensor]:
    """One-shot form of D-Gating's saliency ranking: sum over calibration batches of (dL/dgamma_g * gamma_g)^2 =
    (s_g dL/ds_g)^2 per group, divided by its parameter cost (compared across targets without the median)."""
    bank = hf_dgate.get_bank(model)
    model.train()
    total = {t: torch.zeros(n) for t, n in bank.sizes.items()}
    for i in range(batches):
        for p in bank.parameters():
            p.grad = None
        x = train[i * 16 : (i + 1) * 16]
        model(input_ids=x, labels=x).loss.backward()
        for t in bank.targets:
            total[t] += (bank.gammas[t].grad[0] * bank.gammas[t][0]).detach().pow(2)
    model.zero_grad()
    costs = group_costs(bank)
    return {t: total[t] / costs[t].float() for t in bank.targets}


def taylor_scores(model, train: torch.Tensor, batches: int = 8) -> dict[str, torch.Tensor]:
    """|sum over calibration batches of dL/dgamma_g * gamma_g| = |dL/ds_g * s_g| for every group."""
    bank = hf_dgate.get_bank(model)
    model.train()
    for p in bank.parameters():
        p.grad = None
    for i in range(batches):
        x = train[i * 16 : (i + 1) * 16]
        model(input_ids=x, labels=x).loss.backward()
    scores = {t: (bank.gammas[t].grad[0] * bank.gammas[t][0]).abs().detach() for t in bank.targets}
    model.zero_grad()
    return scores


@torch.no_grad()
def activation_scores(model, train: torch.Tensor, batches: int = 8) -> dict[str, torch.Tensor]:
    """Wanda-sp-style group scores: sum over the weights a group removes of |W_ij| * ||X_j||, where ||X_j|| is the
    L2 norm of the layer's input feature j over every token of the calibration batches (the structured form of
    Wanda's |W| * ||X||; FLAP ranks the same columns by their input's variation). Read from the bank's own group
    slices, so heads and neurons are scored through the weights their export would delete."""
    bank = hf_dgate.get_bank(model)
    mods = {sl.module for gs in bank.group_sets for sl in gs.removable or gs.primary if sl.axis is not None}
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq[name] = sq.get(name, 0) + (x * x).sum(0)

        return pre

    named = dict(model.named_modules())
    handles = [named[m].register_forward_pre_hook(hook(m)) for m in mods if isinstance(named[m], torch.nn.Linear)]
    model.eval()
    for i in range(batches):
        model(input_ids=train[i * 16 : (i + 1) * 16])
    for h in handles:
        h.remove()
    scores = {t: torch.zeros(n) for t, n in bank.sizes.items()}
    for gs, off in zip(bank.group_sets, bank.offsets):
        for sl in gs.removable or gs.primary:
            if sl.module not in sq or sl.param != "weight" or not isinstance(sl.axis, int):
                continue  # biases and norms carry no input activation; stacked experts are not in this model
            w = getattr(named[sl.module], sl.param).detach().float()
            metric = w.abs() * sq[sl.module].sqrt()[None, :]  # (out, in): Wanda's per-weight score
            per_pos = metric.sum(1 - sl.axis)  # one value per position along the sliced axis
            keep = sl.index >= 0
            scores[gs.target].index_add_(0, sl.index[keep] + off, per_pos[keep])
    return scores


def fine_tune_held(model, masks, args, data, val_rows, teacher=None) -> DGateTrainer:
    """Train with the masked groups held at exactly zero from the first step (lam 0): the one-shot peers'
    fine-tune, through the same finish machinery D-Gating ends with (and its distillation, given a teacher)."""
    # gated_lr: the gates' momentum-SGD group at 0.2, as in the dgate rows (DGateTrainer's "auto" gives it to
    # heads and neurons only with target_params, which this fine-tune does not set)
    tr = DGateTrainer(model, args, train_dataset=data, eval_dataset=val_rows, finish_steps=0, teacher=teacher,
                      gated_lr=BLOCK_TARGET_LR)  # fmt: skip
    zero_exactly(tr.dgate_bank, masks)
    tr._dgate_zero_masks = masks
    zeroed = {t: int(m.sum()) for t, m in masks.items()}
    tr.dgate_finish = FinishRecord(start_step=0, steps=args.max_steps, zeroed=zeroed)
    tr.train()
    return tr


def run_method(method, base, fraction, train, val, args, run_dir) -> dict:
    cfg = hf_dgate.DGateConfig(target=["heads", "neurons"], lam=args.lam)
    model = copy.deepcopy(base)
    budget = block_budget(model, fraction)
    data, val_rows = rows(train), rows(val[:64])
    run_dir = os.path.join(run_dir, f"seed{args.seed}")  # (runs of other seeds may run side by side)
    ta = targs(os.path.join(run_dir, f"{method}_{fraction}"), args.steps, args.lr, args.batch, args.seed)
    t0 = time.time()
    if method.startswith("dgate"):
        teacher = copy.deepcopy(base) if method == "dgate+teacher" else None
        kw = {"group_cost": "flops"} if method == "dgate-flops" else {}
        kw["budget_schedule"] = "steered" if method == "dgate-steered" else args.schedule
        if args.ranking is not None:
            kw["budget_ranking"] = args.ranking
        if args.finish_steps is not None:
            kw["finish_steps"] = args.finish_steps
        tr = DGateTrainer(model, ta, dgate_config=cfg, target_params=budget, teacher=teacher, train_dataset=data,
                          eval_dataset=val_rows, **kw)  # fmt: skip
        tr.train()
        print(f"{method} {fraction}: Finish: {tr.dgate_finish.describe()}", flush=True)
    elif method == "l0":
        l0cfg = hf_dgate.DGateConfig(target=["heads", "neurons"], method="l0", l0_target_sparsity=1 - fraction,
                                     l0_droprate_init=0.1)  # fmt: skip
        # the same finish as D-Gating's old default (the last tenth): what L0 has under the threshold then is held at
        # exactly zero while the rest trains, so its export is exact; its Lagrangian needs the run to reach its target
        tr = DGateTrainer(model, ta, dgate_config=l0cfg, train_dataset=data, eval_dataset=val_rows,
                          finish_steps=max(1, args.steps // 10))  # fmt: skip
        tr.train()
    else:
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.0))
        bank = hf_dgate.get_bank(model)
        peer, _, with_teacher = method.partition("+")
        scores = ONE_SHOT.get(peer)
        scores = scores(model, train) if scores else None
        masks, _ = budget_cut(bank, budget, scores, relative=peer != "fisher")
        if method == "dense":  # the reference: nothing cut, the same steps of training
            masks = {t: torch.zeros_like(m) for t, m in masks.items()}
        if method == "scratch":
            model.apply(model._init_weights)
        tr = fine_tune_held(model, masks, ta, data, val_rows, copy.deepcopy(base) if with_teacher else None)
    bank = hf_dgate.get_bank(model)
    total, kept = params_after(bank, {t: bank.zero_groups(t) for t in bank.targets})
    out = os.path.join(run_dir, f"export_{method}_{fraction}")
    try:
        summary, refused = tr.export_pruned(out, overwrite=True, measure=False), ""
    except ExportError as e:  # (L0 has no finish: a grey group can be left) measured anyway, marked not exact
        summary, refused = tr.export_pruned(out, overwrite=True, measure=False, allow_inexact=True), str(e)
    exported = LlamaForCausalLM.from_pretrained(summary["path"]) if summary.get("native") else None
    loss = val_loss(exported if exported is not None else model, val)
    return {
        "method": method, "block_fraction": fraction, "budget": budget, "params_total": total, "params_kept": kept,
        "kept_fraction": kept / total, "val_loss": loss, "exact": bool(summary["verification"]["exact"]),
        "heads_zero": int(bank.zero_groups("heads").sum()), "neurons_zero": int(bank.zero_groups("neurons").sum()),
        "seconds": time.time() - t0, "export_refused": refused, "seed": args.seed,
        "ranking": getattr(getattr(tr, "dgate_finish", None), "ranking", None),
    }  # fmt: skip


def _ranking(row: dict) -> str:
    """What a D-Gating row's budget cut was ranked by (rows from before the ranking was recorded: norms, the only
    ranking then); blank for the one-shot peers (their scorer is their name)."""
    if not row["method"].startswith("dgate") or row["method"].startswith("dgate-steered"):
        return ""
    return row.get("ranking") or "norm"


ONE_SHOT = {"magnitude": None, "taylor": taylor_scores, "wanda-sp": activation_scores, "fisher": fisher_scores}


def cut_losses(base, train: torch.Tensor, val: torch.Tensor, fractions: list[float], out: str) -> str:
    """What each one-shot ranking cuts from the pretrained model and the validation loss right after the cut (no
    training): heads and neurons kept per layer. The magnitude cut is also what D-Gating's norm ranking cuts at its
    first step (every gate is 1 there, so its norms are the weight norms); `fisher` is the one-shot form of its
    saliency ranking. Written to `<out>/cut_loss.md`."""
    lines = [f"Pretrained model, no cut: validation loss {val_loss(base, val):.4f}", "",
             "| block params kept | ranking | val loss right after the cut | heads kept per layer | "
             "neurons kept per layer |", "|---|---|---|---|---|"]  # fmt: skip
    for fraction in fractions:
        for peer, score in ONE_SHOT.items():
            model = copy.deepcopy(base)
            hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.0))
            bank = hf_dgate.get_bank(model)
            masks, _ = budget_cut(bank, block_budget(model, fraction), score(model, train) if score else None,
                                  relative=peer != "fisher")  # fmt: skip
            zero_exactly(bank, masks)
            layers = len(model.model.layers)
            heads = (~masks["heads"]).view(layers, -1).sum(1).tolist()
            neurons = (~masks["neurons"]).view(layers, -1).sum(1).tolist()
            lines.append(f"| {fraction:.0%} | {peer} | {val_loss(model, val):.4f} | {heads} | {neurons} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    with open(os.path.join(out, "cut_loss.md"), "w") as f:
        f.write(table + "\n")
    return table


def markdown(results: list[dict], dense: float) -> str:
    lines = [f"dense (pretrained, no compression): val loss {dense:.4f}", "",
             "| block params kept | method | seed | params kept | heads zero | neurons zero | val loss | exact | "
             "cut ranked by |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(results, key=lambda r: (-r["block_fraction"], r.get("seed", 0), r["val_loss"])):
        lines.append(
            f"| {r['block_fraction']:.0%} | {r['method']} | {r.get('seed', 0)} | {r['params_kept']:,} "
            f"({r['kept_fraction']:.1%}) | {r['heads_zero']} | {r['neurons_zero']} | {r['val_loss']:.4f} | "
            f"{'yes' if r['exact'] else 'NO'} | {_ranking(r)} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], dense: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(sorted(dict.fromkeys(r["method"] for r in results))):
        by_f: dict = {}  # per budget: the kept fraction (the first seed's) and every seed's loss
        for r in sorted(results, key=lambda r: r.get("seed", 0)):
            if r["method"] == m:
                by_f.setdefault(r["block_fraction"], (r["kept_fraction"], []))[1].append(r["val_loss"])
        pts = sorted((x, sum(v) / len(v), min(v), max(v)) for x, v in by_f.values())
        if m == "dense":
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k*", ms=10, label="dense + the same steps")
        elif pts:
            style = "o-" if m.startswith("dgate") else "s--"
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, fmt=style, color=colors[i % 20],
                        capsize=3, label=m)  # fmt: skip
    ax.axhline(dense, color="k", ls=":", lw=1, label="dense (pretrained, no steps)")
    ax.set_xlabel("parameters kept (fraction of the model)")
    ax.set_ylabel("validation loss (nats / char; mean, bars: min - max over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_rows(out: str, name: str) -> list[dict]:
    """The rows of `<name>.jsonl`, each with its training seed (rows written before seeds were recorded: the run's)."""
    with open(os.path.join(out, f"{name}.meta.json")) as f:
        seed = json.load(f).get("seed", 0)
    with open(os.path.join(out, f"{name}.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r.setdefault("seed", seed)
        r.setdefault("source", name)
    return rows


DEFAULT_ROW = "dgate+teacher (saliency)"  # the defaults of items 1-3: what the goal is judged on


def seed_summary(results: list[dict]) -> tuple[str, dict]:
    """Per method and budget: mean, min and max of the validation loss over the seeds run (a markdown table), and
    the verdict per budget: the lowest mean among the methods run on every seed that DEFAULT_ROW ran on."""
    cells: dict = {}
    for r in results:  # D-Gating rows are labelled with their cut's ranking: rows of both never share a cell
        m = f"{r['method']} ({_ranking(r)})" if _ranking(r) else r["method"]
        cells.setdefault((m, r["block_fraction"]), {})[r["seed"]] = r["val_loss"]
    fractions = sorted({f for _, f in cells if f < 1.0}, reverse=True)
    methods = sorted({m for m, _ in cells}, key=lambda m: (m == "dense", m))
    lines = ["| method | " + " | ".join(f"{f:.0%} kept: mean (min - max, seeds)" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]  # fmt: skip
    for m in methods:
        row = []
        for f in fractions if m != "dense" else [1.0]:
            v = cells.get((m, f))
            if not v:
                row.append("")
                continue
            xs = list(v.values())
            seeds = ",".join(str(s) for s in sorted(v))
            row.append(f"{sum(xs) / len(xs):.4f} ({min(xs):.4f} - {max(xs):.4f}, {seeds})")
        if m == "dense":
            row = [row[0] + " (100% kept)"] + [""] * (len(fractions) - 1)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    verdict = {}
    for f in fractions:
        ref = set(cells.get((DEFAULT_ROW, f), {}))
        if not ref:
            continue
        means = {m: sum(v[s] for s in ref) / len(ref) for (m, g), v in cells.items() if g == f and ref <= set(v)}
        best = min(means, key=means.get)
        peers = {m: x for m, x in means.items() if not m.startswith("dgate")}
        peer = min(peers, key=peers.get) if peers else None
        verdict[f] = {"seeds": sorted(ref), "best": best, "means": means, "best_peer": peer}
        gap = f"; best peer {peer} {peers[peer]:.4f}" if peer else ""
        lines.append("")
        lines.append(f"{f:.0%} kept, mean over seeds {sorted(ref)}: best {best} ({means[best]:.4f}); "
                     f"{DEFAULT_ROW} {means[DEFAULT_ROW]:.4f}{gap}.")  # fmt: skip
    return "\n".join(lines), verdict


def render(out: str, name: str, also: list[str] = (), merge: list[str] = ()) -> list[dict]:
    """Table (markdown), plot and one JSON from the rows in `<name>.jsonl` (the last row per method, fraction and
    seed); `merge`: other runs' names whose rows join as the same methods (e.g. other seeds); `also`: other runs'
    names (e.g. another --lam) whose rows join as "<method> (<name>)". With more than one seed the markdown starts
    with the mean and range per method and budget."""
    with open(os.path.join(out, f"{name}.meta.json")) as f:
        meta = json.load(f)
    rows_by_key: dict = {}
    for source in [*merge, name]:
        for r in _read_rows(out, source):
            rows_by_key[(r["method"], r["block_fraction"], r["seed"])] = r
    for other in also:
        for r in _read_rows(out, other):
            r["method"] = f"{r['method']} ({other})"
            rows_by_key[(r["method"], r["block_fraction"], r["seed"])] = r
    results = list(rows_by_key.values())
    dense = meta["dense_val_loss"]
    table = markdown(results, dense)
    verdict = None
    if len({r["seed"] for r in results}) > 1:
        summary, verdict = seed_summary(results)
        table = f"{summary}\n\nEvery run:\n\n{table}"
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "merged": list(merge), "verdict": verdict, "results": results}, f, indent=2,
                  default=str)  # fmt: skip
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    plot(results, dense, os.path.join(out, f"{name}.png"))
    print(table)
    return results


def render_tuning(folder: str) -> str:
    """The tuning table (`<folder>/tuning.md`) from `<folder>/runs.json` (each run's settings) and its rows: one line
    per run and seed. A run's rows are `<name>.jsonl`, or `file` (relative to the folder: a main table's run) filtered
    to its method; runs that share a `group` get the mean over their lines per budget below the table."""
    with open(os.path.join(folder, "runs.json")) as f:
        spec = json.load(f)
    lines = [f"Common flags: `{spec['common']}`; D-Gating, budget_schedule='gradual'. Each cell: validation loss "
             "(parameters kept).", "",
             "| run | method | cut ranked by | lam | --finish-steps (cut over the first) | seed | 75% | 50% | 25% |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict = {}
    for run in spec["runs"]:
        path = os.path.join(folder, run.get("file", f"{run['name']}.jsonl"))
        meta_path = path[: -len(".jsonl")] + ".meta.json"
        seed = run.get("seed", 0)
        if os.path.isfile(meta_path) and "seed" not in run:
            with open(meta_path) as f:
                seed = json.load(f).get("seed", 0)
        cells: dict = {}
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r["method"] == run["method"]:
                    cells.setdefault(r.get("seed", seed), {})[r["block_fraction"]] = r
        cut = 300 - run["finish_steps"]
        for sd, by_f in sorted(cells.items()):
            lines.append(
                f"| {run['name']} | {run['method']} | {run.get('ranking', 'norm')} | {run['lam']:g} | "
                f"{run['finish_steps']} ({cut} steps) | {sd} | "
                + " | ".join(f"{by_f[fr]['val_loss']:.4f} ({by_f[fr]['kept_fraction']:.1%})" if fr in by_f
                             else "not run" for fr in (0.75, 0.5, 0.25)) + " |"
            )  # fmt: skip
            if "group" in run:
                for fr, r in by_f.items():
                    groups.setdefault(run["group"], {}).setdefault(fr, {})[sd] = r["val_loss"]
    if groups:
        lines += ["", "| group | 75%: mean (seeds) | 50%: mean (seeds) | 25%: mean (seeds) |", "|---|---|---|---|"]
        for g, by_f in groups.items():
            cell = [f"{sum(v.values()) / len(v):.4f} ({','.join(map(str, sorted(v)))})" if (v := by_f.get(fr))
                    else "" for fr in (0.75, 0.5, 0.25)]  # fmt: skip
            lines.append(f"| {g} | " + " | ".join(cell) + " |")
    table = "\n".join(lines)
    with open(os.path.join(folder, "tuning.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = os.environ.get("DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    p.add_argument("--data", default=os.path.join(data, "shakespeare.txt"), help="a text file (default: $DATA)")
    p.add_argument("--quick", action="store_true", help="tiny model, 30k characters, a few steps: a smoke run")
    p.add_argument(
        "--size",
        default="base",
        choices=("base", "small"),
        help="base: 4 layers, hidden 192 (1.7 M); small: 4 layers, hidden 96 (0.4 M)",
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per method (same for every method)")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--block", type=int, default=128, help="characters per training window")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=1e-4, help="D-Gating's lam (DGateConfig's default)")
    p.add_argument("--schedule", default="gradual", choices=("gradual", "steered"), help="dgate's budget_schedule")
    p.add_argument("--ranking", default=None, choices=("saliency", "norm"), help="dgate's budget_ranking")
    p.add_argument("--finish-steps", type=int, default=None, help="dgate's finish_steps (default: its 'auto')")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order, L0 samples)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several training seeds, one after another")
    p.add_argument("--out", default="results/compress")
    p.add_argument("--name", default=None, help="file stem in --out (default compress, or compress_quick)")
    p.add_argument("--render", action="store_true", help="only redraw table and plot from <out>/<name>.jsonl")
    p.add_argument("--also", nargs="*", default=[], help="with --render: other runs' names to add to table and plot")
    p.add_argument("--merge", nargs="*", default=[], help="with --render: other runs' names whose rows join as the "
                   "same methods (other seeds): the table gains the mean and range per method and budget")
    p.add_argument("--cut-loss", action="store_true", help="only the one-shot cuts' loss before training (cut_loss.md)")
    p.add_argument("--render-tuning", metavar="DIR", help="only write DIR/tuning.md from DIR/runs.json and its runs")
    args = p.parse_args()
    if args.render_tuning:
        render_tuning(args.render_tuning)
        return
    if args.render:
        render(args.out, args.name or ("compress_quick" if args.quick else "compress"), args.also, args.merge)
        return
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.quick:
        args.steps, args.pretrain_steps, args.batch = min(args.steps, 20), min(args.pretrain_steps, 60), 8
    block = 64 if args.quick else args.block
    train, val, vocab = char_blocks(args.data, block, 30_000 if args.quick else None)
    size = "quick" if args.quick else args.size
    cfg = model_config(vocab, size)
    tag = f"{'llama4x192' if size == 'base' else size}_{args.pretrain_steps}" + ("" if block == 128 else f"_b{block}")
    base = pretrained(cfg, train, args.pretrain_steps, tag)
    dense = val_loss(base, val)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or ("compress_quick" if args.quick else "compress")
    run_dir = os.path.join(CACHE, "runs", tag, name)  # (and per seed: runs side by side never share a folder)
    meta = {"quick": args.quick, "size": size, "block": block, "steps": args.steps,
            "pretrain_steps": args.pretrain_steps, "batch": args.batch, "lr": args.lr,
            "lam": args.lam, "seed": (args.seeds or [args.seed])[0], "dense_val_loss": dense,
            "val_characters": int(val.numel())}  # fmt: skip
    if args.cut_loss:
        cut_losses(base, train, val, args.fractions, args.out)
        return
    with open(os.path.join(args.out, f"{name}.meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    results = []
    for seed in args.seeds or [args.seed]:
        args.seed = seed
        for i, fraction in enumerate(args.fractions):
            for method in args.methods:
                if method == "dense" and i > 0:
                    continue  # one reference row per seed: the whole model, the same steps
                r = run_method(method, base, 1.0 if method == "dense" else fraction, train, val, args, run_dir)
                print(json.dumps(r), flush=True)
                results.append(r)
                with open(os.path.join(args.out, f"{name}.jsonl"), "a") as f:  # each row as it lands (parallel runs)
                    f.write(json.dumps(r) + "\n")
    results = render(args.out, name)
    if not all(math.isfinite(r["val_loss"]) for r in results):
        raise SystemExit("a method diverged (NaN validation loss)")


if __name__ == "__main__":
    main()
