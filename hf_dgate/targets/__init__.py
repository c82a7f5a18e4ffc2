"""Every built-in target, by name; `find_group_sets` asks each target the config selects for its groups. A new
built-in target is one module in this package plus one line in `hf_dgate/target_catalog.py` (torch-free, so config
validation and `hf-dgate --help` read it without importing the stack); `BUILTIN` instantiates what it names."""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any

import torch
from torch import nn

from ..architectures import (
    HEAD_FIELDS,
    BlockStack,
    StructureNotFoundError,
    _count,
    attention_like,
    block_stacks,
    layer_config,
)
from ..compat import config_value
from ..config import DGateConfig
from ..discover import OFF_PATH, OffPath, recurrent_mixer, verify
from ..flops import example_inputs as probe_batch
from ..groups import GroupSet, NeuronInfo
from ..registry import spec_for
from ..target_catalog import CATALOG, describe
from .base import Target
from .modules import Rule

logger = logging.getLogger(__name__)



def _instantiate(name: str) -> Target:
    module, cls = CATALOG[name].cls.split(":")
    target = getattr(importlib.import_module(f".{module}", __package__), cls)()
    if target.name != name or target.per_block != CATALOG[name].per_block:
        raise TypeError(f"target_catalog.py's {name!r} line names {cls}, whose name or per_block disagrees with it")
    return target


BUILTIN: dict[str, Target] = {name: _instantiate(name) for name in CATALOG}


def describe_targets() -> str:
    """One line per built-in target, for help texts."""
    return describe()


def get_target(name: str, config: DGateConfig | None = None) -> Target:
    """The target called `name`: a built-in one, or one of `config`'s user rules."""
    if name in BUILTIN:
        return BUILTIN[name]
    for rule in config.groups if config is not None else ():
        if rule.name == name:
            return Rule(rule)
    raise KeyError(f"no target named {name!r}")


