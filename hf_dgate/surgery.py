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

from .channels import dependency_graph, example_inputs_for
from .choices import Where
from .patch import BANK_NAME, get_bank


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
    graph = None
    for gs, dead in plan:
        owner = _prune_owner(modules, gs.sites[0].module)
        if owner is not None:  # the model knows its own structure (trees, shape functions, modalities)
            owners.setdefault((id(owner), gs.target), (owner, []))[1].append(dead)
            continue
        if gs.target == "features":  # recorded even when nothing is dropped, so callers can always index with it
            _drop_input_features(model, modules[gs.sites[0].module], ~dead)
            continue
        if not bool(dead.any()):
            continue
        if graph is None:
            if example_inputs is None:
                raise ValueError(
                    f"Removing '{gs.target}' groups needs the model traced: pass example_inputs=... or set "
                    "DGateConfig(example_input_shape=[...])."
                )
            graph = dependency_graph(model, example_inputs)
        root_name = getattr(gs.info, "root", None) or gs.sites[0].module
        root = modules[root_name]
        fn = _pruning_fn(root, gs)
        idxs = dead.nonzero().flatten().tolist()
        if len(idxs) == gs.n_groups:
            idxs = idxs[1:]  # a layer keeps at least one (zero) channel so shapes stay valid
        with torch.enable_grad():
            graph.get_pruning_group(root, fn, idxs=idxs).prune()
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


def _pruning_fn(module: nn.Module, gs: Any):
    import torch_pruning as tp

    site = gs.sites[0]
    outputs = site.where == Where.OUTPUT
    if isinstance(module, nn.Conv2d):
        return tp.prune_conv_out_channels if outputs else tp.prune_conv_in_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels if outputs else tp.prune_linear_in_channels
    raise ValueError(f"Cannot remove groups of {type(module).__name__} '{site.module}': implement dgate_prune().")


def _drop_input_features(model: nn.Module, linear: nn.Linear, keep: torch.Tensor) -> None:
    """Slice the first layer's input columns; the model records which original features it still reads."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight[:, keep].clone())
    linear.in_features = int(keep.sum())
    previous = getattr(model, "dgate_kept_features", None)
    kept = torch.arange(len(keep), device=keep.device) if previous is None else previous
    if "dgate_kept_features" in getattr(model, "_buffers", {}):
        del model._buffers["dgate_kept_features"]
    model.register_buffer("dgate_kept_features", kept[keep])
