"""Targets on any torch model: conv filters and input features (found through Torch-Pruning's dependency
graph, removed by surgery.py) and the user's `GroupRule`s (folded on export, not removed)."""

from __future__ import annotations

import re

import torch
from torch import nn

from .. import channels
from ..architectures import StructureNotFoundError, in_features, out_features
from ..choices import GroupKind
from ..config import GroupRule
from ..groups import GroupSet, ModuleInfo, Site, TensorSlice, input_slices, output_slices, slice_index
from .base import RemovalContext, Target


def _feature_axis(m: nn.Module) -> int:
    return 1 if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) else -1


def _rule_sets(model: nn.Module, rule: GroupRule) -> list[GroupSet]:
    pattern = re.compile(rule.modules)
    sets = []
    for name, m in model.named_modules():
        if not pattern.search(name) or getattr(m, "weight", None) is None or not isinstance(m.weight, torch.Tensor):
            continue
        axis = _feature_axis(m)
        if rule.kind == GroupKind.OUT:
            idx = slice_index(out_features(m), rule.size)
            site, primary = Site(name, "output", axis, idx), output_slices(name, m, idx)
        elif rule.kind == GroupKind.IN:
            idx = slice_index(in_features(m), rule.size)
            site, primary = Site(name, "input", axis, idx), input_slices(name, m, idx)
        else:
            idx = torch.zeros(out_features(m), dtype=torch.long)
            site = Site(name, "output", axis, idx)
            primary = [TensorSlice(name, pn, None, torch.tensor([0])) for pn, _ in m.named_parameters(recurse=False)]
        n_groups = int(idx.max()) + 1
        info = ModuleInfo(kind=GroupKind(rule.kind))
        sets.append(GroupSet(rule.name, name, n_groups, [site], primary, list(primary), info))
    if not sets:
        raise StructureNotFoundError(
            f"Group rule '{rule.name}': modules={rule.modules!r} matches no module with a weight; qualified "
            f"names look like {[n for n, _ in list(model.named_modules())[1:4]]}."
        )
    return sets


class ModuleTarget(Target):
    """Groups of whole-model modules (channels, input columns, user rules): removed through Torch-Pruning's
    dependency graph, so whatever reads a removed channel loses it too."""

    per_block = False

    def remove(self, model, gs, dead, ctx=None):
        if not bool(dead.any()):
            return
        ctx = ctx or RemovalContext(model)
        channels.prune_channels(model, ctx.graph(gs.target), gs, dead)


class Filters(ModuleTarget):
    name = "filters"

    def find(self, model, dconfig, example_inputs=None):
        if example_inputs is None:
            example_inputs = channels.example_inputs_for(dconfig.example_input_shape, model)
        return channels.filter_sets(model, example_inputs)


class Features(ModuleTarget):
    name = "features"

    def find(self, model, dconfig, example_inputs=None):
        return [channels.feature_set(model)]

    def remove(self, model, gs, dead, ctx=None):
        """Slice the Linear's input columns (also when none go: the model always records what it reads)."""
        channels.drop_input_features(model, model.get_submodule(gs.sites[0].module), ~dead)

    def probe_width(self, model, gs):
        width = getattr(model.get_submodule(gs.sites[0].module), "in_features", None)
        return width if isinstance(width, int) else None


class Rule(ModuleTarget):
    """A user's `GroupRule`: rows, columns, blocks of them, or whole modules of the matching modules (removed from
    plain torch models; in transformers their zeros are folded into the weights and stay)."""

    removed_by_export = False

    def __init__(self, rule: GroupRule):
        self.rule, self.name = rule, rule.name
        self.description = f"user rule {rule.name!r}: {rule.kind} groups of modules matching {rule.modules!r}"

    def find(self, model, dconfig, example_inputs=None):
        return _rule_sets(model, self.rule)