def find_group_sets(
    model: nn.Module, config: DGateConfig, example_inputs: Any = None, refuse: bool = True
) -> list[GroupSet]:
    """All group sets `config` asks for, in a stable order (target, then stack and layer). `refuse=False` skips
    the registry's refusals (reloading an export only reshapes tensors; it gates nothing)."""
    targets = [BUILTIN[t] for t in config.targets] + [Rule(rule) for rule in config.groups]
    per_block = [t for t in targets if t.per_block]
    sets: list[GroupSet] = []
    if per_block:
        if "heads" in config.targets and hasattr(getattr(model, "config", None), "to_dict") and refuse:
            if not any(attention_like(n, m) for n, m in model.named_modules()):
                raise ValueError(
                    f"target='heads' is not available for {type(model).__name__}: it has no attention heads (no "
                    "attention module anywhere); gate 'neurons', 'layers' or 'filters'."
                )
        stacks = block_stacks(model, config)
        off_path: list[str] = []
        absent: list[StructureNotFoundError] = []
        for stack in stacks:
            try:
                sets += _stack_group_sets(model, config, stack, per_block, refuse, example_inputs)
            except OffPath as e:  # a tower the probe does not feed: dense when another stack is gated
                if len(stacks) == 1:
                    raise ValueError(f"{e} Pass example_inputs=<a batch that uses it> to apply_dgate.") from None
                off_path.append(stack.path)
            except StructureNotFoundError as e:  # a stack without this kind of group (a conv tokenizer's stages)
                if len(stacks) == 1 or config.module_names:
                    raise
                absent.append(e)
        if absent and not sets:
            raise absent[0]
        if absent:
            logger.warning("%d stack(s) stay dense, they have no such groups: %s", len(absent), str(absent[0])[:200])
        if off_path and not sets:
            raise ValueError(
                f"No gated stack is reached by the probe batch ({', '.join(off_path)}); pass example_inputs=<a batch> "
                "to apply_dgate."
            )
        if off_path:
            logger.warning("Stacks %s stay dense: the probe batch does not reach them.", off_path)
    _refuse_shared_modules(model, sets)
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
    model: nn.Module,
    config: DGateConfig,
    stack: BlockStack,
    targets: list[Target],
    refuse: bool,
    example_inputs: Any = None,
) -> list[GroupSet]:
    spec = spec_for(stack.config)
    sets: list[GroupSet] = []
    shared = _shared_position_bias(stack) if spec is None and refuse and not config.module_names else None
    for target in targets:
        if shared and target.name in ("heads", "layers"):
            raise ValueError(
                f"target={target.name!r} is not available for {stack.path!r}: its first block owns a relative position "
                f"bias ('{shared}') that the other blocks reuse (a position bias shared across layers), so that block "
                "cannot go and the others cannot lose heads; gate 'neurons' instead."
            )
        stack_why = dict(stack.refuse).get(target.name)
        why = stack_why or (spec.refusal(target.name, stack.config) if spec is not None else None)
        if why and refuse:
            where = f"the stack {stack.path!r}" if stack_why else f"'{stack.config.model_type}' models"
            raise ValueError(f"target={target.name!r} is not available for {where}: {why}.")
        found: list[GroupSet] = []
        missing: dict[int, str] = {}  # blocks without this kind of group (a hybrid's Mamba blocks have no heads)
        for layer, (name, block) in enumerate(stack.blocks):
            try:
                new = target.find_in_block(model, layer_config(stack.config, layer), config, layer, name, block)
            except StructureNotFoundError as e:
                if spec is not None or config.module_names:
                    raise
                missing[layer] = str(e)
                continue
            for gs in new:
                if refuse and gs.info.refuse:  # found, but the installed transformers cannot run it pruned
                    raise ValueError(gs.info.refuse)
                gs.info.stack, gs.info.stack_name = stack.path, stack.name
            found += new
        if refuse:
            found = _checked(model, target.name, stack, found, missing, example_inputs, config)
        elif missing and not found:
            raise StructureNotFoundError(next(iter(missing.values())))
        sets += found
    return sets


def _shared_position_bias(stack: BlockStack) -> str | None:
    """The relative name of an embedding that only the stack's first block has (T5's relative position bias,
    computed once and passed on to every block), else None."""
    if len(stack.blocks) < 2:
        return None
    cfg = layer_config(stack.config, stack.blocks[0][0])  # the first block's own view of a per-layer config
    heads = next((v for k in ("num_attention_heads", "num_heads", "n_heads") if isinstance(
        v := config_value(cfg, k), int)), None)  # fmt: skip
    first = {
        n: m for n, m in stack.blocks[0][1].named_modules() if isinstance(m, nn.Embedding) and m.embedding_dim == heads
    }
    others = [dict(b.named_modules()) for _, b in stack.blocks[1:]]
    return next((n for n in first if all(n not in o for o in others)), None)


