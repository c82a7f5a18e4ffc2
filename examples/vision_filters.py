"""Filter sparsity for VGG-16 / ResNet-18 with D-Gating, trained with accelerate (paper Sec. 5.2.2, Fig. 6, Table 1).

Why: a zero filter can be removed together with its BatchNorm channel and the next layer's input channel, so
filter sparsity is a real speed-up, measured here as the FLOP ratio of the exported model (FlopCounterMode)
before and after `prune_torch_model`. Gates sit on the BatchNorm output (BN would cancel a scale applied before
it), ResNet channels tied through skip connections form one group. No post-hoc pruning: only groups whose
effective norm is already below the threshold are removed.

The loop is an `accelerate` loop (Accelerator, prepare, backward), so it runs unchanged on CPU, one GPU or
several (`accelerate launch`). Data: CIFAR-10/100 and SVHN from the Hugging Face Hub when online (or a
`datasets.save_to_disk` folder via --data-dir), Fashion-MNIST/MNIST from gzipped IDX files via --data-dir,
scikit-learn digits always offline.

    python examples/vision_filters.py --model vgg16 --dataset fashion-mnist --data-dir $DATA/fashion-mnist \
        --width 0.25 --train-subset 10000 --epochs 4 --output-dir results/vision_filters
    accelerate launch examples/vision_filters.py --model resnet18 --dataset cifar10 --width 1 --epochs 200
    python examples/vision_filters.py --quick --output-dir /tmp/vf    # seconds, digits
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import accuracy_score, cosine_lr, load_images, markdown_table, pyplot, subset, write_results  # noqa: E402

import hf_dgate  # noqa: E402
from hf_dgate.models import VGG16, ResNet18  # noqa: E402
from hf_dgate.surgery import prune_torch_model  # noqa: E402
from hf_dgate.threads import THREADS_HELP, configure_threads  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16", choices=["vgg16", "resnet18"])
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        choices=["fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits"],
    )
    p.add_argument("--data-dir", default=None, help="IDX files (Fashion-MNIST/MNIST) or a datasets.save_to_disk folder")
    p.add_argument(
        "--output-dir",
        default="runs/vision_filters",
        help="where result files go (results/vision_filters holds the committed ones: pass it to regenerate them)",
    )
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier (1.0 = the paper's network)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    p.add_argument("--lams", type=float, nargs="+", default=[1e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="on ungated weights only (the penalty is the decay of gated ones)",
    )
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument(
        "--threshold-mode",
        choices=["absolute", "relative"],
        default="absolute",
        help="relative: a filter is zero below threshold x its layer's largest (BN layers shrink as a whole)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="digits, width 1/16, D=3, lams 0.01 0.04 0.1 (a curve: 1, 79, 244 of 264 filters zero), 60 epochs, "
        "relative; ~1 min per lam on a busy 2-core machine",
    )
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(
            dataset="digits", width=0.0625, depths=[3], lams=[0.01, 0.04, 0.1], epochs=60, threshold_mode="relative"
        )  # lam 0.04 ends with ~1/3 of the filters exactly removed at the gated model's accuracy
        args = p.parse_args(argv)
    return args


def build(args, in_channels, n_classes):
    cls = VGG16 if args.model == "vgg16" else ResNet18
    return cls(num_classes=n_classes, in_channels=in_channels, width=args.width)


def flops(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@torch.no_grad()
def accuracy(model, loader, accelerator):
    was_training = model.training
    model.eval()
    preds, refs = [], []
    for x, y in loader:
        pred, y = accelerator.gather_for_metrics((model(x).argmax(-1), y))
        preds.append(pred.cpu())
        refs.append(y.cpu())
    model.train(was_training)
    return accuracy_score(torch.cat(preds).numpy(), torch.cat(refs).numpy())


# ----------------------------------------------------------------------------------------------------------------
# One run: gate filters, train with accelerate, measure accuracy, sparsity and FLOPs before/after export
# ----------------------------------------------------------------------------------------------------------------
def run(data, depth, lam, args, accelerator):
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(args.seed)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    model = build(args, xtr.shape[1], n_classes)
    shape = [1, *xtr.shape[1:]]
    hf_dgate.apply_dgate(
        model,
        hf_dgate.DGateConfig(
            target="filters",
            depth=depth,
            lam=lam,
            threshold=args.threshold,
            threshold_mode=args.threshold_mode,
            example_input_shape=shape,
        ),
    )
    bank_params = {id(p) for p in hf_dgate.get_bank(model).parameters()}
    decay = [p for p in model.parameters() if p.ndim > 1 and id(p) not in bank_params]
    rest = [p for p in model.parameters() if not (p.ndim > 1 and id(p) not in bank_params)]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=args.momentum,
    )
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch_size, shuffle=True, drop_last=True)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=512)
    model, opt, train_loader, test_loader = accelerator.prepare(model, opt, train_loader, test_loader)
    total, step, t0 = args.epochs * len(train_loader), 0, time.time()
    for _ in range(args.epochs):
        for x, y in train_loader:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, args.lr)
            loss = F.cross_entropy(model(x), y) + hf_dgate.penalty(model)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            step += 1
    train_s = time.time() - t0
    acc = accuracy(model, test_loader, accelerator)
    model = accelerator.unwrap_model(model).cpu().eval()
    report = hf_dgate.sparsity_report(model)
    small = prune_torch_model(model)
    x = xte[:256]
    max_diff = (small(x) - model(x)).abs().max().item()  # tiny when the removed groups were (near) zero
    # Surgery check: the gated model with the removed groups' gates set to exactly 0 must match the export.
    # (Any gap between this and max_diff comes from groups below threshold that still mattered, not surgery.)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        bank = hf_dgate.get_bank(zeroed)
        bank.gammas["filters"][:, bank.zero_groups("filters")] = 0.0
        surgery_diff = (small(x) - zeroed(x)).abs().max().item()
    acc_small = accuracy(small, DataLoader(TensorDataset(xte, yte), batch_size=512), accelerator)
    f_dense, f_small = flops(build(args, xtr.shape[1], n_classes).eval(), x[:1]), flops(small, x[:1])
    ts = report.targets["filters"]
    return {
        "model": args.model,
        "dataset": args.dataset,
        "width": args.width,
        "depth": depth,
        "lam": lam,
        "test_acc": acc,
        "test_acc_exported": acc_small,
        "filters_zero": ts.zero,
        "filters_total": ts.groups,
        "filter_sparsity": ts.sparsity,
        "params_kept_fraction": report.params_kept_fraction,
        "flops_dense": f_dense,
        "flops_pruned": f_small,
        "speedup": f_dense / f_small,
        "export_max_abs_diff": max_diff,
        "surgery_max_abs_diff": surgery_diff,
        "train_s": round(train_s, 1),
    }


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    t_start = time.time()
    accelerator = Accelerator()
    data = load_images(args.dataset, args.data_dir)
    train = subset(*data["train"], args.train_subset, args.seed)
    test = subset(*data["test"], args.test_subset, args.seed)
    accelerator.print(
        f"{args.dataset}: {len(train[1])} train / {len(test[1])} test, images {tuple(train[0].shape[1:])}"
    )
    rows = []
    for depth in args.depths:
        for lam in args.lams:
            row = run((train, test), depth, lam, args, accelerator)
            rows.append(row)
            accelerator.print(
                f"D={depth} lam={lam:.1e}: acc {row['test_acc']:.4f}, {row['filters_zero']}/{row['filters_total']} "
                f"filters zero, FLOPs x{row['speedup']:.2f} fewer, {row['train_s']}s",
                flush=True,
            )
    if not accelerator.is_main_process:
        return rows
    name = f"{args.model}_{args.dataset}"
    write_results(args.output_dir, name, rows, {**vars(args), "wall_time_s": round(time.time() - t_start, 1)})
    keys = ["depth", "lam", "test_acc", "test_acc_exported", "filter_sparsity", "params_kept_fraction", "speedup"]
    print(markdown_table(rows, keys))

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for depth in args.depths:
        rs = sorted([r for r in rows if r["depth"] == depth], key=lambda r: r["lam"])
        axes[0].plot([r["filter_sparsity"] for r in rs], [r["test_acc"] for r in rs], "-o", ms=3, label=f"D={depth}")
        axes[1].plot([r["speedup"] for r in rs], [r["test_acc"] for r in rs], "-o", ms=3, label=f"D={depth}")
    _label_lams(axes[0], rows)
    axes[0].set_xlabel("filter sparsity")
    axes[1].set_xlabel("FLOP reduction (dense FLOPs / exported FLOPs; not a timing)")
    _flop_axis(axes[1], [r["speedup"] for r in rows])
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.legend()
    fig.suptitle(f"{args.model} (width {args.width}) on {args.dataset}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, f"{name}.png"), dpi=120)
    print(f"wrote {args.output_dir}/{name}.* in {time.time() - t_start:.0f}s")
    return rows


def _label_lams(ax, rows: list[dict]) -> None:
    """Which lam made each point, for every curve at once: points closer than about 4% of the axes share one label
    (lams in order, "(D=2)" where the curves differ), and neighbours alternate above and below."""
    spots: dict[tuple[int, int], list[tuple[float, int]]] = {}
    where: dict[tuple[int, int], tuple[float, float]] = {}
    xs, ys = [r["filter_sparsity"] for r in rows], [r["test_acc"] for r in rows]
    dx, dy = 0.04 * ((max(xs) - min(xs)) or 1.0), 0.04 * ((max(ys) - min(ys)) or 1.0)
    for r in sorted(rows, key=lambda r: (r["filter_sparsity"], r["test_acc"])):
        key = (round(r["filter_sparsity"] / dx), round(r["test_acc"] / dy))
        spots.setdefault(key, []).append((r["lam"], r["depth"]))
        where.setdefault(key, (r["filter_sparsity"], r["test_acc"]))
    for i, (key, made) in enumerate(spots.items()):
        lams = sorted({lam for lam, _ in made})
        depths = sorted({d for _, d in made})
        text = "lam " + ", ".join(f"{lam:.2g}" for lam in lams)
        if len(depths) == 1 and len({r["depth"] for r in rows}) > 1:
            text += f" (D={depths[0]})"
        ax.annotate(text, where[key], fontsize=7, xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")


def _flop_axis(ax, ratios: list[float]) -> None:
    """Log scale only where the ratios span more than a factor 4; labels as plain multiples ("2x"), none on
    minor ticks (a narrow log axis would otherwise crowd them with "1.02x10^0" labels)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    ratios = [v for v in ratios if v and v > 0]
    if ratios and max(ratios) / min(ratios) > 4:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))


if __name__ == "__main__":
    main()
