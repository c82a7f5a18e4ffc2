"""Input-feature selection with D-Gating on LeNet-300-100 (paper Sec. 5.2.1, Fig. 5).

Why: gating the first-layer weights leaving each input feature turns feature selection for a non-linear network
into plain differentiable training; a feature whose gate product reaches zero is dropped from the exported
model (`prune_torch_model` slices fc1 and records `dgate_kept_features`). The sweep over lam traces accuracy
against the number of selected features for D = 2 (group lasso), 3 and 4.

Data: scikit-learn digits (8x8 = 64 features, bundled, offline), Fashion-MNIST and MNIST (784 features) from
gzipped IDX files in --data-dir or, when online, from the Hugging Face Hub.

    python examples/feature_selection.py --dataset digits --output-dir results/feature_selection
    python examples/feature_selection.py --dataset fashion-mnist --data-dir $DATA/fashion-mnist \
        --train-subset 10000 --epochs 5 --output-dir results/feature_selection
    python examples/feature_selection.py --dataset digits --trainer   # same, trained by hf_dgate.DGateTrainer
    python examples/feature_selection.py --quick --output-dir /tmp/fs  # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    accuracy_score,
    cosine_lr,
    lam_grid,
    load_images,
    markdown_table,
    pyplot,
    subset,
    write_results,
)

import hf_dgate  # noqa: E402
from hf_dgate.models import LeNet300100  # noqa: E402
from hf_dgate.surgery import prune_torch_model  # noqa: E402
from hf_dgate.threads import THREADS_HELP, configure_threads  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist", "mnist"])
    p.add_argument("--data-dir", default=None, help="folder with the gzipped IDX files (offline Fashion-MNIST/MNIST)")
    p.add_argument(
        "--output-dir",
        default="runs/feature_selection",
        help="where result files go (results/feature_selection holds the committed ones: pass it to regenerate them)",
    )
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--train-subset", type=int, default=None, help="use a random subset of the training set")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--lams", type=float, nargs="+", default=None, help="explicit lam values (else a log grid)")
    p.add_argument("--lam-lo", type=float, default=1e-3)
    p.add_argument("--lam-hi", type=float, default=1e-1)
    p.add_argument("--n-lams", type=int, default=6)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainer", action="store_true", help="train with hf_dgate.DGateTrainer instead of a torch loop")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 lams, D in {2, 3}, 40 short epochs")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        # 600 images, 5 steps an epoch: lr 0.2 and 40 epochs let the unneeded pixels settle at exact zeros
        # (digits, lam 0.05: D=3 keeps 22 of 64 pixels at 0.94 accuracy, D=2 35; lam 0.01 keeps all 64 at 0.96)
        p.set_defaults(depths=[2, 3], lams=[1e-2, 5e-2], epochs=40, lr=0.2, train_subset=600)
        args = p.parse_args(argv)
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Training: a plain PyTorch loop, the penalty simply added to the loss
# ----------------------------------------------------------------------------------------------------------------
def train_loop(model, xtr, ytr, args, opt=None):
    """`opt` (default: SGD over all parameters) may hold groups at other rates: each decays from its own."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    peak = [group["lr"] for group in opt.param_groups]
    steps_per_epoch = (len(ytr) + args.batch_size - 1) // args.batch_size
    total, step = args.epochs * steps_per_epoch, 0
    for _ in range(args.epochs):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            for group, lr0 in zip(opt.param_groups, peak):
                group["lr"] = cosine_lr(step, total, lr0)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + hf_dgate.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1


# ----------------------------------------------------------------------------------------------------------------
# 1b. The same with hf_dgate.DGateTrainer (transformers.Trainer): a module returning {'loss', 'logits'} is enough
# ----------------------------------------------------------------------------------------------------------------
class WithLoss(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits} if labels is not None else {"logits": logits}