def _checked(
    model: nn.Module,
    target: str,
    stack: BlockStack,
    sets: list[GroupSet],
    missing: dict[int, str],
    inputs: Any,
    config: DGateConfig | None = None,
) -> list[GroupSet]:
    """Check every guessed group set numerically (discover.verify); blocks whose sets fail, or where nothing was
    found, stay dense when other blocks of the stack pass (a hybrid), else the target is refused with the reason."""
    guessed = [gs for gs in sets if gs.info.guessed]
    failed: dict[int | str, str] = dict(missing)
    if guessed:
        probe = inputs if isinstance(inputs, (dict, torch.Tensor)) else None
        if probe is None:
            try:
                probe = probe_batch(model, seq_len=8, batch_size=2)
            except Exception:  # noqa: BLE001 - no probe: the guess cannot be checked, so it is refused
                probe = None
        if probe is None:
            raise ValueError(
                f"target={target!r}: the structure of {stack.path!r} was found from names and shapes and needs a "
                "numerical check, but no probe batch could be built; pass example_inputs=... to apply_dgate."
            )
        bad = verify(model, guessed, probe)
        if bad and target == "heads":  # a name-based guess that failed: try the shapes' proposal for those blocks
            from .heads import alternative_head_set, output_side_head_set

            for i in list(bad):
                gs = guessed[i]
                if gs.info.discovered or not isinstance(gs.layer, int):
                    continue
                name, block = stack.blocks[gs.layer]
                cfg = layer_config(stack.config, gs.layer)
                # the same heads gated at the output projection's input: where something besides the values feeds
                # each head's context (NeZha adds relative-position values), a zero value is no zero head
                alt = output_side_head_set(model, cfg, config, gs, name, block) if config is not None else None
                if alt is not None and not verify(model, [alt], probe):
                    alt.info.stack, alt.info.stack_name = stack.path, stack.name
                    sets = [alt if s is gs else s for s in sets]
                    del bad[i]
                    continue
                alt = alternative_head_set(cfg, gs.layer, name, block)
                if alt is not None and not verify(model, [alt], probe):
                    alt.info.stack, alt.info.stack_name = stack.path, stack.name
                    sets = [alt if s is gs else s for s in sets]
                    del bad[i]
        if bad and target == "neurons":  # experts whose gate and up rows alternate: the layout shapes cannot tell
            from .neurons import alternating_expert_unit_set

            for i in list(bad):
                gs = guessed[i]
                name, block = stack.blocks[gs.layer]
                alt = alternating_expert_unit_set(gs, name, block, layer_config(stack.config, gs.layer))
                if alt is not None and not verify(model, [alt], probe):
                    alt.info.stack, alt.info.stack_name = stack.path, stack.name
                    sets = [alt if s is gs else s for s in sets]
                    del bad[i]
        if bad and target == "layers":  # children that add the residual themselves: gate their last layers
            from .layers import alternative_layer_set, fitted_layer_set

            for i in list(bad):
                gs = guessed[i]
                name, block = stack.blocks[gs.layer]
                cfg = layer_config(stack.config, gs.layer)
                for propose in (  # then the weights that carry each branch's scale, found numerically
                    lambda: alternative_layer_set(gs.layer, name, block, cfg),  # noqa: B023 - called in this pass
                    lambda: fitted_layer_set(model, gs, block, cfg, probe),  # noqa: B023
                ):
                    alt = propose()
                    if alt is not None and not verify(model, [alt], probe):
                        alt.info.stack, alt.info.stack_name = stack.path, stack.name
                        sets = [alt if s is gs else s for s in sets]
                        del bad[i]
                        break
        if bad and target == "heads":  # where the structure says why no head can go alone, say that
            from .heads import norm_over_all_heads

            for i in bad:
                gs = guessed[i]
                if isinstance(gs.layer, int):
                    bad[i] = norm_over_all_heads(stack.blocks[gs.layer][1], gs) or bad[i]
        if bad and target == "neurons":  # an "MLP" that is a recurrent mixer's in and out projections: say so
            for i in bad:
                gs = guessed[i]
                if isinstance(gs.layer, int) and isinstance(gs.info, NeuronInfo):
                    bad[i] = _mixer_not_mlp(stack, gs) or bad[i]
        for i, why in bad.items():
            failed[guessed[i].layer] = why
        dropped = {id(guessed[i]) for i in bad}
        sets = [gs for gs in sets if id(gs) not in dropped]
    if missing and not sets and not guessed:  # nothing found anywhere: say why where the structure does, else how
        why = _recurrent_without(target, stack, missing)  # to name the parts
        if why:
            raise ValueError(f"target={target!r} is not available for {stack.path!r}: {why}.")
        raise StructureNotFoundError(next(iter(missing.values())))
    if failed and not sets:
        layer, why = next(iter(failed.items()))
        if all(w == OFF_PATH for w in failed.values()):
            raise OffPath(f"target={target!r}: {stack.path!r} is not reached by the probe batch ({why}).")
        if all(NO_MLP in w for w in failed.values()):  # every block's "MLP" is a recurrent mixer's projections
            raise ValueError(f"target={target!r} is not available for {stack.path!r}: {why}.")
        raise ValueError(
            f"target={target!r} is not available for {stack.path!r}: no block passed (block {layer}: {why}). Name "
            "the parts with DGateConfig(module_names={...}) if they exist."
        )
    if failed:
        logger.warning(
            "target=%r: blocks %s of %r stay dense (%s); the other %d blocks are gated.",
            target, sorted(failed), stack.path, next(iter(failed.values()))[:160], len(stack.blocks) - len(failed),
        )
        for gs in sets:
            gs.info.dense_blocks = tuple(sorted(failed))
    return sets


