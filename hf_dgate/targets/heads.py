"""Attention heads: one group per key/value head (with the query heads that share it under GQA), in self- and
cross-attention. Removal drops the query/key/value rows and output-projection columns of dead groups and updates
the attention module's head counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..architectures import (
    StructureNotFoundError,
    attention_like,
    attention_parts,
    cross_attention_parts,
    discovered_attention,
    head_geometry,
    in_features,
    not_found,
    out_features,
)
from ..choices import AttentionKind, HeadSide
from ..compat import (
    HAS_HF_PRUNE_HEADS,
    TRANSFORMERS_VERSION,
    config_value,
    fixed_shards,
    input_width_reshape,
    output_width_attrs,
    per_layer_overrides,
)
from ..config import DGateConfig
from ..errors import ExportError
from ..groups import UNGATED, GroupSet, HeadInfo, Site, TensorSlice, input_slices, output_slices, slice_index
from ..pruned_modules import (
    ZeroHeadAttention,
    keep_pruned_on_switch,
    make_no_head,
    own_head_config,
    returned_extras,
    select_head_inputs,
)
from ..registry import QK_NORM_SPANS_HEADS, spec_for
from .base import Target, block_name, keep_slice, per_layer_edit, rescale_rms_norm, rms_norms_over

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")


def _head_sets(
    model: nn.Module, hf_config: Any, config: DGateConfig, layer: int, name: str, block: nn.Module
) -> list[GroupSet]:
    """The self-attention heads of a block and, in decoder blocks of encoder-decoders, its cross-attention
    heads (a group set of their own: removing one changes nothing in the self-attention)."""
    sets = [head_set(model, hf_config, config, layer, name, block)]
    cross = cross_attention_parts(block, hf_config)
    if cross is not None:
        sets.append(head_set(model, hf_config, config, layer, name, block, cross))
    for gs in sets:
        gs.removable += per_head_vectors(name, block, gs)
        if spec_for(hf_config) is None and gs.info.refuse is None:
            gs.info.refuse = shared_position_bias(model, name, gs.info.n_heads)
    return sets


def per_head_vectors(name: str, block: nn.Module, gs: GroupSet) -> list[TensorSlice]:
    """Vectors of the attention module with one entry per query head (attention sinks, per-head scales): a removed
    head takes its entry along. Only tensors held by the attention module itself, not its projections'."""
    info = gs.info
    core_rel = attention_of(block, info.v or info.qkv or info.o or "")
    core = block.get_submodule(core_rel) if core_rel else block
    n_heads, n_rep = info.n_heads, info.n_heads // max(1, info.n_kv)
    if n_heads <= 1 or n_heads == info.head_dim:  # (a vector as long as a head would be ambiguous)
        return []
    own = [*core.named_parameters(recurse=False), *core.named_buffers(recurse=False)]
    where = f"{name}.{core_rel}" if core_rel else name
    group = torch.arange(n_heads) // n_rep
    out = [TensorSlice(where, p, 0, group) for p, t in own if t is not None and t.dim() == 1 and t.numel() == n_heads]
    width = slice_index(n_heads * info.head_dim, info.head_dim * n_rep)  # a vector of one block per head (DeBERTa's
    returned = set(returned_extras(type(core)) or ())  # (not one the forward returns: GPT-NeoX-Japanese's bias)
    out += [TensorSlice(where, p, 0, width)  # q_bias and v_bias beside its fused in_proj)
            for p, t in own if t is not None and t.dim() == 1 and t.numel() == n_heads * info.head_dim
            and p not in returned]
    for p, t in own:  # a block per head: an axis of n_heads followed by one of the head size (Funnel's r_w_bias
        if t is None or t.dim() < 2:  # (heads, d_head), r_kernel (d_model, heads, d_head), seg_embed (2, heads, ..))
            continue
        axes = [d for d in range(t.dim() - 1) if t.shape[d] == n_heads and t.shape[d + 1] == info.head_dim]
        if len(axes) == 1:
            out.append(TensorSlice(where, p, axes[0], group))
    if info.n_kv not in (n_heads, info.head_dim, 1):  # one entry per key/value head (Doge's dynamic-mask A)
        out += [
            TensorSlice(where, p, 0, torch.arange(info.n_kv))
            for p, t in own if t is not None and t.dim() == 1 and t.numel() == info.n_kv
        ]
    out += _per_head_linears(name, block, gs, core_rel)
    out += _per_head_position_tables(where, core, core_rel, info, group)
    hd = info.head_dim
    for rel, m in core.named_modules():  # a depthwise convolution over heads (Nystromformer's conv on the values)
        if not rel or not isinstance(m, nn.modules.conv._ConvNd) or not m.groups == m.in_channels == m.out_channels:
            continue
        if m.groups == n_heads:
            out += [TensorSlice(f"{where}.{rel}", p, 0, group) for p in ("weight", "bias") if getattr(m, p) is not None]
        elif hd and m.groups in (info.n_kv * hd, n_heads * hd):  # over each head's channels (Inkling's k/v sconv)
            idx = slice_index(m.groups, hd * (n_rep if m.groups == n_heads * hd else 1))
            out += [TensorSlice(f"{where}.{rel}", p, 0, idx) for p in ("weight", "bias") if getattr(m, p) is not None]
    return out


