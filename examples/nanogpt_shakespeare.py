"""Character-level GPT on TinyShakespeare with D-Gating on its attention heads (Kolb et al. 2025, Fig. 7).

A nanoGPT-style script to read top to bottom: configuration, data, model, training with `DGateTrainer`,
evaluation, report. It runs as a plain script or under `accelerate launch` (one or several processes):

    python examples/nanogpt_shakespeare.py --preset tiny --data-file $DATA/shakespeare.txt
    accelerate launch examples/nanogpt_shakespeare.py --preset tiny --data-file $DATA/shakespeare.txt
    accelerate launch --multi_gpu --num_processes 2 examples/nanogpt_shakespeare.py --preset tiny --data-file ...

(the last one also on a CPU-only machine: the script then sets `use_cpu` and the processes use gloo; accelerate's
`--cpu` launcher would start a single process).

Without `--data-file` it downloads karpathy's tinyshakespeare `input.txt` (and caches it); offline, pass a local
plain-text file instead. The last 10% of the characters are the validation set. Results (validation loss,
perplexity, character accuracy, head sparsity, per-layer active heads) go to `<output-dir>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.request

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, set_seed

import hf_dgate
from hf_dgate.threads import configure_threads
from hf_dgate.trainer import DGateTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import accuracy_score  # noqa: E402  (evaluate's accuracy, offline fallback)

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CACHE_FILE = os.path.join(os.path.expanduser("~"), ".cache", "hf_dgate", "tinyshakespeare", "input.txt")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "nanogpt_shakespeare.yaml")

# ------------------------------------------------------------------------------------------------------------------
# 1. Configuration: YAML defaults < --preset < command-line flags
# ------------------------------------------------------------------------------------------------------------------


def _gated_lr(text: str) -> float | str:
    """--gated-lr: 'auto', 'off' (or 0) or a rate > 0."""
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, off or a rate >= 0")
    return value or "off"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_CONFIG)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    with open(known.config) as f:
        defaults = yaml.safe_load(f) or {}
    presets = defaults.pop("presets", {}) or {}
    if known.preset is not None:
        if known.preset not in presets:
            sys.exit(f"--preset {known.preset!r} is not in {known.config}; available: {sorted(presets)}")
        defaults.update(presets[known.preset])

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML file with the defaults")
    p.add_argument("--preset", default=None, choices=sorted(presets) or None, help="named overrides from --config")
    p.add_argument("--data-file", type=str, help="local plain-text corpus (else TinyShakespeare is downloaded)")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--eval-samples", type=int, help="validation windows per evaluation")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--method", choices=["dgate", "direct"], help="direct: lam * sum ||theta_g||_2, no gates")
    p.add_argument("--target", type=str, help="what to gate: heads, neurons, layers")
    p.add_argument("--depth", type=int, help="D >= 2 (D-1 gates per group); ignored (2) for --method direct")
    p.add_argument("--lam", type=float)
    p.add_argument("--lam-warmup-steps", type=int)
    p.add_argument("--target-sparsity", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process and micro-batch")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--optim", type=str, help="transformers' optimizer name (default adamw_torch), e.g. adafactor, sgd")
    p.add_argument("--optim-args", type=str, help="e.g. momentum=0.9 for --optim sgd")
    p.add_argument(
        "--gated-lr",
        type=_gated_lr,
        help="momentum-SGD rate of the gates inside AdamW (hf_dgate.optim): auto (default; heads and neurons keep "
        "AdamW, as in the paper), a float (e.g. 0.2), or off (plain AdamW)",
    )
    p.add_argument("--gates-only", action="store_true", help="with --gated-lr: only the gates take SGD steps")
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--adam-beta2", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--logging-steps", type=int)
    p.add_argument("--save-steps", type=int, help="0: no intermediate checkpoints")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'last' for the newest in --output-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dir", type=str)
    p.add_argument("--report-to", type=str, help="none, tensorboard, wandb, ... (any Trainer integration)")
    p.add_argument("--sample-chars", type=int, help="characters to generate at the end (0: none)")
    unknown = sorted(set(defaults) - {a.dest for a in p._actions})
    if unknown:
        sys.exit(f"{known.config}: unknown keys {unknown}")
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.method == "direct":
        args.depth = 2  # direct: lam * sum ||theta_g||_2^(2/2), the group lasso on the same groups
    return args


# ------------------------------------------------------------------------------------------------------------------
# 2. Data: characters -> integer ids; the last val_fraction is held out
# ------------------------------------------------------------------------------------------------------------------


def read_text(data_file: str | None) -> str:
    """The corpus: --data-file, else the cached or freshly downloaded TinyShakespeare (fails fast offline)."""
    path = data_file
    if path is None:
        if not os.path.isfile(CACHE_FILE):
            try:
                with urllib.request.urlopen(DATA_URL, timeout=10) as r:
                    raw = r.read()
            except OSError as e:
                sys.exit(
                    f"Could not download TinyShakespeare from {DATA_URL} ({e}).\n"
                    "Offline? Pass a local plain-text file with --data-file PATH "
                    "(the last 10% of its characters are held out for validation)."
                )
            os.makedirs(os.path.dirname(CACHE_FILE), exist_ok=True)
            with open(CACHE_FILE, "wb") as f:
                f.write(raw)
        path = CACHE_FILE
    if not os.path.isfile(path):
        sys.exit(f"--data-file {path!r} does not exist; pass a plain-text file.")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        sys.exit(f"--data-file {path!r} is empty; pass a plain-text file with the training corpus.")
    return text


class CharWindows(torch.utils.data.Dataset):
    """Windows of `block` characters every `stride` characters; the model shifts labels itself."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int, limit: int | None = None):
        self.ids, self.block = ids, block
        starts = torch.arange(0, len(ids) - block + 1, stride)
        if limit is not None and len(starts) > limit:  # evenly spread over the split
            starts = starts[torch.linspace(0, len(starts) - 1, limit).long()]
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.ids[self.starts[i] : self.starts[i] + self.block]
        return {"input_ids": x, "labels": x}


