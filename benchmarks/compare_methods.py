"""Accuracy-vs-sparsity trade-off of D-Gating against its baselines, two settings, one run on one machine.

Settings (issue 6, requirement 3; the paper's Fig. 5 / Fig. 7 and App. C.3 protocol, at a reduced CPU scale):

* ``lenet``: LeNet-300-100 input-feature selection (784 groups on Fashion-MNIST, 64 on scikit-learn digits), trained
  with `examples/feature_selection.py`'s plain SGD loop (`train_loop`) and evaluated with its `accuracy`.
* ``nanogpt``: character GPT-2 attention heads on Shakespeare, the `tiny` preset of `examples/nanogpt_shakespeare.py`
  (data windows from its `read_text`/`make_datasets`), trained by a short AdamW loop written here (the example's
  CLI only knows 'dgate'/'direct'; this loop runs every method the same way).

Methods (``method`` column of the CSV):

* ``dgate D=2|3|4``: D-Gating, sparsity read off the trained model (||theta_g|| < threshold), no pruning step.
* ``direct+MP``: the direct non-smooth penalty lam * sum ||theta_g||_2 (DGateConfig(method='direct')), then
  `hf_dgate.magnitude_prune(model, ratio)` over a grid of ratios; the curve takes the best accuracy over lam at
  each ratio (App. C.3).
* ``l0``: hard-concrete L0 gates (method='l0') run as their users run them: log_alpha in its own parameter group at a
  larger rate (`hf_dgate.optim.l0_optimizer`), a drop rate at init (`l0_droprate_init`: 0.5 for LeNet's inputs as in
  Louizos et al., 0.1 for heads), the penalty per training example (`l0_train_size` = N, lam / N * expected L0);
  sparsity from the deterministic test-time gates. ``l0+MP``: the same models with magnitude pruning on top, best
  over lam per ratio.
* ``l0 target``: the same gates with CoFiPruning's Lagrangian toward a target sparsity (`l0_target_sparsity`, the
  ``target`` column; multipliers trained by ascent; NanoGPT ramps the target up over the first half of training, as
  CoFi's Lagrangian warm-up), one run per target, sparsity from the test-time gates.
* ``dense+MP``: lam = 0 (no penalty), magnitude pruning of the dense model.

Outputs under --output-dir: ``compare_methods.csv`` (one row per task, method, lam, prune ratio: sparsity,
accuracy), per-task CSVs, ``compare_methods.json`` (meta) and ``compare_methods.png`` (both panels).

    python benchmarks/compare_methods.py --data-dir $DATA/fashion-mnist \
        --data-file $DATA/shakespeare.txt                       # default scale (CPU tens of minutes)
    python benchmarks/compare_methods.py --quick --dataset digits --data-file FILE --output-dir /tmp/cm   # seconds
    python benchmarks/compare_methods.py --task lenet ... ; ... --task nanogpt ... ; ... --merge-only
    python benchmarks/compare_methods.py --task lenet --methods l0 "l0 target" ...   # re-run only L0, keep the rest
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import feature_selection as fs  # noqa: E402  (examples/feature_selection.py)
from common import cosine_lr, load_images, markdown_table, pyplot, subset  # noqa: E402

import hf_dgate  # noqa: E402
from hf_dgate.models import LeNet300100  # noqa: E402
from hf_dgate.threads import THREADS_HELP, configure_threads  # noqa: E402

COLUMNS = [
    "task",
    "method",
    "depth",
    "lam",
    "target",
    "prune_ratio",
    "sparsity",
    "accuracy",
    "groups_zero",
    "groups_total",
    "on_curve",
    "train_s",
]
TARGET = {"lenet": "features", "nanogpt": "heads"}
RUN_LABELS = ("dense+MP", "dgate", "direct+MP", "l0", "l0 target")  # what --methods selects


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="both", choices=["both", "lenet", "nanogpt"])
    p.add_argument("--merge-only", action="store_true", help="only merge per-task CSVs into the table and plot")
    p.add_argument(
        "--output-dir",
        default="runs/compare_methods",
        help="where result files go (results/compare_methods holds the committed ones: pass it to regenerate them)",
    )
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny models, few steps, 2 lams, 4 ratios (compares nothing)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=RUN_LABELS,
        help="train only these (l0 also gives l0+MP); the other methods' rows are kept from the task's CSV",
    )
    # LeNet-300-100 feature selection
    p.add_argument("--dataset", default="fashion-mnist", choices=["digits", "fashion-mnist", "mnist"])
    p.add_argument("--data-dir", default=None, help="gzipped IDX files (Fashion-MNIST/MNIST)")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lenet-lams", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="dgate/direct lams")
    p.add_argument("--lenet-l0-lams", type=float, nargs="+", default=[10, 30, 100], help="per example (lam / N)")
    p.add_argument("--lenet-l0-targets", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    p.add_argument("--lenet-l0-lr", type=float, default=1.0, help="log_alpha's SGD rate (l0_optimizer)")
    p.add_argument("--lenet-l0-droprate", type=float, default=0.5, help="l0_droprate_init (Louizos: 0.5 for inputs)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=128)
    # NanoGPT heads
    p.add_argument("--data-file", default=None, help="plain-text corpus (Shakespeare)")
    p.add_argument("--gpt-steps", type=int, default=250)
    p.add_argument("--gpt-lams", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="dgate/direct lams")
    p.add_argument("--gpt-l0-lams", type=float, nargs="+", default=[10, 30, 100], help="per example (lam / N)")
    p.add_argument("--gpt-l0-targets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--gpt-l0-lr", type=float, default=0.1, help="log_alpha's AdamW rate (l0_optimizer)")
    p.add_argument("--gpt-l0-droprate", type=float, default=0.1, help="l0_droprate_init (0.5 measured worse)")
    p.add_argument(
        "--gpt-l0-target-ramp", type=float, default=0.5, help="fraction of the steps over which the target rises from 0"
    )
    p.add_argument("--gpt-batch-size", type=int, default=32)
    p.add_argument("--gpt-lr", type=float, default=5e-3)
    p.add_argument("--gpt-layers", type=int, default=4)
    p.add_argument("--gpt-heads", type=int, default=8)
    p.add_argument("--gpt-embd", type=int, default=96)
    p.add_argument("--gpt-block", type=int, default=64)
    p.add_argument("--gpt-eval-samples", type=int, default=200)
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(
            depths=[2, 3, 4],
            ratios=[0.0, 0.3, 0.6, 0.9],
            train_subset=600,
            epochs=2,
            lenet_lams=[1e-2, 1e-1],
            lenet_l0_lams=[10, 100],
            lenet_l0_targets=[0.5],
            gpt_steps=15,
            gpt_lams=[1e-2, 1e-1],
            gpt_l0_lams=[10, 100],
            gpt_l0_targets=[0.5],
            gpt_batch_size=8,
            gpt_layers=2,
            gpt_heads=4,
            gpt_embd=32,
            gpt_block=32,
            gpt_eval_samples=20,
        )
        args = p.parse_args(argv)
    return args


def method_runs(depths, lams, l0_lams, l0_targets=(), only=None):
    """(label, DGateConfig method, depth, lam, L0 target sparsity, prune afterwards?) for every training run of one
    task; `only`: the RUN_LABELS to keep (None: all)."""
    runs = [("dense+MP", "direct", 2, 0.0, None, True)]
    for i, lam in enumerate(lams):  # lam-major, L0 interleaved: a run cut short still covers every method
        runs += [(f"dgate D={d}", "dgate", d, lam, None, False) for d in depths]
        runs.append(("direct+MP", "direct", 2, lam, None, True))
        if i < len(l0_lams):
            runs.append(("l0", "l0", 2, l0_lams[i], None, True))
    runs += [("l0", "l0", 2, lam, None, True) for lam in l0_lams[len(lams) :]]
    runs += [("l0 target", "l0", 2, 0.0, t, False) for t in l0_targets]
    return [r for r in runs if only is None or r[0].split(" D=")[0] in only]


def run_config(target, method, depth, lam, l0_target, args, n_train, droprate):
    """The DGateConfig of one run; L0 gets its practice: drop-rate init and lam per example or a target sparsity."""
    extra = {}
    if method == "l0":
        extra["l0_droprate_init"] = droprate
        if l0_target is None:
            extra["l0_train_size"] = n_train
        else:
            extra["l0_target_sparsity"] = l0_target
    return hf_dgate.DGateConfig(target=target, depth=depth, lam=lam, method=method, threshold=args.threshold, **extra)


def kept_rows(args, task):
    """With --methods: the rows of the methods not re-run, from the task's CSV in --output-dir."""
    path = os.path.join(args.output_dir, f"{task}.csv")
    if args.methods is None or not os.path.isfile(path):
        return []
    rerun = set(args.methods) | ({"l0+MP"} if "l0" in args.methods else set())
    return [r for r in read_csv(path) if r["method"].split(" D=")[0] not in rerun]


