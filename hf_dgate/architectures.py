"""Where things are in a model: its block stacks (and the config each one follows), and inside a block the
attention projections, the MLP projections and the routed experts.

Three sources, in order: the user's `DGateConfig.module_names`, the family's entry in registry.py (keyed by
`model_type`), and for families without one, common module names (`q_proj`/`v_proj`/`o_proj`, `c_attn`,
`fc1`/`fc2`, ...). The targets (targets/) turn what is found here into group sets; export reads the same lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .compat import TRANSFORMERS_VERSION, config_value, experts_list
from .config import TRANSFORMER_TARGETS, DGateConfig
from .groups import (
    in_axis,
    out_axis,
)
from .registry import spec_for

# Relative names inside a block, most specific first. A name matches a module whose relative name equals it
# or ends with "." + it.
VALUE_NAMES = ("v_proj", "self.value", "attention.value", "value", "to_v", "wv", "v_lin")
QUERY_NAMES = ("q_proj", "self.query", "attention.query", "query", "to_q", "wq", "q_lin")
KEY_NAMES = ("k_proj", "self.key", "attention.key", "key", "to_k", "wk", "k_lin")
FUSED_QKV = {
    "c_attn": "blocked",
    "qkv_proj": "blocked",
    "Wqkv": "blocked",
    "qkv": "blocked",
    "query_key_value": "interleaved",
}
OUT_NAMES = (
    "o_proj",
    "out_proj",
    "attention.output.dense",
    "attn.c_proj",
    "attention.dense",
    "self_attn.dense",
    "wo",
    "to_out.0",
    "out_lin",
)
DOWN_NAMES = ("down_proj", "mlp.c_proj", "fc2", "dense_4h_to_h", "output.dense", "w2", "lin2")
UP_NAMES = (
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("c_fc",),
    ("fc1",),
    ("dense_h_to_4h",),
    ("intermediate.dense",),
    ("lin1",),
)
# Families whose blocks normalise after the residual add: scaling a branch to zero does not make the block the
# identity, so whole-layer gating cannot remove a layer there.
POST_NORM_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "electra",
    "albert",
    "distilbert",
    "mpnet",
    "deberta",
    "deberta-v2",
    "ernie",
    "bart",
    "plbart",
    "marian",
    "fsmt",
    "squeezebert",  # LayerNorm(conv1d(x) + x) after attention and after the MLP (ConvDropoutLayerNorm)
}


class StructureNotFoundError(ValueError):
    """A target's structure (value projection, MLP, block list) could not be located."""


