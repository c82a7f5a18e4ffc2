"""Compress a trained causal LM to a parameter budget in one call: gate, train to the budget, finish, verify, export.

    summary = hf_dgate.compress("my-model", budget=0.5, data="corpus.txt", steps=500, out="my-model-half")

`hf-dgate compress MODEL_DIR --budget 0.5 --data FILE --steps N --out DIR` is the same call. The data is tokenized
with the model's tokenizer into blocks of `seq_len` tokens; the last `eval_fraction` of the blocks is held out and
gives the validation loss before compression and of the exported model (which computes what the gated one does:
the export is verified, and only exact zeros are removed).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

TEXT_SUFFIXES = (".txt", ".text", ".md")
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class CompressSummary:
    """What `compress` did and measured (printed as a table by the CLI, written into the card)."""

    out: str
    params_before: int
    params_after: int
    budget: int
    val_loss_before: float
    val_loss_after: float
    steps: int
    exact: bool
    kept: dict[str, str] = field(default_factory=dict)  # target -> "active/total"
    finish: str = ""

    def table(self) -> str:
        rows = [
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}"),
            ("budget", "", f"{self.budget:,} ({self.budget / self.params_before:.1%})"),
            ("validation loss", f"{self.val_loss_before:.4f}", f"{self.val_loss_after:.4f}"),
            *((t, "", k) for t, k in self.kept.items()),
            ("export exact", "", "yes" if self.exact else "NO"),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows + [("", "before", "")])
        lines = [f"{'':<{w0}}  {'before':>{w1}}  after", *(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)]
        return "\n".join(lines)


def _blocks(model_dir: str, data: str, tokenizer: Any, seq_len: int, text_column: str) -> Any:
    """Token blocks of `seq_len` from a text file, a local json/csv/parquet file or a `datasets` name."""
    from datasets import load_dataset

    if os.path.isfile(data):
        ext = os.path.splitext(data)[1].lower()
        if ext in TEXT_SUFFIXES or ext not in DATA_SUFFIXES:
            with open(data, encoding="utf-8", errors="replace") as f:
                texts = [f.read()]
        else:
            texts = load_dataset(DATA_SUFFIXES[ext], data_files=data, split="train")[text_column]
    elif os.path.isdir(data) or "/" in data or data.replace("_", "").replace("-", "").isalnum():
        try:
            ds = load_dataset(data, split="train")
        except Exception as e:  # noqa: BLE001 (datasets raises many kinds; one line with the way out)
            raise ValueError(
                f"--data {data!r}: not a file, and `datasets.load_dataset` could not open it ({type(e).__name__}); "
                "pass a text/json/csv/parquet file or a dataset name reachable from here."
            ) from None
        if text_column not in ds.column_names:
            raise ValueError(
                f"--data {data!r} has no column {text_column!r} (it has {ds.column_names}); pass --text-column."
            )
        texts = ds[text_column]
    else:
        raise ValueError(f"--data {data!r} is neither a file nor a dataset name; pass a text file.")
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None and len(texts) > 1:
            ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(
            f"--data {data!r} gives {len(ids)} tokens: fewer than two blocks of {seq_len}; pass more text."
        )
    import torch

    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _val_loss(model: Any, blocks: Any, batch_size: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = blocks[i : i + batch_size].to(next(model.parameters()).device)
            total += float(model(input_ids=x, labels=x).loss) * len(x)
            count += len(x)
    return total / count


def compress(
    model_dir: str,
    budget: float | int,
    data: str,
    steps: int,
    out: str,
    *,
    target: str | list[str] = ("heads", "neurons"),
    lam: float = 1e-4,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 256,
    eval_fraction: float = 0.05,
    text_column: str = "text",
    finish_steps: int | str = "auto",
    teacher: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> CompressSummary:
    """Gate `model_dir`'s heads and neurons, train `steps` optimizer steps on `data` toward `budget` (a fraction of
    the parameters or a count) with `DGateTrainer(target_params=...)` and its finish, then export the verified
    smaller model to `out`. With `teacher=True` the model as loaded distils into the gated one (logit KL)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

    from .config import DGateConfig
    from .outdir import OutputDir
    from .report import sparsity_report
    from .trainer import DGateTrainer

    OutputDir.plan(out, sources=[model_dir], overwrite=overwrite)  # refuse a bad --out before any work
    set_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir!r} has no tokenizer that AutoTokenizer can load ({e}); save one there.") from None
    blocks = _blocks(model_dir, data, tokenizer, seq_len, text_column)
    n_eval = max(1, int(len(blocks) * eval_fraction))
    train_blocks, eval_blocks = blocks[: len(blocks) - n_eval], blocks[len(blocks) - n_eval :]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = _val_loss(model, eval_blocks, batch_size)
    teacher_model = copy.deepcopy(model).eval() if teacher else None
    targets = [target] if isinstance(target, str) else list(target)
    with tempfile.TemporaryDirectory(prefix="hf-dgate-compress-") as run_dir:
        args = TrainingArguments(
            output_dir=run_dir,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            disable_tqdm=not progress,
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
        )
        train = [{"input_ids": x, "labels": x} for x in train_blocks]
        evals = [{"input_ids": x, "labels": x} for x in eval_blocks]
        extra = {} if teacher_model is None else {"teacher": teacher_model}
        trainer = DGateTrainer(
            model, args, dgate_config=DGateConfig(target=targets, lam=lam), target_params=budget,
            finish_steps=finish_steps, train_dataset=train, eval_dataset=evals, **extra,
        )  # fmt: skip
        trainer.train()
        after = _val_loss(model, eval_blocks, batch_size)
        rep = sparsity_report(model)
        rec = trainer.dgate_finish
        text = rec.describe() + (
            f" Validation loss (held-out {n_eval} blocks of {seq_len} tokens): {before:.4f} before compression, "
            f"{after:.4f} after."
        )
        summary = trainer.export_pruned(
            out, overwrite=overwrite, source_dirs=[model_dir], progress=progress,
            compression=rec.to_dict() | {"text": text, "val_loss_before": before, "val_loss_after": after},
        )  # fmt: skip
    return CompressSummary(
        out=summary["path"],
        params_before=summary["params_before"],
        params_after=summary["params_after"],
        budget=trainer.dgate_budget,
        val_loss_before=before,
        val_loss_after=after,
        steps=steps,
        exact=bool(summary["verification"]["exact"]),
        kept={t: f"{ts.groups - ts.zero}/{ts.groups} kept" for t, ts in rep.targets.items()},
        finish=rec.describe(),
    )


def summary_dict(s: CompressSummary) -> dict[str, Any]:
    d = asdict(s)
    d["params_ratio"] = s.params_after / max(s.params_before, 1)
    d["val_loss_change"] = s.val_loss_after - s.val_loss_before if math.isfinite(s.val_loss_after) else None
    return d
