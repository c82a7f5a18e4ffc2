"""Modality selection in a late-fusion network with D-Gating (paper App. E.5, Fig. 20).

Why: in late fusion each modality has its own subnetwork and one fusion head; gating each head as a whole
module lets training decide which modalities to keep, and `prune_torch_model` then deletes the dead branch.
The paper's semi-synthetic data makes the right answer known: y = a * image_signal + b * tabular_signal + noise
with image_signal the (demeaned, standardised) digit shown in an image and tabular_signal = sum_j f_j(x_j)
of a few smooth functions of Gaussian covariates; with a = 0 or b = 0 one modality is pure noise.

Images: scikit-learn digits (8x8, bundled, offline, the default), or MNIST / Fashion-MNIST (class index as the
"face value") from gzipped IDX files in --data-dir or from the Hub when online. The training loop is a plain
PyTorch loop with `hf_dgate.penalty(model)` added to the loss.

    python examples/late_fusion.py --output-dir results/late_fusion
    python examples/late_fusion.py --dataset fashion-mnist --data-dir $DATA/fashion-mnist --train-subset 5000
    python examples/late_fusion.py --quick --output-dir /tmp/lf     # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cosine_lr, lam_axis, load_images, markdown_table, pyplot, subset, write_results  # noqa: E402

import hf_dgate  # noqa: E402
from hf_dgate.models import LateFusion  # noqa: E402
from hf_dgate.surgery import prune_torch_model  # noqa: E402
from hf_dgate.threads import THREADS_HELP, configure_threads  # noqa: E402

TABULAR_FUNCTIONS = [torch.sin, lambda x: x**2 - 1, lambda x: torch.tanh(2 * x), lambda x: 0.5 * x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist"])
    p.add_argument("--data-dir", default=None, help="gzipped IDX files (MNIST / Fashion-MNIST)")
    p.add_argument(
        "--output-dir",
        default="runs/late_fusion",
        help="where result files go (results/late_fusion holds the committed ones: pass it to regenerate them)",
    )
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--tabular-features", type=int, default=8, help="covariates; the first 4 carry the signal")
    p.add_argument("--scenarios", default="1:0,1:1,0:1", help="comma-separated a:b weights of image:tabular signal")
    p.add_argument("--noise-sd", type=float, default=0.5)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    p.add_argument("--lams", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: digits subset, one scenario, 1 lam, 15 epochs")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        # 15 epochs at lr 0.1: the uninformative tabular head reaches exactly 0 and is removed (test MSE 0.54)
        p.set_defaults(dataset="digits", scenarios="1:0", depths=[3], lams=[1e-1], epochs=15, lr=0.1, train_subset=400)
        args = p.parse_args(argv)
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Semi-synthetic data: images with a known signal plus tabular covariates with a known signal
# ----------------------------------------------------------------------------------------------------------------
def make_split(images, labels, n_tab, g):
    tab = torch.randn(len(labels), n_tab, generator=g)
    tab_signal = sum(f(tab[:, j]) for j, f in enumerate(TABULAR_FUNCTIONS))
    img_signal = labels.float()
    return images, tab, img_signal, tab_signal


def standardise(train_signal, test_signal):
    mu, sd = train_signal.mean(), train_signal.std()
    return (train_signal - mu) / sd, (test_signal - mu) / sd


# ----------------------------------------------------------------------------------------------------------------
# 2. One run: gate the two fusion heads, train, read off which modalities survive
# ----------------------------------------------------------------------------------------------------------------
def run(train, test, depth, lam, args):
    (img, tab, y), (img_te, tab_te, y_te) = train, test
    torch.manual_seed(args.seed)
    model = LateFusion(tab.shape[1], num_classes=1, in_channels=img.shape[1])
    rule = hf_dgate.GroupRule("modalities", r"^fusion\.(image|tabular)$", kind="module")
    hf_dgate.apply_dgate(
        model, hf_dgate.DGateConfig(target=[], groups=[rule], depth=depth, lam=lam, threshold=args.threshold)
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = args.epochs * ((len(y) + args.batch_size - 1) // args.batch_size)
    step = 0
    for _ in range(args.epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), args.batch_size):
            idx = perm[i : i + args.batch_size]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, args.lr)
            loss = F.mse_loss(model(img[idx], tab[idx]).squeeze(-1), y[idx]) + hf_dgate.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad():
        mse = F.mse_loss(model(img_te, tab_te).squeeze(-1), y_te).item()
        norms = hf_dgate.effective_norms(model, "modalities").tolist()  # order: image, tabular
        small = prune_torch_model(model)  # a dead modality's branch and fusion head are deleted
        mse_small = F.mse_loss(small(img_te, tab_te).squeeze(-1), y_te).item()
    return {
        "depth": depth,
        "lam": lam,
        "test_mse": mse,
        "test_mse_exported": mse_small,
        "image_norm": norms[0],
        "tabular_norm": norms[1],
        "kept": "+".join(sorted(small.fusion.keys())) or "none",
        "params_exported": sum(p.numel() for p in small.parameters()),
    }


def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    t_start = time.time()
    data = load_images(args.dataset, args.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    img, tab, img_sig, tab_sig = make_split(
        *subset(*data["train"], args.train_subset, args.seed), args.tabular_features, g
    )
    img_te, tab_te, img_sig_te, tab_sig_te = make_split(
        *subset(*data["test"], args.test_subset, args.seed), args.tabular_features, g
    )
    img_sig, img_sig_te = standardise(img_sig, img_sig_te)  # both predictors on the same scale
    tab_sig, tab_sig_te = standardise(tab_sig, tab_sig_te)
    print(
        f"{args.dataset}: {len(img)} train / {len(img_te)} test images {tuple(img.shape[1:])}, "
        f"{args.tabular_features} tabular covariates"
    )
    rows = []
    for scenario in args.scenarios.split(","):
        a, b = (float(v) for v in scenario.split(":"))
        y = a * img_sig + b * tab_sig + args.noise_sd * torch.randn(len(img), generator=g)
        y_te = a * img_sig_te + b * tab_sig_te + args.noise_sd * torch.randn(len(img_te), generator=g)
        for depth in args.depths:
            for lam in args.lams:
                t0 = time.time()
                row = run((img, tab, y), (img_te, tab_te, y_te), depth, lam, args)
                row = {"scenario": f"image {a:g} : tabular {b:g}", "a": a, "b": b, **row}
                rows.append(row)
                print(
                    f"[{row['scenario']}] D={depth} lam={lam:.0e}: MSE {row['test_mse']:.3f}, norms image "
                    f"{row['image_norm']:.3g} tabular {row['tabular_norm']:.3g}, kept {row['kept']} "
                    f"({time.time() - t0:.0f}s)",
                    flush=True,
                )
    write_results(args.output_dir, args.dataset, rows, {**vars(args), "wall_time_s": round(time.time() - t_start, 1)})
    print(markdown_table(rows, ["scenario", "depth", "lam", "test_mse", "image_norm", "tabular_norm", "kept"]))

    plt = pyplot()
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4 * len(scenarios), 3.5), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        for depth in args.depths:
            rs = [r for r in rows if r["scenario"] == sc and r["depth"] == depth]
            lams = [r["lam"] for r in rs]
            ax.plot(lams, [max(r["image_norm"], 1e-8) for r in rs], "-o", ms=3, label=f"image D={depth}")
            ax.plot(lams, [max(r["tabular_norm"], 1e-8) for r in rs], "--s", ms=3, label=f"tabular D={depth}")
        ax.axhline(args.threshold, color="gray", lw=1, label=f"threshold {args.threshold:g} (below: removed)")
        lam_axis(ax, [r["lam"] for r in rows])
        ax.set_yscale("log")
        ax.set_title(sc)
    axes[0][0].set_ylabel("fusion head norm ||theta_g||")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, f"{args.dataset}.png"), dpi=120)
    print(f"wrote {args.output_dir}/{args.dataset}.* in {time.time() - t_start:.0f}s")
    return rows


if __name__ == "__main__":
    main()
