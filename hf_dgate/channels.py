"""Filters and input features of plain PyTorch models, as `GroupSet`s.

Which channels belong together is a property of the graph, not of module names: a ResNet's residual stream
ties the output channels of every block in a stage. Torch-Pruning's dependency graph traces that once; each of
its channel groups becomes one `GroupSet` whose gate scales the channel at every producer (the BatchNorm when
one follows the conv, since BN would cancel a scale applied before it) and whose `removable` slices are the
whole coupled group (producers, BN, and the inputs of the consumers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .choices import Where
from .extras import require
from .groups import GroupSet, ModuleInfo, Site, input_slices, output_slices, slice_index

UNGATED = -1


def dependency_graph(model: nn.Module, example_inputs: Any):
    """Torch-Pruning's DependencyGraph of `model`, traced once on `example_inputs`."""
    tp = require("torch_pruning", "target='filters' and prune_torch_model (channels are traced with Torch-Pruning)")

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        model.train(was_training)


def filter_sets(model: nn.Module, example_inputs: Any) -> list[GroupSet]:
    """One GroupSet per coupled set of Conv2d output channels."""
    tp = require("torch_pruning", "target='filters' and prune_torch_model (channels are traced with Torch-Pruning)")

    if example_inputs is None:
        raise ValueError(
            "target='filters' traces the model to find coupled channels: set DGateConfig(example_input_shape="
            "[1, 3, 32, 32]) or pass apply_dgate(model, config, example_inputs=...)."
        )
    graph = dependency_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    sets, seen = [], set()
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        if conv in seen or conv.groups != 1:
            continue
        n = conv.out_channels
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        sites, primary, removable = [], [], []
        for item in group.items:
            module, handler = item.dep.target.module, item.dep.handler
            if module not in names or not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                continue
            name = names[module]
            size = _axis_size(module, graph.is_out_channel_pruning_fn(handler))
            index = torch.full((size,), UNGATED, dtype=torch.long)
            index[torch.as_tensor(item.idxs, dtype=torch.long)] = torch.as_tensor(item.root_idxs, dtype=torch.long)
            if graph.is_out_channel_pruning_fn(handler):
                removable += output_slices(name, module, index)
                if isinstance(module, nn.Conv2d):
                    seen.add(module)
                    if _feeds_batchnorm(graph, module):
                        continue  # its BatchNorm carries the gate
                elif not module.affine:
                    raise ValueError(f"BatchNorm '{name}' has no affine parameters to gate; use affine=True.")
                if not isinstance(module, nn.Linear):
                    sites.append(Site(name, "output", 1, index))
                    primary += output_slices(name, module, index)
            else:
                removable += input_slices(name, module, index)
        if sites:
            sets.append(GroupSet("filters", names[conv], n, sites, primary, removable, ModuleInfo(root=names[conv])))
    if not sets:
        raise ValueError(f"target='filters' found no Conv2d layers in {type(model).__name__}.")
    return sets


def feature_set(model: nn.Module) -> GroupSet:
    """Input columns of the first Linear: one group per input feature."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError(f"target='features' needs an nn.Linear input layer; {type(model).__name__} has none.")
    name, lin = first
    tied = _tied_to(model, name, lin)
    if tied:
        raise ValueError(
            f"target='features' gates the input columns of the first nn.Linear, {name!r}, but its weights are shared "
            f"with {tied[0]!r} (tied weights, as in a language model's lm_head): the gate would change that module "
            "too and export would cut its columns. Gate the module that reads your features instead: "
            "DGateConfig(target=[], groups=[GroupRule('features', r'^<module name>$', kind='in')])."
        )
    before = _weights_before(model, name)
    if before is not None:
        raise ValueError(
            f"target='features' gates the input columns of the first nn.Linear, {name!r}, but {before!r} "
            f"({type(model.get_submodule(before)).__name__}) holds weights that come before it, so those columns are "
            "not the model's input features and an export could not be fed the kept ones. Gate 'heads', 'neurons' "
            "or 'layers' of a transformer, 'filters' of a CNN, or the Linear that reads your features directly with "
            "DGateConfig(target=[], groups=[GroupRule('features', r'^<module name>$', kind='in')])."
        )
    index = slice_index(lin.in_features)
    slices = input_slices(name, lin, index)
    return GroupSet(
        "features", name, lin.in_features, [Site(name, "input", -1, index)], slices, list(slices), ModuleInfo(root=name)
    )


def _weights_before(model: nn.Module, name: str) -> str | None:
    """The first module registered before `name` (and not around it) that holds its own weights (an embedding, a
    convolution, a norm), else None: only then does the first Linear read the model's input."""
    for other, m in model.named_modules():
        if other == name:
            return None
        if name.startswith(f"{other}.") if other else True:
            continue  # a container of the Linear
        if any(True for _ in m.parameters(recurse=False)):
            return other
    return None


