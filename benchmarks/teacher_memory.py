"""Peak RSS and step time of a budgeted DGateTrainer run on a small Llama (1.8 M parameters), with and without teacher=.

    for m in none teacher; do python benchmarks/teacher_memory.py $m ../shared/data/shakespeare.txt; done
    for m in lora lora-copy lora-base; do python benchmarks/teacher_memory.py $m ../shared/data/shakespeare.txt; done

The lora modes train LoRA adapters (r 8 on q/k/v/o and the MLP) beside the gates: without a teacher, with a copy of
the model as teacher, and with teacher="base" (the PEFT model's own frozen weights, adapters and gates off).

Each in its own process, so the peak RSS is that run's; results/compress/teacher_memory.jsonl holds one line each.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers import logging as hf_logging

import hf_dgate
from hf_dgate.trainer import DGateTrainer


def main() -> None:
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    mode = sys.argv[1]
    if mode not in ("none", "teacher", "lora", "lora-copy", "lora-base"):
        sys.exit(f"mode {mode!r}: pass none, teacher, lora, lora-copy or lora-base")
    path = sys.argv[2] if len(sys.argv) > 2 else "../shared/data/shakespeare.txt"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=65, hidden_size=192, intermediate_size=576, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()[:200000]
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) % 65 for c in text])
    blocks = ids[: (len(ids) // 128) * 128].view(-1, 128)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    teacher = copy.deepcopy(model) if mode in ("teacher", "lora-copy") else None
    if mode.startswith("lora"):
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets))
        teacher = "base" if mode == "lora-base" else teacher
    args = TrainingArguments("outputs/teacher_memory", max_steps=30, per_device_train_batch_size=16,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             logging_steps=100)  # fmt: skip
    tr = DGateTrainer(model, args, dgate_config=hf_dgate.DGateConfig(target=["heads", "neurons"], lam=1e-3),
                      target_params=0.6, teacher=teacher, train_dataset=data)  # fmt: skip
    t0 = time.time()
    tr.train()
    dt = time.time() - t0
    print(json.dumps({"mode": mode, "teacher": mode in ("teacher", "lora-copy", "lora-base"),
                      "params": sum(p.numel() for p in model.parameters()),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_training_mb": rss0 / 1024, "train_s": dt, "s_per_step": dt / 30}))  # fmt: skip


if __name__ == "__main__":
    main()
