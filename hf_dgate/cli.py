"""`hf-dgate` command line: demo, export (physically pruned model) and report (sparsity table, heat-map)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def demo(args: argparse.Namespace) -> int:
    """Gate the heads of a tiny GPT-2, train a few Adam steps on synthetic text and print the sparsity report."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_dgate

    torch.manual_seed(args.seed)
    vocab, block = 32, 32
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=block,
            n_embd=64,
            n_layer=4,
            n_head=8,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", depth=args.depth, lam=args.lam))
    # Synthetic language: each sequence repeats a random 8-token motif, so a couple of heads suffice.
    motifs = torch.randint(0, vocab, (4096, 8))
    data = motifs.repeat(1, block // 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(0, len(data), (32,))]
        loss = model(batch, labels=batch).loss
        total = loss + hf_dgate.penalty(model)
        opt.zero_grad()
        total.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            rep = hf_dgate.sparsity_report(model)
            print(
                f"step {step:4d}  loss {loss.item():.3f}  penalty {hf_dgate.penalty(model).item():.4f}  "
                f"head sparsity {rep.sparsity('heads'):.2f}"
            )
    print(hf_dgate.sparsity_report(model))
    return 0


class CLIError(Exception):
    """A problem with the user's input; printed as one line, no traceback."""


def _gated_dir(path: str) -> str:
    from .config import CONFIG_NAME

    if not os.path.isdir(path):
        raise CLIError(f"{path!r} is not a directory; pass the directory hf_dgate.save_gated(model, dir) wrote.")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise CLIError(
            f"{path!r} has no {CONFIG_NAME}, so it holds no gated model; save one with "
            "hf_dgate.save_gated(model, dir) (or DGateTrainer.save_model) and pass that directory."
        )
    return path


def _load_gated(path: str):
    from .saving import load_gated

    try:
        return load_gated(path)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "mismatch" in str(e).lower():
            raise CLIError(
                f"the config.json in {path!r} does not match its weights (tensor shapes differ); fix config.json or "
                "re-save the model with hf_dgate.save_gated."
            ) from None
        raise CLIError(
            f"could not load the gated model in {path!r}: {first} - check that config.json matches the weights "
            "(re-save it with hf_dgate.save_gated)."
        ) from None


def export(args: argparse.Namespace) -> int:
    """Load a gated model, remove its zero groups and write a smaller model (+ card) to --out."""
    from .hub import export_to_dir

    if args.threshold is not None and not args.threshold > 0:
        raise CLIError(f"--threshold {args.threshold} is invalid: pass a float > 0 (e.g. 1e-3).")
    src = _gated_dir(args.gated_dir)
    if os.path.abspath(args.out) == os.path.abspath(src):
        raise CLIError("--out must differ from GATED_DIR (the gated model would be overwritten).")
    if os.path.exists(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists; pass --overwrite to replace it or choose another directory.")
    model = _load_gated(src)
    summary = export_to_dir(
        model,
        args.out,
        push_to_hub=bool(args.push_to_hub),
        hub_model_id=args.push_to_hub,
        threshold=args.threshold,
        measure=not args.no_measure,
        seq_len=args.seq_len,
        base_model=args.base_model,
        progress=True,
    )
    print(f"wrote {summary['path']}")
    print(
        f"  parameters {summary['params_before']:,} -> {summary['params_after']:,}; forward FLOPs "
        f"{summary['flops_before']:,} -> {summary['flops_after']:,} ({summary['flops_ratio']:.2f}x fewer)"
    )
    if "speedup" in summary:
        print(f"  measured speed-up {summary['speedup']:.2f}x on {summary['device']}")
    print(f"  max |output difference| to the gated model: {summary['max_abs_diff']:.2e}")
    if summary["max_abs_diff"] > 1e-3:
        print(
            "  warning: some removed groups were not numerically zero (training has not converged to exact zeros "
            "at this threshold); lower --threshold or train longer if the outputs must match."
        )
    loader = "transformers.AutoModel*" if summary["native"] else "hf_dgate.AutoPrunedModel"
    print(f"  load with {loader}.from_pretrained({summary['path']!r})")
    if summary.get("hub_repo"):
        print(f"  uploaded to https://huggingface.co/{summary['hub_repo']}")
    return 0


def report(args: argparse.Namespace) -> int:
    """Sparsity table of a gated model directory (and a heat-map), or the kept structure of an export."""
    from .config import CONFIG_NAME

    if args.threshold is not None and not args.threshold > 0:
        raise CLIError(f"--threshold {args.threshold} is invalid: pass a float > 0 (e.g. 1e-3).")
    if not os.path.isdir(args.dir):
        raise CLIError(f"{args.dir!r} is not a directory; pass a gated model directory or an hf-dgate export.")
    if not os.path.isfile(os.path.join(args.dir, CONFIG_NAME)):
        return _report_export(args)
    from .report import sparsity_report

    model = _load_gated(args.dir)
    rep = sparsity_report(model, args.threshold)
    print(rep.to_json() if args.json else rep)
    if args.plot:
        path = plot_norms(model, args.plot, args.threshold)
        print(f"heat-map written to {path}")
    return 0


def _report_export(args: argparse.Namespace) -> int:
    from .hub import SUMMARY_NAME, structure_table

    summary_path = os.path.join(args.dir, SUMMARY_NAME)
    if not os.path.isfile(summary_path):
        raise CLIError(
            f"{args.dir!r} is neither a gated model (no dgate_config.json) nor an hf-dgate export (no "
            f"{SUMMARY_NAME}); pass a directory written by hf_dgate.save_gated or `hf-dgate export`."
        )
    if args.plot:
        raise CLIError("--plot needs the gates: run it on the gated model directory, not on the export.")
    with open(summary_path) as f:
        summary = json.load(f)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"hf-dgate export {args.dir} (threshold {summary['threshold']:g})")
    print(f"  parameters {summary['params_before']:,} -> {summary['params_after']:,}")
    print(f"  forward FLOPs {summary['flops_before']:,} -> {summary['flops_after']:,}")
    print(structure_table(summary.get("structure") or {}))
    return 0


def plot_norms(model, path: str, threshold: float | None = None) -> str:
    """Heat-map of per-head (else per-neuron) effective norms ||theta_g||, one row per layer, zeros marked."""
    try:
        import matplotlib
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install matplotlib (or hf-dgate[examples]).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from .patch import get_bank

    bank = get_bank(model)
    target = "heads" if "heads" in bank.targets else bank.targets[0]
    with torch.no_grad():
        norms = bank.effective_norms(target).float().cpu().numpy()
        zero = bank.zero_groups(target, threshold).cpu().numpy()
    rows = [
        (str(gs.layer), norms[off : off + gs.n_groups], zero[off : off + gs.n_groups])
        for gs, off in zip(bank.group_sets, bank.offsets)
        if gs.target == target
    ]
    width = max(len(r) for _, r, _ in rows)
    grid = np.full((len(rows), width), np.nan)
    removed = np.zeros((len(rows), width), dtype=bool)
    for i, (_, r, z) in enumerate(rows):
        grid[i, : len(r)] = r
        removed[i, : len(z)] = z
    fig, ax = plt.subplots(figsize=(min(3 + 0.4 * width, 16), 2.2 + 0.35 * len(rows)))
    im = ax.imshow(np.log10(np.maximum(grid, 1e-12)), aspect="auto", cmap="viridis", interpolation="nearest")
    dead = np.argwhere(removed)
    ax.scatter(dead[:, 1], dead[:, 0], marker="x", color="red", s=20, label="zero (removed on export)")
    ax.set_xlabel("key/value group" if target == "heads" else target)
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows])
    ax.set_title(f"log10 effective norm per {target[:-1] if target.endswith('s') else target}")
    fig.colorbar(im, ax=ax)
    if len(dead):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


