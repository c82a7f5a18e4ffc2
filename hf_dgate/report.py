"""Sparsity read off the effective weights: which groups are zero and what removing them would save."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn

from .architectures import stack_status
from .choices import AttentionKind, ThresholdMode
from .groups import GateBank
from .patch import get_bank
from .targets import BUILTIN
from .targets.modules import Rule


@dataclass
class TargetSparsity:
    target: str
    groups: int
    zero: int
    per_layer: dict[str, list[int]] = field(default_factory=dict)  # layer -> [active, total]
    description: str = ""  # what a group is, from the target itself
    grey: int = 0  # zero groups not settled at zero yet: within two decades below their threshold

    @property
    def sparsity(self) -> float:
        return self.zero / self.groups if self.groups else 0.0


@dataclass
class SparsityReport:
    threshold: float
    targets: dict[str, TargetSparsity]
    params_total: int
    params_kept: int
    relative: bool = False  # threshold is a fraction of the largest norm in each layer
    stacks: dict[str, bool] = field(default_factory=dict)  # block stack -> gated (False: left dense)

    @property
    def ungated_stacks(self) -> list[str]:
        return [name for name, gated in self.stacks.items() if not gated]

    @property
    def params_kept_fraction(self) -> float:
        return self.params_kept / self.params_total if self.params_total else 1.0

    def sparsity(self, target: str) -> float:
        return self.targets[target].sparsity

    def to_dict(self) -> dict:
        d = asdict(self)
        for t, ts in self.targets.items():
            d["targets"][t]["sparsity"] = ts.sparsity
        d["params_kept_fraction"] = self.params_kept_fraction
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def __str__(self) -> str:
        rule = f"{self.threshold:g} x its layer's largest" if self.relative else f"{self.threshold:g}"
        lines = [f"D-Gating sparsity (zero when ||theta_g|| < {rule})"]
        for ts in self.targets.values():
            about = f"  [{ts.description}]" if ts.description else ""
            grey = f", {ts.grey} of them grey (not settled: train longer)" if ts.grey else ""
            lines.append(f"  {ts.target}: {ts.zero}/{ts.groups} zero ({100 * ts.sparsity:.1f}% sparse{grey}){about}")
            width = max((len(k) for k in ts.per_layer), default=5)
            for layer, (active, total) in ts.per_layer.items():
                bar = "#" * active + "." * (total - active) if total <= 64 else ""
                lines.append(f"    {layer:>{width}}  {active:>5}/{total:<5} active  {bar}")
        if len(self.stacks) > 1 or self.ungated_stacks:
            lines.append("  stacks: " + ", ".join(f"{n} ({'gated' if g else 'dense'})" for n, g in self.stacks.items()))
        lines.append(
            f"  parameters: {self.params_kept:,} of {self.params_total:,} kept "
            f"({100 * self.params_kept_fraction:.1f}%) once zero groups are removed"
        )
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module, threshold: float | None = None) -> SparsityReport:
    """Per target: groups, zero groups, sparsity, active groups per layer, and the parameters left after export."""
    bank = get_bank(model)
    thr = bank.check_threshold(threshold)
    bank.assert_finite("report sparsity")  # a NaN norm compares as "not below threshold": it would count as active
    dead = {t: bank.zero_groups(t, thr) for t in bank.targets}
    stacks = stack_status(bank.module(""), bank.config)
    about = {t.name: t.description for t in BUILTIN.values()} | {
        r.name: Rule(r).description for r in bank.config.groups
    }
    targets = {
        t: TargetSparsity(
            t, bank.sizes[t], int(dead[t].sum()), {}, about.get(t, ""), int(bank.grey_groups(t, thr).sum())
        )
        for t in bank.targets
    }
    for gs, d in bank.per_set(dead):
        label = group_set_label(gs, multi_stack=len(stacks) > 1)
        targets[gs.target].per_layer[label] = [gs.n_groups - int(d.sum()), gs.n_groups]
    total, kept = param_counts(bank, dead)
    return SparsityReport(thr, targets, total, kept, bank.config.threshold_mode == ThresholdMode.RELATIVE, stacks)


def group_set_label(gs: Any, multi_stack: bool = False) -> str:
    """How reports name a group set: its layer, prefixed by its stack in multi-stack models ("decoder.3"), with
    ".cross" for cross-attention heads."""
    info = gs.info
    label = f"{info.stack_name}.{gs.layer}" if multi_stack and info.stack_name else str(gs.layer)
    return label + ".cross" if getattr(info, "attention", None) == AttentionKind.CROSS else label


def _adapter_param_ids(bank: GateBank) -> set[int]:
    """Parameters of PEFT adapter layers (LoRA A/B, DoRA magnitudes, ...): the export merges them into the weights
    they adapt, so the parameters left after export do not include them."""
    ids: set[int] = set()
    for module in bank._modules_by_name.values():
        for attr in getattr(module, "adapter_layer_names", ()) or ():
            sub = getattr(module, attr, None)
            if isinstance(sub, nn.Module):
                ids |= {id(p) for p in sub.parameters()}
    return ids


def param_counts(bank: GateBank, dead: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Exact count of parameters left once dead groups (and what only fed them) are removed.

    Removing a position along an axis removes its whole hyper-row, so per tensor the kept count is the product
    over axes of kept positions; overlapping removals (a dead head inside a dead layer) are not double counted.
    """
    kept_mask: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    whole_dead: set[tuple[int, str]] = set()
    for gs, d in bank.per_set(dead):
        d = d.cpu()
        if not bool(d.any()):
            continue
        for sl in gs.removable:
            module = bank.module(sl.module)
            key = (id(module), sl.param)
            if sl.axis is None:
                if bool(d[sl.index].all()):
                    whole_dead.add(key)
                continue
            w = getattr(module, sl.param)
            masks = kept_mask.setdefault(key, {})
            mask = masks.setdefault(sl.axis, torch.ones(w.shape[sl.axis], dtype=torch.bool))
            in_group = sl.index >= 0
            removed = torch.zeros_like(mask)
            removed[in_group] = d[sl.index[in_group]]
            mask &= ~removed
    total = kept = 0
    seen = {id(p) for p in bank.parameters()}  # gates fold into the weights; tied tensors count once
    seen |= _adapter_param_ids(bank)  # PEFT adapters are merged into the base weights by the export
    for module in bank._modules_by_name.values():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            key = (id(module), pname)
            if key in whole_dead:
                continue
            masks = kept_mask.get(key, {})
            kept += prod(int(masks[a].sum()) if a in masks else s for a, s in enumerate(p.shape))
    return total, kept