def _tied_to(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """Names of the other modules holding `module`'s parameters (the same tensor, or one at the same address)."""
    own = list(module.parameters(recurse=False))
    ptrs = {_storage(p) for p in own} - {None}
    tied = []
    for other_name, other in model.named_modules(remove_duplicate=False):
        if other is module:
            continue
        for p in other.parameters(recurse=False):
            if any(p is q for q in own) or _storage(p) in ptrs:
                tied.append(other_name)
                break
    return tied


def _storage(p: torch.Tensor) -> tuple | None:
    """Where a tensor's data starts (None for meta and empty tensors). Not the storage's start: weights loaded
    from one memory-mapped file share a storage without being tied."""
    if p.device.type == "meta" or p.numel() == 0:
        return None
    return (p.device.type, p.device.index, p.data_ptr())


def _axis_size(module: nn.Module, out: bool) -> int:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return module.weight.shape[0 if out else 1]


def _feeds_batchnorm(graph: Any, conv: nn.Conv2d) -> bool:
    outs = graph.module2node[conv].outputs
    return len(outs) == 1 and isinstance(outs[0].module, nn.modules.batchnorm._BatchNorm)


def example_inputs_for(config_shape: list[int] | None, model: nn.Module) -> torch.Tensor | None:
    if config_shape is None:
        return None
    ref = next(model.parameters(), None)
    return torch.randn(*config_shape, device=ref.device if ref is not None else None)


# ---- removal (the module targets' `remove`) ---------------------------------------------------------------------
def prune_channels(model: nn.Module, graph: Any, gs: GroupSet, dead: torch.Tensor) -> None:
    """Remove the dead groups of `gs` with everything that depends on them, through Torch-Pruning's graph."""
    modules = dict(model.named_modules())
    root_name = getattr(gs.info, "root", None) or gs.sites[0].module
    root = modules[root_name]
    fn = _pruning_fn(root, gs)
    idxs = dead.nonzero().flatten().tolist()
    if len(idxs) == gs.n_groups:
        idxs = idxs[1:]  # a layer keeps at least one (zero) channel so shapes stay valid
    with torch.enable_grad():
        graph.get_pruning_group(root, fn, idxs=idxs).prune()


def _pruning_fn(module: nn.Module, gs: GroupSet):
    tp = require("torch_pruning", "target='filters' and prune_torch_model (channels are traced with Torch-Pruning)")

    site = gs.sites[0]
    outputs = site.where == Where.OUTPUT
    if isinstance(module, nn.Conv2d):
        return tp.prune_conv_out_channels if outputs else tp.prune_conv_in_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels if outputs else tp.prune_linear_in_channels
    raise ValueError(f"Cannot remove groups of {type(module).__name__} '{site.module}': implement dgate_prune().")


def drop_input_features(model: nn.Module, linear: nn.Linear, keep: torch.Tensor) -> None:
    """Slice the first layer's input columns; the model records which original features it still reads."""
    keep = keep.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight[:, keep].clone())
    linear.in_features = int(keep.sum())
    previous = getattr(model, "dgate_kept_features", None)
    kept = torch.arange(len(keep), device=keep.device) if previous is None else previous
    if "dgate_kept_features" in getattr(model, "_buffers", {}):
        del model._buffers["dgate_kept_features"]
    model.register_buffer("dgate_kept_features", kept[keep])
