"""Whole blocks: one group per block, gating every residual branch (attention, cross-attention, MLP or MoE
output). Needs pre-norm blocks, where zero branches make the block the identity. Dead blocks are dropped from
their stack together, and the stack's layer count in the config follows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..architectures import (
    POST_NORM_TYPES,
    BlockStack,
    StructureNotFoundError,
    attention_parts,
    cross_attention_parts,
    dense_mlp_block,
    expert_tensors,
    has_module,
    mlp_parts,
    out_features,
    routed_experts,
)
from ..compat import experts_list, rekey_per_layer_config
from ..config import DGateConfig
from ..discover import branch_candidates, fit_branch_scale, hidden_size, residual_branches
from ..errors import ExportError
from ..groups import GroupSet, LayerInfo, Site, TensorSlice, whole_module_slices, whole_weight_slices
from ..registry import spec_for
from .base import Target, settable

# config fields holding one entry per layer (a field counts only where it is a list as long as the stack)
PER_LAYER_CONFIG_LISTS = (
    "layer_types",
    "attention_layers",
    "no_rope_layers",
    "mlp_layer_types",
    "intermediate_size",  # Gemma 3n
    "activation_sparsity_pattern",
    "num_attention_heads_per_layer",
    "swiglu_limits",  # Step 3.7
    "swiglu_limits_shared",
    "layers_block_type",  # Nemotron-H, Zamba, Zamba 2
)
# a pattern that repeats over the layers (RecurrentGemma's block_types): written out for the kept layers
CYCLED_CONFIG_LISTS = ("block_types",)
# the first k layers are of one kind (dense MLPs before MoE ones): k becomes the number of those layers kept
PREFIX_COUNT_FIELDS = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
# the width of each layer's slice of a packed per-layer input (Gemma 3n/4: an embedding and a projection writing
# num_hidden_layers x this many features outside the stack)
PER_LAYER_INPUT_FIELDS = ("hidden_size_per_layer_input",)


def _layer_sets(
    model: nn.Module, hf_config: Any, config: DGateConfig, layer: int, name: str, block: nn.Module
) -> list[GroupSet]:
    return [_layer_set(model, hf_config, config, layer, name, block)]


def _layer_set(
    model: nn.Module, hf_config: Any, config: DGateConfig, layer: int, name: str, block: nn.Module
) -> GroupSet:
    model_type = getattr(hf_config, "model_type", None)
    spec = spec_for(hf_config)
    post_norm = not spec.is_pre_norm(hf_config) if spec is not None else model_type in POST_NORM_TYPES
    if post_norm or getattr(hf_config, "do_layer_norm_before", True) is False:
        raise ValueError(
            f"target='layers' needs pre-norm blocks (x + f(x)); '{model_type}' normalises after the residual "
            "add, so a zero branch does not remove the layer. Gate 'heads' or 'neurons' instead."
        )
    cross = cross_attention_parts(block, hf_config)
    attentions = _attention_modules(block)
    if spec is None and not config.module_names:  # every branch found from shapes, checked numerically
        return _guessed_layer_set(layer, name, block, hf_config)
    if len(attentions) > 1 + (cross is not None):
        raise ValueError(
            f"target='layers' cannot make '{name}' exact: it has {len(attentions)} attention branches "
            f"({', '.join(attentions)}; e.g. self- and cross-attention) and a zero layer gate scales one attention "
            "output and the MLP, so the block would not become the identity. Gate 'heads' or 'neurons' instead."
        )
    # a MoE block: attention output + the whole MoE block's output (a family may mix dense and MoE blocks)
    if spec is not None and spec.experts is not None and not dense_mlp_block(spec, block):
        found = routed_experts(hf_config, block)  # (the registry's paths, moved where this transformers has them)
        return _moe_layer_set(layer, name, block, config, hf_config, found[0] if found else spec.experts)
    if spec is not None and spec.branches:
        branches = spec.branches
    else:
        o_rel = attention_parts(name, block, config, hf_config)["o"]
        cross_o = (cross["o"],) if cross is not None else ()
        branches = (o_rel, *cross_o, mlp_parts(name, block, config, hf_config)[0])
    sites, primary = [], []
    for rel in branches:
        m = block.get_submodule(rel)
        sites.append(Site(f"{name}.{rel}", "output", -1, torch.zeros(out_features(m), dtype=torch.long)))
        primary += whole_weight_slices(f"{name}.{rel}", m)
    return GroupSet("layers", layer, 1, sites, primary, whole_module_slices(name, block), LayerInfo(block=name))


def alternative_layer_set(layer: int, name: str, block: nn.Module, hf_config: Any) -> GroupSet:
    """The same branches gated at their last layers instead of at the child's output (for children that add the
    residual themselves, as BERT's attention output does)."""
    return _guessed_layer_set(layer, name, block, hf_config, at_child=False)