def train_trainer(model, xtr, ytr, args, run_dir):
    from transformers import TrainingArguments

    from hf_dgate.trainer import DGateTrainer

    data = [{"x": x, "labels": y} for x, y in zip(xtr, ytr)]
    targs = TrainingArguments(
        output_dir=run_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        optim="sgd",
        optim_args=f"momentum={args.momentum}",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = DGateTrainer(model=WithLoss(model), args=targs, train_dataset=data)
    trainer.train()


# ----------------------------------------------------------------------------------------------------------------
# 2. One run: gate the input features, train, measure, export
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    preds = torch.cat([model(x[i : i + 2048]).argmax(-1) for i in range(0, len(y), 2048)])
    model.train()
    return accuracy_score(preds.numpy(), y.numpy())


def run(xtr, ytr, xte, yte, n_classes, depth, lam, args):
    torch.manual_seed(args.seed)
    model = LeNet300100(in_features=xtr.shape[1], num_classes=n_classes)
    cfg = hf_dgate.DGateConfig(target="features", depth=depth, lam=lam, threshold=args.threshold)
    hf_dgate.apply_dgate(model, cfg)
    t0 = time.time()
    if args.trainer:
        with tempfile.TemporaryDirectory() as run_dir:  # the Trainer wants an output_dir; nothing is saved there
            train_trainer(model, xtr, ytr, args, run_dir)
    else:
        train_loop(model, xtr, ytr, args)
    report = hf_dgate.sparsity_report(model)
    acc = accuracy(model, xte, yte)
    small = prune_torch_model(model)  # fc1 keeps only the selected input columns
    # (the attribute is only set when some feature was removed)
    kept = getattr(small, "dgate_kept_features", torch.arange(xtr.shape[1]))
    acc_small = accuracy(small, xte[:, kept], yte)
    return {
        "depth": depth,
        "lam": lam,
        "test_acc": acc,
        "test_acc_exported": acc_small,
        "selected_features": int(len(kept)),
        "total_features": int(xtr.shape[1]),
        "params_kept": report.params_kept,
        "params_total": report.params_total,
        "train_s": round(time.time() - t0, 1),
    }, kept


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    t_start = time.time()
    data = load_images(args.dataset, args.data_dir)
    xtr, ytr = subset(*data["train"], args.train_subset, args.seed)
    xte, yte = data["test"]
    xtr, xte = xtr.flatten(1), xte.flatten(1)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    print(f"{args.dataset}: {len(ytr)} train / {len(yte)} test, {xtr.shape[1]} features, {n_classes} classes")
    lams = args.lams or lam_grid(args.lam_lo, args.lam_hi, args.n_lams)
    rows = []
    for depth in args.depths:
        for lam in lams:
            row, kept = run(xtr, ytr, xte, yte, n_classes, depth, lam, args)
            row["dataset"] = args.dataset
            rows.append(row)
            row["kept_features"] = " ".join(str(i) for i in kept.tolist())
            print(
                f"D={depth} lam={lam:.2e}: acc {row['test_acc']:.4f} (exported {row['test_acc_exported']:.4f}), "
                f"{row['selected_features']}/{row['total_features']} features, {row['train_s']}s",
                flush=True,
            )
    name = f"{args.dataset}{'_trainer' if args.trainer else ''}"
    meta = {**vars(args), "wall_time_s": round(time.time() - t_start, 1)}
    write_results(args.output_dir, name, rows, meta)
    keys = ["depth", "lam", "test_acc", "test_acc_exported", "selected_features", "total_features"]
    print(markdown_table(rows, keys))

    # plot: accuracy against selected features, plus the pixels a sparse, still accurate model keeps
    plt = pyplot()
    side = int(round(xtr.shape[1] ** 0.5))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    for depth in args.depths:
        rs = sorted([r for r in rows if r["depth"] == depth], key=lambda r: r["selected_features"])
        axes[0].plot([r["selected_features"] for r in rs], [r["test_acc"] for r in rs], "-o", ms=3, label=f"D={depth}")
    axes[0].set_xlabel("selected input features")
    axes[0].set_ylabel("test accuracy")
    how = "hf_dgate.DGateTrainer" if args.trainer else "a torch loop"
    axes[0].set_title(f"LeNet-300-100 feature selection, {args.dataset}\n(trained by {how})", fontsize=10)
    axes[0].legend()
    # the sparsest model within 15% of the best accuracy
    best = max(rows, key=lambda r: (r["test_acc"] >= 0.85 * max(x["test_acc"] for x in rows), -r["selected_features"]))
    mask = torch.zeros(xtr.shape[1])
    mask[[int(i) for i in best["kept_features"].split()]] = 1
    if side * side == xtr.shape[1]:
        axes[1].imshow(mask.reshape(side, side), cmap="gray", vmin=0, vmax=1)
        from matplotlib.patches import Patch

        key = [Patch(facecolor="white", edgecolor="black", label="kept"), Patch(facecolor="black", label="removed")]
        axes[1].legend(handles=key, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8)
    axes[1].set_title(
        f"pixels kept at D={best['depth']}, lam={best['lam']:.2g}:\n{best['selected_features']} of "
        f"{xtr.shape[1]} ({best['test_acc']:.3f} test acc.)",
        fontsize=9,
    )
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, f"{name}.png"), dpi=120)
    print(f"wrote {args.output_dir}/{name}.* in {time.time() - t_start:.0f}s")
    return rows


if __name__ == "__main__":
    main()
