"""MLP neurons: one group per intermediate unit (input column of the down projection, rows of the up/gate
projections); in a mixture of experts, every unit of every expert, and a shared expert's units."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..architectures import (
    StructureNotFoundError,
    _attention_out_name,
    expert_tensors,
    has_module,
    in_features,
    mlp_parts,
    out_features,
    routed_experts,
)
from ..compat import config_value, experts_list
from ..config import DGateConfig
from ..discover import beside_ups, propose_mlp
from ..errors import ExportError
from ..groups import ExpertUnitInfo, GroupSet, NeuronInfo, Site, TensorSlice, input_slices, output_slices, slice_index
from ..registry import spec_for
from .base import (
    MISSING,
    Target,
    block_name,
    keep_slice,
    merge_edits,
    per_layer_edit,
    rescale_rms_norm,
    rms_norms_over,
)

NEURON_CONFIG_ATTRS = ("intermediate_size", "n_inner", "ffn_dim")


def _neuron_sets(
    model: nn.Module, hf_config: Any, config: DGateConfig, layer: int, name: str, block: nn.Module
) -> list[GroupSet]:
    """The MLP's intermediate units; in a mixture of experts every expert's units (and a shared expert's)."""
    found = routed_experts(hf_config, block, config)
    if found is None:  # a dense MLP (or a dense block of a family that mixes both)
        return [_neuron_set(model, hf_config, config, layer, name, block)]
    moe, discovered = found
    listed = experts_list(block.get_submodule(moe.experts)) if has_module(block, moe.experts) else None
    if listed is not None:  # transformers 4.x: one dense MLP module per expert; its units, expert by expert
        sets = []
        for i, expert in listed:
            rel = f"{moe.experts}.{i}"
            down, ups = mlp_parts(f"{name}.{rel}", expert, config, hf_config)
            parts = (f"{rel}.{down}", [f"{rel}.{u}" for u in ups])
            # (names inside each expert: checked numerically like any found MLP)
            gs = _neuron_set(model, hf_config, config, layer, name, block, parts, found=True)
            sets.append(gs)
    else:
        sets = [_expert_unit_set(layer, name, block, moe)]
        sets[0].info.guessed = discovered
    if moe.shared is not None and all(has_module(block, r) for r in (moe.shared.down, *moe.shared.up)):
        dense = _neuron_set(model, hf_config, config, layer, name, block, (moe.shared.down, list(moe.shared.up)))
        dense.info.shared_expert = True
        sets.append(dense)
    elif discovered:  # a dense MLP beside the experts (a shared expert), found from shapes like any MLP
        shared = shared_mlp(block, hf_config, config, name, moe)
        if shared is not None:
            dense = _neuron_set(model, hf_config, config, layer, name, block, shared, found=True)
            dense.info.shared_expert = True
            sets.append(dense)
    return sets


def shared_mlp(
    block: nn.Module, hf_config: Any, config: DGateConfig, name: str, moe: Any
) -> tuple[str, list[str]] | None:
    """A dense MLP of a block with discovered experts (its shared expert): the MLP its shapes propose outside the
    attention and the experts, or None."""
    o_rel = _attention_out_name(name, block, config, hf_config)
    found = propose_mlp(block, hf_config, exclude=o_rel.rpartition(".")[0] if o_rel else None)
    if found is None or found[0].startswith(moe.experts + ".") or found[0] == moe.router:
        return None
    return found[0], list(found[1])


def _expert_unit_set(layer: int, name: str, block: nn.Module, moe: Any) -> GroupSet:
    """Group (e, j): unit j of expert e, i.e. column j of down_proj[e] and the rows of gate_up_proj[e] (and of its
    bias) that feed unit j: j and I + j ([gate | up] halves) or 2j and 2j + 1 (alternating)."""
    t = expert_tensors(name, block, moe)
    n_exp, units = t.n_experts, t.units
    idx = torch.arange(n_exp * units).reshape(n_exp, units)
    rows = torch.arange(2 * units)
    gate_up_idx = idx[:, rows // 2 if t.interleaved else rows % units]
    site = Site(t.down[0], "param", (0, t.down_axis), idx, param=t.down[1])
    primary = [TensorSlice(*t.down, (0, t.down_axis), idx)]
    removable = [*primary, TensorSlice(*t.gate_up, (0, t.gate_up_axis), gate_up_idx)]
    if t.bias is not None:
        removable.append(TensorSlice(*t.bias, (0, 1), gate_up_idx))
    info = ExpertUnitInfo(experts=moe.experts, n_experts=n_exp, units=units, gate_up=moe.gate_up, down=moe.down,
                          interleaved=t.interleaved)
    return GroupSet("neurons", layer, n_exp * units, [site], primary, removable, info)


def alternating_expert_unit_set(gs: GroupSet, name: str, block: nn.Module, hf_config: Any) -> GroupSet | None:
    """The same discovered experts with gate and up rows alternating (GPT-OSS) instead of in halves: the layout the
    shapes cannot tell apart, proposed when the halves fail the numerical check (None: already tried)."""
    import dataclasses

    info = gs.info
    if not isinstance(info, ExpertUnitInfo) or info.interleaved or not info.guessed:
        return None
    moe = routed_experts(hf_config, block)
    if moe is None or not moe[1]:
        return None
    alt = _expert_unit_set(gs.layer, name, block, dataclasses.replace(moe[0], interleaved=True))
    alt.info.guessed = True
    return alt


def _neuron_set(
    model: nn.Module,
    hf_config: Any,
    config: DGateConfig,
    layer: int,
    name: str,
    block: nn.Module,
    parts: tuple[str, list[str]] | None = None,
    found: bool = False,
) -> GroupSet:
    """`parts`: (down, ups) already located; `found`: located from names or shapes (checked numerically), so an up
    projection twice as wide as the units is read as [gate | up] halves."""
    down_rel, up_rels = parts or mlp_parts(name, block, config, hf_config)
    spec = spec_for(hf_config)
    registered = spec is not None and any(m.down == down_rel for m in spec.mlps())
    named = {"up", "down"} & set(config.module_names or {})
    guessed = found or parts is None and not registered and not named  # checked numerically before gating
    width = in_features(block.get_submodule(down_rel))
    misfit = any(out_features(block.get_submodule(r)) not in (width, 2 * width) for r in up_rels)
    if parts is None and guessed and misfit:
        o_rel = _attention_out_name(name, block, config, hf_config)  # names that do not fit: ask the shapes
        exclude = o_rel.rpartition(".")[0] if o_rel else None
        down_rel, up_rels = propose_mlp(block, hf_config, exclude=exclude) or (down_rel, up_rels)
    down = block.get_submodule(down_rel)
    n = in_features(down)
    idx = slice_index(n)
    removable = input_slices(f"{name}.{down_rel}", down, idx)
    fused = {m.fused_up for m in spec.mlps()} if spec is not None else set()
    for rel in up_rels:
        up = block.get_submodule(rel)
        if (rel in fused or guessed) and out_features(up) == 2 * n:  # [gate | up] halves: unit j is rows j, n + j
            removable += output_slices(f"{name}.{rel}", up, torch.arange(2 * n) % n)
            continue
        if out_features(up) != n:
            raise StructureNotFoundError(
                f"MLP projections of '{name}' disagree: '{rel}' has {out_features(up)} outputs, '{down_rel}' "
                f"takes {n} inputs. Name them with DGateConfig(module_names={{'up': [...], 'down': ...}})."
            )
        removable += output_slices(f"{name}.{rel}", up, idx)
    for rel in beside_ups(block, hf_config, down_rel, up_rels) if guessed else ():
        beside = block.get_submodule(rel)
        rows = torch.arange(out_features(beside))
        removable += output_slices(f"{name}.{rel}", beside, rows % n if out_features(beside) == 2 * n else idx)
    parent = down_rel.rpartition(".")[0]
    hidden = out_features(down)
    sub_norms = rms_norms_over(block, parent, n)
    linear_up = sorted((r for r in up_rels if out_features(block.get_submodule(r)) == n),
                       key=lambda r: "up" not in r.rpartition(".")[2])  # fmt: skip
    sub_norms = sub_norms if linear_up else ()
    for rel, conv in (block.get_submodule(parent) if parent else block).named_modules():
        full = f"{name}.{parent + '.' if parent else ''}{rel}"
        if f"{parent + '.' if parent else ''}{rel}" in sub_norms:  # an RMSNorm over all units: rescaled (below)
            continue
        if _depthwise(conv, n):  # a per-unit conv between up and down (SegFormer's Mix-FFN): its channels go too
            removable += output_slices(full, conv, idx)
        elif n != hidden and _per_unit(conv, n):  # (as wide as the hidden size: could be the block's own norm)
            mixes = _mixes_units(conv, n)
            if mixes is None:  # it does not run on a plain activation: left to the check and the export's
                continue
            if mixes:
                raise ValueError(
                    f"target='neurons' cannot remove units of '{name}' exactly: '{full}' ({type(conv).__name__}) "
                    f"{UNITS_NORMALISED}, so removing one unit changes the others (no exact export); gate 'layers'."
                )
            removable += [TensorSlice(full, pn, p.dim() - 1, idx) for pn, p in conv.named_parameters(recurse=False)
                          if p.shape[-1] == n and p.numel() == n]
    site = Site(f"{name}.{down_rel}", "input", -1, idx)
    primary = input_slices(f"{name}.{down_rel}", down, idx)
    if sub_norms:  # an RMSNorm over all units before down (BitNet's ffn_sub_norm): gate before it, on the up
        up_rel = linear_up[0]  # projection's output, so a dead unit reaches the norm as zero
        site = Site(f"{name}.{up_rel}", "output", -1, idx)
        primary = output_slices(f"{name}.{up_rel}", block.get_submodule(up_rel), idx)
        removable += [TensorSlice(f"{name}.{rel}", "weight", 0, idx) for rel in sub_norms]
    info = NeuronInfo(down=down_rel, up=tuple(up_rels), guessed=guessed, sub_norms=sub_norms)
    return GroupSet("neurons", layer, n, [site], primary, removable, info)


UNITS_NORMALISED = "normalises every MLP unit by statistics over all units"


def _per_unit(m: nn.Module, n: int) -> bool:
    """A parameter-holding leaf other than a linear or convolutional layer with one value per unit (a per-unit
    scale or bias, ConvNeXt V2's global response norm): it sits on the units between up and down."""
    own = [p for p in m.parameters(recurse=False) if p.shape and p.shape[-1] == n and p.numel() == n]
    plain = isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)) or in_axis_layer(m)
    return bool(own) and not plain and not any(True for _ in m.children())


