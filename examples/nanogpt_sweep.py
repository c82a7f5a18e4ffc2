"""Sweep lam for D-Gating (D = 2, 3, 4) and the direct group-lasso baseline on the NanoGPT example (paper Fig. 7).

Each run is `examples/nanogpt_shakespeare.py` in its own process (run directories under --runs-dir; finished runs
are skipped, so the sweep can be resumed). The table (CSV + JSON) and the plot of validation character accuracy
against head sparsity go to --results-dir.

    # the paper's setting, plain AdamW for the gates too (results/nanogpt; DGateTrainer's default for heads now,
    # so `--gated-lr auto` gives the same runs)
    nice python examples/nanogpt_sweep.py --data-file $DATA/shakespeare.txt -- --gated-lr off
    # the example's defaults as they stand (gated_lr auto), D = 3, on the current code (results/nanogpt_default)
    nice python examples/nanogpt_sweep.py --data-file $DATA/shakespeare.txt --depths 3 --no-direct \
        --lams 0.0003 0.001 0.003 0.01 0.03 0.1 0.3 --runs-dir outputs/nanogpt_sweep_default \
        --results-dir results/nanogpt_default
    # the gates on momentum SGD at 0.2 inside AdamW (DGateTrainer's "auto" for heads before it changed), D = 3
    nice python examples/nanogpt_sweep.py --data-file $DATA/shakespeare.txt --depths 3 --no-direct \
        --lams 0.003 0.005 0.01 0.02 0.03 --runs-dir outputs/nanogpt_sweep_sgd \
        --results-dir results/nanogpt_gates_sgd -- --gated-lr 0.2
    python examples/nanogpt_sweep.py --table-only      # rebuild table and plot from finished runs
    python examples/nanogpt_sweep.py --update-docs     # rewrite the generated tables in README.md and docs/
    # the default command and its dense twin, recorded for README (results/nanogpt/default_command.json)
    accelerate launch examples/nanogpt_shakespeare.py --data-file $DATA/shakespeare.txt --preset tiny --output-dir A
    accelerate launch examples/nanogpt_shakespeare.py --data-file $DATA/shakespeare.txt --preset tiny --output-dir B \
        --lam 0
    python examples/nanogpt_sweep.py --record-default A B   # (each log.txt ending in "wall=SECONDS")

The tables in README.md and docs/trainer.md between `<!-- generated: nanogpt_sweep ... -->` markers are written
by `--update-docs` from the results files (tests/test_docs.py checks that they still match).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = [
    "method",
    "depth",
    "lam",
    "head_sparsity",
    "head_sparsity_1e-4",
    "head_sparsity_1e-6",
    "val_loss",
    "val_perplexity",
    "val_char_accuracy",
    "params_kept",
    "params_total",
    "steps",
    "train_seconds",
]


def run_names(depths: list[int], lams: list[float], direct: bool, dense: bool) -> list[tuple[str, list[str]]]:
    """(name, extra flags) of every run, lam-major so a cut-short sweep still covers every method."""
    runs = [("dense_lam0", ["--method", "dgate", "--depth", "3", "--lam", "0"])] if dense else []
    for lam in lams:
        for d in depths:
            runs.append((f"dgate_D{d}_lam{lam:g}", ["--method", "dgate", "--depth", str(d), "--lam", str(lam)]))
        if direct:
            runs.append((f"direct_lam{lam:g}", ["--method", "direct", "--lam", str(lam)]))
    return runs


def strict_sparsity(run_dir: str) -> dict[str, float | None]:
    """Head sparsity at stricter thresholds, from the saved gated model: how exactly zero the zeros are."""
    import hf_dgate

    try:
        model = hf_dgate.load_gated(run_dir)
    except (OSError, ValueError):
        return {"head_sparsity_1e-4": None, "head_sparsity_1e-6": None}
    return {
        f"head_sparsity_{name}": hf_dgate.sparsity_report(model, threshold=t).sparsity("heads")
        for name, t in (("1e-4", 1e-4), ("1e-6", 1e-6))
    }


def collect(runs_dir: str, results_dir: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        path = os.path.join(runs_dir, name, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            row = {k: r.get(k) for k in COLUMNS}
            row["method"] = "direct" if r["method"] == "direct" else f"dgate D={r['depth']}"
            row["run"] = name
            row["active_per_layer"] = r["active_per_layer"].get("heads")
            row["gated_lr"] = r.get("args", {}).get("gated_lr")
            row.update(strict_sparsity(os.path.join(runs_dir, name)))
            rows.append(row)
    rows.sort(key=lambda r: (r["method"], r["lam"]))
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(results_dir, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", *COLUMNS])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in ["run", *COLUMNS]})
    recipes = {r["gated_lr"] for r in rows}
    # heads under "auto" keep AdamW (no budget here); runs before that default recorded "auto" for SGD 0.2 and sit in
    # results/nanogpt_gates_sgd, whose plot is not redrawn from here
    recipe = "gates: AdamW with the weights" if recipes <= {"off", "auto"} else "gates: momentum SGD in AdamW"
    plot(rows, os.path.join(results_dir, "accuracy_vs_head_sparsity.png"), recipe)
    return rows


def plot(rows: list[dict], path: str, recipe: str = "") -> None:
    """Accuracy against head sparsity at the default threshold (left) and at a strict one (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in (
        (axes[0], "head_sparsity", "zero: ||theta_g|| < 1e-3 (default)"),
        (axes[1], "head_sparsity_1e-6", "zero: ||theta_g|| < 1e-6"),
    ):
        dense = [r for r in rows if r["lam"] == 0]
        for method in sorted({r["method"] for r in rows if r["lam"] > 0}):
            pts = sorted(
                (r[key], r["val_char_accuracy"], r["lam"])
                for r in rows
                if r["method"] == method and r["lam"] > 0 and r[key] is not None
            )
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            for sp, acc, lam in pts:
                ax.annotate(f"{lam:g}", (100 * sp, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for r in dense:
            ax.plot([100 * (r[key] or 0.0)], [r["val_char_accuracy"]], "k*", markersize=10, label="dense (lam = 0)")
        ax.set_xlabel(f"head sparsity (%), {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation character accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"NanoGPT on TinyShakespeare, tiny preset (CPU, 600 steps); point labels = lam; {recipe}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | lam | head sparsity | at 1e-4 | at 1e-6 | val loss | ppl | char acc. | params kept | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['lam']:g} | {100 * r['head_sparsity']:.1f}% | {pct(r['head_sparsity_1e-4'])} | "
            f"{pct(r['head_sparsity_1e-6'])} | {r['val_loss']:.4f} | "
            f"{r['val_perplexity']:.3f} | {r['val_char_accuracy']:.4f} | {r['params_kept']:,} / "
            f"{r['params_total']:,} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def pivot(rows: list[dict]) -> str:
    """README form: one row per lam, one column per method, 'sparsity / accuracy' in each cell."""
    methods = sorted({r["method"] for r in rows if r["lam"] > 0})
    lams = sorted({r["lam"] for r in rows if r["lam"] > 0})
    cells = {(r["method"], r["lam"]): r for r in rows}
    head = "| lam | " + " | ".join(f"{m.replace('dgate ', '')} sparsity / acc." for m in methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 1)]
    for lam in lams:
        parts = []
        for m in methods:
            r = cells.get((m, lam))
            parts.append("-" if r is None else f"{100 * r['head_sparsity']:.1f}% / {r['val_char_accuracy']:.4f}")
        lines.append(f"| {lam:g} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


DEFAULT_COMMAND = "accelerate launch examples/nanogpt_shakespeare.py --data-file $DATA/shakespeare.txt --preset tiny"


def record_default(run_dir: str, dense_dir: str, path: str) -> dict:
    """`<results>/default_command.json` from a run of DEFAULT_COMMAND and one with `--lam 0` added (the dense
    reference of the same recipe), with how exactly zero the zeros are and the wall time in each run's log."""
    rec = {"command": DEFAULT_COMMAND, "dense_command": DEFAULT_COMMAND + " --lam 0"}
    for key, d in (("run", run_dir), ("dense", dense_dir)):
        with open(os.path.join(d, "results.json")) as f:
            r = json.load(f)
        r.pop("args", None)
        r.update(strict_sparsity(d))
        with open(os.path.join(d, "log.txt")) as f:
            tail = f.read().rsplit("wall=", 1)
        r["wall_seconds"] = int(tail[1].split()[0]) if len(tail) == 2 else None
        rec[key] = r
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
    return rec


def command_sentence(rec: dict) -> str:
    """What the default command produced, in one paragraph (README)."""
    r, d = rec["run"], rec["dense"]
    gap = 100 * (d["val_char_accuracy"] - r["val_char_accuracy"])
    return (
        f"`{rec['command']}` ends with {100 * r['head_sparsity']:.1f}% of the 32 heads zero "
        f"({100 * r['head_sparsity_1e-6']:.1f}% even at a 1e-6 threshold) at character accuracy "
        f"{r['val_char_accuracy']:.4f} on the held-out 10%, {gap:.1f} "
        f"points under the same command with `--lam 0` ({d['val_char_accuracy']:.4f}); {r['wall_seconds']} s wall on "
        "a busy 2-core CPU."
    )


GENERATORS = {"table": markdown, "pivot": pivot}
DOCS = ("README.md", os.path.join("docs", "trainer.md"))
MARK = "<!-- generated: nanogpt_sweep "


def generated_block(results_dir: str, kind: str, root: str) -> str:
    """The table `kind` (table | pivot) from `<results_dir>/sweep.json`, as --update-docs writes it."""
    if kind == "command":
        with open(os.path.join(root, results_dir, "default_command.json")) as f:
            rec = json.load(f)
        text = command_sentence(rec)
        sweep = os.path.join(root, results_dir, "sweep.json")
        if os.path.isfile(sweep):
            with open(sweep) as f:
                same = [r for r in json.load(f) if r["method"] == "dgate D=3" and r["lam"] == rec["run"]["lam"]]
            if same:
                text += (
                    f" The sweep's run of this setting below (an earlier version of the code) gave "
                    f"{100 * same[0]['head_sparsity']:.1f}% at {same[0]['val_char_accuracy']:.4f}."
                )
        return text
    with open(os.path.join(root, results_dir, "sweep.json")) as f:
        rows = json.load(f)
    dense = [r for r in rows if r["lam"] == 0]
    text = GENERATORS[kind](rows)
    if kind == "pivot" and dense:
        text = f"(dense, lam = 0: accuracy {dense[0]['val_char_accuracy']:.4f})\n\n" + text
    return text


def update_docs(root: str, check: bool = False) -> list[str]:
    """Rewrite every marked block in README.md and docs/trainer.md from its results file; with `check`, only return
    the files whose blocks differ."""
    stale = []
    for name in DOCS:
        path = os.path.join(root, name)
        with open(path) as f:
            lines = f.read().split("\n")
        out, i = [], 0
        while i < len(lines):
            line = lines[i]
            out.append(line)
            if line.startswith(MARK):
                results_dir, kind = line[len(MARK) :].rstrip(" ->").split()
                j = lines.index("<!-- end generated -->", i)
                out.extend(generated_block(results_dir, kind, root).split("\n"))
                out.append(lines[j])
                i = j
            i += 1
        text = "\n".join(out)
        with open(path) as f:
            if f.read() != text:
                stale.append(name)
                if not check:
                    with open(path, "w") as g:
                        g.write(text)
    return stale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-file", default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--lams", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    p.add_argument("--no-direct", action="store_true")
    p.add_argument("--no-dense", action="store_true", help="skip the lam = 0 reference run")
    p.add_argument("--runs-dir", default="outputs/nanogpt_sweep")
    p.add_argument("--results-dir", default="results/nanogpt")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--update-docs", action="store_true", help="rewrite the generated tables in README.md and docs/")
    p.add_argument(
        "--record-default",
        nargs=2,
        metavar=("RUN_DIR", "DENSE_DIR"),
        help="write <results-dir>/default_command.json from a run of the default command and one with --lam 0",
    )
    p.add_argument("extra", nargs="*", help="flags passed to every run, after --")
    args = p.parse_args()
    if args.record_default:
        print(json.dumps(record_default(*args.record_default, os.path.join(args.results_dir, "default_command.json"))))
        return
    if args.update_docs:
        print("rewrote:", update_docs(os.path.join(HERE, "..")) or "nothing (up to date)")
        return

    if not args.table_only:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for name, flags in run_names(args.depths, args.lams, not args.no_direct, not args.no_dense):
            out = os.path.join(args.runs_dir, name)
            if os.path.isfile(os.path.join(out, "results.json")):
                continue
            cmd = [sys.executable, os.path.join(HERE, "nanogpt_shakespeare.py"), "--preset", args.preset]
            cmd += ["--output-dir", out, "--sample-chars", "0", *flags, *args.extra]
            if args.data_file:
                cmd += ["--data-file", args.data_file]
            t0 = time.time()
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "log.txt"), "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"{name}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
            collect(args.runs_dir, args.results_dir)
    rows = collect(args.runs_dir, args.results_dir)
    print(markdown(rows))


if __name__ == "__main__":
    main()
