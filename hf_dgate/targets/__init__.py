"""Every built-in target, registered by name; `find_group_sets` asks each target the config selects for its
groups. A new built-in target is one module in this package plus one line in `BUILTIN`."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..architectures import BlockStack, block_stacks, layer_config
from ..config import DGateConfig
from ..groups import GroupSet
from ..registry import spec_for
from .base import Target
from .experts import Experts
from .heads import Heads
from .layers import Layers
from .modules import Features, Filters, Rule
from .neurons import Neurons

BUILTIN: dict[str, Target] = {t.name: t for t in (Heads(), Neurons(), Layers(), Experts(), Filters(), Features())}


def get_target(name: str) -> Target:
    return BUILTIN[name]


def describe_targets() -> str:
    """One line per built-in target, for help texts."""
    return "\n".join(f"{t.name}: {t.description}" for t in BUILTIN.values())


def find_group_sets(
    model: nn.Module, config: DGateConfig, example_inputs: Any = None, refuse: bool = True
) -> list[GroupSet]:
    """All group sets `config` asks for, in a stable order (target, then stack and layer). `refuse=False` skips
    the registry's refusals (reloading an export only reshapes tensors; it gates nothing)."""
    targets = [BUILTIN[t] for t in config.targets] + [Rule(rule) for rule in config.groups]
    per_block = [t for t in targets if t.per_block]
    sets: list[GroupSet] = []
    if per_block:
        for stack in block_stacks(model, config):
            sets += _stack_group_sets(model, config, stack, per_block, refuse)
    for target in targets:
        if not target.per_block:
            sets += target.find(model, config, example_inputs)
    if config.target_modules is not None:
        pattern = re.compile(config.target_modules)
        sets = [gs for gs in sets if any(pattern.search(s.module) for s in gs.sites)]
        if not sets:
            raise ValueError(
                f"target_modules={config.target_modules!r} matches none of the modules that would be gated; "
                "it is matched with re.search against names such as 'model.layers.0.self_attn.v_proj'."
            )
    return sets


def _stack_group_sets(
    model: nn.Module, config: DGateConfig, stack: BlockStack, targets: list[Target], refuse: bool
) -> list[GroupSet]:
    spec = spec_for(stack.config)
    sets: list[GroupSet] = []
    for target in targets:
        stack_why = dict(stack.refuse).get(target.name)
        why = stack_why or (spec.refusal(target.name, stack.config) if spec is not None else None)
        if why and refuse:
            where = f"the stack {stack.path!r}" if stack_why else f"'{stack.config.model_type}' models"
            raise ValueError(f"target={target.name!r} is not available for {where}: {why}.")
        for layer, (name, block) in enumerate(stack.blocks):
            new = target.find_in_block(model, layer_config(stack.config, layer), config, layer, name, block)
            for gs in new:
                if refuse and gs.info.refuse:  # found, but the installed transformers cannot run it pruned
                    raise ValueError(gs.info.refuse)
                gs.info.stack, gs.info.stack_name = stack.path, stack.name
            sets += new
    return sets
