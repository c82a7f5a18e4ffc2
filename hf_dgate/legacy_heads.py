"""transformers 4.x's own head pruning: where the installed transformers still has `prune_heads` (4.x) and a
family implements it, an export removes plain multi-head self-attention heads with it, so `config.pruned_heads`
records them and a plain `from_pretrained` rebuilds the model without hf_dgate. transformers 5 has no such path."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import BlockStack
from .choices import AttentionKind
from .compat import HAS_HF_PRUNE_HEADS, hf_prune_heads
from .groups import GroupSet, HeadInfo


def prune_with_transformers(
    model: nn.Module,
    st: BlockStack,
    plan: list[tuple[GroupSet, torch.Tensor]],
    dead_layers: set[int],
    kept: list[list[int]],
    single: bool,
) -> set[int]:
    """Remove dead heads with the model's own `prune_heads` where its transformers has one (4.x), so that
    `config.pruned_heads` records them and a plain `from_pretrained` rebuilds the model. Returns the ids of the
    group sets it handled (none elsewhere, and none where a layer would lose every head: transformers' attention
    cannot run without heads, hf_dgate's bias-only attention can)."""
    if not HAS_HF_PRUNE_HEADS or not single or st.name != st.path:
        return set()
    head_sets = [(gs, d) for gs, d in plan if isinstance(gs.info, HeadInfo)]
    sets = [(gs, d) for gs, d in head_sets if gs.layer not in dead_layers and bool(d.any())]
    if not sets or any(gs.info.attention != AttentionKind.SELF or gs.info.n_heads != gs.info.n_kv for gs, _ in sets):
        return set()
    if any(gs.info.discovered for gs, _ in sets):  # found from shapes: transformers' prune_heads may not know it
        return set()
    if any(bool(d.all()) for _, d in sets):
        return set()
    heads = {gs.layer: [kept[gs.layer][j] for j in range(len(d)) if d[j]] for gs, d in sets}
    if not hf_prune_heads(model, heads):
        return set()
    for gs, d in sets:
        kept[gs.layer] = [h for j, h in enumerate(kept[gs.layer]) if not d[j]]
    return {id(gs) for gs, _ in sets}