# ---- blocks ------------------------------------------------------------------------------------------------
def find_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every top-level list of transformer blocks (a decoder; encoder and decoder; vision and text towers).

    A stack is an `nn.ModuleList` whose entries are blocks with attention or MLP projections of their own and
    that does not sit inside another stack (T5's per-block `layer` lists, MoE expert lists).
    """
    text = _text_config(model)
    n_layers = next((v for k in LAYER_COUNT_FIELDS if isinstance(v := getattr(text, k, None), int)), None)
    stacks: list[tuple[str, nn.ModuleList]] = []
    stage_lists: list[str] = []
    for n, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or any(n.startswith(p + ".") for p, _ in stacks):
            continue
        if any(n.startswith(p + ".") for p in stage_lists):
            continue
        inner = _stages(m)
        if inner is not None:  # a hierarchical model: each stage's own list of blocks is a stack
            stage_lists.append(n)
            stacks += [(f"{n}.{i}{'.' + rel if rel else ''}", blocks) for i, (rel, blocks) in enumerate(inner)]
            continue
        if all(_is_block(b, named=len(m) != n_layers) for b in m):
            stacks.append((n, m))
    if not stacks and getattr(model, "config", None) is None:
        # no names and no layer count: the first list of two or more blocks built alike (checked numerically later)
        for n, m in model.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) >= 2 and all(len(_leaves(b)) >= 2 for b in m):
                if len({type(b) for b in m}) == 1:
                    return [(n, m)]
    return stacks


LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
BLOCK_LISTS = (nn.ModuleList, nn.Sequential)


def _stages(m: nn.ModuleList) -> list[tuple[str, nn.Module]] | None:
    """[(relative name, list of blocks)] when every entry of `m` is a stage of a hierarchical model (Swin, PVT,
    SegFormer, ConvNeXt): a list of blocks of one type, or a module whose direct child is one and that has no
    attention outside it (downsampling and norms beside it); else None. T5's per-block lists of sub-layers of
    different types are not stages, nor are lists of experts inside a block."""
    out: list[tuple[str, nn.Module] | None] = []
    for entry in m:
        if isinstance(entry, BLOCK_LISTS):
            out.append(("", entry) if _uniform_blocks(entry) or len(entry) == 0 else None)
            continue
        rel, inner = next(((r, c) for r, c in entry.named_children() if _uniform_blocks(c)), (None, None))
        if inner is None:
            out.append(None)
            continue
        outside = [n for n, x in entry.named_modules() if attention_like(n, x) and not n.startswith(rel + ".")]
        out.append(None if outside else (rel, inner))
    found = [x for x in out if x is not None and len(x[1])]
    if not found:
        return None
    for i, x in enumerate(out):  # a stage whose blocks an export dropped keeps its (empty) list
        rel = found[0][0]
        if x is None and rel and isinstance(getattr(m[i], rel, None), BLOCK_LISTS) and not len(getattr(m[i], rel)):
            out[i] = (rel, getattr(m[i], rel))
    return None if any(x is None for x in out) else out  # type: ignore[misc]


def _uniform_blocks(m: nn.Module) -> bool:
    """A list of blocks of one type, each with a linear layer (lists of convolutional blocks are no stage of a
    transformer: gate 'filters' there)."""
    return (
        isinstance(m, BLOCK_LISTS) and len(m) > 0 and len({type(b) for b in m}) == 1
        and all(_is_block(b, named=False) for b in m) and not isinstance(m[0], BLOCK_LISTS)
        and all(any(getattr(x, "weight", None) is not None and x.weight.dim() == 2 for x in _leaves(b).values())
                for b in m)
    )


def _is_block(block: nn.Module, named: bool) -> bool:
    """A module with two or more weighted layers; with `named`, one of them must carry a known projection name
    (lists as long as the config's num_hidden_layers count without it, for unknown families)."""
    leaves = _leaves(block)
    names = (*OUT_NAMES, *DOWN_NAMES, *FUSED_QKV, *VALUE_NAMES)
    return len(leaves) >= 2 and (not named or _match(leaves, names, set()) is not None)


@dataclass
class BlockStack:
    """One list of blocks that gets gated, with the config that describes it."""

    name: str  # short name ("decoder", "vision"); the path for single-stack and unknown models
    path: str
    blocks: list[tuple[str, nn.Module]]  # (qualified name, block); shared (tied) blocks once
    config: Any  # head counts etc. of these blocks (a sub-config, or the model config seen by this stack)
    layers_config: Any  # the config object whose `layers_field` counts these blocks
    layers_field: str
    refuse: tuple[tuple[str, str], ...] = ()  # targets this stack cannot have (registry), with the reason
    layers_index: int | None = None  # a stage of a hierarchical model: its entry in the `layers_field` list


def block_stacks(model: nn.Module, config: DGateConfig) -> list[BlockStack]:
    """The block stacks `config` gates: the one named in `module_names['layers']`, the ones chosen in
    `DGateConfig.stacks`, or every stack of the model. A model with several stacks that the registry does not
    describe is refused (its per-stack head counts would be guesses)."""
    names = config.module_names or {}
    if "layers" in names:
        try:
            blocks = model.get_submodule(names["layers"])
        except AttributeError:
            raise StructureNotFoundError(
                f"module_names['layers']={names['layers']!r} is not a submodule of {type(model).__name__}."
            ) from None
        return [_stack(model, names["layers"], blocks)]
    found = find_stacks(model)
    hf_model = hasattr(getattr(model, "config", None), "to_dict")  # a transformers model (its config)
    if not found and hf_model and (
        not any(attention_like(n, m) for n, m in model.named_modules()) or not _linear_in_a_list(model)
    ):  # (VAN: "attention" that is all convolutions, its only linear layer the classifier)
        raise StructureNotFoundError(
            f"{type(model).__name__} has no transformer blocks (no attention module anywhere, or none of its blocks "
            "has a linear layer): heads, neurons and "
            "layers do not apply; gate 'filters' for a convolutional network."
        )
    if not found:
        raise StructureNotFoundError(
            f"Could not find the list of transformer blocks in {type(model).__name__} (an nn.ModuleList of "
            "blocks with attention or MLP projections). Name it explicitly: "
            "DGateConfig(module_names={'layers': 'model.layers'})."
        )
    stacks = [_stack(model, path, blocks) for path, blocks in found]
    if len(stacks) > 1 and any(st.name == st.path for st in stacks) and not _checkable(model, stacks):
        raise StructureNotFoundError(
            f"{type(model).__name__} has {len(found)} block stacks: {describe_stacks(found)}, and hf_dgate has no "
            "registry entry that says how each is configured; it will not gate a subset silently. Choose one "
            f"with DGateConfig(module_names={{'layers': {found[-1][0]!r}}}) (the others stay dense and the "
            "sparsity report lists them)."
        )
    chosen = getattr(config, "stacks", None)
    if chosen:
        known = {st.name for st in stacks} | {st.path for st in stacks}
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(
                f"DGateConfig.stacks={chosen!r}: {unknown} is not a stack of {type(model).__name__}; its stacks "
                f"are {[st.name for st in stacks]}."
            )
        stacks = [st for st in stacks if st.name in chosen or st.path in chosen]
    return stacks


def _linear_in_a_list(model: nn.Module) -> bool:
    """Whether any linear layer (a 2-D weight) sits in a list of modules: a transformer's blocks have them, a
    convolutional network's blocks do not (its only linear layer is the classifier)."""
    lists = [n for n, m in model.named_modules() if n and isinstance(m, BLOCK_LISTS)]
    return any(
        isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2 and not isinstance(m, nn.Embedding)
        and any(n.startswith(p + ".") for p in lists)
        for n, m in model.named_modules()
    )


def _checkable(model: nn.Module, stacks: list[BlockStack]) -> bool:
    """Several stacks without a registry row can all be gated when each has its own head count (or, for stages
    of a hierarchical model, its own width) in the config: an encoder and a decoder, towers with their own
    sub-configs, stages; every group found there is checked numerically before gating, and a stack the probe does
    not reach stays dense (with a warning)."""
    if spec_for(getattr(model, "config", None)) is not None:  # a registered family: its entry must name the stacks
        return False
    return all(
        _count([st.config], HEAD_FIELDS) is not None
        or isinstance(st.config, _StackConfig) and isinstance(getattr(st.config, "hidden_size", None), int)
        for st in stacks
    )


def _stack(model: nn.Module, path: str, blocks: nn.ModuleList) -> BlockStack:
    cfg = getattr(model, "config", None)
    spec = spec_for(cfg)
    entry = next((st for st in (spec.stacks if spec else ()) if st.matches(path)), None)
    unique, seen = [], set()
    for i, block in enumerate(blocks):
        if id(block) not in seen:
            seen.add(id(block))
            unique.append((f"{path}.{i}", block))
    if entry is None:
        own = stack_config(model, path)
        # the config that counts these blocks: the stack's own sub-config (a vision tower's), else the text one
        counts = own if hasattr(own, "to_dict") and getattr(own, "num_hidden_layers", None) == len(blocks) else None
        text = counts or _text_config(model)
        field = "num_hidden_layers"
        for side in ("encoder", "decoder"):  # an encoder-decoder config counts each side's blocks
            if not any(p.endswith(side) for p in path.split(".")):
                continue
            names = (f"{side}_layers", f"num_{side}_layers", *(("num_layers",) if side == "encoder" else ()))
            counted = next((k for k in names if getattr(cfg, k, None) == len(blocks)), None)
            if counted:
                text, field = cfg, counted
        stage = own.__dict__["_stage"] if isinstance(own, _StackConfig) else None
        for key in STAGE_DEPTHS if stage is not None else ():  # a stage's depth: its entry in the config's list
            depths = getattr(own.__dict__["_cfg"], key, None)
            if isinstance(depths, (list, tuple)) and stage < len(depths) and depths[stage] == len(blocks):
                return BlockStack(path, path, unique, own, own.__dict__["_cfg"], key, layers_index=stage)
        return BlockStack(path, path, unique, own, text, field)
    if entry.config:
        sub = getattr(cfg, entry.config)
        return BlockStack(entry.name, path, unique, sub, sub, entry.layers_field, entry.refuse)
    stack_cfg = _StackConfig(cfg, _prefixed(cfg, entry.prefix)) if entry.prefix else cfg
    return BlockStack(entry.name, path, unique, stack_cfg, cfg, entry.layers_field, entry.refuse)


def _prefixed(cfg: Any, side: str) -> dict[str, Any]:
    """Head counts of one side of an encoder-decoder config, under the names the rest of hf_dgate reads."""
    heads = getattr(cfg, f"{side}_attention_heads")
    kv = getattr(cfg, f"{side}_num_key_value_heads", None) or getattr(cfg, f"{side}_key_value_heads", None)
    out = {"num_attention_heads": heads, "num_key_value_heads": kv or heads}
    if hasattr(cfg, f"{side}_head_dim"):
        out["head_dim"] = getattr(cfg, f"{side}_head_dim")
    return out


def find_blocks(model: nn.Module, config: DGateConfig, stack: str | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks of one stack in order (`stack`: its path; None: the model's only gated stack)."""
    stacks = block_stacks(model, config)
    if stack is not None:
        for st in stacks:
            if st.path == stack:
                return st.blocks
        raise StructureNotFoundError(f"{stack!r} is not a block stack of {type(model).__name__}.")
    if len(stacks) != 1:
        raise StructureNotFoundError(
            f"{type(model).__name__} has several block stacks ({', '.join(st.path for st in stacks)}); this "
            "operation works on one: choose it with DGateConfig(module_names={'layers': ...})."
        )
    return stacks[0].blocks


def attention_like(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()  # "...MLA": a multi-head latent attention (LongcatFlashMLA)
    return "attention" in cls or "attn" in cls or cls.endswith("mla") or isinstance(module, nn.MultiheadAttention)


def describe_stacks(stacks: list[tuple[str, nn.ModuleList]]) -> str:
    return ", ".join(f"'{n}' ({len(m)} x {type(m[0]).__name__})" for n, m in stacks)


def stack_status(model: nn.Module, config: DGateConfig) -> dict[str, bool]:
    """Every block stack of `model` and whether `config` gates it (empty for models gated only on filters,
    features or custom groups); the sparsity report lists it so a dense stack is never a silent one."""
    if not any(t in TRANSFORMER_TARGETS for t in config.targets):
        return {}
    gated = {st.path for st in block_stacks(model, config)}
    return {n: n in gated for n, _ in find_stacks(model)} | dict.fromkeys(gated, True)


class _StackConfig:
    """The model config as one stack sees it: encoder-decoder configs keep per-stack head counts
    (`decoder_attention_heads`)."""

    def __init__(self, cfg: Any, overrides: dict[str, Any], stage: int | None = None):
        self._cfg, self._overrides, self._stage = cfg, overrides, stage  # stage: its index in a hierarchical model

    def __getattr__(self, key: str) -> Any:
        overrides = self.__dict__.get("_overrides", {})
        return overrides[key] if key in overrides else getattr(self.__dict__["_cfg"], key)


def stack_config(model: nn.Module, block_name: str) -> Any:
    """The config that describes the blocks under `block_name` (a block or stack path)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    spec = spec_for(cfg)
    for entry in spec.stacks if spec else ():
        path = block_name.rpartition(".")[0] if block_name.rpartition(".")[2].isdigit() else block_name
        if entry.matches(path):
            if entry.config:
                return getattr(cfg, entry.config)
            return _StackConfig(cfg, _prefixed(cfg, entry.prefix)) if entry.prefix else cfg
    parts = block_name.split(".")
    sub = _sub_config(cfg, parts)
    staged = _stage_config(model, sub if sub is not None else cfg, block_name)
    if staged is not None:
        return staged
    if sub is not None:
        return sub
    for side in ("encoder", "decoder"):
        if side in parts and hasattr(cfg, f"{side}_attention_heads"):
            return _StackConfig(cfg, _prefixed(cfg, side))
    return _text_config(model)


STAGE_DEPTHS = ("depths", "depth")  # the per-stage block counts of a hierarchical config
# per-stage lists of a hierarchical vision config, and the field each entry stands for in one stage
STAGE_FIELDS = {
    "hidden_size": ("hidden_sizes", "embed_dims", "embed_dim", "dims"),
    "num_attention_heads": ("num_attention_heads", "num_heads", "heads"),
}


def _stage_config(model: nn.Module, cfg: Any, block_name: str) -> Any:
    """The config as stage i of a hierarchical model sees it: where the config lists one width or head count per
    stage (a list as long as the model has stacks), stage i reads entry i as `hidden_size` / `num_attention_heads`.
    A listed width is taken only where the stage's first block has layers reading it (FocalNet lists the widths
    after each downsampling); else the width most of them read. None for any other model."""
    lists = {
        key: v for names in STAGE_FIELDS.values() for key in names
        if isinstance(v := config_value(cfg, key), (list, tuple)) and v and all(type(x) is int for x in v)
    }
    if not lists:
        return None
    stacks = [p for p, _ in find_stacks(model)]
    path = next((p for p in stacks if block_name == p or block_name.startswith(p + ".")), None)
    if path is None or len(stacks) < 2:
        return None
    i = stacks.index(path)
    first = next(iter(model.get_submodule(path)), None)
    widths = [in_features(m) for m in _leaves(first).values() if getattr(m, "weight", None) is not None
              and m.weight.dim() == 2] if first is not None else None  # fmt: skip
    overrides: dict[str, Any] = {}
    for field, names in STAGE_FIELDS.items():
        for key in names:
            if key in lists and len(lists[key]) == len(stacks):
                if field == "hidden_size" and widths is not None and lists[key][i] not in widths:
                    continue
                overrides[field] = lists[key][i]
                break
    if "hidden_size" not in overrides and widths:
        overrides["hidden_size"] = max(set(widths), key=lambda w: (widths.count(w), -w))
    return _StackConfig(cfg, overrides, stage=i) if overrides else None


def _sub_config(cfg: Any, parts: list[str]) -> Any:
    """The sub-config a module path names (`vision_model` -> vision_config), refined through nested ones (T5Gemma 2's
    encoder config holds a text and a vision config); None when no part names one."""
    for key in getattr(cfg, "sub_configs", None) or {}:
        stem = key.removesuffix("_config")
        aliases = {stem, "language"} if stem == "text" else {stem}
        sub = getattr(cfg, key, None)
        hit = next((i for i, p in enumerate(parts) if p.split("_")[0] in aliases), None)
        if sub is not None and hit is not None:
            return _sub_config(sub, parts[hit + 1 :]) or sub
    for i, p in enumerate(parts):  # a config held under the module's own name, not listed in sub_configs (4.x)
        sub = getattr(cfg, p, None) if p.isidentifier() else None
        if sub is not cfg and hasattr(sub, "to_dict") and hasattr(sub, "num_hidden_layers"):
            return _sub_config(sub, parts[i + 1 :]) or sub
    return None


def layer_config(cfg: Any, layer: int | str) -> Any:
    """The config one block follows (`layer`: its index or qualified name): its own view where a 5.x config
    overrides fields per layer (`per_layer_config`), else `cfg` itself."""
    if isinstance(layer, str):
        tail = layer.rpartition(".")[2]
        if not tail.isdigit():
            return cfg
        layer = int(tail)
    if getattr(cfg, "is_heterogeneous", False) and 0 <= layer < len(cfg.per_layer_config):
        return cfg.per_layer_config[layer]
    return cfg


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


def _leaves(block: nn.Module) -> dict[str, nn.Module]:
    """Weighted layers by relative name; a PEFT-wrapped layer counts as one leaf under its own name."""
    leaves: dict[str, nn.Module] = {}
    wrapped: tuple[str, ...] = ()
    for n, m in block.named_modules():
        if not n or n.startswith(wrapped):
            continue
        if isinstance(getattr(m, "base_layer", None), nn.Module):
            leaves[n] = m
            wrapped = (*wrapped, n + ".")
        elif getattr(m, "weight", None) is not None and len(list(m.children())) == 0:
            leaves[n] = m
    return leaves


def _match(leaves: dict[str, nn.Module], patterns: tuple[str, ...], taken: set[str]) -> str | None:
    for p in patterns:
        for rel in leaves:
            if rel not in taken and (rel == p or rel.endswith("." + p)):
                return rel
    for p in patterns:  # a wrapper of that name around one weighted layer (Moshi's q_proj.linear)
        for rel in leaves:
            parent = rel.rpartition(".")[0]
            if rel not in taken and (parent == p or parent.endswith("." + p)):
                if sum(r.startswith(parent + ".") for r in leaves) == 1:
                    return rel
    return None


def not_found(what: str, name: str, block: nn.Module, key: str, example: str) -> StructureNotFoundError:
    leaves = ", ".join(_leaves(block)) or "none"
    return StructureNotFoundError(
        f"Could not find the {what} in module '{name}' ({type(block).__name__}); its weighted submodules are: "
        f"{leaves}. Name it explicitly: DGateConfig(module_names={{'{key}': '{example}'}})."
    )


def out_features(m: nn.Module) -> int:
    return m.weight.shape[out_axis(m)]


def in_features(m: nn.Module) -> int:
    return m.weight.shape[in_axis(m)]


# ---- attention heads -------------------------------------------------------------------------------------------
ATTENTION_KEYS = ("qkv", "value", "query", "key", "out")


def attention_parts(name: str, block: nn.Module, config: DGateConfig, hf_config: Any = None) -> dict[str, Any]:
    """Relative names of a block's (self-)attention projections: the user's `module_names`, else the family's
    registry entry, else common names."""
    names = config.module_names or {}
    spec = spec_for(hf_config)
    if spec is not None and spec.attention is not None and not set(ATTENTION_KEYS) & set(names):
        parts = spec.attention.parts(hf_config)
        if parts.pop("per_head_optional", False):  # per-head projections where the config builds them
            parts["per_head"] = tuple(r for r in parts["per_head"] if has_module(block, r))
        if _present(block, parts):
            return parts
    leaves = _leaves(block)
    taken: set[str] = set()
    parts: dict[str, Any] = {}
    if "qkv" in names:
        parts["qkv"] = names["qkv"]
        parts["layout"] = names.get("qkv_layout", "blocked")
    elif "value" in names:
        parts["v"] = names["value"]
    else:
        fused = _match(leaves, tuple(FUSED_QKV), taken)
        if fused is not None:
            parts["qkv"] = fused
            parts["layout"] = FUSED_QKV[fused.rsplit(".", 1)[-1]]
        else:
            parts["v"] = _match(leaves, VALUE_NAMES, taken)
    if "v" in parts and parts["v"] is not None:
        parts["q"] = names.get("query") or _match(leaves, QUERY_NAMES, taken)
        parts["k"] = names.get("key") or _match(leaves, KEY_NAMES, taken)
    parts["o"] = names.get("out") or _match(leaves, OUT_NAMES, taken)
    if not set(ATTENTION_KEYS) & set(names):  # a guess from common names: checked numerically before gating
        parts["guessed"] = True
    if parts["o"] is None and not set(ATTENTION_KEYS) & set(names):
        found = discovered_attention(block, hf_config)
        if found is not None:
            return found
    if parts["o"] is None:
        raise not_found("attention output projection", name, block, "out", "attn.o_proj")
    return parts


def discovered_attention(block: nn.Module, hf_config: Any) -> dict[str, Any] | None:
    """The attention as its shapes propose it (discover.py); None without a head count or a fitting layer."""
    from .discover import propose_attention

    # head counts: the config's (under any common name), else the attention module's own attributes
    modules = [m for _, m in block.named_modules()]
    n_heads = _count([hf_config], HEAD_FIELDS) or _count(modules, HEAD_FIELDS)
    if n_heads is None:
        return None
    n_kv = _count([hf_config], KV_HEAD_FIELDS) or _count(modules, KV_HEAD_FIELDS) or n_heads
    return propose_attention(block, hf_config, n_heads, n_kv if n_heads % n_kv == 0 else n_heads)


def cross_attention_parts(block: nn.Module, hf_config: Any) -> dict[str, Any] | None:
    """The registry's cross-attention projections when this block has them (decoder blocks of encoder-decoders)."""
    spec = spec_for(hf_config)
    if spec is None or spec.cross_attention is None:
        return None
    parts = spec.cross_attention.parts(hf_config)
    return parts if _present(block, parts) else None


def _present(block: nn.Module, parts: dict[str, Any]) -> bool:
    names = [rel for key, rel in parts.items() if isinstance(rel, str) and key != "layout"]
    return all(has_module(block, rel) for rel in [*names, *parts.get("per_head", ())])


def dense_mlp_block(spec: Any, block: nn.Module) -> bool:
    """Whether a block of a mixture-of-experts family has the family's dense MLP instead (Step 3.7's first layers)."""
    return spec is not None and any(has_module(block, m.down) for m in spec.mlps())


def has_module(block: nn.Module, rel: str) -> bool:
    try:
        block.get_submodule(rel)
    except AttributeError:
        return False
    return True


def kv_head_count(hf_config: Any) -> int | None:
    """Key/value heads as the family's config counts them (None: the config has no head count)."""
    n_heads = getattr(hf_config, "num_attention_heads", None)
    spec = spec_for(hf_config)
    if spec is not None and spec.kv_heads is not None and n_heads is not None:
        return spec.kv_heads(hf_config)
    return getattr(hf_config, "num_key_value_heads", None) or n_heads


HEAD_FIELDS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "heads")
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "kv_heads")


def _count(sources: list[Any], fields: tuple[str, ...]) -> int | None:
    for src in sources:
        for key in fields:
            val = getattr(src, key, None)
            if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                return val
    return None


HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "head_size")


def head_geometry(
    hf_config: Any,
    o: nn.Module,
    name: str,
    core: nn.Module | None = None,
    kv_width: int | None = None,
    recorded_head_dim: int | None = None,
) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of one attention as its weights have them now.

    The head size is fixed by the family (the config's `head_dim`, the pruning record's, the attention module's
    own, else hidden_size / heads); the counts are read off the projections, so a model pruned earlier (an export,
    `prune_heads`) is gated with its real heads, not the config's. `kv_width`: the value projection's output width
    (None: the config's ratio of query to key/value heads). Anything that does not fit is refused."""
    n_cfg = getattr(hf_config, "num_attention_heads", None)
    if n_cfg is None:
        raise StructureNotFoundError(
            f"The config of '{name}' has no num_attention_heads; heads cannot be gated without it."
        )
    kv_cfg = kv_head_count(hf_config) or n_cfg
    width = in_features(o)
    hd = getattr(hf_config, "head_dim", None) or recorded_head_dim
    hd = hd or next((getattr(core, a) for a in HEAD_SIZE_ATTRS if isinstance(getattr(core, a, None), int)), None)
    hd = hd or (getattr(hf_config, "hidden_size", None) or width) // n_cfg
    n_heads = width // hd if hd else 0
    n_kv = kv_width // hd if kv_width is not None and hd else (n_heads * kv_cfg // n_cfg if n_cfg else 0)
    if not hd or n_heads * hd != width or n_heads == 0 or not n_kv or n_heads % n_kv or n_cfg % kv_cfg or (
        n_heads // n_kv != n_cfg // kv_cfg
    ):  # fmt: skip
        left = " (none left: an earlier export removed them all)" if width == 0 else ""
        raise StructureNotFoundError(
            f"Head geometry of '{name}' does not fit its weights{left}: its output projection takes {width} inputs, "
            f"the head size is {hd}, the config says {n_cfg} heads sharing {kv_cfg} key/value heads. Gate 'neurons' "
            "or 'layers' of this model, or gate the model before it was pruned."
        )
    return n_heads, n_kv, hd


# ---- MLP neurons -------------------------------------------------------------------------------------------------
def mlp_parts(name: str, block: nn.Module, config: DGateConfig, hf_config: Any = None) -> tuple[str, list[str]]:
    """(down, [up, ...]) relative names: the user's `module_names`, else the family's entry, else common names."""
    names = config.module_names or {}
    spec = spec_for(hf_config)
    for mlp in spec.mlps() if spec is not None and not {"up", "down"} & set(names) else ():
        ups = [mlp.fused_up] if mlp.fused_up else list(mlp.up)
        if all(has_module(block, rel) for rel in (mlp.down, *ups)):
            return mlp.down, ups
    leaves = _leaves(block)
    o_rel = _attention_out_name(name, block, config, hf_config)
    if o_rel and not set(ATTENTION_KEYS) & set(names) and not _inside_attention(block, o_rel):
        o_rel = None  # a common name outside any attention module (T5's MLP output `wo`): not the attention's
    taken = {p for p in (o_rel,) if p}
    down = names.get("down") or _match(leaves, DOWN_NAMES, taken)
    ups = names.get("up")
    if ups is None and down is not None:
        for group in UP_NAMES:
            found = [_match(leaves, (p,), taken) for p in group]
            if all(found):
                ups = found
                break
    if (down is None or not ups) and not {"up", "down"} & set(names):
        from .discover import propose_mlp

        found_mlp = propose_mlp(block, hf_config, exclude=o_rel.rpartition(".")[0] if o_rel else None)
        if found_mlp is not None:
            return found_mlp
    if down is None:
        raise not_found("MLP down (second) projection", name, block, "down", "mlp.down_proj")
    if not ups:
        raise not_found("MLP up (first) projection", name, block, "up", "['mlp.up_proj']")
    return down, [ups] if isinstance(ups, str) else list(ups)


def _inside_attention(block: nn.Module, rel: str) -> bool:
    """Whether some module on the path to `rel` (itself excluded) is an attention module."""
    parts = rel.split(".")[:-1]
    return any(attention_like("", block.get_submodule(".".join(parts[: i + 1]))) for i in range(len(parts)))


def _attention_out_name(name: str, block: nn.Module, config: DGateConfig, hf_config: Any = None) -> str | None:
    try:
        return attention_parts(name, block, config, hf_config)["o"]
    except StructureNotFoundError:
        return None


def routed_experts(hf_config: Any, block: nn.Module, config: DGateConfig | None = None) -> tuple[Any, bool] | None:
    """(experts, discovered) of a block: the family's registry entry (None in its dense blocks), else the stacked
    expert tensors its shapes show (discover.propose_experts; checked numerically before gating), else None. The
    user's `module_names` for the MLP turn both off."""
    if config is not None and {"up", "down"} & set(config.module_names or {}):
        return None
    spec = spec_for(hf_config)
    if spec is not None and spec.experts is not None:
        if dense_mlp_block(spec, block):
            return None
        return (_moved_experts(block, spec.experts) or spec.experts), False
    from .discover import propose_experts

    found = propose_experts(block, hf_config)
    return (found, True) if found is not None else None


def _moved_experts(block: nn.Module, moe: Any) -> Any:
    """The registry's experts where this transformers puts them under another parent (Mixtral and PhiMoE in 4.x:
    `block_sparse_moe.experts` for 5.x's `mlp.experts`): the same entry with its paths moved, or None."""
    import dataclasses

    if has_module(block, moe.experts):
        return None
    tail = moe.experts.rpartition(".")[2]
    for rel, _ in block.named_modules():
        parent, _, last = rel.rpartition(".")
        if last == tail and parent:
            router = f"{parent}.{moe.router.rpartition('.')[2]}"
            router = router if has_module(block, router) else ""
            return dataclasses.replace(moe, block=parent, experts=rel, router=router)
    return None


@dataclass
class ExpertTensors:
    """The stacked expert tensors of one block, resolved: qualified module and parameter name of `down` (E, H, I) or
    (E, I, H) and `gate_up` (E, 2I, H) or (E, H, 2I) (and its (E, 2I) bias), the axis of each that indexes units."""

    experts: str  # the qualified name of the module holding them (the module `moe.experts` names)
    module: nn.Module
    n_experts: int
    units: int
    down: tuple[str, str]  # (qualified module, parameter)
    gate_up: tuple[str, str]
    bias: tuple[str, str] | None
    down_axis: int  # the axis of down that indexes units (2, or 1 when transposed)
    gate_up_axis: int  # the axis of gate_up (and 1 of its bias) that indexes [gate | up] rows
    interleaved: bool


def _param_path(root: str, rel: str) -> tuple[str, str]:
    owner, _, leaf = rel.rpartition(".")
    return (f"{root}.{owner}" if owner else root).strip("."), leaf


def expert_tensors(name: str, block: nn.Module, moe: Any) -> ExpertTensors:
    """The stacked expert tensors of a block, checked against each other; refused when they are not a fused
    [gate | up] projection and a down projection of the same experts and units."""
    if not has_module(block, moe.experts):
        raise not_found("routed experts", name, block, "experts", moe.experts)
    experts = block.get_submodule(moe.experts)
    if experts_list(experts) is not None:
        raise StructureNotFoundError(
            f"transformers {TRANSFORMERS_VERSION} stores the routed experts of '{name}' as a list of modules; hf_dgate "
            "gates experts and their units in the stacked layout of transformers 5. Gate 'heads' or 'layers' here, "
            "or upgrade transformers."
        )

    def param(rel: str) -> Any:
        try:
            return experts.get_parameter(rel) if rel else None
        except AttributeError:
            return None

    down, gate_up, bias = param(moe.down), param(moe.gate_up), param(getattr(moe, "bias", ""))
    transposed = getattr(moe, "transposed", False) or getattr(experts, "is_transposed", False)
    # transformers 5's experts declare their layout (is_transposed; is_concatenated False: alternating rows)
    interleaved = getattr(moe, "interleaved", False) or getattr(experts, "is_concatenated", True) is False
    if down is None or gate_up is None or down.dim() != 3 or getattr(experts, "has_gate", True) is False:
        raise StructureNotFoundError(
            f"The experts of '{name}' are not stored as a fused [gate | up] (E, 2I, H) and a (E, H, I) tensor (or "
            "their transposes); hf_dgate gates that layout only."
        )
    n_exp, units = down.shape[0], down.shape[1 if transposed else 2]
    two = gate_up.shape[2 if transposed else 1]
    if gate_up.dim() != 3 or gate_up.shape[0] != n_exp or two != 2 * units or (
        bias is not None and tuple(bias.shape) != (n_exp, 2 * units)
    ):  # fmt: skip
        raise StructureNotFoundError(
            f"The expert tensors of '{name}' disagree: {tuple(gate_up.shape)} vs {tuple(down.shape)}."
        )
    full = f"{name}.{moe.experts}"
    return ExpertTensors(
        full, experts, n_exp, units, _param_path(full, moe.down), _param_path(full, moe.gate_up),
        _param_path(full, moe.bias) if bias is not None else None, 1 if transposed else 2, 2 if transposed else 1,
        interleaved,
    )


def stacked_experts(name: str, block: nn.Module, moe: Any) -> tuple[str, nn.Module, int, int]:
    """The stacked expert tensors of a block: (qualified name, module, experts, units per expert)."""
    t = expert_tensors(name, block, moe)
    return t.experts, t.module, t.n_experts, t.units


# ---- whole layers ----------------------------------------------------------------------------------------------


# ---- user-defined groups on any module ---------------------------------------------------------------------
