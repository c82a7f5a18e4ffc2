"""Native configs: rewrite an export's config so that a plain `from_pretrained` builds exactly its shapes, where
the config can say so (one count for every layer, the family's per-layer lists, or 5.x `per_layer_config`).

Each target proposes the fields that would express what is left of it (`Target.native_edit`); a proposal counts
only where the installed transformers validates the config and builds these shapes from it (on the meta device).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .compat import (
    HAS_PER_LAYER_CONFIG,
    build_on_meta,
    config_value,
    per_layer_overrides,
    set_per_layer_overrides,
)
from .pruned_modules import KeepsPrunedAttention, ZeroHeadAttention, ZeroInputConv1D
from .targets import BUILTIN
from .targets.base import MISSING, merge_edits, settable

PATCHED = (ZeroHeadAttention, ZeroInputConv1D, KeepsPrunedAttention)  # hf_dgate's subclasses of pruned modules


def text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def make_native(model: nn.Module, structure: dict[str, Any]) -> bool:
    """Rewrite the config so a plain `from_pretrained` builds exactly these shapes, when the config can say so.

    Each target proposes the config fields that would express what is left of it: one count for every layer, the
    family's own per-layer list, or 5.x `per_layer_config` overrides (targets/base.py `per_layer_edit`). Every
    combination, largest first, is verified by validating the rewritten config and building the model class from it
    on the meta device, comparing every tensor shape; so a form counts only where the installed transformers really
    builds it. Multi-stack records are only checked as they are (their layer counts were set on removal).
    """
    cfg = text_config(model)
    if cfg is None or "stacks" in structure or not structure.get("heads"):
        return shapes_match(model)
    edits = [e for e in (t.native_edit(cfg, structure) for t in BUILTIN.values() if t.per_block) if e]
    fields = {k for e in edits for k in e if k != "per_layer_config"}
    originals = {k: config_value(cfg, k, MISSING) for k in fields}
    original_overrides = per_layer_overrides(cfg)
    for edit in [merge_edits(*edits), *edits, {}]:
        set_config_fields(cfg, originals)
        set_config_fields(cfg, edit, original_overrides)
        if config_valid(model.config) and shapes_match(model):
            return True
    set_config_fields(cfg, originals, original_overrides)
    return False


def set_config_fields(cfg: Any, values: dict[str, Any], overrides: dict[int, dict[str, Any]] | None = None) -> None:
    """Set config fields, then the per-layer overrides: `overrides` with `values["per_layer_config"]` on top
    (nothing changes them when both are None)."""
    for k, v in values.items():
        if k == "per_layer_config" or not settable(cfg, k):
            continue
        if v is MISSING:  # a field the config did not have before a candidate set it
            vars(cfg).pop(k, None)
        else:
            setattr(cfg, k, v)
    extra = values.get("per_layer_config")
    if HAS_PER_LAYER_CONFIG and (extra or overrides is not None or per_layer_overrides(cfg) is not None):
        merged = merge_edits({"per_layer_config": overrides or {}}, {"per_layer_config": extra or {}})
        try:
            set_per_layer_overrides(cfg, merged["per_layer_config"])
        except (ValueError, TypeError):  # the config refuses these overrides: the candidate cannot be native
            set_per_layer_overrides(cfg, overrides)


def config_valid(cfg: Any) -> bool:
    """Would `save_pretrained`/`from_pretrained` accept the config? (strict configs validate, e.g. that
    hidden_size is a multiple of num_attention_heads, even where head_dim is explicit)."""
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
    except Exception:
        return False
    return True


def shapes_match(model: nn.Module) -> bool:
    """Would `type(model)(model.config)` have exactly the parameter shapes of `model`?"""
    if has_patched_modules(model):
        return False
    try:
        fresh = build_on_meta(type(model), model.config)
    except Exception:
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return mine == theirs


def has_patched_modules(model: nn.Module) -> bool:
    return any(
        isinstance(m, PATCHED) or getattr(m, "_dgate_head_inputs", None)
        or getattr(m, "_dgate_rescaled", False)  # an RMSNorm's epsilon that no config field holds
        for m in model.modules()
    )


def reload_problem(model: nn.Module) -> str | None:
    """Why the export, once saved, would not load back into exactly its shapes (None: it would).

    Rehearsed on the meta device the way the loaders build it: the config through a save/load round trip (strict
    configs validate there), the class built from it with its weights initialised (transformers runs the family's
    init on load, and some inits cannot run on the pruned config), shrunk to the record where the config cannot say
    the shape (`AutoPrunedModel`); every tensor name and shape must then equal the export's. An export that fails
    this is refused at export, never written to fail on load."""
    from .loading import rebuild_structure
    from .recording import read_record

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not hasattr(model, "save_pretrained"):
        return None
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
        again = type(cfg).from_dict(cfg.to_dict())
    except Exception as e:  # noqa: BLE001 - any failure is the reason
        return f"its config does not survive saving and loading ({_short(e)})"
    record = read_record(model) or {}
    try:
        fresh = build_on_meta(type(model), again)
    except Exception as e:  # noqa: BLE001
        return f"{type(model).__name__} cannot be built from its config ({_short(e)})"
    if record and not record.get("native", True):
        try:
            with torch.device("cpu"):
                rebuild_structure(fresh, record)
        except Exception as e:  # noqa: BLE001
            return f"the pruned structure cannot be rebuilt from its record ({_short(e)})"
    init = getattr(fresh, "initialize_weights", None)  # the loader initialises the shrunk model (once)
    try:
        if callable(init):
            init()
    except (ArithmeticError, ValueError, TypeError, KeyError, IndexError) as e:  # (not meta-device limits)
        return f"{type(model).__name__} cannot initialise its weights in the pruned shapes ({_short(e)})"
    except Exception:  # noqa: BLE001 - an init the meta device cannot run says nothing about loading
        pass
    switched = _switch_like(model, fresh)
    fresh_modules = dict(fresh.named_modules())
    for name in switched:  # the attention the switch built must have the export's head counts
        for rel, m in model.get_submodule(name).named_children():
            f = fresh_modules.get(f"{name}.{rel}")
            sizes = {k: v for k, v in vars(m).items() if k in SIZE_ATTRS and isinstance(v, int)}
            theirs = {k: vars(f).get(k) for k in sizes} if f is not None else {}
            if f is not None and sizes != theirs:
                return (f"'{name}.{rel}' would have {theirs} after {type(m).__name__} is rebuilt at run time, the "
                        f"export has {sizes}")
    for name, m in model.named_modules():  # the config builds other modules
        f = fresh_modules.get(name)
        weighted = next(m.parameters(), None) is not None  # (a drop path that is Identity at rate 0 does not count)
        if f is not None and weighted and _base_class(m) is not _base_class(f):
            return (f"its config builds {_base_class(f).__name__} at '{name}' where the export has "
                    f"{_base_class(m).__name__}")
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        shown = ", ".join(f"{k} {mine.get(k, 'absent')} vs {theirs.get(k, 'absent')}" for k in diff[:3])
        return f"the reloaded model would have other tensors than the export ({len(diff)}: {shown})"
    return None


SIZE_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "attention_head_size", "head_dim",
              "all_head_size", "num_key_value_heads")


def _switch_like(model: nn.Module, fresh: nn.Module) -> list[str]:
    """Put the freshly built model's run-time attention switches where the export's are: BigBird's config builds
    block-sparse attention and its forward swaps in full attention for short inputs (`set_attention_type`, from the
    config), so an export made after a short input holds the full one. The names of the modules switched."""
    fresh_modules = dict(fresh.named_modules())
    switched = []
    for name, m in model.named_modules():
        f = fresh_modules.get(name)
        kind = getattr(m, "attention_type", None)
        if f is not None and isinstance(kind, str) and callable(getattr(f, "set_attention_type", None)):
            if getattr(f, "attention_type", None) != kind:
                switched.append(name)
    for name in switched:  # outer first (named_modules order); inner ones are switched along
        f = fresh.get_submodule(name)
        if f.attention_type != model.get_submodule(name).attention_type:
            with torch.device("meta"):
                f.set_attention_type(model.get_submodule(name).attention_type)
    return switched


def _base_class(m: nn.Module) -> type:
    """The module's class without hf_dgate's no-head / no-input / kept-heads subclass."""
    cls = type(m)
    return cls.__mro__[1] if issubclass(cls, PATCHED) else cls


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
