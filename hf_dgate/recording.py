"""Building the pruning record (record.py's `PruningRecord`) from a pruned model: the geometry each block has
now, read off its weights, plus what the export knows (kept original head numbers, layers, threshold).

export.py plans, removes and verifies; this module says what is left, in the record's layout, and stores it
(through `PruningRecord`, which checks it) together with whether the config alone can build those shapes and the
rebuild spec (`rebuild_spec`: what a fresh build from the config must change), which every reload applies.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .architectures import BlockStack
from .compat import HAS_HF_PRUNE_HEADS, build_on_meta, config_value
from .config import DGateConfig
from .native import make_native
from .pruned_modules import KeepsPrunedAttention, ZeroHeadAttention, ZeroInputConv1D
from .record import CURRENT, HF_PRUNED_HEADS, RECORD_KEY, PruningRecord
from .registry import spec_for
from .targets.base import RMS_EPS_ATTRS


def stack_record(
    model: nn.Module,
    st: BlockStack,
    dconfig: DGateConfig,
    kept: dict[str, list[list[int]]],
    kept_layers: list[int],
    kept_dead: list[int],
    prev: dict[str, Any],
    n_before: int,
    by_hf: bool,
    downs: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The record of one block stack after its removals: per current layer what is left (`kept`: original head
    numbers per layer before layers were dropped), which original layers remain, and the dead layers kept.
    `downs`: the MLP down projection gated in each (original) layer, so what is left is read where it was gated."""
    blocks = model.get_submodule(st.path)
    now = [(f"{st.path}.{i}", b) for i, b in enumerate(blocks)]
    downs_now = {i: (downs or {})[old] for i, old in enumerate(kept_layers) if old in (downs or {})}
    record = stack_structure(
        model, now, dconfig, {k: [v[i] for i in kept_layers] for k, v in kept.items()}, downs_now
    )
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


def model_record(
    dconfig: DGateConfig,
    records: dict[str, dict[str, Any]],
    prev: dict[str, Any],
    multi: bool,
    threshold: float,
    not_removed: list[str],
) -> dict[str, Any]:
    """The whole record from the stacks' records: `stacks` (earlier stacks kept) when the model has several stacks,
    else the one stack's lists at the top."""
    structure: dict[str, Any] = {"version": CURRENT, "module_names": dconfig.module_names}
    if multi:
        structure["stacks"] = {**prev.get("stacks", {}), **records}
    elif records:
        structure.update(next(iter(records.values())))
    structure.update(threshold=threshold, not_removed=not_removed)  # not_removed: custom GroupRule targets
    return structure


def heads_record(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    dconfig: DGateConfig,
    kept_heads: list[list[int]],
    prev: dict[str, Any],
    by_hf: bool,
) -> dict[str, Any]:
    """The (single-stack) record after `export.prune_heads`: the heads kept now, the rest of the earlier record."""
    structure = {"version": CURRENT, "module_names": dconfig.module_names}
    structure.update(stack_structure(model, blocks, dconfig, {"self": kept_heads}))
    if by_hf or prev.get(HF_PRUNED_HEADS):
        structure[HF_PRUNED_HEADS] = True
    for key in ("layers", "num_hidden_layers_original", "threshold", "not_removed"):
        if key in prev:
            structure[key] = prev[key]
    structure.setdefault("layers", list(range(len(blocks))))
    structure.setdefault("num_hidden_layers_original", len(blocks))
    return structure