def fitted_layer_set(model: nn.Module, gs: GroupSet, block: nn.Module, hf_config: Any, inputs: Any) -> GroupSet | None:
    """`gs` with each branch's scale carried by the weights found numerically (discover.fit_branch_scale) instead of
    by the last layer writing the hidden size: for branches whose last registered layer is not their last in the
    data flow (an attention output gate), a mixture of experts beside a shared expert, or stacked experts with a
    bias or in the (E, I, H) layout. None when some branch has no such weights."""
    name = gs.info.block
    hidden = hidden_size(hf_config, block)
    if hidden is None:
        return None
    primary = []
    for site in gs.sites:
        child = site.module.removeprefix(f"{name}.")
        if site.where != "output" or child == site.module or "." in child and not child.split(".")[-1].isdigit():
            return None  # (only the gates on a direct child's output, as `_guessed_layer_set` places them)
        fitted = fit_branch_scale(model, name, child, branch_candidates(block, child, hidden), inputs)
        if fitted is None:
            return None
        primary += [TensorSlice(f"{name}.{rel}", pn, None, torch.tensor([0])) for rel, pn in fitted]
    info = LayerInfo(block=name, guessed=True)
    return GroupSet("layers", gs.layer, 1, list(gs.sites), primary, list(gs.removable), info)


def _guessed_layer_set(layer: int, name: str, block: nn.Module, hf_config: Any, at_child: bool = True) -> GroupSet:
    """A block of a family without a registry row: each child writing the hidden size is a residual branch, gated at
    its output; its scale folds into that branch's last layer (discover.residual_branches). The numerical check
    then asks whether zero branches make the block the identity."""
    branches = residual_branches(block, hf_config)
    if not branches:
        raise StructureNotFoundError(f"No residual branch writing the hidden size was found in '{name}'.")
    hidden = hidden_size(hf_config, block)
    sites, primary = [], []
    zeros = torch.zeros(hidden, dtype=torch.long)
    for child, params in branches:
        if at_child:
            sites.append(Site(f"{name}.{child}", "output", -1, zeros))
        for rel in params:
            owner, _, pname = rel.rpartition(".")
            m = block.get_submodule(rel) if pname not in dict(block.get_submodule(owner).named_parameters(
                recurse=False)) else None
            if m is not None:
                primary += whole_weight_slices(f"{name}.{rel}", m)
            else:
                primary.append(TensorSlice(f"{name}.{owner}", pname, None, torch.tensor([0])))
            if not at_child:
                site = f"{name}.{rel if m is not None else owner}"
                if all(s.module != site for s in sites):
                    sites.append(Site(site, "output", -1, zeros))
    info = LayerInfo(block=name, guessed=True)
    return GroupSet("layers", layer, 1, sites, primary, whole_module_slices(name, block), info)


def _moe_layer_set(layer: int, name: str, block: nn.Module, config: DGateConfig, hf_config: Any, moe: Any) -> GroupSet:
    o_rel = attention_parts(name, block, config, hf_config)["o"]
    o = block.get_submodule(o_rel)
    hidden = out_features(o)
    sites = [
        Site(f"{name}.{o_rel}", "output", -1, torch.zeros(hidden, dtype=torch.long)),
        Site(f"{name}.{moe.block}", "output", -1, torch.zeros(hidden, dtype=torch.long)),
    ]
    primary = whole_weight_slices(f"{name}.{o_rel}", o)
    listed = experts_list(block.get_submodule(moe.experts)) if has_module(block, moe.experts) else None
    if listed is not None:  # transformers 4.x: one MLP module per expert; its down projection writes the branch
        for i, expert in listed:
            for rel, m in expert.named_modules():
                if isinstance(m, nn.Linear) and m.out_features == hidden:
                    primary += whole_weight_slices(f"{name}.{moe.experts}.{i}.{rel}", m)
    else:
        down = expert_tensors(name, block, moe).down
        primary.append(TensorSlice(*down, None, torch.tensor([0])))
    if moe.shared is not None and has_module(block, moe.shared.down):
        primary += whole_weight_slices(f"{name}.{moe.shared.down}", block.get_submodule(moe.shared.down))
    return GroupSet("layers", layer, 1, sites, primary, whole_module_slices(name, block), LayerInfo(block=name))