def make_datasets(text: str, args: argparse.Namespace):
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_val = int(len(ids) * args.val_fraction)
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if len(train_ids) <= args.block_size or len(val_ids) <= args.block_size:
        sys.exit(
            f"The corpus has {len(ids)} characters: too short for block_size={args.block_size} with "
            f"val_fraction={args.val_fraction}; pass a longer --data-file or a smaller --block-size."
        )
    train = CharWindows(train_ids, args.block_size, stride=max(1, args.block_size // 2))
    val = CharWindows(val_ids, args.block_size, stride=args.block_size, limit=args.eval_samples)
    return chars, train, val


# ------------------------------------------------------------------------------------------------------------------
# 3. Evaluation metric: next-character accuracy (the loss and perplexity come from the Trainer's eval_loss)
# ------------------------------------------------------------------------------------------------------------------


def argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)  # keep only predictions: (N, T) instead of (N, T, vocab)


def char_accuracy(eval_pred) -> dict[str, float]:
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    return {"char_accuracy": accuracy_score(preds[:, :-1], labels[:, 1:])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_threads()  # a small model: a user's OMP_NUM_THREADS, else the idle cores (at most 4; hf_dgate.threads)
    set_seed(args.seed)
    text = read_text(args.data_file)
    chars, train_ds, val_ds = make_datasets(text, args)

    # --------------------------------------------------------------------------------------------------------------
    # 4. Model: GPT-2 architecture over characters, gated heads (gates start at 1: outputs unchanged)
    # --------------------------------------------------------------------------------------------------------------
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(chars),
            n_positions=args.block_size,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            resid_pdrop=args.dropout,
            embd_pdrop=args.dropout,
            attn_pdrop=args.dropout,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    model.loss_type = "ForCausalLM"  # transformers cannot tell from the name GPT2LMHeadModel and warns
    dgate_config = hf_dgate.DGateConfig(target=args.target, depth=args.depth, lam=args.lam, method=args.method)

    # --------------------------------------------------------------------------------------------------------------
    # 5. Train: DGateTrainer adds the penalty once per optimizer step and logs dgate/* metrics
    # --------------------------------------------------------------------------------------------------------------
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": args.min_lr_ratio},
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_beta2=args.adam_beta2,
        optim=args.optim or "adamw_torch",
        optim_args=args.optim_args,
        max_grad_norm=args.max_grad_norm,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(1, args.save_steps),
        report_to=args.report_to,
        seed=args.seed,
        dataloader_drop_last=True,
        # Without a GPU, say so: then `accelerate launch --num_processes 2` runs CPU DDP (gloo) instead of two
        # independent single-process runs.
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DGateTrainer(
        model,
        training_args,
        dgate_config=dgate_config,
        lam_warmup_steps=args.lam_warmup_steps,
        target_sparsity=args.target_sparsity,
        gated_lr=None if args.gated_lr == "off" else args.gated_lr or "auto",
        gated_weights=False if args.gates_only else None,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        compute_metrics=char_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
    )
    t0 = time.time()
    trainer.train(resume_from_checkpoint=True if args.resume == "last" else args.resume)
    train_seconds = time.time() - t0

    # --------------------------------------------------------------------------------------------------------------
    # 6. Evaluate and report
    # --------------------------------------------------------------------------------------------------------------
    metrics = trainer.evaluate()
    report = hf_dgate.sparsity_report(model)
    results = {
        "method": args.method,
        "depth": args.depth,
        "lam": args.lam,
        "final_lam": trainer.dgate_bank.lam,
        "target": args.target,
        "steps": trainer.state.global_step,
        "val_loss": metrics["eval_loss"],
        "val_perplexity": math.exp(metrics["eval_loss"]),
        "val_char_accuracy": metrics["eval_char_accuracy"],
        "head_sparsity": report.targets["heads"].sparsity if "heads" in report.targets else None,
        "sparsity": {t: ts.sparsity for t, ts in report.targets.items()},
        "active_per_layer": {t: ts.per_layer for t, ts in report.targets.items()},
        "params_kept": report.params_kept,
        "params_total": report.params_total,
        "train_seconds": train_seconds,
        "world_size": training_args.world_size,
        "args": vars(args),
    }
    trainer.save_model()  # gated model + dgate_config.json; reload with hf_dgate.load_gated(output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "vocab.json"), "w") as f:
            json.dump(chars, f)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(
            f"val loss {results['val_loss']:.4f} | perplexity {results['val_perplexity']:.3f} | "
            f"char accuracy {results['val_char_accuracy']:.4f} | head sparsity {results['head_sparsity']} | "
            f"params kept {report.params_kept:,}/{report.params_total:,} | {train_seconds:.0f}s"
        )
        if args.sample_chars > 0:
            model.eval()
            start = torch.zeros((1, 1), dtype=torch.long, device=model.device)  # id 0 is '\n' in Shakespeare
            with torch.no_grad():
                out = model.generate(
                    start, max_new_tokens=min(args.sample_chars, args.block_size - 1), do_sample=True, top_k=20
                )
            print("sample:", "".join(chars[i] for i in out[0].tolist()))
    return results


if __name__ == "__main__":
    main()
