"""`hf-dgate` command line: demo, export (physically pruned model) and report (sparsity table, heat-map)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .target_catalog import describe as describe_targets


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
    model.loss_type = "ForCausalLM"  # transformers cannot tell from the name GPT2LMHeadModel and warns
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", depth=args.depth, lam=args.lam))
    # Synthetic language: each sequence repeats a random 8-token motif, so a couple of heads suffice.
    motifs = torch.randint(0, vocab, (4096, 8))
    data = motifs.repeat(1, block // 8)
    # Adam for the weights; the gates take momentum-SGD steps (hf_dgate.optim): under Adam alone the head norms
    # shrink together and stop just under the threshold instead of reaching exact zeros (docs/optimizers.md).
    opt = hf_dgate.optim.dgate_optimizer(
        torch.optim.Adam(model.parameters(), lr=3e-3), model, lr=args.gate_lr, include_weights=False
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(0, len(data), (32,))]
        loss = model(batch, labels=batch).loss
        total = loss + hf_dgate.penalty(model)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
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
    from safetensors import SafetensorError

    from .errors import NonFiniteError
    from .saving import load_gated

    try:
        return load_gated(path)
    except NonFiniteError:
        raise
    except RecursionError:
        raise CLIError(
            f"a JSON file in {path!r} (config.json or dgate_*.json) is nested too deeply to read; replace it with the "
            "file hf_dgate wrote, or re-save the model."
        ) from None
    except SafetensorError as e:
        raise CLIError(
            f"a weight file in {path!r} is corrupt or truncated ({_one_line(e)}); re-save or re-download the model."
        ) from None
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first.startswith("Cannot load"):  # load_gated's own check, naming the tensors: already says what to do
            raise CLIError(first[0].lower() + first[1:]) from None
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
    import warnings

    from .errors import ExportError
    from .hub import check_repo_id, export_to_dir
    from .outdir import OutputDir
    from .verify import ExportInexactWarning, ExportNotVerifiedWarning, Verification

    if args.threshold is not None and not args.threshold > 0:
        raise CLIError(f"--threshold {args.threshold} is invalid: pass a float > 0 (e.g. 1e-3).")
    src = _gated_dir(args.gated_dir)
    try:  # before the model is loaded: a refused --out or repo id costs nothing
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
        OutputDir.plan(args.out, sources=[src], overwrite=args.overwrite, force=args.force)
    except ExportError as e:
        raise CLIError(cli_spelling(str(e))) from None
    model = _with_threshold_mode(_load_gated(src), args.threshold_mode)
    try:
        with warnings.catch_warnings():  # the outcome is printed below as one plain line
            warnings.simplefilter("ignore", ExportNotVerifiedWarning)
            warnings.simplefilter("ignore", ExportInexactWarning)
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
                overwrite=args.overwrite,
                force=args.force,
                source_dirs=[src],
                allow_inexact=args.allow_inexact,
                format=args.format,
                shape=args.shape,
                multiple_of=args.multiple_of,
                gguf_dtype=args.gguf_dtype,
                tokenizer=args.tokenizer or src,
            )
    except ExportError as e:  # the library's remedies, as this command spells them
        raise CLIError(cli_spelling(str(e))) from None
    print(f"wrote {summary['path']}")
    print(
        f"  parameters {summary['params_before']:,} -> {summary['params_after']:,}; forward FLOPs "
        f"{summary['flops_before']:,} -> {summary['flops_after']:,} ({summary['flops_ratio']:.2f}x fewer)"
    )
    if "speedup" in summary:
        print(f"  measured forward speed-up on {summary['device']}: {summary['speedup_text']}")
    check = Verification(**summary["verification"])
    print(f"  {'' if check.exact else 'WARNING: '}the export {check.describe()}")
    pad = summary.get("padding")
    if pad and pad.get("params_unpadded"):
        print(
            f"  padding ({pad['shape']}, multiple_of {pad['multiple_of'] or '-'}): {pad['groups_added']} zero groups "
            f"kept, parameters +{summary['params_after'] / pad['params_unpadded'] - 1:.1%}, FLOPs "
            f"+{summary['flops_after'] / max(pad['flops_unpadded'], 1) - 1:.1%} vs the non-uniform export"
        )
    if summary.get("gguf"):
        g = summary["gguf"]
        check = g.get("llama_cpp") or {}
        ran = (
            f"llama.cpp logits within {check['max_abs_diff']:.2e} of PyTorch"
            if check.get("verified")
            else f"not run in llama.cpp ({check.get('reason')})"
        )
        print(f"  run with llama.cpp: {os.path.join(summary['path'], g['file'])} ({ran})")
    elif summary.get("decilm"):
        print(f"  serve with vLLM: vllm serve {summary['path']} --trust-remote-code (DeciLMForCausalLM)")
        print(f"  or load in PyTorch: hf_dgate.formats.decilm.load_decilm({summary['path']!r})")
    else:
        loader = "transformers.AutoModel*" if summary["native"] else "hf_dgate.AutoPrunedModel"
        print(f"  load with {loader}.from_pretrained({summary['path']!r})")
    if summary.get("hub_repo"):
        print(f"  uploaded to https://huggingface.co/{summary['hub_repo']}")
    return 0


def compress(args: argparse.Namespace) -> int:
    """Gate a trained causal LM, train it to --budget, finish, verify and export it (hf_dgate.compress)."""
    import json

    from .compress import compress as run
    from .compress import summary_dict
    from .errors import ExportError

    budget = args.budget if args.budget < 1 else int(args.budget)
    if args.budget >= 1 and not float(args.budget).is_integer():
        raise CLIError(f"--budget {args.budget} is invalid: pass a fraction in (0, 1) or a parameter count.")
    try:
        s = run(
            args.model_dir, budget, args.data, args.steps, args.out, target=args.target.split(","), lam=args.lam,
            learning_rate=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, text_column=args.text_column,
            teacher=args.distill, overwrite=args.overwrite, seed=args.seed,
        )  # fmt: skip
    except ExportError as e:
        raise CLIError(cli_spelling(str(e))) from None
    print(s.table())
    print(f"finish: {s.finish}")
    print(f"wrote {s.out}")
    if args.json:
        print(json.dumps(summary_dict(s), indent=2))
    return 0


def _with_threshold_mode(model, mode: str | None):
    """--threshold-mode overrides the mode saved in dgate_config.json (what zero_groups reads)."""
    if mode is not None:
        from .patch import get_bank

        get_bank(model).config.threshold_mode = mode
    return model


def cli_spelling(message: str) -> str:
    """A library message with its remedies spelled as this command's flags (hf_dgate.errors.CLI_REMEDIES)."""
    from .errors import CLI_REMEDIES

    for library, flag in CLI_REMEDIES.items():
        message = message.replace(library, flag)
    return message


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

    plot = _plot_path(args.plot) if args.plot else None  # refuse a bad path before the (slow) load
    model = _with_threshold_mode(_load_gated(args.dir), args.threshold_mode)
    rep = sparsity_report(model, args.threshold)
    print(rep.to_json() if args.json else rep)
    if plot:
        path = plot_norms(model, plot, args.threshold)
        print(f"heat-map written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _plot_path(path: str) -> str:
    """The file `--plot` writes: PATH itself for an image file name, PATH/norms.png for a directory; else refuse.

    (matplotlib would append '.png' to a name without a suffix, writing a file the user did not name.)
    """
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        if not os.path.isdir(path):
            raise CLIError(f"--plot {path!r}: no such directory; create it or pass a file name such as norms.png.")
        return os.path.join(path, "norms.png")
    if os.path.splitext(path)[1].lower() not in PLOT_FORMATS:
        raise CLIError(
            f"--plot {path!r} has no image suffix; pass a file name ending in one of {', '.join(PLOT_FORMATS)} "
            "or an existing directory (the heat-map is then written to DIR/norms.png)."
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"--plot {path!r}: the directory {parent!r} does not exist; create it first.")
    return path


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
    try:
        with open(summary_path) as f:
            summary = json.load(f, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise CLIError(f"{summary_path!r} is not valid JSON ({_one_line(e)}); re-run `hf-dgate export`.") from None
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
        return 0
    try:
        lines = [
            f"hf-dgate export {args.dir} (threshold {summary['threshold']:g})",
            f"  parameters {summary['params_before']:,} -> {summary['params_after']:,}",
            f"  forward FLOPs {summary['flops_before']:,} -> {summary['flops_after']:,}",
        ]
        pad = summary.get("padding")
        if pad and pad.get("params_unpadded"):  # a uniform / rounded export: what the zero groups cost
            lines.append(
                f"  padding ({pad['shape']}, multiple_of {pad['multiple_of'] or '-'}): {pad['groups_added']} zero "
                f"groups kept; the non-uniform export has {pad['params_unpadded']:,} parameters and "
                f"{pad['flops_unpadded']:,} FLOPs"
            )
        if summary.get("format", "native") != "native":
            lines.append(f"  format {summary['format']}")
        lines.append(structure_table(summary.get("structure") or {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CLIError(
            f"{summary_path!r} is incomplete or malformed ({type(e).__name__}: {_one_line(e)}); re-run `hf-dgate "
            "export`."
        ) from None
    print("\n".join(lines))
    return 0


def _no_constant(name: str) -> float:
    """json.load hook: NaN/Infinity are not JSON, and a summary holding them records a broken export."""
    raise ValueError(f"non-standard JSON constant {name}")


def _one_line(e: BaseException) -> str:
    """An exception's message as one line (whitespace collapsed, at most 300 characters)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def plot_norms(model, path: str, threshold: float | None = None) -> str:
    """Heat-map of per-head (else per-neuron) effective norms ||theta_g||, one row per layer, zeros marked.

    Returns the file written: `path`, or `path`/norms.png for a directory."""
    path = _plot_path(path)
    from .extras import MissingExtraError, require

    try:
        matplotlib = require("matplotlib", "--plot")
    except MissingExtraError as e:
        raise CLIError(str(e)) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from .patch import get_bank
    from .targets import get_target

    bank = get_bank(model)
    target = "heads" if "heads" in bank.targets else bank.targets[0]
    thr = bank.check_threshold(threshold)
    relative = bank.config.threshold_mode == "relative"
    with torch.no_grad():
        norms = bank.effective_norms(target).float().cpu().numpy()
        zero = bank.zero_groups(target, threshold).cpu().numpy()
        grey = bank.grey_groups(target, threshold).cpu().numpy()
    per_set = zip(bank.per_set(norms, target), bank.per_set(zero, target), bank.per_set(grey, target))
    rows = [(str(gs.layer), n, z, g) for (gs, n), (_, z), (_, g) in per_set]
    width = max(len(r) for _, r, _, _ in rows)
    grid = np.full((len(rows), width), np.nan)
    settled = np.zeros((len(rows), width), dtype=bool)
    unsettled = np.zeros((len(rows), width), dtype=bool)
    for i, (_, r, z, g) in enumerate(rows):
        grid[i, : len(r)] = r
        settled[i, : len(z)] = z & ~g
        unsettled[i, : len(g)] = g
    fig, ax = plt.subplots(figsize=(min(4 + 0.4 * width, 16), 2.6 + 0.35 * len(rows)))
    im = ax.imshow(np.log10(np.maximum(grid, 1e-12)), aspect="auto", cmap="viridis", interpolation="nearest")
    marks = [
        (settled, "x", "red", "zero: settled below the threshold (removed on export)"),
        (unsettled, "o", "orange", "grey: below the threshold but not settled (export checks it, may refuse)"),
    ]
    for mask, marker, color, label in marks:
        where = np.argwhere(mask)
        if len(where):
            style = {"c": color} if marker == "x" else {"facecolors": "none", "edgecolors": color}
            ax.scatter(where[:, 1], where[:, 0], marker=marker, s=28, label=label, **style)
    ax.set_xlabel(get_target(target, bank.config).unit or target)
    ax.set_ylabel("layer")
    if width <= 32:
        ax.set_xticks(range(width))
    ax.set_yticks(range(len(rows)), [name for name, _, _, _ in rows])
    rule = f"{thr:g} x its layer's largest" if relative else f"{thr:g}"
    unit = target[:-1] if target.endswith("s") else target
    ax.set_title(f"effective norm ||theta_g|| per {unit}; zero below {rule}", fontsize="medium")
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("log10 ||theta_g||" + ("" if relative else "; red: threshold"))
    if not relative:
        bar.ax.axhline(np.log10(thr), color="red", linewidth=2)
    if settled.any() or unsettled.any():
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


THRESHOLD_HELP = (
    "Zero when ||theta_g|| < T (None: the threshold saved in the model's dgate_config.json); with "
    "--threshold-mode relative, T is a fraction of the largest norm in the group's layer."
)

# `hf-dgate --help` must answer without importing torch (seconds on a busy machine): the catalog is torch-free.
TARGETS_HELP = describe_targets()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help line (not for flags, off unless given, nor for required options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return action.help or ""
        return super()._get_help_string(action)


class _TopHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help keeps the target list's line breaks."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (argparse prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass an int >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; pass an int >= {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _float_above(low: float, strict: bool):
    sign = ">" if strict else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a finite float {sign} {low:g}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; pass a finite float {sign} {low:g} (e.g. 1e-3)")
        return value

    parse.__name__ = f"float {sign} {low:g}"
    return parse


def _threads_option(parser: argparse.ArgumentParser) -> None:
    from .threads import THREADS_HELP  # plain Python: no torch

    parser.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help=THREADS_HELP + ".",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. It imports nothing heavy: `hf-dgate --help` answers before torch is loaded."""
    parser = _Parser(
        prog="hf-dgate",
        description="D-Gating structured sparsity for HF models. `hf-dgate VERB --help` lists a verb's options.",
        epilog="targets (DGateConfig.target):\n" + TARGETS_HELP,
        formatter_class=_TopHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    p = sub.add_parser(
        "demo",
        help="Gate a tiny GPT-2, train on synthetic data, print the head-sparsity report.",
        description="Gate the heads of a tiny GPT-2, train it on a synthetic copy task (Adam for the weights, "
        "momentum SGD for the gates) and print the sparsity report. Downloads nothing.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--steps", type=_int_at_least(1), default=300, help="Training steps (batch of 32 sequences).")
    p.add_argument("--depth", type=_int_at_least(2), default=3, help="D: D-1 scalar gates per head (2 = group lasso).")
    p.add_argument("--lam", type=_float_above(0.0, strict=False), default=3e-2, help="Penalty strength lambda.")
    p.add_argument(
        "--gate-lr", type=_float_above(0.0, strict=True), default=0.2, help="SGD rate of the gates (hf_dgate.optim)."
    )
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="torch.manual_seed for model and data.")
    _threads_option(p)
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "export",
        help="Remove zero groups of a gated model and write a smaller HF model.",
        description="Load a gated model, remove its zero groups, check the result against the gated model on a "
        "probe batch, and write the smaller model, its model card and dgate_export.json to --out.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("gated_dir", metavar="GATED_DIR", help="Directory written by hf_dgate.save_gated.")
    p.add_argument("--out", required=True, help="Output directory (written atomically).")
    p.add_argument("--threshold", type=_float_above(0.0, strict=True), default=None, help=THRESHOLD_HELP)
    p.add_argument(
        "--threshold-mode",
        choices=("absolute", "relative"),
        default=None,
        help="absolute: zero when ||theta_g|| < T; relative: when below T times the largest norm in its layer "
        "(None: the model's dgate_config.json).",
    )
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="Also upload to this Hub repo (user/name).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it holds a previous export.")
    p.add_argument(
        "--force", action="store_true", help="Replace --out whatever it holds (never GATED_DIR or the current dir)."
    )
    p.add_argument("--no-measure", action="store_true", help="Skip the latency measurement.")
    p.add_argument("--seq-len", type=_int_at_least(1), default=128, help="Sequence length of the FLOPs/latency batch.")
    p.add_argument("--base-model", default=None, help="Base model id for the model card.")
    p.add_argument(
        "--allow-inexact",
        action="store_true",
        help="Write the export even when its outputs differ from the gated model's beyond the tolerance (removed "
        "groups not zero); the card and dgate_export.json then say so.",
    )
    _threads_option(p)
    p.add_argument(
        "--format",
        choices=["native", "gguf", "decilm"],
        default="native",
        help="native: transformers folder; gguf: llama.cpp (per-layer shapes, Llama/Mistral/Qwen2); decilm: vLLM's "
        "DeciLMForCausalLM block_configs (Llama/Mistral/Qwen2).",
    )
    p.add_argument(
        "--shape",
        choices=["per_layer", "uniform"],
        default="per_layer",
        help="uniform: every layer keeps as many heads/neurons as the fullest (zero groups kept; plain "
        "from_pretrained loads it). The card states the cost.",
    )
    p.add_argument(
        "--multiple-of",
        default=None,
        metavar="N|neurons=N,heads=M",
        help="Round kept counts up with zero groups: N for neurons (e.g. 128), heads=M for key/value heads "
        "(--format gguf rounds neurons to 64 unless given; 1 keeps exact counts).",
    )
    p.add_argument("--gguf-dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="Weight type of --format gguf.")  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None, help="Tokenizer folder for --format gguf (default: GATED_DIR's, if it has one)."
    )
    p.set_defaults(func=export)

    p = sub.add_parser(
        "report",
        help="Sparsity table (and heat-map) of a gated model dir, or an export's structure.",
        description="Print the sparsity table of a gated model directory (optionally a heat-map of its group "
        "norms), or the kept structure of an hf-dgate export.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="A gated model directory (hf_dgate.save_gated) or an export.")
    p.add_argument(
        "--plot",
        metavar="FILE.png|DIR",
        default=None,
        help="Write a heat-map of effective norms to FILE.png (.pdf, .svg) or to DIR/norms.png.",
    )
    p.add_argument("--threshold", type=_float_above(0.0, strict=True), default=None, help=THRESHOLD_HELP)
    p.add_argument(
        "--threshold-mode",
        choices=("absolute", "relative"),
        default=None,
        help="absolute or relative threshold (None: the model's dgate_config.json); see `hf-dgate export --help`.",
    )
    p.add_argument("--json", action="store_true", help="Machine-readable output.")
    _threads_option(p)
    p.set_defaults(func=report)

    p = sub.add_parser(
        "compress",
        help="Compress a trained causal LM to a parameter budget (gate, train, finish, verify, export).",
        description="Gate the heads and neurons of a trained causal LM, train it on --data while the weakest groups "
        "(lowest estimated loss change per parameter, from the gates' gradients) are set to exactly zero a few at a "
        "time until --budget is met (first 30% of the steps), hold them there "
        "while the rest recovers, verify and export the smaller model with its card to --out, and print a summary "
        "table.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="A transformers causal-LM folder (with its tokenizer).")
    p.add_argument(
        "--budget", type=_float_above(0.0, strict=True), required=True,
        help="Parameters the export keeps: a fraction in (0, 1) of the model's, or a count.",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="A text/json/jsonl/csv/parquet file or a `datasets` name.")
    p.add_argument(
        "--steps", type=_int_at_least(2), required=True, help="Optimizer steps (first 30%%: cut; the rest: recover)."
    )
    p.add_argument("--out", required=True, help="Output directory of the export (written atomically).")
    p.add_argument("--target", default="heads,neurons", help="Comma-separated targets to gate.")
    p.add_argument("--lam", type=_float_above(0.0, strict=True), default=1e-4, help="Penalty strength lambda.")
    p.add_argument("--lr", type=_float_above(0.0, strict=True), default=1e-4, help="AdamW peak learning rate.")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="Blocks per optimizer step.")
    p.add_argument("--seq-len", type=_int_at_least(2), default=256, help="Tokens per block.")
    p.add_argument("--text-column", default="text", help="Column of a json/csv/parquet file or dataset.")
    p.add_argument("--distill", action="store_true", help="Distil from the model as loaded (logit KL, T = 2).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it holds a previous export.")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="Seed for gating order and data shuffling.")
    p.add_argument("--json", action="store_true", help="Also print the summary as JSON.")
    _threads_option(p)
    p.set_defaults(func=compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected failure (bad input, unreadable or corrupt files, NaN/inf gates, a model that
    cannot be exported) is one line on stderr and exit code 2, no traceback (HF_DGATE_DEBUG=1 shows it).

    Arguments are parsed before anything heavy is imported (torch, transformers: seconds), so --help is instant."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (already printed as one line)
        return e.code if isinstance(e.code, int) else 0
    from safetensors import SafetensorError

    from .threads import configure_threads

    try:
        configure_threads(args.threads)
        return args.func(args)
    except CLIError as e:
        print(f"hf-dgate {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # exports write to a temporary folder and swap it in: nothing is left half-written
        if os.environ.get("HF_DGATE_DEBUG"):
            raise
        print(f"hf-dgate {args.command}: interrupted; nothing was written or changed.", file=sys.stderr)
        return 130
    except RecursionError:
        where = getattr(args, "dir", None) or getattr(args, "gated_dir", None) or "the input folder"
        msg = (
            f"a JSON file in {where!r} (config.json or dgate_*.json) is nested too deeply to read; replace it with "
            "the file hf_dgate wrote, or re-save the model."
        )
        print(f"hf-dgate {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (ValueError, OSError, SafetensorError) as e:  # ValueError covers NonFiniteError and ExportError
        if os.environ.get("HF_DGATE_DEBUG"):
            raise
        msg = _one_line(cli_spelling(str(e)))
        print(f"hf-dgate {args.command}: error: {msg} (set HF_DGATE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