def _attention_modules(block: nn.Module) -> list[str]:
    """Outermost submodules whose class is an attention module: one per residual attention branch."""
    found: list[str] = []
    for n, m in block.named_modules():
        if n and "Attention" in type(m).__name__ and not any(n.startswith(f + ".") for f in found):
            found.append(n)
    return found


def drop_layers(model: nn.Module, st: BlockStack, dead: set[int]) -> None:
    parent_name, _, attr = st.path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if len(old) != len(st.blocks):
        raise ExportError("Cannot drop layers of a model whose blocks are shared (tied) between positions.")
    kept = [b for i, b in enumerate(old) if i not in dead]
    setattr(parent, attr, nn.Sequential(*kept) if isinstance(old, nn.Sequential) else nn.ModuleList(kept))
    for new_idx, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx  # the KV cache is indexed by layer_idx
    if st.layers_index is not None:  # a stage of a hierarchical model: its entry in the per-stage depths
        depths = list(getattr(st.layers_config, st.layers_field))
        if depths[st.layers_index] == len(old):
            depths[st.layers_index] = len(kept)
            setattr(st.layers_config, st.layers_field, depths)
        return
    configs = [st.layers_config]
    mine = any(c is st.layers_config for c in _configs(model))  # (not a tower's or one side's own sub-config)
    if st.layers_field == "num_hidden_layers" and mine:  # a text config inside a composite one may count them too
        configs += [c for c in _configs(model) if c is not st.layers_config]
    for cfg in configs:
        n_old = getattr(cfg, st.layers_field, None)
        if n_old != len(old):
            continue
        for key in PER_LAYER_INPUT_FIELDS:
            width = getattr(cfg, key, None)
            if isinstance(width, int) and width > 0:
                _slice_per_layer_inputs(model, st.path, n_old, width, [i for i in range(n_old) if i not in dead])
        for key in PER_LAYER_CONFIG_LISTS + CYCLED_CONFIG_LISTS:
            val = getattr(cfg, key, None)
            if key in CYCLED_CONFIG_LISTS and isinstance(val, (list, tuple)) and 0 < len(val) < n_old:
                val = [val[i % len(val)] for i in range(n_old)]
            if isinstance(val, (list, tuple)) and len(val) == n_old and settable(cfg, key):
                setattr(cfg, key, [v for i, v in enumerate(val) if i not in dead])
        for key in PREFIX_COUNT_FIELDS:
            k = getattr(cfg, key, None)
            if isinstance(k, int) and not isinstance(k, bool) and settable(cfg, key):
                setattr(cfg, key, sum(1 for i in range(min(k, n_old)) if i not in dead))
        try:
            setattr(cfg, st.layers_field, len(kept))
        except Exception as e:  # noqa: BLE001 - a strict config validates the count (NeoMME: a positive int)
            reason = (str(e).splitlines() or [type(e).__name__])[-1].strip()
            raise ExportError(
                f"Cannot drop {len(dead)} of {len(old)} layers of '{st.path}': its config refuses "
                f"{st.layers_field}={len(kept)} ({reason}). Keep at least one layer, or gate other targets."
            ) from None
        if st.layers_field == "num_hidden_layers":
            rekey_per_layer_config(cfg, [i for i in range(len(old)) if i not in dead])


@torch.no_grad()
def _slice_per_layer_inputs(model: nn.Module, stack: str, n_old: int, width: int, kept: list[int]) -> None:
    """Keep the kept layers' slices of every embedding or linear layer outside the stack that writes one slice of
    `width` features per layer (packed [layer, width]); the export check and the reload rehearsal confirm it."""
    rows = torch.cat([torch.arange(i * width, (i + 1) * width) for i in kept]) if kept else torch.zeros(0).long()
    for name, m in model.named_modules():
        if name == stack or name.startswith(stack + "."):
            continue
        if isinstance(m, nn.Embedding) and m.embedding_dim == n_old * width:
            m.weight = nn.Parameter(m.weight[:, rows].clone(), requires_grad=m.weight.requires_grad)
            m.embedding_dim = len(rows)
        elif isinstance(m, nn.Linear) and m.out_features == n_old * width:
            m.weight = nn.Parameter(m.weight[rows].clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias[rows].clone(), requires_grad=m.bias.requires_grad)
            m.out_features = len(rows)


def _configs(model: nn.Module) -> list[Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is not cfg:
        out.append(text)
    return out


class Layers(Target):
    name = "layers"
    order = 9
    removes_blocks = True

    find_in_block = staticmethod(_layer_sets)

    def metric_name(self):
        return "layer_sparsity"

    def remove(self, model, gs, dead, ctx=None):
        """Nothing per group set: dead blocks leave their stack together (`drop_layers`)."""
