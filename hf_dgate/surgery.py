"""Physical removal of dead groups from plain PyTorch models (vision, tabular, custom).

- filters: Torch-Pruning's dependency graph removes each dead channel from its conv, its BatchNorm, every
  coupled producer (residual streams) and every consumer's input, which is the surgery it is built for;
- features: the first Linear loses the dead input columns and the model records `dgate_kept_features`;
- anything else: the nearest module (the gated one or an ancestor) that implements
  `dgate_prune(target, keep)` removes its own groups (trees, shape functions, modalities), and plain
  Linear/Conv rows or columns go through Torch-Pruning too.
Gates are folded first, so a removed group contributes exactly zero and outputs are unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .channels import example_inputs_for
from .patch import BANK_NAME, get_bank
from .targets import get_target
from .targets.base import RemovalContext
from .targets.modules import Rule


@torch.no_grad()
def prune_torch_model(
    model: nn.Module, threshold: float | None = None, example_inputs: Any = None, inplace: bool = False
) -> nn.Module:
    """A smaller copy of a gated torch model without its zero groups (the gated model is left as it is unless
    `inplace=True`, which saves the copy: the model itself is then folded, ungated and pruned). This is the bare
    surgery; `hf_dgate.export_pruned` calls it and checks the result against the gated model."""

    if not inplace:
        model = copy.deepcopy(model)
    bank = get_bank(model)
    thr = bank.check_threshold(threshold)
    dead_by_target = {t: bank.zero_groups(t, thr).cpu() for t in bank.targets}
    plan = bank.per_set(dead_by_target)
    if example_inputs is None:
        example_inputs = example_inputs_for(bank.config.example_input_shape, model)
    bank.fold()
    bank.detach()
    delattr(model, BANK_NAME)

    modules = dict(model.named_modules())
    owners: dict[tuple[int, str], tuple[nn.Module, list[torch.Tensor]]] = {}
    ctx = RemovalContext(model, example_inputs)
    rules = {rule.name: Rule(rule) for rule in bank.config.groups}
    for gs, dead in plan:
        owner = _prune_owner(modules, gs.sites[0].module)
        if owner is not None:  # the model knows its own structure (trees, shape functions, modalities)
            owners.setdefault((id(owner), gs.target), (owner, []))[1].append(dead)
            continue
        (rules.get(gs.target) or get_target(gs.target)).remove(model, gs, dead, ctx)
    for (_, target), (owner, deads) in owners.items():
        dead = torch.cat(deads)
        if bool(dead.any()):
            owner.dgate_prune(target, ~dead)
    return model


def _prune_owner(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        m = modules.get(".".join(parts[:i]))
        if m is not None and callable(getattr(m, "dgate_prune", None)):
            return m
    return None
