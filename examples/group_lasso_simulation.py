"""Group-sparse linear regression: D-Gating vs proximal group lasso, direct GD and the oracle (paper Fig. 4).

Why: a linear model is where D-Gating's claims can be checked against ground truth. With D = 2 the gated
problem is the convex group lasso, so full-batch GD on the smooth surrogate must land on the proximal
(FISTA) solution; D = 3, 4 solve the non-convex L_{2,2/D} problem and should select the true groups at
lower test error; direct (sub)gradient descent on the same non-smooth penalty never reaches exact zeros.

Setup (paper App. C.1): n = 200 train / 2000 test, p = 200 Gaussian features in 40 groups of 5, 7 informative
groups with N(0, 1) effects, N(0, 1) noise; full-batch GD for 1500 iterations, cosine lr from 5e-2, momentum
0.9; a group is zero when ||theta_g|| < 1e-3. The simulated data needs no download.

    python examples/group_lasso_simulation.py --output-dir results/group_lasso            # ~10 min on 1 core
    python examples/group_lasso_simulation.py --quick --output-dir /tmp/gl                # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cosine_lr, lam_axis, lam_grid, markdown_table, pyplot, write_results  # noqa: E402

import hf_dgate  # noqa: E402
from hf_dgate.baselines import group_lasso_fista  # noqa: E402
from hf_dgate.threads import THREADS_HELP, configure_threads  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--output-dir",
        default="runs/group_lasso",
        help="where result files go (results/group_lasso holds the committed ones: pass it to regenerate them)",
    )
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--n-groups", type=int, default=40)
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--informative", type=int, default=7)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--lr", type=float, default=5e-2)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--n-lams", type=int, default=10, help="lam grid: log-spaced, as a fraction of lam_max (D=2)")
    p.add_argument("--lam-min", type=float, default=1e-3, help="smallest lam / lam_max")
    p.add_argument("--lam-max", type=float, default=1.0, help="largest lam / lam_max")
    p.add_argument("--n-sims", type=int, default=3, help="independent simulated data sets (results are averaged)")
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--fista-iters", type=int, default=5000)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 depths, 2 lams, 150 iterations, 1 sim")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(
            depths=[2, 3], n_lams=2, iters=150, n_sims=1, n_test=500, lam_min=0.03, lam_max=1.5, fista_iters=1000
        )
        args = p.parse_args(argv)
    return args


# ----------------------------------------------------------------------------------------------------------------
# 1. Data: the paper's simulation
# ----------------------------------------------------------------------------------------------------------------
def simulate(args, seed):
    g = torch.Generator().manual_seed(seed)
    p = args.n_groups * args.group_size
    groups = torch.arange(p) // args.group_size
    beta = torch.zeros(p, dtype=torch.float64)
    true_groups = torch.randperm(args.n_groups, generator=g)[: args.informative]
    for k in true_groups.tolist():
        beta[k * args.group_size : (k + 1) * args.group_size] = torch.randn(args.group_size, generator=g).double()

    def draw(n):
        X = torch.randn(n, p, generator=g, dtype=torch.float64)
        return X, X @ beta + torch.randn(n, generator=g, dtype=torch.float64)

    Xtr, ytr = draw(args.n_train)
    Xte, yte = draw(args.n_test)
    return Xtr, ytr, Xte, yte, groups, set(true_groups.tolist())


def group_norms(beta, groups, n_groups):
    return torch.zeros(n_groups, dtype=beta.dtype).index_add_(0, groups, beta.detach() ** 2).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# 2. Methods: the gated (or directly penalised) linear model trained by full-batch GD in a plain torch loop
# ----------------------------------------------------------------------------------------------------------------
def fit_gd(X, y, groups, lam, depth, method, args):
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 1, bias=False)).double()
    rule = hf_dgate.GroupRule("groups", r"^0$", kind="in", size=args.group_size)
    cfg = hf_dgate.DGateConfig(target=[], groups=[rule], depth=depth, lam=lam, threshold=args.threshold, method=method)
    hf_dgate.apply_dgate(model, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=args.momentum)
    for step in range(args.iters):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.iters, args.lr)
        loss = 0.5 * (model(X).squeeze(-1) - y).pow(2).mean() + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scale = hf_dgate.get_bank(model).scale("groups")
    return (model[0].weight[0] * scale[groups]).detach()  # theta = w * prod(gamma), folded


def evaluate(beta, Xte, yte, groups, n_groups, true_groups, threshold):
    norms = group_norms(beta, groups, n_groups)
    selected = set((norms >= threshold).nonzero().flatten().tolist())
    return {
        "test_mse": float((Xte @ beta - yte).pow(2).mean()),
        "selected": len(selected),
        "true_positives": len(selected & true_groups),
        "false_positives": len(selected - true_groups),
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. The sweep
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    configure_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(0)
    rows = []
    for sim in range(args.n_sims):
        Xtr, ytr, Xte, yte, groups, true_groups = simulate(args, seed=sim)
        G = args.n_groups
        lam_max = group_norms(Xtr.T @ ytr / len(ytr), groups, G).max().item()  # smallest lam with beta = 0 (D=2)
        # oracle: least squares on the true support only
        support = torch.isin(groups, torch.tensor(sorted(true_groups)))
        beta_or = torch.zeros(Xtr.shape[1], dtype=torch.float64)
        beta_or[support] = torch.linalg.lstsq(Xtr[:, support], ytr.unsqueeze(1)).solution.squeeze(1)
        res = evaluate(beta_or, Xte, yte, groups, G, true_groups, args.threshold)
        rows.append({"sim": sim, "method": "oracle", "depth": 0, "lam": 0.0, "lam_rel": 0.0, **res})
        for frac in lam_grid(args.lam_min, args.lam_max, args.n_lams):
            lam = frac * lam_max
            beta = group_lasso_fista(Xtr, ytr, groups, lam, max_iter=args.fista_iters, tol=1e-10)
            res = evaluate(beta, Xte, yte, groups, G, true_groups, args.threshold)
            rows.append({"sim": sim, "method": "prox_group_lasso", "depth": 2, "lam": lam, "lam_rel": frac, **res})
            for depth in args.depths:
                for method in ("dgate", "direct"):
                    torch.manual_seed(1000 * sim + depth)
                    beta = fit_gd(Xtr, ytr, groups, lam, depth, method, args)
                    res = evaluate(beta, Xte, yte, groups, G, true_groups, args.threshold)
                    rows.append({"sim": sim, "method": method, "depth": depth, "lam": lam, "lam_rel": frac, **res})
        print(f"simulation {sim + 1}/{args.n_sims} done ({time.time() - t0:.0f}s)", flush=True)

    # average over simulations per (method, depth, lam_rel)
    summary = {}
    for r in rows:
        key = (r["method"], r["depth"], round(r["lam_rel"], 12))
        summary.setdefault(key, []).append(r)
    table = []
    for (method, depth, lam_rel), rs in summary.items():
        entry = {"method": method, "depth": depth, "lam_rel": lam_rel}
        for k in ("test_mse", "selected", "true_positives", "false_positives"):
            entry[k] = sum(r[k] for r in rs) / len(rs)
        table.append(entry)
    meta = {k: v for k, v in vars(args).items()}
    meta["wall_time_s"] = round(time.time() - t0, 1)
    write_results(args.output_dir, "runs", rows, meta)
    write_results(args.output_dir, "summary", table, meta)

    # best test error per method (the lam a validation set would pick, here read off the test set as in Fig. 4)
    best = []
    for method, depth in sorted({(t["method"], t["depth"]) for t in table}):
        rs = [t for t in table if t["method"] == method and t["depth"] == depth]
        b = min(rs, key=lambda t: t["test_mse"])
        best.append(dict(b))
    print(markdown_table(best, ["method", "depth", "lam_rel", "test_mse", "selected", "true_positives"]))
    with open(os.path.join(args.output_dir, "best.md"), "w") as f:
        f.write(markdown_table(best, ["method", "depth", "lam_rel", "test_mse", "selected", "true_positives"]) + "\n")

    # plot: test error and selected groups against lam
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    oracle = [t for t in table if t["method"] == "oracle"][0]
    for method, depth in sorted({(t["method"], t["depth"]) for t in table if t["method"] != "oracle"}):
        rs = sorted([t for t in table if t["method"] == method and t["depth"] == depth], key=lambda t: t["lam_rel"])
        label = "prox. group lasso (FISTA)" if method == "prox_group_lasso" else f"{method} D={depth}"
        style = "k--" if method == "prox_group_lasso" else ("-o" if method == "dgate" else ":x")
        xs = [t["lam_rel"] for t in rs]
        axes[0].plot(xs, [t["test_mse"] for t in rs], style, label=label, ms=3)
        axes[1].plot(xs, [t["selected"] for t in rs], style, label=label, ms=3)
    axes[0].axhline(oracle["test_mse"], color="gray", lw=1, label="oracle OLS")
    axes[1].axhline(args.informative, color="gray", lw=1, label="true groups")
    for ax, ylabel in zip(axes, ("test MSE", "selected groups")):
        lam_axis(ax, [t["lam_rel"] for t in table if t["method"] != "oracle"], label="lam / lam_max")
        ax.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    for ax in axes:  # each panel names its own reference line (oracle OLS, true groups)
        ax.legend(fontsize=7)
    runs = "one simulation" if args.n_sims == 1 else f"mean of {args.n_sims} simulations"
    fig.suptitle(f"Group-sparse regression, {runs}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "group_lasso.png"), dpi=120)
    print(f"wrote {args.output_dir} in {time.time() - t0:.0f}s")
    return table


if __name__ == "__main__":
    main()