def current_heads(
    model: nn.Module, blocks: list, dconfig: DGateConfig, prev: dict[str, Any], kind: str = "self"
) -> list[list[int]]:
    """Kept query heads per layer in the original numbering (all of them for a model never pruned)."""
    key = "heads" if kind == "self" else "cross_heads"
    if prev.get(key) and len(prev[key]) == len(blocks):
        return [list(h) for h in prev[key]]
    # heads that transformers' own prune_heads removed (4.x, no hf_dgate record) keep their original numbers
    cfg = getattr(model, "config", None)  # (none for a plain nn.Module)
    pruned = getattr(cfg, "pruned_heads", None) if HAS_HF_PRUNE_HEADS and kind == "self" else None
    out = []
    for i, (name, block) in enumerate(blocks):
        geo = block_geometry(model, name, block, dconfig, kind)
        n = geo[0] if geo else 0
        gone = set((pruned or {}).get(i, ()) or (pruned or {}).get(str(i), ()))
        kept = [h for h in range(n + len(gone)) if h not in gone]
        out.append(kept if len(kept) == n else list(range(n)))
    return out


def stack_structure(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    dconfig: DGateConfig,
    kept: dict[str, list[list[int]]],
    downs: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Per current layer of one stack: kept query heads (original numbering), kept key/value heads and kept
    neurons; decoder blocks of encoder-decoders add the same for their cross-attention."""
    out: dict[str, Any] = {}
    rows: dict[str, list] = {k: [] for k in ("heads", "kv_heads", "neurons", "cross_heads", "cross_kv_heads")}
    head_dims = []
    if not blocks:
        return {"heads": [], "kv_heads": [], "head_dim": None, "neurons": []}
    for i, (name, block) in enumerate(blocks):
        geo = block_geometry(model, name, block, dconfig, down_rel=(downs or {}).get(i))
        if geo is None:
            return _neurons_only(model, blocks, dconfig, downs or {}) if i == 0 else out
        n_q, n_kv, hd, n_neur = geo
        mine = kept.get("self")
        rows["heads"].append(mine[i] if mine is not None and len(mine[i]) == n_q else list(range(n_q)))
        rows["kv_heads"].append(n_kv)
        rows["neurons"].append(n_neur)
        head_dims.append(hd)
        moe = moe_geometry(model, name, block)  # None for a dense block (some families mix both)
        rows.setdefault("experts", []).append(moe[0] if moe else None)
        rows.setdefault("expert_units", []).append(moe[1] if moe else None)
        cross = block_geometry(model, name, block, dconfig, "cross")
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


def _neurons_only(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], dconfig: DGateConfig, downs: dict[int, str]
) -> dict[str, Any]:
    """The record of a stack whose blocks have an MLP and no attention heads (ConvNeXt, a pure-MLP mixer): the
    width of each block's MLP; empty when a block has none either."""
    from .architectures import layer_config, mlp_parts, stack_config

    neurons = []
    for i, (name, block) in enumerate(blocks):
        try:
            down = downs.get(i) or mlp_parts(name, block, dconfig, layer_config(stack_config(model, name), name))[0]
        except ValueError:
            return {}
        m = block.get_submodule(down)
        neurons.append(m.weight.shape[0] if type(m).__name__.endswith("Conv1D") else m.weight.shape[1])
    return {"neurons": neurons}


def moe_geometry(model: nn.Module, name: str, block: nn.Module) -> tuple[int, int] | None:
    """(experts, units per expert) of a mixture-of-experts block, None for a dense one."""
    from .architectures import layer_config, routed_experts, stack_config, stacked_experts

    found = routed_experts(layer_config(stack_config(model, name), name), block)
    if found is None:
        return None
    try:
        _, _, n_exp, units = stacked_experts(name, block, found[0])
    except ValueError:
        return None
    return n_exp, units


def block_geometry(
    model: nn.Module, name: str, block: nn.Module, dconfig: DGateConfig, kind: str = "self", down_rel: str | None = None
) -> tuple[int, int, int, int | None] | None:
    """(query heads, key/value heads, head size, neurons) a block has now, read off its weights (neurons: None
    without a dense MLP). `down_rel`: the MLP down projection that was gated (found again from names and shapes
    otherwise, which a pruned MLP as wide as the hidden size can make ambiguous)."""
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
    if down_rel is not None and has_module(block, down_rel):
        pass
    elif spec is not None and spec.experts is not None and not dense_mlp_block(spec, block):
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


def read_record(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    rec = getattr(cfg, RECORD_KEY, None) if cfg is not None else model.__dict__.get(RECORD_KEY)
    return copy.deepcopy(rec) if isinstance(rec, dict) else None


def write_record(model: nn.Module, structure: dict[str, Any]) -> None:
    """Store the record (through `PruningRecord`, which checks it and keeps the layout), whether it is native, and
    its rebuild spec (after the native config edit: the spec is what the saved config does not build)."""
    structure = PruningRecord.from_dict(structure).to_dict()
    cfg = getattr(model, "config", None)
    if cfg is None:  # a plain nn.Module: no config to carry the record, kept on the model (not native)
        model.__dict__[RECORD_KEY] = {**structure, "native": False}
        return
    setattr(cfg, RECORD_KEY, structure)
    structure["native"] = make_native(model, structure)
    spec = rebuild_spec(model)
    if spec is not None:
        structure["rebuild"] = spec
    setattr(cfg, RECORD_KEY, structure)


HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")


def rebuild_spec(model: nn.Module) -> dict[str, Any] | None:
    """What a fresh `type(model)(model.config)` must change to become `model` (the record's `rebuild`): tensor
    shapes, int attributes, per-module head configs, attention layers without heads and Conv1Ds without inputs,
    and the class whose module names these are.
    Found by comparing with a fresh build on the meta device; None for a class that cannot be built from its config
    (reloads then derive the spec from the per-layer lists, legacy_records.py)."""
    try:
        fresh = build_on_meta(type(model), model.config)
    except Exception:  # noqa: BLE001 - any failure to build means "no spec", never a wrong one
        return None
    fresh_tensors = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    mine = [*model.named_parameters(), *model.named_buffers()]
    shapes = {
        n: list(p.shape) for n, p in mine if n in fresh_tensors and tuple(fresh_tensors[n].shape) != tuple(p.shape)
    }
    attrs: dict[str, dict[str, Any]] = {}
    fresh_modules = dict(fresh.named_modules())
    for name, m in model.named_modules():
        f = fresh_modules.get(name)
        if f is None:
            continue
        diff = {
            k: v
            for k, v in vars(m).items()
            if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_") and vars(f).get(k, v) != v
        }
        if getattr(m, "_dgate_rescaled", False):  # an RMSNorm's epsilon, rescaled with the features it lost
            diff.update({k: float(v) for k, v in vars(m).items() if k in RMS_EPS_ATTRS and isinstance(v, float)})
        if diff:
            attrs[name] = diff
    no_head = {n: m._dgate_out for n, m in model.named_modules() if isinstance(m, ZeroHeadAttention)}
    no_input = [n for n, m in model.named_modules() if isinstance(m, ZeroInputConv1D)]
    head_configs = {}  # per-module config copies with their own head counts (Phi-3)
    for name, m in model.named_modules():
        f = fresh_modules.get(name)
        heads = [config_value(getattr(x, "config", None), k) for x in (m, f) for k in HEAD_FIELDS]
        heads = [h if h is not None or i % 2 == 0 else heads[i - 1] for i, h in enumerate(heads)]  # (no kv: MHA)
        if name and f is not None and all(isinstance(h, int) for h in heads) and heads[:2] != heads[2:]:
            head_configs[name] = heads[:2]
    spec = {"shapes": shapes, "attrs": attrs, "no_head": no_head, "no_input": no_input}
    if head_configs:
        spec["head_configs"] = head_configs
    head_inputs = {n: m._dgate_head_inputs for n, m in model.named_modules() if getattr(m, "_dgate_head_inputs", None)}
    if head_inputs:
        spec["head_inputs"] = head_inputs
    keep = [n for n, m in model.named_modules() if isinstance(m, KeepsPrunedAttention)]
    if keep:  # attention rebuilt from the config at run time (BigBird) keeps the pruned sizes
        spec["keep_on_switch"] = keep
    return {**spec, "model_class": type(model).__name__}  # whose module names these are