NO_MLP = "has no MLP"


def _recurrent_without(target: str, stack: BlockStack, missing: dict[int, str]) -> str | None:
    """Why no block of a stack has attention heads, where its structure says so: a recurrent sequence mixer (RWKV's
    time mixing) in every block, and no head count in the config: its channels are mixed over time one by one
    (one decay each), never split into heads."""
    if target != "heads" or _count([stack.config], HEAD_FIELDS) is not None:
        return None
    found = [recurrent_mixer(stack.blocks[i][1], layer_config(stack.config, i)) for i in missing]
    if not found or any(f is None for f in found):
        return None
    rel, evidence = found[0]
    kind = type(stack.blocks[next(iter(missing))][1].get_submodule(rel)).__name__
    return (
        f"it has no attention heads: its mixer '{rel}' ({kind}) is recurrent, with {evidence}, and the config "
        "gives no head count; gate 'neurons' or 'layers'"
    )


def _mixer_not_mlp(stack: BlockStack, gs: GroupSet) -> str | None:
    """Why a proposed MLP of a block failed its check, where the structure says so: its up and down projections are
    the input and output projections of a recurrent sequence mixer (Mamba's in_proj and out_proj, with a convolution
    along the sequence and a state update reading every unit between them): the block has no MLP."""
    name, block = stack.blocks[gs.layer]
    found = recurrent_mixer(block, layer_config(stack.config, gs.layer))
    if found is None:
        return None
    rel, evidence = found
    if not (gs.info.down.startswith(rel + ".") and all(u.startswith(rel + ".") for u in gs.info.up)):
        return None
    kind = type(block.get_submodule(rel)).__name__
    return (
        f"block {gs.layer} {NO_MLP}: its only layers shaped like one ('{gs.info.up[0]}', '{gs.info.down}') are the "
        f"input and output projections of a recurrent mixer ('{rel}', {kind}, with {evidence}), whose state reads "
        "all their units; gate 'layers'"
    )


def _refuse_shared_modules(model: nn.Module, sets: list[GroupSet]) -> None:
    """Refuse group sets of different blocks that gate one module object (Zamba2's shared transformer block, reused
    by every hybrid layer): its weights serve every block that holds it, so one block cannot lose groups alone, and
    two gates on one module would remove each other's groups."""
    seen: dict[int, tuple[str, Any, str]] = {}
    for gs in sets:
        for site in gs.sites:
            m = model.get_submodule(site.module)
            key = (gs.target, gs.info.stack)
            first = seen.setdefault(id(m), (gs.target, gs.layer, site.module))
            if first[0] == gs.target and first[1] != gs.layer:
                raise ValueError(
                    f"target={gs.target!r} is not available for {key[1]!r}: '{first[2]}' and '{site.module}' are one "
                    f"module {SHARED_BY_BLOCKS} {first[1]} and {gs.layer} (parameters shared across layers), so one "
                    "block cannot lose groups alone; gate 'layers', or the blocks that own their modules."
                )


SHARED_BY_BLOCKS = "shared by blocks"
