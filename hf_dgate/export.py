"""Physical export: fold the gates, remove every zero group and what only fed it, and keep the model reloadable.

The group sets of the gate bank already say, per head / neuron / layer / expert, which tensor slices belong to
a group and nothing else (`GroupSet.removable`); each target (targets/) removes its dead groups from the folded
model. This module runs that plan stack by stack, checks the result against the gated model (verify.py),
records the pruned structure and rewrites the config where it can express the new shape.

The pruned structure is recorded in `config.dgate_pruning`; `AutoPrunedModel.from_pretrained` (loading.py)
rebuilds it. Where the config alone can express the shape (layers dropped, equal head or neuron counts in every
layer and a family whose head size is a config field) the config is rewritten so that a plain
`transformers.AutoModel*.from_pretrained` loads the export as well. Writing to a directory with a model card
and uploading live in hub.py.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .architectures import BlockStack, block_stacks, find_blocks
from .compat import HAS_HF_PRUNE_HEADS, hf_prune_heads, rekey_pruned_heads
from .config import DGateConfig
from .errors import ExportError
from .groups import GroupSet
from .legacy_heads import prune_with_transformers
from .native import make_native
from .patch import get_bank, remove_dgate, unwrap
from .record import HF_PRUNED_HEADS, RECORD_KEY, PruningRecord
from .registry import spec_for
from .targets import get_target
from .targets.heads import head_set, prune_head_group_set
from .targets.layers import drop_layers

PRUNING_KEY = RECORD_KEY  # (the names earlier code imported from here)

__all__ = ["ExportError", "export_checked", "export_pruned", "prune_heads", "pruned_structure", "pruning_record"]


# ---- public API -----------------------------------------------------------------------------------------------
@torch.no_grad()
def export_pruned(
    model: nn.Module,
    threshold: float | None = None,
    inplace: bool = False,
    *,
    allow_inexact: bool = False,
    verify: bool = True,
    example_inputs: Any = None,
    shape: str = "per_layer",
    multiple_of: int | dict[str, int] | str | None = None,
) -> nn.Module:
    """A physically smaller copy of a gated model that computes what the gated model computes, checked.

    Gates are folded into the weights, then every group whose effective norm ||theta_g|| is below `threshold`
    (default: the DGateConfig's) is removed with everything that only fed it: heads (whole key/value groups
    under GQA), MLP neurons and whole layers. The caller's model is left untouched unless `inplace=True`
    (saves the memory of a copy; the model is then folded, ungated and pruned). Models gated only on filters,
    input features or custom groups go to `hf_dgate.surgery.prune_torch_model`.

    The export is verified (`hf_dgate.verify`): gated and exported model run on a probe batch
    (`example_inputs`, else one built from the config or `DGateConfig.example_input_shape`) and their outputs
    must agree within `max|diff| <= atol + rtol * max|gated|` (1e-4, 1e-4 in float32). Otherwise ExportError
    names the removed groups that were not zero, unless `allow_inexact=True`. NaN/inf gates or weights raise
    NonFiniteError. The outcome is `pruned.dgate_verification` (`verified`, `exact`, `max_abs_diff`, ...).

    `shape="uniform"` keeps in every layer as many key/value groups and neurons as the layer that keeps most, and
    `multiple_of` rounds kept counts up (an int: neurons; or {"neurons": 128, "heads": 2}), by keeping some of
    the layer's own below-threshold groups (hf_dgate.formats.shape): outputs stay the same, one count per layer
    lets a plain `from_pretrained` load the export wherever the config has one count. What padding kept is
    `pruned.dgate_padding` (counts before/after, parameters added).
    """
    pruned, result = export_checked(
        model,
        threshold,
        inplace,
        allow_inexact=allow_inexact,
        verify=verify,
        inputs=example_inputs,
        shape=shape,
        multiple_of=multiple_of,
    )
    pruned.dgate_verification = result
    return pruned


def export_checked(
    model: nn.Module,
    threshold: float | None,
    inplace: bool,
    *,
    allow_inexact: bool = False,
    verify: bool = True,
    inputs: Any = None,
    shape: str = "per_layer",
    multiple_of: int | dict[str, int] | str | None = None,
) -> tuple[nn.Module, Any]:
    """export_pruned's work: the pruned model and its verification result (`hf_dgate.verify.Verification`);
    export_to_dir passes its own batch as `inputs` so the outputs are measured once."""
    from .formats.shape import ExportShape, parse_multiple_of, parse_shape
    from .verify import ExportCheck

    padded = parse_shape(shape) is not ExportShape.PER_LAYER or bool(parse_multiple_of(multiple_of))
    bank = get_bank(model)
    bank.assert_finite("export")
    try:
        thr = bank.check_threshold(threshold)
    except ValueError as e:
        raise ExportError(str(e)) from None
    per_block = tuple(t for t in bank.targets if get_target(t, bank.config).per_block)
    transformer = bool(per_block)
    removed = per_block if transformer else None
    # the reference outputs come from the gated model before anything (PEFT merge, in-place pruning) changes it
    check = ExportCheck(model, bank, thr, inputs=inputs, verify=verify, targets=removed)
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):  # PEFT: merge adapters, then prune
        from .patch import merge_adapters

        model, inplace = merge_adapters(model if inplace else copy.deepcopy(model)), True
        bank = get_bank(model)
    if padded and not transformer:
        raise ExportError(
            "shape='uniform' and multiple_of apply to attention heads and MLP neurons; this model gates neither."
        )
    padding = None
    if not transformer:
        from .surgery import prune_torch_model  # filters, input features, custom groups of plain torch models

        pruned = prune_torch_model(model, thr, inplace=inplace)
    else:
        dead = {t: bank.zero_groups(t, thr).cpu() for t in bank.targets}
        plan = bank.per_set(dead)
        dconfig = bank.config
        base = unwrap(model)
        pruned = base if inplace else copy.deepcopy(base)
        remove_dgate(pruned, merge=True)
        if padded:
            from .formats.shape import pad_plan

            padding = pad_plan(pruned, plan, shape, multiple_of)
        _apply_plan(pruned, plan, dconfig, float(thr))
        pruned.eval()
    pruned.dgate_padding = padding.to_dict() if padding is not None else None
    return pruned, check.finish(pruned, allow_inexact)


@torch.no_grad()
def prune_heads(model: nn.Module, heads_to_prune: dict[int, list[int]], dconfig: DGateConfig | None = None) -> None:
    """transformers 4.x's `prune_heads` contract for models whose transformers has none (v5 removed it).

    `heads_to_prune` maps a layer (its current position) to attention heads in their original numbering; heads
    pruned earlier are ignored. Under GQA a key/value head can only go with all query heads that share it.
    With transformers 4.x and a model that still has `_prune_heads`, that implementation is used.
    """
    from types import SimpleNamespace

    base = unwrap(model)
    dconfig = _with_targets(dconfig or DGateConfig(target="heads"), ["heads"])
    record = _record(base) or {}
    blocks = find_blocks(base, dconfig)
    if "stacks" in record:
        raise ExportError("prune_heads works on single-stack models; this one records several stacks.")
    kept_heads = _current_heads(base, blocks, dconfig, record)
    by_hf = hf_prune_heads(base, heads_to_prune)  # transformers 4.x, a family with its own head pruning
    for layer, heads in heads_to_prune.items() if by_hf else ():
        kept_heads[layer] = [h for h in kept_heads[layer] if h not in set(heads)]
    for layer, heads in heads_to_prune.items() if not by_hf else ():
        if not 0 <= layer < len(blocks):
            raise ExportError(f"Layer {layer} does not exist; the model has {len(blocks)} layers.")
        name, block = blocks[layer]
        n_q, n_kv, hd, _ = _block_geometry(base, name, block, dconfig)
        if n_q == 0:
            continue  # nothing left to prune
        # the layer's own (possibly already pruned) geometry, not the config's
        geometry = SimpleNamespace(num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=hd)
        gs = head_set(base, geometry, dconfig, layer, name, block)
        kept_q = kept_heads[layer]
        n_rep = gs.info.n_heads // gs.info.n_kv
        current = [kept_q[i] for i in range(0, len(kept_q), n_rep)]  # original query head opening each group
        dead = torch.zeros(gs.n_groups, dtype=torch.bool)
        for h in set(heads):
            grp = [i for i, first in enumerate(current) if first <= h < first + n_rep]
            if not grp:
                continue  # already pruned
            members = set(range(current[grp[0]], current[grp[0]] + n_rep))
            if not members <= set(heads):
                raise ExportError(
                    f"Head {h} of layer {layer} shares its key/value head with heads {sorted(members)}; prune all "
                    "of them together (GQA)."
                )
            dead[grp[0]] = True
        prune_head_group_set(base, gs, dead)
        kept_heads[layer] = [h for j, h in enumerate(kept_q) if not dead[j // n_rep]]
    structure = {"version": 1, "module_names": dconfig.module_names}
    structure.update(_structure(base, blocks, dconfig, {"self": kept_heads}))
    if by_hf or record.get(HF_PRUNED_HEADS):
        structure[HF_PRUNED_HEADS] = True
    for key in ("layers", "num_hidden_layers_original", "threshold", "not_removed"):
        if key in record:
            structure[key] = record[key]
    structure.setdefault("layers", list(range(len(blocks))))
    structure.setdefault("num_hidden_layers_original", len(blocks))
    _write_record(base, structure)


def pruned_structure(model: nn.Module) -> dict[str, Any] | None:
    """What export removed, as recorded in the config (None for a model that was not pruned); as a dict."""
    return _record(unwrap(model))


def pruning_record(model: nn.Module) -> PruningRecord | None:
    """What export removed, as the typed record (None for a model that was not pruned)."""
    cfg = getattr(unwrap(model), "config", None)
    return PruningRecord.read(cfg) if cfg is not None else None


# ---- the plan -------------------------------------------------------------------------------------------------
def _apply_plan(model: nn.Module, plan: list[tuple[GroupSet, torch.Tensor]], dconfig: DGateConfig, thr: float) -> None:
    """Remove the dead groups of every gated stack and record what is left (per stack for multi-stack models)."""
    prev = _record(model) or {}
    block_targets = {t for t in dconfig.targets if get_target(t, dconfig).per_block}
    skipped = sorted({gs.target for gs, d in plan if gs.target not in block_targets and d.any()})
    stacks = block_stacks(model, dconfig) if block_targets else []
    # one record per stack wherever the model has several (even when one is gated): reloading must know which
    multi = len(stacks) > 1 or "stacks" in prev or any(st.name != st.path for st in stacks)
    records = {}
    for st in stacks:
        sub_plan = [(gs, d) for gs, d in plan if gs.info.stack == st.path]
        before = prev.get("stacks", {}).get(st.path, {}) if multi else prev
        records[st.path] = _prune_stack(model, st, sub_plan, dconfig, before)
    structure: dict[str, Any] = {"version": 2 if multi else 1, "module_names": dconfig.module_names}
    if multi:
        structure["stacks"] = {**prev.get("stacks", {}), **records}
    elif records:
        structure.update(next(iter(records.values())))
    structure.update(threshold=thr, not_removed=skipped)  # not_removed: custom GroupRule targets (zeros kept)
    _write_record(model, structure)


def _prune_stack(
    model: nn.Module, st: BlockStack, plan: list[tuple[GroupSet, torch.Tensor]], dconfig: DGateConfig, prev: dict
) -> dict[str, Any]:
    n_before = len(st.blocks)
    kept = {kind: _current_heads(model, st.blocks, dconfig, prev, kind) for kind in ("self", "cross")}
    dead_layers = {gs.layer for gs, d in plan if get_target(gs.target).removes_blocks and bool(d.all())}
    spec = spec_for(st.config)
    kept_dead = sorted(dead_layers & {0}) if spec is not None and spec.keeps_first_layer else []
    dead_layers -= set(kept_dead)
    by_hf = prune_with_transformers(model, st, plan, dead_layers, kept["self"], single=not prev.get("stacks"))
    for gs, dead in sorted(plan, key=lambda p: get_target(p[0].target).order):
        if gs.layer in dead_layers or not bool(dead.any()) or id(gs) in by_hf:
            continue
        target = get_target(gs.target)
        target.remove(model, gs, dead)
        target.track_kept(gs, dead, kept)  # (heads: which original heads are left, for the record)
    kept_layers = [i for i in range(n_before) if i not in dead_layers]
    if dead_layers:
        drop_layers(model, st, dead_layers)
        rekey_pruned_heads(getattr(model, "config", None), kept_layers)
    blocks = model.get_submodule(st.path)
    now = [(f"{st.path}.{i}", b) for i, b in enumerate(blocks)]
    record = _structure(model, now, dconfig, {k: [v[i] for i in kept_layers] for k, v in kept.items()})
    orig_layers = prev.get("layers", list(range(n_before)))
    record.update(
        layers=[orig_layers[i] for i in kept_layers],
        num_hidden_layers_original=prev.get("num_hidden_layers_original", n_before),
    )
    if kept_dead:  # dead, but its position cannot be taken by another block: an identity block stays there
        record["dead_layers_kept"] = [orig_layers[i] for i in kept_dead]
    if by_hf or prev.get(HF_PRUNED_HEADS):
        record[HF_PRUNED_HEADS] = True  # config.pruned_heads holds the heads; reloading must not shrink them again
    return record


def _current_heads(
    model: nn.Module, blocks: list, dconfig: DGateConfig, prev: dict[str, Any], kind: str = "self"
) -> list[list[int]]:
    """Kept query heads per layer in the original numbering (all of them for a model never pruned)."""
    key = "heads" if kind == "self" else "cross_heads"
    if prev.get(key) and len(prev[key]) == len(blocks):
        return [list(h) for h in prev[key]]
    # heads that transformers' own prune_heads removed (4.x, no hf_dgate record) keep their original numbers
    pruned = getattr(model.config, "pruned_heads", None) if HAS_HF_PRUNE_HEADS and kind == "self" else None
    out = []
    for i, (name, block) in enumerate(blocks):
        geo = _block_geometry(model, name, block, dconfig, kind)
        n = geo[0] if geo else 0
        gone = set((pruned or {}).get(i, ()) or (pruned or {}).get(str(i), ()))
        kept = [h for h in range(n + len(gone)) if h not in gone]
        out.append(kept if len(kept) == n else list(range(n)))
    return out


def _with_targets(dconfig: DGateConfig, targets: list[str]) -> DGateConfig:
    return DGateConfig(target=targets, module_names=dconfig.module_names, head_side="auto")


# ---- the recorded structure ---------------------------------------------------------------------------------
def _structure(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], dconfig: DGateConfig, kept: dict[str, list[list[int]]]
) -> dict[str, Any]:
    """Per current layer of one stack: kept query heads (original numbering), kept key/value heads and kept
    neurons; decoder blocks of encoder-decoders add the same for their cross-attention."""
    out: dict[str, Any] = {}
    rows: dict[str, list] = {k: [] for k in ("heads", "kv_heads", "neurons", "cross_heads", "cross_kv_heads")}
    head_dims = []
    if not blocks:
        return {"heads": [], "kv_heads": [], "head_dim": None, "neurons": []}
    for i, (name, block) in enumerate(blocks):
        geo = _block_geometry(model, name, block, dconfig)
        if geo is None:
            return out
        n_q, n_kv, hd, n_neur = geo
        mine = kept.get("self")
        rows["heads"].append(mine[i] if mine is not None and len(mine[i]) == n_q else list(range(n_q)))
        rows["kv_heads"].append(n_kv)
        rows["neurons"].append(n_neur)
        head_dims.append(hd)
        moe = _moe_geometry(model, name, block)  # None for a dense block (some families mix both)
        rows.setdefault("experts", []).append(moe[0] if moe else None)
        rows.setdefault("expert_units", []).append(moe[1] if moe else None)
        cross = _block_geometry(model, name, block, dconfig, "cross")
        if cross is not None:
            theirs = kept.get("cross")
            ok = theirs is not None and len(theirs[i]) == cross[0]
            rows["cross_heads"].append(theirs[i] if ok else list(range(cross[0])))
            rows["cross_kv_heads"].append(cross[1])
    out.update(heads=rows["heads"], kv_heads=rows["kv_heads"], head_dim=head_dims[0], neurons=rows["neurons"])
    if rows["cross_heads"]:
        out.update(cross_heads=rows["cross_heads"], cross_kv_heads=rows["cross_kv_heads"])
    if any(n is not None for n in rows["experts"]):
        out.update(experts=rows["experts"], expert_units=rows["expert_units"])
    return out


def _moe_geometry(model: nn.Module, name: str, block: nn.Module) -> tuple[int, int] | None:
    """(experts, units per expert) of a mixture-of-experts block, None for a dense one."""
    from .architectures import stack_config, stacked_experts

    spec = spec_for(stack_config(model, name))
    if spec is None or spec.experts is None:
        return None
    try:
        _, _, n_exp, units = stacked_experts(name, block, spec.experts)
    except ValueError:
        return None
    return n_exp, units


def _block_geometry(
    model: nn.Module, name: str, block: nn.Module, dconfig: DGateConfig, kind: str = "self"
) -> tuple[int, int, int, int | None] | None:
    """(query heads, key/value heads, head size, neurons) a block has now, read off its weights (neurons: None
    without a dense MLP)."""
    from .architectures import (
        attention_parts,
        cross_attention_parts,
        dense_mlp_block,
        has_module,
        kv_head_count,
        layer_config,
        mlp_parts,
        stack_config,
    )

    cfg = layer_config(stack_config(model, name), name)
    spec = spec_for(cfg)
    if getattr(cfg, "num_attention_heads", None) is None or (spec is not None and spec.attention is None):
        return None  # no attention heads to describe (Mamba)
    try:
        parts = attention_parts(name, block, dconfig, cfg) if kind == "self" else cross_attention_parts(block, cfg)
    except ValueError:
        return None
    if parts is None:
        return None
    if spec is not None and spec.experts is not None and not dense_mlp_block(spec, block):
        # a mixture of experts: its dense MLP is the shared expert
        shared = spec.experts.shared
        down_rel = shared.down if shared is not None and has_module(block, shared.down) else None
    else:
        try:
            down_rel = mlp_parts(name, block, dconfig, cfg)[0]
        except ValueError:  # no MLP found
            down_rel = None
    o = block.get_submodule(parts["o"])
    in_o = o.weight.shape[0] if type(o).__name__.endswith("Conv1D") else o.weight.shape[1]
    rec = PruningRecord.read(model.config)
    hd = (rec.single.head_dim if rec is not None else None) or getattr(cfg, "head_dim", None)
    if not hd:
        hd = cfg.hidden_size // cfg.num_attention_heads
    n_q = in_o // hd
    n_heads_cfg = cfg.num_attention_heads
    if isinstance(parts, dict) and parts.get("guessed") and n_q > n_heads_cfg:
        n_q = n_heads_cfg  # a common name on a wider, head-less mixer (a hybrid's linear attention): not heads
    n_kv_cfg = kv_head_count(cfg) or n_heads_cfg
    n_rep = n_heads_cfg // n_kv_cfg
    if down_rel is None:
        return n_q, n_q // n_rep, hd, None
    down = block.get_submodule(down_rel)
    n_neur = down.weight.shape[0] if type(down).__name__.endswith("Conv1D") else down.weight.shape[1]
    return n_q, n_q // n_rep, hd, n_neur


def _record(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    rec = getattr(cfg, PRUNING_KEY, None) if cfg is not None else model.__dict__.get(PRUNING_KEY)
    return copy.deepcopy(rec) if isinstance(rec, dict) else None


def _write_record(model: nn.Module, structure: dict[str, Any]) -> None:
    """Store the record (through `PruningRecord`, which checks it and keeps the layout) and whether it is native."""
    structure = PruningRecord.from_dict(structure).to_dict()
    cfg = getattr(model, "config", None)
    if cfg is None:  # a plain nn.Module: no config to carry the record, kept on the model (not native)
        model.__dict__[PRUNING_KEY] = {**structure, "native": False}
        return
    setattr(cfg, PRUNING_KEY, structure)
    structure["native"] = make_native(model, structure)
    setattr(cfg, PRUNING_KEY, structure)
