"""transformers 4.x's own head pruning: where the installed transformers still has `prune_heads` (4.x) and a
family implements it, an export removes plain multi-head self-attention heads with it, so `config.pruned_heads`
records them and a plain `from_pretrained` rebuilds the model without hf_dgate. transformers 5 has no such path;
`prune_heads` below offers 4.x's contract on any gated family and line (re-exported by hf_dgate.export)."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import BlockStack, find_blocks
from .choices import AttentionKind
from .compat import HAS_HF_PRUNE_HEADS, hf_prune_heads
from .config import DGateConfig
from .errors import ExportError
from .groups import GroupSet, HeadInfo
from .patch import unwrap
from .recording import block_geometry, current_heads, heads_record, read_record, write_record


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


@torch.no_grad()
def prune_heads(model: nn.Module, heads_to_prune: dict[int, list[int]], dconfig: DGateConfig | None = None) -> None:
    """transformers 4.x's `prune_heads` contract for models whose transformers has none (v5 removed it).

    `heads_to_prune` maps a layer (its current position) to attention heads in their original numbering; heads
    pruned earlier are ignored. Under GQA a key/value head can only go with all query heads that share it.
    With transformers 4.x and a model that still has `_prune_heads`, that implementation is used.
    """
    from types import SimpleNamespace

    from .targets.heads import head_set, prune_head_group_set

    base = unwrap(model)
    dconfig = _with_targets(dconfig or DGateConfig(target="heads"), ["heads"])
    record = read_record(base) or {}
    blocks = find_blocks(base, dconfig)
    if "stacks" in record:
        raise ExportError("prune_heads works on single-stack models; this one records several stacks.")
    kept_heads = current_heads(base, blocks, dconfig, record)
    by_hf = hf_prune_heads(base, heads_to_prune)  # transformers 4.x, a family with its own head pruning
    for layer, heads in heads_to_prune.items() if by_hf else ():
        kept_heads[layer] = [h for h in kept_heads[layer] if h not in set(heads)]
    for layer, heads in heads_to_prune.items() if not by_hf else ():
        if not 0 <= layer < len(blocks):
            raise ExportError(f"Layer {layer} does not exist; the model has {len(blocks)} layers.")
        name, block = blocks[layer]
        n_q, n_kv, hd, _ = block_geometry(base, name, block, dconfig)
        if n_q == 0:
            continue  # nothing left to prune
        # the layer's own (possibly already pruned) geometry, not the config's
        geometry = SimpleNamespace(num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=hd)
        gs = head_set(base, geometry, dconfig, layer, name, block)
        kept_q = kept_heads[layer]
        n_rep = gs.info.n_heads // gs.info.n_kv
        current = [kept_q[i] for i in range(0, len(kept_q), n_rep)]  # original query head opening each group
        dead = torch.zeros(gs.n_groups, dtype=torch.bool)
        for h in set(heads):
            grp = [i for i, first in enumerate(current) if first <= h < first + n_rep]
            if not grp:
                continue  # already pruned
            members = set(range(current[grp[0]], current[grp[0]] + n_rep))
            if not members <= set(heads):
                raise ExportError(
                    f"Head {h} of layer {layer} shares its key/value head with heads {sorted(members)}; prune all "
                    "of them together (GQA)."
                )
            dead[grp[0]] = True
        prune_head_group_set(base, gs, dead)
        kept_heads[layer] = [h for j, h in enumerate(kept_q) if not dead[j // n_rep]]
    write_record(base, heads_record(base, blocks, dconfig, kept_heads, record, by_hf))


def _with_targets(dconfig: DGateConfig, targets: list[str]) -> DGateConfig:
    return DGateConfig(target=targets, module_names=dconfig.module_names, head_side="auto")
