"""The protocol of a target (a kind of group: heads, neurons, layers, experts, filters, features, rules), and
the tensor surgery every target's removal is made of.

A target finds its groups (as `GroupSet`s: tensor slices plus index vectors, see groups.py), removes the dead
ones from a folded model, proposes the config edit that expresses what is left, and describes itself for
reports, cards and the CLI. Adding a built-in target is one module here plus a line in `targets/__init__.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat import HAS_PER_LAYER_CONFIG, config_value, per_layer_overrides
from ..config import DGateConfig
from ..errors import ExportError
from ..groups import GroupSet, TensorSlice
from ..pruned_modules import make_no_input


class Target:
    """One kind of group. Transformer targets (`per_block`) are found in every block of every gated stack;
    the others on the whole model."""

    name: str = ""
    description: str = ""  # one line for reports, model cards and the CLI
    per_block: bool = True
    removed_by_export: bool = True  # False: zero groups are folded into the weights but stay (custom rules)
    order: int = 5  # removal order inside a block stack (expert units index the experts as they were)

    def find_in_block(
        self, model: nn.Module, hf_config: Any, dconfig: DGateConfig, layer: int, name: str, block: nn.Module
    ) -> list[GroupSet]:
        raise NotImplementedError

    def find(self, model: nn.Module, dconfig: DGateConfig, example_inputs: Any = None) -> list[GroupSet]:
        raise NotImplementedError

    def remove(self, model: nn.Module, gs: GroupSet, dead: torch.Tensor) -> None:
        """Physically remove the dead groups of `gs` (and what only fed them) from a folded, ungated model."""
        raise NotImplementedError

    def native_edit(self, cfg: Any, record: dict[str, Any]) -> dict[str, Any]:
        """Config fields that would make a fresh build match the pruned shapes (checked by the caller); per-layer
        values go under "per_layer_config" as {layer: {field: value}} (see `per_layer_edit`)."""
        return {}


MISSING = object()


def per_layer_edit(cfg: Any, rows: dict[str, list[int]], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config edit that would say "layer i has rows[field][i]" for each field, in the first form the config
    has: one value for every layer, the family's own per-layer list (Gemma 3n's `intermediate_size`), or 5.x
    `per_layer_config` overrides. Whether the family's modeling code reads that form is not assumed: the export
    builds the model from the edited config and compares every shape (native.make_native). {} when no form fits."""
    edit = dict(fixed or {})
    overridden = {k for layer in (per_layer_overrides(cfg) or {}).values() for k in layer}
    overrides: dict[int, dict[str, Any]] = {}
    for field, values in rows.items():
        current = config_value(cfg, field, MISSING)
        present = {v for v in values if v is not None}  # None: the layer has no such part (a dense block of a MoE)
        if current is MISSING or not present:
            return {}
        if isinstance(current, list) and len(current) == len(values) and None not in values:
            edit[field] = list(values)
        elif len(present) == 1 and field not in overridden:
            edit[field] = present.pop()
        elif HAS_PER_LAYER_CONFIG:
            for i, v in enumerate(values):
                if v is not None:
                    overrides.setdefault(i, {})[field] = v
        else:
            return {}
    if overrides:
        edit["per_layer_config"] = overrides
    return edit


def merge_edits(*edits: dict[str, Any]) -> dict[str, Any]:
    """One config edit from several (fields side by side, per-layer overrides merged layer by layer)."""
    out: dict[str, Any] = {}
    for edit in edits:
        for key, value in edit.items():
            if key == "per_layer_config":
                merged = out.setdefault(key, {})
                for layer, fields in value.items():
                    merged[layer] = {**merged.get(layer, {}), **fields}
            else:
                out[key] = value
    return out


# ---- surgery shared by the targets -------------------------------------------------------------------------------
def keep_mask(sl: TensorSlice, dead: torch.Tensor) -> torch.Tensor:
    idx = sl.index
    return (idx < 0) | ~dead[idx.clamp(min=0)]


def keep_slice(model: nn.Module, sl: TensorSlice, dead: torch.Tensor) -> None:
    """Replace `module.param` by its kept positions along `sl.axis`."""
    module = model.get_submodule(sl.module)
    p = getattr(module, sl.param)
    if sl.axis is None:
        return
    keep = torch.nonzero(keep_mask(sl, dead).cpu()).flatten().to(p.device)
    new = p.data.index_select(sl.axis, keep).contiguous()
    if sl.param in module._buffers:  # a per-group buffer (a router's per-expert score-correction bias)
        module._buffers[sl.param] = new
    else:
        setattr(module, sl.param, nn.Parameter(new, requires_grad=p.requires_grad))
    sync_features(module)


def sync_features(module: nn.Module) -> None:
    """Keep a module's size attributes true to its weight (they feed `extra_repr` and some forwards)."""
    w = getattr(module, "weight", None)
    if w is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif type(module).__name__.endswith("Conv1D"):
        module.nx, module.nf = w.shape
        if module.nx == 0:
            make_no_input(module)


def block_name(gs: GroupSet) -> str:
    """The block a head/neuron group set lives in (its site names are `<block>.<relative name>`)."""
    rels = gs.info.block_parts()
    rel = rels[0] if rels else None
    name = gs.sites[0].module if gs.sites else gs.removable[0].module
    if rel and name.endswith("." + rel):
        return name[: -len(rel) - 1]
    for sl in gs.removable:
        for r in rels:
            if isinstance(r, str) and r and sl.module.endswith("." + r):
                return sl.module[: -len(r) - 1]
    raise ExportError(f"Cannot locate the block of group set {gs.target}/{gs.layer}.")


def settable(cfg: Any, key: str) -> bool:
    """False for config fields computed from others (Mamba's `layer_types` is a read-only property)."""
    prop = getattr(type(cfg), key, None)
    return not isinstance(prop, property) or prop.fset is not None