THRESHOLD_HELP = (
    "Zero when ||theta_g|| < T (default: the config's); with threshold_mode='relative', T is a fraction of the "
    "largest norm in the group's layer."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dgate", description="D-Gating structured sparsity for HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="Gate a tiny GPT-2, train on synthetic data, print the head-sparsity report.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lam", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)

    p = sub.add_parser("export", help="Remove zero groups of a gated model and write a smaller HF model.")
    p.add_argument("gated_dir", metavar="GATED_DIR", help="Directory written by hf_dgate.save_gated.")
    p.add_argument("--out", required=True, help="Output directory (written atomically).")
    p.add_argument("--threshold", type=float, default=None, help=THRESHOLD_HELP)
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="Also upload to this Hub repo (user/name).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    p.add_argument("--no-measure", action="store_true", help="Skip the latency measurement.")
    p.add_argument("--seq-len", type=int, default=128, help="Sequence length of the FLOPs/latency batch.")
    p.add_argument("--base-model", default=None, help="Base model id for the model card.")
    p.set_defaults(func=export)

    p = sub.add_parser("report", help="Sparsity table (and heat-map) of a gated model dir, or an export's structure.")
    p.add_argument("dir", metavar="DIR", help="A gated model directory (hf_dgate.save_gated) or an export.")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="Write a heat-map of effective norms.")
    p.add_argument("--threshold", type=float, default=None, help=THRESHOLD_HELP)
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    p.set_defaults(func=report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"hf-dgate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("HF_DGATE_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hf-dgate {args.command}: error: {first} (set HF_DGATE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
