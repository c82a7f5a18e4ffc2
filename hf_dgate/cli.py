"""`hf-dgate` command line."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dgate", description="D-Gating structured sparsity for HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="Gate a tiny GPT-2, train on synthetic data, print the head-sparsity report.")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lam", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
