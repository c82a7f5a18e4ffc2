"""Head pruning during a LoRA fine-tune: a small Llama, LoRA on the attention projections, D-Gating on heads.

    python examples/lora_head_pruning.py --steps 300 --output-dir runs/lora-heads

The base weights are frozen, so only the LoRA matrices and the gates move. The penalty sees the effective
weights W + BA; D-1 gates under an L2 penalty induce |s|^(2/(D-1)) on their product, so D >= 3 is what makes
heads go to zero here (D = 2 is only a ridge on the gate). At the end the adapters are merged, zero heads are
removed, and the smaller model is saved and checked against the gated one.

The base model is a randomly initialised small Llama pre-trained here on a synthetic copying task, so the script
runs anywhere without downloads. Pass `--model NAME_OR_PATH` to start from a real checkpoint (the fine-tuning
task stays synthetic; real LMs copy with their induction heads).
"""

from __future__ import annotations

import argparse
import json
import os

import peft
import torch
import transformers as T

import hf_dgate
from hf_dgate.threads import THREADS_HELP, configure_threads

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="a causal LM to fine-tune (default: a random small Llama)")
parser.add_argument("--depth", type=int, default=3)
parser.add_argument("--lam", type=float, default=0.1)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--lr", type=float, default=1e-3, help="Adam step for the LoRA matrices")
parser.add_argument("--gate-lr", type=float, default=1e-2, help="Adam step for the gates")
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--pretrain-steps", type=int, default=400, help="full training of the random base model")
parser.add_argument("--output-dir", default="runs/lora-heads")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
args = parser.parse_args()
configure_threads(args.threads)
torch.manual_seed(args.seed)

# 1. A base model. Offline default: a small random Llama (GQA: 8 query heads share 4 key/value heads).
if args.model:
    base = T.AutoModelForCausalLM.from_pretrained(args.model)
else:
    base = T.LlamaForCausalLM(
        T.LlamaConfig(
            num_hidden_layers=4,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=256,
        )
    )
vocab = base.config.vocab_size
params_before = sum(p.numel() for p in base.parameters())


# 2. Sequences that repeat a random 8-token motif 4 times: the first 8 tokens are noise, the rest can be copied.
# Fresh motifs every batch, so the held-out loss measures the skill, not memory. The random base model is first
# pre-trained on it (full weights); the LoRA run then continues on the same task with gated heads, so what it
# shows is how many heads can go and at what cost in held-out loss.
def sequences(n: int, motif: int, repeats: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, vocab, (n, motif), generator=generator).repeat(1, repeats)


held_out = sequences(256, 8, 4, generator=torch.Generator().manual_seed(args.seed + 1))


@torch.no_grad()
def eval_loss(m: torch.nn.Module) -> float:
    """Mean loss on 256 held-out sequences (the number the fine-tune and the pruning are judged by)."""
    was_training = m.training
    m.eval()
    loss = sum(m(input_ids=b, labels=b).loss.item() for b in held_out.split(64)) / len(held_out.split(64))
    m.train(was_training)
    return loss


# A random base model knows nothing: pre-train it so that its heads have work to do.
if not args.model:
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    for _ in range(args.pretrain_steps):
        batch = sequences(32, 8, 4)
        loss = base(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pre-trained base: loss {loss.item():.3f} after {args.pretrain_steps} steps")
loss_base = eval_loss(base)
print(f"base model: held-out loss {loss_base:.3f}")

# 3. LoRA on the attention projections, then D-Gating on the heads of the wrapped model.
model = peft.get_peft_model(
    base,
    peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
)
hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", depth=args.depth, lam=args.lam))
gates = list(hf_dgate.get_bank(model).parameters())
lora = [p for p in model.parameters() if p.requires_grad and all(p is not g for g in gates)]
print(f"trainable: {sum(p.numel() for p in lora):,} LoRA parameters and {sum(g.numel() for g in gates)} gates")

# 4. A plain training loop: data loss + the D-Gating penalty. The gates are scalars that must travel from 1 to 0
# within the run, so they get a larger step than LoRA (at 1e-2, LoRA itself diverged on this task).
opt = torch.optim.Adam([{"params": lora, "lr": args.lr}, {"params": gates, "lr": args.gate_lr}])
model.train()
for step in range(1, args.steps + 1):
    batch = sequences(16, 8, 4)
    loss = model(input_ids=batch, labels=batch).loss
    opt.zero_grad()
    (loss + hf_dgate.penalty(model)).backward()
    opt.step()
    if step % max(1, args.steps // 5) == 0:
        rep = hf_dgate.sparsity_report(model)
        print(f"step {step:4d}  loss {loss.item():.3f}  head sparsity {rep.sparsity('heads'):.2f}")

# 5. Merge the adapters, remove zero heads, check the smaller model, save it.
model.eval()
report = hf_dgate.sparsity_report(model)
print(report)
probe = held_out[:4]
with torch.no_grad():
    gated = model(input_ids=probe).logits
    small = hf_dgate.export_pruned(model)  # merges LoRA (merge_and_unload), folds gates, prunes
    diff = (small(input_ids=probe).logits - gated).abs().max().item()
loss_gated, loss_pruned = eval_loss(model), eval_loss(small)
os.makedirs(args.output_dir, exist_ok=True)
small.save_pretrained(args.output_dir)
summary = {
    "head_sparsity": report.sparsity("heads"),
    "params_before": params_before,
    "params_after": sum(p.numel() for p in small.parameters()),
    "max_logit_diff": diff,  # groups under the threshold are removed: small, not always exactly 0
    "held_out_loss_base": loss_base,
    "held_out_loss_gated": loss_gated,
    "held_out_loss_pruned": loss_pruned,
    "args": vars(args),
}
with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
print(f"reload with: hf_dgate.AutoPrunedModel.from_pretrained({args.output_dir!r})")
