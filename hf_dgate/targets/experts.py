"""Whole routed experts of a mixture of experts. Removing one also removes its router row, so tokens that had it
among their top-k are routed elsewhere: exports of this target are measured and stated, never exact by design."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..architectures import StructureNotFoundError, expert_tensors, routed_experts
from ..config import DGateConfig
from ..errors import ExportError
from ..groups import ExpertInfo, GroupSet, Site, TensorSlice
from ..registry import spec_for
from .base import Target, keep_slice, per_layer_edit


def _expert_sets(
    model: nn.Module, hf_config: Any, config: DGateConfig, layer: int, name: str, block: nn.Module
) -> list[GroupSet]:
    """Whole routed experts: the gate scales an expert's down projection; removal also drops its router row (and
    the router's per-expert buffers, such as a score-correction bias)."""
    spec = spec_for(hf_config)
    found = routed_experts(hf_config, block)
    if found is None and spec is not None and spec.experts is not None:
        return []  # a dense block of a family that mixes both (Step 3.7's first layers)
    if found is not None and not found[0].router:
        raise StructureNotFoundError(
            f"The routed experts of '{name}' were found from their shapes, but not the router beside them (a layer "
            "with one output per expert), whose rows whole experts take along; gate 'neurons' or 'layers'."
        )
    if found is None:  # (a dense block: blocks without experts stay dense where others have them)
        raise StructureNotFoundError(
            f"target='experts' needs a mixture-of-experts model; '{getattr(hf_config, 'model_type', None)}' has "
            "no routed experts (gate 'neurons' or 'layers')."
        )
    moe, discovered = found
    t = expert_tensors(name, block, moe)
    n_exp = t.n_experts
    idx = torch.arange(n_exp)
    router_name = f"{name}.{moe.router}"
    router = block.get_submodule(moe.router)
    site = Site(t.down[0], "param", 0, idx, param=t.down[1])
    primary = [TensorSlice(*t.down, 0, idx)]
    removable = [*primary, TensorSlice(*t.gate_up, 0, idx)]
    owner = t.module  # per-expert biases beside the stacked tensors (GPT-OSS's (E, 2I) and (E, H) ones)
    removable += [
        TensorSlice(t.experts, n, 0, idx) for n, p in owner.named_parameters(recurse=False)
        if p.dim() == 2 and p.shape[0] == n_exp and (t.experts, n) not in (t.down, t.gate_up)
    ]
    per_expert = [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]
    removable += [TensorSlice(router_name, n, 0, idx) for n, x in per_expert if x.dim() and x.shape[0] == n_exp]
    info = ExpertInfo(experts=moe.experts, router=moe.router, n_experts=n_exp, guessed=discovered)
    return [GroupSet("experts", layer, n_exp, [site], primary, removable, info)]


def prune_expert_group_set(model: nn.Module, gs: GroupSet, dead: torch.Tensor) -> None:
    """Remove whole routed experts with their router rows. The router then chooses among fewer experts, which
    changes routing wherever a removed expert was among a token's top-k: the export's verification measures it."""
    n_left = int((~dead).sum())
    if n_left == 0:
        raise ExportError(
            f"Every expert of layer {gs.layer} is zero; removing all of them leaves no MLP to route to. Gate "
            "target='layers' to remove whole layers, or export with a lower threshold."
        )
    for sl in gs.removable:
        keep_slice(model, sl, dead)
    owners = {sl.module for sl in gs.removable} | {gs.sites[0].module.rpartition(".")[0]}
    for m in (model.get_submodule(o) for o in owners):
        for attr in ("num_experts", "num_local_experts"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, n_left)
        if isinstance(getattr(m, "top_k", None), int):
            m.top_k = min(m.top_k, n_left)


class Experts(Target):
    name = "experts"
    order = 2

    find_in_block = staticmethod(_expert_sets)

    def remove(self, model, gs, dead, ctx=None):
        prune_expert_group_set(model, gs, dead)

    def record_field(self, gs):
        return "experts"

    def recorded_in(self, record):
        return bool(record.experts)

    def native_edit(self, cfg, record):
        spec = spec_for(cfg)
        if not record.get("experts") or spec is None or spec.experts is None:
            return {}
        return per_layer_edit(cfg, {spec.experts.count_field: list(record["experts"])})