def _per_head_position_tables(
    where: str, core: nn.Module, core_rel: str, info: HeadInfo, group: torch.Tensor
) -> list[TensorSlice]:
    """Tensors of the attention module and its helper submodules (not its projections) with one column per head:
    a relative position bias table (positions, heads) (Swin's relative_position_bias_table, held by the attention or
    by a bias module in it), a per-head scale with unit axes (Swin v2's logit_scale (heads, 1, 1)) and the last
    Linear of a bias MLP writing one output per head (Swin v2's continuous_position_bias_mlp). A removed head takes
    its column, entry or row along. Proposed from shapes; the export's numerical checks decide."""
    n_heads = info.n_heads
    taken = {r for r in (info.q, info.k, info.v, info.o, info.qkv, *info.per_head, *info.per_kv_head) if r}
    out: list[TensorSlice] = []
    own_heads = [r for r, m in core.named_modules() if r and any(isinstance(getattr(m, a, None), int)
                                                                 for a in HEAD_COUNT_ATTRS)]
    for rel, m in core.named_modules():
        if rel and (isinstance(m, nn.Embedding) or attention_like(rel, m)):  # (per-layer embeddings: handled apart)
            continue
        if any(rel == r or rel.startswith(r + ".") for r in own_heads):  # a helper with heads of its own (a sparse
            continue  # attention's indexer, GLM-MoE-DSA's: it picks the keys for all heads), not per-head tables
        full = f"{where}.{rel}" if rel else where
        if isinstance(m, nn.Linear):
            in_block = f"{core_rel}.{rel}" if core_rel else rel
            if rel and in_block not in taken and m.out_features == n_heads:
                out += output_slices(full, m, group)
            continue
        for p, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is None or t.dim() < 2:
                continue
            axes = [d for d in range(t.dim()) if t.shape[d] == n_heads]
            if len(axes) != 1:
                continue
            if t.numel() == n_heads or (t.dim() == 2 and axes[0] == 1 and t.shape[0] != info.head_dim):
                out.append(TensorSlice(full, p, axes[0], group))
    return out


def _per_head_linears(name: str, block: nn.Module, gs: GroupSet, core_rel: str) -> list[TensorSlice]:
    """Other Linears of the attention module that read the key/value heads' states or write one output per head
    (Doge's dynamic-mask dt_proj: values of every key/value head in, one mask row per key/value head out): a removed
    head takes its columns and its row along. Proposed from widths; the numerical checks decide."""
    info = gs.info
    n_heads, n_kv, hd = info.n_heads, info.n_kv, info.head_dim
    n_rep = n_heads // max(1, n_kv)
    taken = {r for r in (info.q, info.k, info.v, info.o, info.qkv, *info.per_head, *info.per_kv_head) if r}
    if not (info.v or info.qkv) or info.side != HeadSide.VALUE:  # only zero values make their readers' columns free
        return []
    out: list[TensorSlice] = []
    for rel, m in _leaf_linears(block).items():
        if rel in taken or rel.rpartition(".")[0] != core_rel or in_features(m) != n_kv * hd:
            continue
        if out_features(m) not in (n_kv, n_heads):
            continue
        rows = torch.arange(n_kv) if out_features(m) == n_kv else torch.arange(n_heads) // n_rep
        out += input_slices(f"{name}.{rel}", m, slice_index(n_kv * hd, hd)) + output_slices(f"{name}.{rel}", m, rows)
    return out


def _kernel_from_all_queries(block: nn.Module, parts: dict[str, Any], core_rel: str) -> str | None:
    """A Linear of the attention module beside q/k/v that reads all query channels and writes several outputs per
    head (ConvBERT's conv_kernel_layer: every head's dynamic-convolution kernel from all heads' queries), by name;
    None without one. The attention module's own head count says how many heads there are."""
    if not parts.get("q") or not core_rel:
        return None
    core = block.get_submodule(core_rel)
    n_heads = next((getattr(core, a) for a in HEAD_COUNT_ATTRS if isinstance(getattr(core, a, None), int)), None)
    q = block.get_submodule(parts["q"])
    width = out_features(q)
    if width == in_features(q):  # (query space as wide as the input: a reader of either cannot be told apart)
        return None
    taken = {parts.get(k) for k in ("q", "k", "v", "o")}
    for rel, m in core.named_children():
        if not n_heads or not isinstance(m, nn.Linear) or f"{core_rel}.{rel}" in taken:
            continue
        out = out_features(m)
        if in_features(m) == width and out != width and out % n_heads == 0 and out // n_heads > 1:
            return f"{core_rel}.{rel}"
    return None