def measure(model, target, evaluate, label, depth, lam, prune, ratios, task, train_s, l0_target=None):
    """Rows for one trained model: as trained, and (prune=True) after magnitude pruning at every ratio."""
    rows = []

    def row(method, ratio):
        rep = hf_dgate.sparsity_report(model).targets[target]
        return {
            "task": task,
            "method": method,
            "depth": depth,
            "lam": lam,
            "target": "" if l0_target is None else l0_target,
            "prune_ratio": ratio,
            "sparsity": rep.sparsity,
            "accuracy": evaluate(model),
            "groups_zero": rep.zero,
            "groups_total": rep.groups,
            "train_s": round(train_s, 1),
        }

    if not prune or label == "l0":
        rows.append(row(label, ""))  # dgate / l0: sparsity read off directly
    if prune:
        mp_label = "l0+MP" if label == "l0" else label
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for ratio in ratios:
            hf_dgate.magnitude_prune(model, ratio, target=target)
            rows.append(row(mp_label, ratio))
            model.load_state_dict(state)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (b) LeNet-300-100 input features
# ----------------------------------------------------------------------------------------------------------------
def run_lenet(args):
    data = load_images(args.dataset, args.data_dir)
    xtr, ytr = subset(*data["train"], args.train_subset, args.seed)
    xte, yte = data["test"]
    xtr, xte = xtr.flatten(1), xte.flatten(1)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    print(f"[lenet] {args.dataset}: {len(ytr)} train / {len(yte)} test, {xtr.shape[1]} features", flush=True)
    loop_args = SimpleNamespace(lr=args.lr, momentum=args.momentum, epochs=args.epochs, batch_size=args.batch_size)
    rows = kept_rows(args, "lenet")
    runs = method_runs(args.depths, args.lenet_lams, args.lenet_l0_lams, args.lenet_l0_targets, args.methods)
    for label, method, depth, lam, l0_target, prune in runs:
        torch.manual_seed(args.seed)
        model = LeNet300100(in_features=xtr.shape[1], num_classes=n_classes)
        droprate = args.lenet_l0_droprate
        hf_dgate.apply_dgate(model, run_config("features", method, depth, lam, l0_target, args, len(ytr), droprate))
        # SGD + momentum, cosine lr, loss + hf_dgate.penalty(model); L0: log_alpha in its own SGD group
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        if method == "l0":
            hf_dgate.optim.l0_optimizer(opt, model, lr=args.lenet_l0_lr)
        t0 = time.time()
        fs.train_loop(model, xtr, ytr, loop_args, opt)
        train_s = time.time() - t0
        evaluate = lambda m: fs.accuracy(m, xte, yte)  # noqa: E731
        rows += measure(
            model, "features", evaluate, label, depth, lam, prune, args.ratios, "lenet", train_s, l0_target
        )
        write_csv(os.path.join(args.output_dir, "lenet.csv"), mark_curves(rows))  # partial results survive
        what = f"target={l0_target:g}" if l0_target is not None else f"lam={lam:g}"
        print(f"[lenet] {label} {what}: {rows[-1]['accuracy']:.4f} ({train_s:.1f}s)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (a) NanoGPT attention heads
# ----------------------------------------------------------------------------------------------------------------
def run_nanogpt(args):
    import nanogpt_shakespeare as ng  # examples/nanogpt_shakespeare.py (imports transformers: seconds)
    from transformers import GPT2Config, GPT2LMHeadModel

    ds_args = SimpleNamespace(val_fraction=0.1, block_size=args.gpt_block, eval_samples=args.gpt_eval_samples)
    chars, train_ds, val_ds = ng.make_datasets(ng.read_text(args.data_file), ds_args)
    val_x = torch.stack([val_ds[i]["input_ids"] for i in range(len(val_ds))])
    print(f"[nanogpt] {len(chars)} chars vocab, {len(train_ds)} train / {len(val_ds)} val windows", flush=True)

    @torch.no_grad()
    def char_accuracy(model):  # next-character accuracy on the validation windows (the example's metric)
        model.eval()
        hits = 0
        for i in range(0, len(val_x), 64):
            x = val_x[i : i + 64]
            hits += (model(input_ids=x).logits[:, :-1].argmax(-1) == x[:, 1:]).sum().item()
        model.train()
        return hits / (val_x.shape[0] * (val_x.shape[1] - 1))

    rows = kept_rows(args, "nanogpt")
    runs = method_runs(args.depths, args.gpt_lams, args.gpt_l0_lams, args.gpt_l0_targets, args.methods)
    for label, method, depth, lam, l0_target, prune in runs:
        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(chars),
                n_positions=args.gpt_block,
                n_embd=args.gpt_embd,
                n_layer=args.gpt_layers,
                n_head=args.gpt_heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
        model.loss_type = "ForCausalLM"  # transformers cannot tell from the name GPT2LMHeadModel and warns
        droprate = args.gpt_l0_droprate
        hf_dgate.apply_dgate(model, run_config("heads", method, depth, lam, l0_target, args, len(train_ds), droprate))
        bank = hf_dgate.get_bank(model)
        model.train()
        # AdamW (beta2 0.99, no weight decay: the penalty is the only regulariser), warmup + cosine to 10%,
        # grad-norm clipping at 1 -- the tiny preset's optimiser without the Trainer around it. L0: log_alpha (and
        # the Lagrange multipliers) in their own AdamW group at --gpt-l0-lr, on the same schedule.
        opt = torch.optim.AdamW(model.parameters(), lr=args.gpt_lr, betas=(0.9, 0.99), weight_decay=0.0)
        if method == "l0":
            hf_dgate.optim.l0_optimizer(opt, model, lr=args.gpt_l0_lr)
        peak = [g["lr"] for g in opt.param_groups]
        warm = max(1, args.gpt_steps // 20)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        for step in range(args.gpt_steps):
            lr = (
                args.gpt_lr * (step + 1) / warm
                if step < warm
                else 0.1 * args.gpt_lr + 0.9 * cosine_lr(step - warm, args.gpt_steps - warm, args.gpt_lr)
            )
            for g, lr0 in zip(opt.param_groups, peak):
                g["lr"] = lr * lr0 / args.gpt_lr
            if l0_target is not None and args.gpt_l0_target_ramp > 0:  # CoFi's Lagrangian warm-up of the target
                bank.l0_target = l0_target * min(1.0, (step + 1) / (args.gpt_l0_target_ramp * args.gpt_steps))
            idx = torch.randint(len(train_ds), (args.gpt_batch_size,), generator=gen)
            x = torch.stack([train_ds[int(i)]["input_ids"] for i in idx])
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss = loss + hf_dgate.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        train_s = time.time() - t0
        rows += measure(
            model, "heads", char_accuracy, label, depth, lam, prune, args.ratios, "nanogpt", train_s, l0_target
        )
        write_csv(os.path.join(args.output_dir, "nanogpt.csv"), mark_curves(rows))  # partial results survive
        what = f"target={l0_target:g}" if l0_target is not None else f"lam={lam:g}"
        print(f"[nanogpt] {label} {what}: {rows[-1]['accuracy']:.4f} ({train_s:.1f}s)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Table, curves, plot
# ----------------------------------------------------------------------------------------------------------------
def mark_curves(rows):
    """on_curve = 1: every dgate/l0 row; for the +MP methods the best accuracy over lam at each prune ratio."""
    best = {}
    for r in rows:
        if r["method"].endswith("+MP"):
            key = (r["task"], r["method"], float(r["prune_ratio"]))
            if key not in best or float(r["accuracy"]) > float(best[key]["accuracy"]):
                best[key] = r
    chosen = {id(r) for r in best.values()}
    for r in rows:
        r["on_curve"] = int(not r["method"].endswith("+MP") or id(r) in chosen)
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("lam", "sparsity", "accuracy", "train_s"):
            r[k] = float(r[k])
        for k in ("depth", "groups_zero", "groups_total"):
            r[k] = int(r[k])
        r["prune_ratio"] = float(r["prune_ratio"]) if r["prune_ratio"] != "" else ""
        r["target"] = float(r["target"]) if r.get("target") not in (None, "") else ""  # CSVs from before the column
    return rows


STYLE = {
    "dgate D=2": ("C0", "o-"),
    "dgate D=3": ("C1", "o-"),
    "dgate D=4": ("C2", "o-"),
    "direct+MP": ("C3", "s--"),
    "l0": ("C4", "^"),
    "l0+MP": ("C4", "^--"),
    "l0 target": ("C5", "v-"),
    "dense+MP": ("C7", "x:"),
}


def plot(rows, path, titles):
    plt = pyplot()
    tasks = [t for t in ("nanogpt", "lenet") if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, (color, fmt) in STYLE.items():
            rs = [r for r in rows if r["task"] == task and r["method"] == method and r["on_curve"]]
            if not rs:
                continue
            rs.sort(key=lambda r: (r["sparsity"], -r["accuracy"]))
            kw = {"ms": 4} if "-" in fmt or ":" in fmt else {"ms": 7, "ls": "none"}
            ax.plot([r["sparsity"] for r in rs], [r["accuracy"] for r in rs], fmt, color=color, label=method, **kw)
        ax.set_xlabel(f"{TARGET[task]} sparsity (fraction of groups zero)")
        ax.set_ylabel("validation char accuracy" if task == "nanogpt" else "test accuracy")
        ax.set_title(titles.get(task, task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(args, meta):
    rows = []
    for task in ("nanogpt", "lenet"):
        path = os.path.join(args.output_dir, f"{task}.csv")
        if os.path.isfile(path):
            rows += read_csv(path)
    mark_curves(rows)
    write_csv(os.path.join(args.output_dir, "compare_methods.csv"), rows)
    with open(os.path.join(args.output_dir, "compare_methods.json"), "w") as f:
        json.dump({"meta": meta, "n_rows": len(rows)}, f, indent=2)
    titles = {
        "nanogpt": "NanoGPT heads, Shakespeare" + (" (quick)" if args.quick else ""),
        "lenet": f"LeNet-300-100 input features, {args.dataset}" + (" (quick)" if args.quick else ""),
    }
    if rows:
        plot(rows, os.path.join(args.output_dir, "compare_methods.png"), titles)
        curve = [r for r in rows if r["on_curve"]]
        print(markdown_table(curve, ["task", "method", "lam", "target", "prune_ratio", "sparsity", "accuracy"]))
    return rows


QUICK_NOTE = (
    "--quick checks that every method runs end to end (train, prune, export, score); at 15 NanoGPT steps and 2 LeNet "
    "epochs the models barely learn and few groups reach zero, so its rows compare nothing: drop --quick for that."
)


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    if args.quick:
        print(QUICK_NOTE, flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.time()
    meta = {**vars(args), "torch_threads": torch.get_num_threads()}
    if not args.merge_only:
        tasks = ["nanogpt", "lenet"] if args.task == "both" else [args.task]
        for task in tasks:
            t0 = time.time()
            rows = run_nanogpt(args) if task == "nanogpt" else run_lenet(args)
            write_csv(os.path.join(args.output_dir, f"{task}.csv"), mark_curves(rows))
            with open(os.path.join(args.output_dir, f"{task}_meta.json"), "w") as f:
                json.dump({**meta, "wall_time_s": round(time.time() - t0, 1)}, f, indent=2)
            print(f"[{task}] done in {time.time() - t0:.0f}s", flush=True)
    rows = merge(args, {**meta, "wall_time_s": round(time.time() - t_start, 1)})
    print(f"wrote {args.output_dir}/compare_methods.* ({len(rows)} rows) in {time.time() - t_start:.0f}s")
    if not math.isfinite(sum(r["accuracy"] for r in rows)):
        raise SystemExit("non-finite accuracy in the results")
    return rows


if __name__ == "__main__":
    main()
