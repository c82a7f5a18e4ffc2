"""Exact zeros under the optimizers people use: optimizer x target x lam -> zero groups and test accuracy (issue 13).

Every optimizer runs twice on the same data, seed and schedule (cosine to 0): as given (the penalty simply added to
the loss, gates and gated weights without weight decay), and with `hf_dgate.optim.dgate_optimizer`, which moves gates
and gated weights into a momentum-SGD group of the same optimizer. Targets: input features of LeNet-300-100 on
Fashion-MNIST (paper Sec. 5.2.1) and filters of a narrow VGG-16 on scikit-learn digits (Sec. 5.2.2).

    python benchmarks/optimizers.py --data-dir $DATA/fashion-mnist            # features, ~10 min on CPU
    python benchmarks/optimizers.py --targets filters                                   # VGG filters on digits
    python benchmarks/optimizers.py --quick                                   # ~1 min, digits features, lam 0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from common import cosine_lr, load_images, markdown_table, subset, write_results  # noqa: E402
from feature_selection import accuracy  # noqa: E402

import hf_dgate  # noqa: E402
from hf_dgate.models import VGG16, LeNet300100  # noqa: E402
from hf_dgate.optim import dgate_optimizer, gated_parameters  # noqa: E402
from hf_dgate.threads import THREADS_HELP, configure_threads  # noqa: E402

# name -> (constructor over parameter groups, peak lr); weight decay is given per group below
OPTIMIZERS = {
    "sgd": (lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9), 0.05),
    "adam": (lambda groups, lr: torch.optim.Adam(groups, lr=lr), 1e-3),
    "adamw": (lambda groups, lr: torch.optim.AdamW(groups, lr=lr, weight_decay=0.01), 1e-3),
    "rmsprop": (lambda groups, lr: torch.optim.RMSprop(groups, lr=lr), 1e-3),
    "adafactor": (lambda groups, lr: torch.optim.Adafactor(groups, lr=lr), 1e-2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = os.environ.get("DATA", os.path.join(ROOT, "..", "shared", "data"))  # README: where local data lives
    p.add_argument("--data-dir", default=os.path.join(data, "fashion-mnist"), help="Fashion-MNIST IDX files")
    p.add_argument(
        "--output-dir",
        default="runs/optimizers",
        help="where result files go (results/optimizers holds the committed ones: pass it to regenerate them)",
    )
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--targets", nargs="+", default=["features"], choices=["features", "filters"])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--recipes", nargs="+", default=["plain", "dgate"], choices=["plain", "dgate"])
    p.add_argument("--lams", type=float, nargs="+", default=None, help="default: 0.035 0.04 features, 0.03 0.1 filters")
    p.add_argument(
        "--gated-lr", type=float, default=None, help="peak lr of the recipe's group (default: the library's, 0.05 here)"
    )
    p.add_argument("--gates-only", action="store_true", help="the recipe moves the gates only, not the gated weights")
    p.add_argument("--epochs", type=int, default=None, help="default: 10 (features), 60 (filters)")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits features, SGD and Adam, lam 0.1, 40 epochs (~1 min): Adam alone zeros no pixel, SGD and the "
        "dgate recipe about 52 of 64",
    )
    args = p.parse_args(argv)
    if args.quick:  # fewer epochs or a smaller lam leave every group above the threshold: nothing to compare
        p.set_defaults(optimizers=["sgd", "adam"], lams=[0.1], epochs=40)
        args = p.parse_args(argv)
    return args


def load(target, args):
    """(x_train, y_train, x_test, y_test) of the target's task."""
    if target == "features" and not args.quick:
        data = load_images("fashion-mnist", args.data_dir)
    else:
        data = load_images("digits", None)
    xtr, ytr = subset(*data["train"], args.train_subset, args.seed)
    xte, yte = data["test"]
    if target == "features":
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    return xtr, ytr, xte, yte


def build(target, lam, xtr, args):
    torch.manual_seed(args.seed)
    if target == "features":
        model = LeNet300100(in_features=xtr.shape[1], num_classes=10)
        cfg = hf_dgate.DGateConfig(target="features", depth=args.depth, lam=lam, threshold=args.threshold)
    else:
        model = VGG16(num_classes=10, in_channels=xtr.shape[1], width=0.125)
        cfg = hf_dgate.DGateConfig(target="filters", depth=args.depth, lam=lam, threshold=args.threshold,
                                   example_input_shape=[1, *xtr.shape[1:]])  # fmt: skip
    return hf_dgate.apply_dgate(model, cfg)


def make_optimizer(model, name, recipe, args):
    """The optimizer as a user builds it: decay on ungated matrices only (the penalty decays gated tensors)."""
    ctor, lr = OPTIMIZERS[name]
    gated = {id(p) for p in gated_parameters(model)}
    decay = [p for p in model.parameters() if p.ndim > 1 and id(p) not in gated]
    rest = [p for p in model.parameters() if not (p.ndim > 1 and id(p) not in gated)]
    wd = 5e-4 if name == "sgd" else 0.01 if name == "adamw" else 0.0
    opt = ctor([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr)
    if recipe == "dgate":
        opt = dgate_optimizer(opt, model, lr=args.gated_lr, include_weights=False if args.gates_only else None)
    return opt


def train(model, opt, xtr, ytr, epochs, batch_size):
    steps = epochs * ((len(ytr) + batch_size - 1) // batch_size)
    peaks = [g["lr"] for g in opt.param_groups]
    step = 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), batch_size):
            idx = perm[i : i + batch_size]
            for g, peak in zip(opt.param_groups, peaks):
                g["lr"] = cosine_lr(step, steps, peak)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx]) + hf_dgate.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1


def run(target, data, name, recipe, lam, args):
    xtr, ytr, xte, yte = data
    model = build(target, lam, xtr, args)
    opt = make_optimizer(model, name, recipe, args)
    epochs = args.epochs or (10 if target == "features" else 60)
    t0 = time.time()
    train(model, opt, xtr, ytr, epochs, args.batch_size)
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        norms = bank.effective_norms(target)
    zero = int((norms < args.threshold).sum())
    grey = int(((norms >= args.threshold) & (norms < 100 * args.threshold)).sum())
    model.eval()
    return {
        "target": target,
        "optimizer": name,
        "recipe": recipe,
        "lam": lam,
        "test_acc": round(accuracy(model, xte, yte), 4),
        "groups": len(norms),
        "zero": zero,
        "kept": len(norms) - zero,
        "grey": grey,
        "median_norm": float(norms.median()),
        "train_s": round(time.time() - t0, 1),
    }


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    torch.set_flush_denormal(True)  # decaying groups pass through denormal floats, 10x slower on CPU
    rows, t_start = [], time.time()
    for target in args.targets:
        data = load(target, args)
        lams = args.lams or ([0.035, 0.04] if target == "features" else [0.03, 0.1])
        for lam in lams:
            for name in args.optimizers:
                for recipe in args.recipes:
                    if name == "sgd" and recipe == "dgate" and "plain" in args.recipes:
                        continue  # SGD already is the recipe
                    row = run(target, data, name, recipe, lam, args)
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    keys = ["target", "optimizer", "recipe", "lam", "zero", "kept", "grey", "groups", "test_acc", "median_norm"]
    print(markdown_table(rows, keys))
    name = "_".join(args.targets) + ("_quick" if args.quick else "")
    write_results(args.output_dir, name, rows, {**vars(args), "wall_time_s": round(time.time() - t_start, 1)})
    return rows


if __name__ == "__main__":
    main()