def differential_values(core: nn.Module) -> bool:
    """Does the attention's forward split its values in two halves along the heads (differential attention:
    DiffLlama's `torch.chunk(value_states, 2, dim=1)`)? Then heads pair up (read from the source)."""
    import re

    from ..compat import _forward_source

    return bool(re.search(r"chunk\(\s*value_states\s*,\s*2\s*,\s*dim\s*=\s*1\s*\)", _forward_source(type(core))))


def _differential_head_set(
    layer: int, name: str, block: nn.Module, parts: dict[str, Any], n_heads: int, n_kv: int, hd: int
) -> GroupSet:
    """Heads of a differential attention (DiffLlama): the values' two halves along the key/value heads go into
    every output, so key/value heads j and j + n_kv/2 form one group, with the query heads that read either and the
    output pairs (query heads p and p + n/2, 2 x head_dim wide, each normalised alone) they write: n_kv/2 groups,
    gated at the values. A dead group's pairs are zero, so removing it is exact."""
    get = block.get_submodule
    full = lambda rel: f"{name}.{rel}"  # noqa: E731
    half, n_rep = n_kv // 2, n_heads // n_kv
    q_group = (torch.arange(n_heads * hd) // hd // n_rep) % half
    kv_group = (torch.arange(n_kv * hd) // hd) % half
    o_group = torch.arange(n_heads * hd) // (2 * hd) // n_rep  # output pair p (< n/2) of query heads p, p + n/2
    removable = input_slices(full(parts["o"]), get(parts["o"]), o_group)
    for key, idx in (("q", q_group), ("k", kv_group), ("v", kv_group)):
        if parts.get(key):
            removable += output_slices(full(parts[key]), get(parts[key]), idx)
    sites = [Site(full(parts["v"]), "output", -1, kv_group)]
    primary = output_slices(full(parts["v"]), get(parts["v"]), kv_group)
    keys = ("o", "q", "k", "v", "guessed", "config_heads")
    info = HeadInfo(**{k: parts[k] for k in keys if k in parts}, layout="differential", n_heads=n_heads, n_kv=n_kv,
                    head_dim=hd, side=HeadSide.VALUE, attention=AttentionKind.SELF)
    return GroupSet("heads", layer, half, sites, primary, removable, info)


def _leaf_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and isinstance(m, nn.Linear)}


def shared_position_bias(model: nn.Module, name: str, n_heads: int) -> str | None:
    """Why no layer can lose heads alone where a table with one column per head sits outside the blocks (a relative
    position bias computed once and added to every layer's scores, as in MPNet and T5); None without one."""
    stack = name.rpartition(".")[0]
    stacks: list[str] | None = None
    for rel, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.embedding_dim == n_heads and not rel.startswith(stack + "."):
            if stacks is None:
                from ..architectures import find_stacks

                stacks = [p for p, _ in find_stacks(model)]
            if any(rel.startswith(p + ".") for p in stacks):  # a bias of another stack's own layer (UMT5's decoder)
                continue
            return (
                f"target='heads' is not available for {type(model).__name__}: the relative position bias '{rel}' "
                "(one column per head) is computed once and added to every "
                "layer's attention scores, so one layer cannot lose heads alone; gate 'neurons' or 'layers'"
            )
    return None


def head_set(
    model: nn.Module,
    hf_config: Any,
    config: DGateConfig,
    layer: int,
    name: str,
    block: nn.Module,
    parts: dict[str, Any] | None = None,
) -> GroupSet:
    """One attention's heads (`parts`: its projections; default the self-attention's)."""
    cross = parts is not None
    parts = parts if cross else attention_parts(name, block, config, hf_config)
    get = block.get_submodule
    named_ok = parts.get("v") or parts.get("qkv")  # heads can only be removed with their value rows
    mixer = _kernel_from_all_queries(block, parts, attention_of(block, parts.get("v") or parts.get("qkv") or ""))
    if mixer is not None:
        raise StructureNotFoundError(
            f"target='heads' is not available for '{name}': its attention mixes its heads ('{mixer}' computes "
            "every head's convolution kernel from all heads' query channels, as ConvBERT's span-based dynamic "
            "convolution does), so one head cannot be removed without changing the others; gate 'neurons'"
        )
    if parts.get("guessed") and not (named_ok and _names_fit(hf_config, block, parts, name)):  # ask the shapes
        parts = discovered_attention(block, hf_config) or parts
    if parts.get("discovered"):
        return _discovered_head_set(hf_config, layer, name, block, parts)
    if parts.get("guessed") and not named_ok:  # an output projection alone (a Mamba mixer's out_proj): no heads
        raise not_found("query/key/value projections of an attention", name, block, "value", "attn.v_proj")
    o = get(parts["o"])
    core_rel = attention_of(block, parts.get("v") or parts.get("qkv") or "")
    row = None if cross else _recorded_row(model, name, layer)
    n_heads, n_kv, hd = head_geometry(
        hf_config, o, name, get(core_rel) if core_rel else block, _kv_width(parts, get, o), (row or {}).get("head_dim")
    )
    n_rep = n_heads // n_kv
    core = get(core_rel) if core_rel else block
    if not cross and parts.get("v") and not parts.get("qkv") and n_kv % 2 == 0 and differential_values(core):
        return _differential_head_set(layer, name, block, parts, n_heads, n_kv, hd)
    q_group = slice_index(n_heads * hd, hd * n_rep)  # query head -> its key/value group
    kv_group = slice_index(n_kv * hd, hd)
    full = lambda rel: f"{name}.{rel}"  # noqa: E731
    removable = input_slices(full(parts["o"]), o, q_group)
    side = config.head_side
    value_site: Site | None = None
    value_primary: list[TensorSlice] = []
    if parts.get("qkv"):
        qkv = get(parts["qkv"])
        n = out_features(qkv)
        if parts["layout"] == "interleaved":  # per head [q_h | k_h | v_h] (GPT-NeoX); MHA only
            if n != 3 * n_heads * hd or n_rep != 1:
                raise not_found("interleaved query/key/value layout", name, block, "qkv", parts["qkv"])
            pos = torch.arange(n)
            fused_idx = pos // (3 * hd)
            value_idx = torch.where(pos % (3 * hd) >= 2 * hd, fused_idx, UNGATED)
        elif parts["layout"] == "grouped":  # per key/value group [q x n_rep | k | v] (Falcon's new layout)
            if n != (n_heads + 2 * n_kv) * hd:
                raise not_found("grouped query/key/value layout", name, block, "qkv", parts["qkv"])
            pos = torch.arange(n)
            fused_idx = pos // ((n_rep + 2) * hd)
            value_idx = torch.where(pos % ((n_rep + 2) * hd) >= (n_rep + 1) * hd, fused_idx, UNGATED)
        else:  # [q | k | v] blocks (GPT-2 c_attn, Phi-3 qkv_proj)
            if n != (n_heads + 2 * n_kv) * hd:
                raise not_found("blocked query/key/value layout", name, block, "qkv", parts["qkv"])
            fused_idx = torch.cat([q_group, kv_group, kv_group])
            value_idx = torch.cat([torch.full((n - n_kv * hd,), UNGATED), kv_group])
        removable += output_slices(full(parts["qkv"]), qkv, fused_idx)
        value_site = Site(full(parts["qkv"]), "output", -1, value_idx)
        value_primary = output_slices(full(parts["qkv"]), qkv, value_idx)
    elif parts.get("v"):
        v = get(parts["v"])
        if out_features(v) != n_kv * hd:
            raise StructureNotFoundError(f"Value projection '{name}.{parts['v']}' does not have {n_kv}x{hd} outputs.")
        for key, idx in (("q", q_group), ("k", kv_group), ("v", kv_group)):
            if parts.get(key):
                removable += output_slices(full(parts[key]), get(parts[key]), idx)
        value_site = Site(full(parts["v"]), "output", -1, kv_group)
        value_primary = output_slices(full(parts["v"]), v, kv_group)
    if parts.get("guessed") and not parts.get("per_head"):  # per-head output gates (AFMoE's gate_proj, LFM3's g_proj;
        # MiniCPM5-MoE's q_gate_proj: [query | gate] per head)
        taken = {parts.get(k) for k in ("q", "k", "v", "o", "qkv")}
        attn_rel = parts["o"].rpartition(".")[0]
        widths = (n_heads * hd, n_heads, 2 * n_heads * hd)
        parts = {**parts, "per_head": tuple(
            rel for rel, m in _leaf_linears(block).items()
            if rel not in taken and rel.rpartition(".")[0] == attn_rel and out_features(m) in widths
            and in_features(m) == in_features(get(parts["q"] or parts["v"] or parts["qkv"]))
        )} if (parts.get("q") or parts.get("v") or parts.get("qkv")) else parts
    for rel in parts.get("per_head", ()):  # outputs in one block per query head (a per-head gate)
        extra = get(rel)
        if out_features(extra) % n_heads:
            raise StructureNotFoundError(f"'{name}.{rel}' does not have a block of outputs per query head.")
        width = out_features(extra) // n_heads
        removable += output_slices(full(rel), extra, slice_index(n_heads * width, width * n_rep))
    if side == HeadSide.VALUE and value_site is None:
        raise not_found("value projection (head_side='value')", name, block, "value", "attn.v_proj")
    if side in (HeadSide.VALUE, HeadSide.AUTO) and value_site is not None:
        sites, primary, used = [value_site], value_primary, "value"
    else:
        sites = [Site(full(parts["o"]), "input", -1, q_group)]
        primary, used = input_slices(full(parts["o"]), o, q_group), "output"
    kind = AttentionKind.CROSS if cross else AttentionKind.SELF
    sub_norms: tuple[str, ...] = ()
    if used == "value":  # dead heads give zero outputs: an RMSNorm over all of them can be rescaled exactly
        sub_norms = rms_norms_over(block, core_rel, n_heads * hd, exclude=("q", "k"))
        for rel in sub_norms:
            removable.append(TensorSlice(full(rel), "weight", 0, q_group))
    info = HeadInfo(**parts, n_heads=n_heads, n_kv=n_kv, head_dim=hd, side=HeadSide(used), attention=kind,
                    sub_norms=sub_norms)
    core_rel = attention_of(block, parts.get("v") or parts.get("qkv") or parts.get("o") or "")
    if input_width_reshape(get(core_rel) if core_rel else block):
        # apply_dgate refuses; reloading an export (no head removed here) goes on
        info.refuse = _WIDTH_RESHAPE.format(name=name, version=TRANSFORMERS_VERSION)
    shards = fixed_shards(get(core_rel) if core_rel else block)
    if info.refuse is None and shards and shards > 1:
        info.refuse = _FIXED_SHARDS.format(name=name, version=TRANSFORMERS_VERSION, n=shards)
    if info.refuse is None and row and row.get("invalid"):
        info.refuse = row["invalid"]
    if info.refuse is None and row and "heads" in row and (len(row["heads"]), row["kv_heads"]) != (n_heads, n_kv):
        info.refuse = (  # apply_dgate refuses; rebuilding the export from this record (on full weights) goes on
            f"The pruning record (config.dgate_pruning) says '{name}' keeps {len(row['heads'])} heads and "
            f"{row['kv_heads']} key/value heads, its weights hold {n_heads} and {n_kv}: the record does not describe "
            "these weights. Re-export the model from its gated source."
        )
    return GroupSet("heads", layer, n_kv, sites, primary, removable, info)


def attention_of(block: nn.Module, rel: str) -> str:
    """The module holding projection `rel` (the attention): its parent, or the parent's parent where the parent only
    wraps this one weighted layer (Moshi's q_proj.linear)."""
    parent = rel.rpartition(".")[0]
    if parent and rel.rpartition(".")[2] and len(list(block.get_submodule(parent).children())) == 1:
        return parent.rpartition(".")[0]
    return parent


def _names_fit(hf_config: Any, block: nn.Module, parts: dict[str, Any], name: str) -> bool:
    """Whether projections found by common names have the widths the config's head counts say."""
    try:
        n_heads, n_kv, hd = head_geometry(hf_config, block.get_submodule(parts["o"]), name)
    except StructureNotFoundError:
        return False
    want = {"q": n_heads * hd, "k": n_kv * hd, "v": n_kv * hd}
    return all(not parts.get(k) or out_features(block.get_submodule(parts[k])) == w for k, w in want.items())


def output_side_head_set(
    model: nn.Module, hf_config: Any, config: DGateConfig, gs: GroupSet, name: str, block: nn.Module
) -> GroupSet | None:
    """The heads of a guessed self-attention set gated at the output projection's input instead of the values
    (None where it already was, or for cross-attention), for a set whose value-side check failed."""
    import dataclasses

    if gs.info.side != HeadSide.VALUE or gs.info.attention != AttentionKind.SELF or config.head_side == "value":
        return None
    try:
        sets = _head_sets(model, hf_config, dataclasses.replace(config, head_side="output"), gs.layer, name, block)
    except (StructureNotFoundError, ValueError):
        return None
    alt = next((s for s in sets if s.info.attention == AttentionKind.SELF), None)
    return alt if alt is not None and alt.info.side == HeadSide.OUTPUT else None


def alternative_head_set(hf_config: Any, layer: int, name: str, block: nn.Module) -> GroupSet | None:
    """The heads as the shapes propose them, for a block whose name-based guess failed its numerical check."""
    parts = discovered_attention(block, hf_config)
    return None if parts is None else _discovered_head_set(hf_config, layer, name, block, parts)


_FIXED_SHARDS = (
    "target='heads' is not available for '{name}': its attention module in transformers {version} splits the fused "
    "query/key/value into a fixed number of shards ({n}), each holding an equal share of the heads, so it cannot "
    "run with the heads left after a removal; gate 'neurons' or 'layers' (or upgrade transformers, whose newer "
    "module is rewritten)"
)
_WIDTH_RESHAPE = (
    "target='heads' is not available for '{name}': its attention module in transformers {version} reshapes its "
    "output to the width of its input, so it cannot run with fewer heads; gate 'neurons' or 'layers' (or, where a "
    "newer transformers has rewritten the module, upgrade)"
)


def norm_over_all_heads(block: nn.Module, gs: GroupSet) -> str | None:
    """Why a head set that failed its numerical check cannot be exact, where the structure says so: a query or key
    norm inside the attention whose weight spans every head at once (OLMo 2/3 style q_norm/k_norm over heads x head
    size) normalises each head by the others, so removing one changes the rest. (Other norms as wide as all heads
    are not named: an input norm inside the attention can be as wide.)"""
    info = gs.info
    if not isinstance(info, HeadInfo) or not info.o or not info.head_dim:
        return None
    # the module computing the heads (where q/k/v live; BERT's output LayerNorm beside `o` is on the residual sum)
    head_rel = next((r for r in (info.v, info.qkv, info.q, *info.per_head, *info.per_kv_head) if r), info.o)
    attn_rel = head_rel.rpartition(".")[0]
    if not attn_rel:
        return None
    attn = block.get_submodule(attn_rel)
    widths = {info.n_heads * info.head_dim, info.n_kv * info.head_dim} - {info.head_dim}
    for rel, m in attn.named_modules():
        w = getattr(m, "weight", None)
        if rel and "norm" in type(m).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
            if w.numel() in widths and rel.rpartition(".")[2].lower().startswith(("q", "k")):
                return f"'{attn_rel}.{rel}': {QK_NORM_SPANS_HEADS}"
    return None


def discovered_core(o: str, per_head: tuple[str, ...] | list[str], per_kv_head: tuple[str, ...] | list[str]) -> str:
    """The module holding an attention found from shapes: the output projection's parent, or, where that wraps the
    output layer alone (CvT's attention.output), the deepest module holding it and the per-head projections."""
    core = o.rpartition(".")[0]
    while core and not all(r.startswith(core + ".") for r in (*per_head, *per_kv_head)):
        core = core.rpartition(".")[0]
    return core


def _discovered_head_set(hf_config: Any, layer: int, name: str, block: nn.Module, parts: dict[str, Any]) -> GroupSet:
    """Heads of an attention found from its shapes: gated at the output projection's input, one block of outputs
    per (query or key/value) head removed from every sibling projection. Checked numerically before gating."""
    get = block.get_submodule
    o = get(parts["o"])
    n_heads, n_kv = parts["n_heads"], parts["n_kv"]
    n_rep, hd = n_heads // n_kv, parts["head_dim"]
    q_group = slice_index(n_heads * hd, hd * n_rep)
    full = lambda rel: f"{name}.{rel}"  # noqa: E731
    removable = input_slices(full(parts["o"]), o, q_group)
    for rel in parts["per_head"]:
        width = out_features(get(rel)) // n_heads
        removable += output_slices(full(rel), get(rel), slice_index(n_heads * width, width * n_rep))
    for rel in parts["per_kv_head"]:
        width = out_features(get(rel)) // n_kv
        removable += output_slices(full(rel), get(rel), slice_index(n_kv * width, width))
    core_rel = discovered_core(parts["o"], parts["per_head"], parts["per_kv_head"])
    core = get(core_rel) if core_rel else block
    for rel, emb in core.named_modules():  # a per-layer position bias with one column per head (UMT5)
        if isinstance(emb, nn.Embedding) and emb.embedding_dim == n_heads:
            removable.append(TensorSlice(full(f"{core_rel}.{rel}" if core_rel else rel), "weight", 1,
                                         torch.arange(n_heads) // n_rep))
    sites = [Site(full(parts["o"]), "input", -1, q_group)]
    primary = input_slices(full(parts["o"]), o, q_group)
    info = HeadInfo(
        o=parts["o"], per_head=tuple(parts["per_head"]), per_kv_head=tuple(parts["per_kv_head"]), discovered=True,
        guessed=True, n_heads=n_heads, n_kv=n_kv, head_dim=hd, side=HeadSide.OUTPUT, attention=AttentionKind.SELF,
    )
    if input_width_reshape(core):
        info.refuse = _WIDTH_RESHAPE.format(name=name, version=TRANSFORMERS_VERSION)
    return GroupSet("heads", layer, n_kv, sites, primary, removable, info)


def _kv_width(parts: dict[str, Any], get: Any, o: nn.Module) -> int | None:
    """Output width of the key/value heads' value slice (None where only the config can tell)."""
    if parts.get("v"):
        return out_features(get(parts["v"]))
    if parts.get("qkv") and parts.get("layout") != "interleaved":
        return (out_features(get(parts["qkv"])) - in_features(o)) // 2  # [q | k | v] with k, v equally wide
    return None


def _recorded_row(model: nn.Module, name: str, layer: int) -> dict[str, Any] | None:
    """This layer's row of the model's pruning record (kept heads, kv heads, head size), if it was exported."""
    from ..record import PruningRecord, RecordError

    try:
        rec = PruningRecord.read(getattr(model, "config", None) or {})
    except RecordError as e:  # gating reads the head numbers from it: refused in apply_dgate (not when rebuilding)
        return {"invalid": str(e)}
    if rec is None:
        return None
    st = rec.single if not rec.multi_stack else next(
        (r for p, r in rec.stacks.items() if p and name.startswith(f"{p}.")), None)  # fmt: skip
    if st is None:
        return None
    row: dict[str, Any] = {"head_dim": st.head_dim if isinstance(st.head_dim, int) else None}
    heads, kv = st.kept("heads"), st.kept("kv_heads")
    if len(kv) == len(heads) and 0 <= layer < len(heads) and isinstance(heads[layer], list):
        if isinstance(kv[layer], int):
            row.update(heads=heads[layer], kv_heads=kv[layer])
    return row


def prune_head_group_set(model: nn.Module, gs: GroupSet, dead: torch.Tensor) -> None:
    info = gs.info
    if info.discovered:
        for sl in gs.removable:
            keep_slice(model, sl, dead)
        _set_head_counts(model, gs, dead, discovered_core(info.o, info.per_head, info.per_kv_head))
        return
    if not info.v and not info.qkv:
        raise ExportError(
            f"Cannot remove heads of layer {gs.layer}: its query/key/value projections were not found. Name them "
            "with DGateConfig(module_names={'value': ..., 'query': ..., 'key': ...}) when gating."
        )
    for sl in gs.removable:
        keep_slice(model, sl, dead)
    n_rep = info.n_heads // info.n_kv
    kept = int((~dead).sum()) * n_rep * info.head_dim
    for rel in info.sub_norms if kept else ():
        rescale_rms_norm(model.get_submodule(f"{block_name(gs)}.{rel}"), info.n_heads * info.head_dim, kept)
    _set_head_counts(model, gs, dead, attention_of(model.get_submodule(block_name(gs)), info.v or info.qkv))


def _set_head_counts(model: nn.Module, gs: GroupSet, dead: torch.Tensor, core_rel: str) -> None:
    """The attention module's own head counts and widths follow the kept heads."""
    info = gs.info
    block = block_name(gs)
    core = model.get_submodule(f"{block}.{core_rel}" if core_rel else block)
    n_rep = info.n_heads // info.n_kv
    n_kv = int((~dead).sum()) * (2 if info.layout == "differential" else 1)  # (a group: two key/value heads)
    n_q, hd = n_kv * n_rep, info.head_dim
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(core, attr, None), int):
            setattr(core, attr, n_q)
    for attr in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
        if isinstance(getattr(core, attr, None), int):
            setattr(core, attr, n_kv)
    if (info.config_heads or reads_heads_from_config(core)) and getattr(core, "config", None) is not None:
        own_head_config(core, n_q, n_kv)  # this layer's own head counts (the forward reads them there)
    for attr in ("all_head_size", "split_size", "inner_dim", *output_width_attrs(core)):
        if isinstance(getattr(core, attr, None), int):
            setattr(core, attr, n_q * hd)
    for name, inner in core.named_modules():  # an attention module inside the wrapper holding its output layer
        if name and attention_like(name, inner) and not isinstance(inner, ZeroHeadAttention):
            for attr in HEAD_COUNT_ATTRS:
                if getattr(inner, attr, None) == info.n_heads:
                    setattr(inner, attr, n_q)
            for attr in ("all_head_size", "inner_dim", *output_width_attrs(inner)):
                if getattr(inner, attr, None) == info.n_heads * hd:
                    setattr(inner, attr, n_q * hd)
    if 0 < n_kv < info.n_kv:
        _select_outside_heads(core, info, dead)
    if n_kv == 0 and not isinstance(core, ZeroHeadAttention) and not _adds_and_norms_itself(core, info, core_rel):
        o_rel = info.o
        inside = not core_rel or o_rel.startswith(core_rel + ".")
        make_no_head(core, (o_rel[len(core_rel) + 1 :] if core_rel else o_rel) if inside else None)
    # a module that rebuilds this attention from the config at run time (BigBird) keeps its sizes: the attention's
    # parent, or the wrapper found as the attention (BigBird-Pegasus' encoder attention holds its output projection)
    keep_pruned_on_switch(core)
    if core_rel:
        keep_pruned_on_switch(model.get_submodule(f"{block}.{core_rel}".rpartition(".")[0]))


def _adds_and_norms_itself(core: nn.Module, info: HeadInfo, core_rel: str) -> bool:
    """An attention module that holds its output projection and a norm as wide as the model, and reads its head
    count from its config (Funnel: `layer_norm(query + post_proj(...))` inside the module): its own forward runs with
    no head (zero-width heads, the output projection's bias), which the no-head forward would not reproduce (it
    returns the projection alone). The export's numerical check stands behind it."""
    if not info.o or (core_rel and not info.o.startswith(core_rel + ".")) or not reads_heads_from_config(core):
        return False
    width = out_features(core.get_submodule(info.o[len(core_rel) + 1 :] if core_rel else info.o))
    return any(
        "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.numel() == width
        for _, m in core.named_children()
    )


def reads_heads_from_config(core: nn.Module) -> bool:
    """Does the attention's forward read its head count from its config (Funnel: `self.config.n_head`)? Then the
    layer gets its own config copy with its own head count."""
    import inspect

    try:
        source = inspect.getsource(type(core).forward)
    except (OSError, TypeError):
        return False
    names = ("num_attention_heads", "n_head", "num_heads", "n_heads", "num_key_value_heads")
    return any(f"self.config.{n}" in source.replace(" ", "") for n in names) and not any(
        isinstance(getattr(core, n, None), int) for n in HEAD_COUNT_ATTRS
    )


def outside_head_inputs(core: nn.Module) -> list[str]:
    """The arguments of an attention module's forward that can carry a per-head position bias built once by the
    model for all layers from the config's head count: `alibi` (BLOOM, Falcon) and `position_bias` (MPT's ALiBi,
    CPM-Ant's learned segment bias). A layer with fewer heads must take its kept heads' share of them (the
    export's numerical check verifies the result)."""
    import inspect

    try:
        params = inspect.signature(type(core).forward).parameters
    except (TypeError, ValueError):
        return []
    return [a for a in ("alibi", "position_bias") if a in params]


def _select_outside_heads(core: nn.Module, info: HeadInfo, dead: torch.Tensor) -> None:
    args = outside_head_inputs(core)
    if args:
        n_rep = info.n_heads // info.n_kv
        kept = [h for h in range(info.n_heads) if not bool(dead[h // n_rep])]
        select_head_inputs(core, args, kept, info.n_heads)


class Heads(Target):
    name = "heads"
    order = 0
    unit = "key/value group"

    find_in_block = staticmethod(_head_sets)

    def remove(self, model, gs, dead, ctx=None):
        prune_head_group_set(model, gs, dead)

    def record_field(self, gs):
        return "kv_heads" if gs.info.attention == AttentionKind.SELF else "cross_kv_heads"

    def recorded_in(self, record):
        # heads that transformers' own prune_heads removed (4.x) come back from config.pruned_heads at construction
        # there; transformers 5 ignores config.pruned_heads, so on 5.x they are removed like any others
        return bool(record.heads) and not (record.hf_pruned_heads and HAS_HF_PRUNE_HEADS)

    def track_kept(self, gs, dead, kept):
        """The record lists kept query heads in their original numbering; a key/value group takes its queries."""
        n_rep = gs.info.n_heads // gs.info.n_kv
        heads = kept[gs.info.attention]
        if len(heads[gs.layer]) != gs.info.n_heads:  # read off other layers (a hybrid's head-less blocks): restart
            heads[gs.layer] = list(range(gs.info.n_heads))
        if gs.info.layout == "differential":  # query head j reads key/value heads of group (j // n_rep) % (n_kv/2)
            half = gs.info.n_kv // 2
            heads[gs.layer] = [h for j, h in enumerate(heads[gs.layer]) if not dead[(j // n_rep) % half]]
            return
        heads[gs.layer] = [h for j, h in enumerate(heads[gs.layer]) if not dead[j // n_rep]]

    def metric_name(self):
        return "head_sparsity"

    def native_edit(self, cfg, record):
        heads = [len(h) for h in record.get("heads") or []]
        if record.get("hf_pruned_heads"):  # config.pruned_heads expresses them already (transformers 4.x)
            return {}
        if record.get("cross_heads") or not heads or 0 in heads:  # a layer without heads is hf_dgate's own module
            return {}
        if set(heads) == {config_value(cfg, "num_attention_heads")} and not per_layer_overrides(cfg):
            return {}  # every head is left
        rows = {"num_attention_heads": heads}
        if config_value(cfg, "num_key_value_heads") is not None:
            rows["num_key_value_heads"] = list(record["kv_heads"])
        return per_layer_edit(cfg, rows, {"head_dim": record["head_dim"]})