def in_axis_layer(m: nn.Module) -> bool:
    """transformers' Conv1D and other layers with a 2-D weight: handled as up/down projections, not here."""
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2


def _mixes_units(m: nn.Module, n: int) -> bool | None:
    """Whether `m` makes one unit's output depend on another unit's input, with its parameters moved off their
    initial values (a global response norm starts as the identity, weight 0): run on a random channels-last
    activation with and without unit 0. None: it does not run on such an input."""
    import copy

    g = torch.Generator().manual_seed(3)
    probe = copy.deepcopy(m).float().eval()
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for shape in ((2, 3, 3, n), (2, 5, n)):
            x = torch.randn(shape, generator=g)
            try:
                y = probe(x)
                x0 = x.clone()
                x0[..., 0] = 0
                y0 = probe(x0)
            except Exception:  # noqa: BLE001 - not this input layout
                continue
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return None
            return not torch.allclose(y[..., 1:], y0[..., 1:], rtol=1e-5, atol=1e-6)
    return None


def _depthwise(m: nn.Module, channels: int) -> bool:
    """A depthwise convolution over `channels` units (one filter per channel, nothing mixed between them)."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels == channels


def prune_neuron_group_set(model: nn.Module, gs: GroupSet, dead: torch.Tensor) -> None:
    for sl in gs.removable:
        keep_slice(model, sl, dead)
    block = block_name(gs)
    parent_rel = gs.info.down.rpartition(".")[0]
    parent = model.get_submodule(f"{block}.{parent_rel}" if parent_rel else block)
    n = int((~dead).sum())
    for rel in gs.info.sub_norms if n else ():
        rescale_rms_norm(model.get_submodule(f"{block}.{rel}"), gs.n_groups, n)
    for attr in ("intermediate_size", "ffn_dim"):
        if isinstance(getattr(parent, attr, None), int):
            setattr(parent, attr, n)


def prune_expert_unit_group_set(model: nn.Module, gs: GroupSet, dead: torch.Tensor) -> None:
    """Remove expert units. Experts are stacked in one tensor, so every expert keeps as many units as the
    fullest one (rounded up to a multiple of 8); the others are padded with units whose weights are all zero,
    which add exactly nothing (act(0) * 0 = 0, times a zero column). Units within an expert are
    interchangeable, so each expert's kept units move to the front."""
    info = gs.info
    n_exp, units = info.n_experts, info.units
    alive = ~dead.reshape(n_exp, units).cpu()
    # grouped expert matmuls (torch._grouped_mm) need rows of a non-zero multiple of 16 bytes: round up with
    # zero units (a layer whose every unit is zero keeps 8 of them)
    keep = min(units, max(8, -(-int(alive.sum(1).max()) // 8) * 8))
    for sl in gs.removable:
        _repack(model.get_submodule(sl.module), sl, alive, units, keep)
    for owner in {sl.module for sl in gs.removable}:
        m = model.get_submodule(owner)
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if getattr(m, attr, None) == units:
                setattr(m, attr, keep)
        for attr in ("input_size", "output_size"):  # a module holding one (E, out, in) weight (GraniteMoE 4.x)
            w = getattr(m, "weight", None)
            if isinstance(getattr(m, attr, None), int) and isinstance(w, torch.Tensor) and w.dim() == 3:
                setattr(m, attr, w.shape[2 if attr == "input_size" else 1])


def _repack(module: nn.Module, sl: TensorSlice, alive: torch.Tensor, units: int, keep: int) -> None:
    """Keep each expert's live units of one stacked tensor along its unit axis, moved to the front and padded with
    zeros to `keep` units; the tensor's own layout of the units (one row each, [gate | up] halves or alternating
    rows) is kept."""
    p = getattr(module, sl.param)
    axis = sl.axis[1]
    n = p.shape[axis]
    reps = n // units
    unit = sl.index[0].cpu()  # expert 0's positions: the unit each one belongs to
    pos = torch.arange(n)
    if torch.equal(unit, pos % units):
        def new_pos(slots: torch.Tensor, r: int) -> torch.Tensor:
            return r * keep + slots
        part = pos // units
    elif torch.equal(unit, pos // reps):
        def new_pos(slots: torch.Tensor, r: int) -> torch.Tensor:
            return slots * reps + r
        part = pos % reps
    else:
        raise ExportError(f"The expert tensor {sl.module}.{sl.param} holds its units in a layout hf_dgate cannot "
                          "repack.")
    shape = list(p.shape)
    shape[axis] = reps * keep
    new = p.data.new_zeros(shape)
    for e in range(alive.shape[0]):
        units_kept = torch.nonzero(alive[e]).flatten()
        slots = torch.arange(len(units_kept))
        for r in range(reps):
            old = pos[part == r][units_kept]
            src = p.data[e].index_select(axis - 1, old.to(p.device))
            new[e].index_copy_(axis - 1, new_pos(slots, r).to(p.device), src)
    setattr(module, sl.param, nn.Parameter(new, requires_grad=p.requires_grad))


class Neurons(Target):
    name = "neurons"
    order = 1

    find_in_block = staticmethod(_neuron_sets)

    def metric_name(self):
        return "neuron_sparsity"

    def remove(self, model, gs, dead, ctx=None):
        units = isinstance(gs.info, ExpertUnitInfo)
        (prune_expert_unit_group_set if units else prune_neuron_group_set)(model, gs, dead)

    def record_field(self, gs):
        return "expert_units" if isinstance(gs.info, ExpertUnitInfo) else "neurons"

    def recorded_in(self, record):
        return any(isinstance(n, int) for n in record.kept("neurons")) or bool(record.expert_units)

    def rebuild_dead(self, gs, kept):
        """Expert units: every expert keeps `kept` units (the export pads each to the fullest)."""
        info = gs.info
        if not isinstance(info, ExpertUnitInfo):
            return super().rebuild_dead(gs, kept)
        if kept > info.units:
            raise ExportError(
                f"The recorded structure keeps {kept} neurons per expert in layer {gs.layer} but the config builds "
                f"only {info.units}: the config does not match the weights."
            )
        return None if kept == info.units else (torch.arange(info.units, device="cpu") >= kept).repeat(info.n_experts)

    def native_edit(self, cfg, record):
        edit: dict[str, Any] = {}
        neurons = record.get("neurons") or []
        if neurons and all(isinstance(n, int) for n in neurons) and not record.get("experts"):
            key = next((k for k in NEURON_CONFIG_ATTRS if config_value(cfg, k, MISSING) is not MISSING), None)
            if key:
                edit = per_layer_edit(cfg, {key: list(neurons)})
        spec = spec_for(cfg)
        if record.get("expert_units") and spec is not None and spec.experts is not None:
            units = per_layer_edit(cfg, {spec.experts.units_field: list(record["expert_units"])})
            edit = merge_edits(edit, units)
        return edit
