"""Everything that differs between the transformers lines hf_dgate supports (4.57.x and 5.x), in one place.

Each difference is detected from the installed library (a method, a property, the layout of a module), never
from a version number, so a backport or a later 4.x behaves as what it is. What the differences mean for users:
docs/transformers_versions.md.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from functools import cache
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

try:  # the config base class was renamed in 5.x; the old name stays as an alias there
    from transformers import PreTrainedConfig as _ConfigBase
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _ConfigBase

__all__ = [
    "HAS_HF_PRUNE_HEADS",
    "HAS_PER_LAYER_CONFIG",
    "TRANSFORMERS_VERSION",
    "build_on_meta",
    "config_value",
    "experts_list",
    "hf_prune_heads",
    "input_width_reshape",
    "output_width_attrs",
    "per_layer_overrides",
    "rekey_per_layer_config",
    "rekey_pruned_heads",
    "set_per_layer_overrides",
]

TRANSFORMERS_VERSION: str = transformers.__version__

# transformers 4.x: `PreTrainedModel.prune_heads` records `config.pruned_heads` and `from_pretrained` re-applies
# it, so a model with different head counts per layer reloads with the plain Auto classes. 5.x removed both.
HAS_HF_PRUNE_HEADS: bool = callable(getattr(PreTrainedModel, "prune_heads", None))

# transformers 5.x (recent): `config.per_layer_config` overrides fields per layer for the families whose modeling
# code reads it; whether a family does is found by building it (native.make_native), not assumed.
HAS_PER_LAYER_CONFIG: bool = isinstance(getattr(_ConfigBase, "per_layer_config", None), property)


def per_layer_overrides(config: Any) -> dict[int, dict[str, Any]] | None:
    """The fields a heterogeneous config (5.x `per_layer_config`) overrides per layer, or None where it has none."""
    spec = vars(config).get("_heterogeneity_spec") if HAS_PER_LAYER_CONFIG else None
    return copy.deepcopy(spec.per_layer_overrides) if spec is not None else None


def set_per_layer_overrides(config: Any, overrides: dict[int, dict[str, Any]] | None) -> None:
    """Replace a config's per-layer overrides (None or {}: a homogeneous config again)."""
    config.per_layer_config = overrides or None


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """`config.<key>`, also where a heterogeneous config varies it per layer (the global value then; transformers
    raises on plain access there, so per-layer readers use `config.per_layer_config[i]`)."""
    read = getattr(config, "_getattr_without_heterogeneous_validation", None)
    if read is not None:
        return read(key, default)
    return getattr(config, key, default)


def rekey_per_layer_config(config: Any, kept_layers: list[int]) -> None:
    """After layers were dropped: move each layer's overrides to the layer's new position (call it once the
    config counts the kept layers)."""
    overrides = per_layer_overrides(config)
    if overrides:
        new_pos = {old: new for new, old in enumerate(kept_layers)}
        set_per_layer_overrides(config, {new_pos[i]: v for i, v in overrides.items() if i in new_pos})


def hf_prune_heads(model: nn.Module, heads_to_prune: dict[int, list[int]]) -> bool:
    """Prune with the model's own `prune_heads` where its transformers has one (4.x); False where it has none or
    the family leaves it unimplemented (DeBERTa-v2), with `config.pruned_heads` left as it was.

    Heads are in their original numbering and layers in their current position, as transformers expects."""
    heads_to_prune = {int(k): sorted(int(h) for h in v) for k, v in heads_to_prune.items() if v}
    base = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if not HAS_HF_PRUNE_HEADS or base is None or not callable(getattr(base, "_prune_heads", None)):
        return False
    if not isinstance(getattr(config, "pruned_heads", None), dict):
        return False
    if not heads_to_prune:
        return True
    before = copy.deepcopy(config.pruned_heads)
    try:
        model.prune_heads(heads_to_prune)
    except NotImplementedError:  # transformers updates the config before it finds out
        config.pruned_heads = before
        return False
    config.pruned_heads = {int(k): sorted(int(h) for h in v) for k, v in config.pruned_heads.items()}
    return True


def build_on_meta(model_class: type, config: Any) -> nn.Module:
    """`model_class(config)` with its parameters on the meta device (shapes only, no memory).

    A 4.x config with `pruned_heads` prunes while it is built, and transformers' head pruning computes its index
    vectors with boolean masks that the meta device cannot evaluate: those are built on the CPU and applied to the
    meta model afterwards."""
    config = copy.deepcopy(config)
    pruned = getattr(config, "pruned_heads", None) if HAS_HF_PRUNE_HEADS else None
    if pruned:
        config.pruned_heads = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # a layer left with no units
        try:
            with torch.device("meta"):
                model = model_class(config)
        except (NotImplementedError, RuntimeError) as e:
            # a module reading a value off a tensor it just made (Apertus' xIELU in 4.x: `.item()` of a buffer):
            # parameters on meta, buffers real, as transformers' own loader builds it (accelerate's helper)
            if "meta" not in str(e):
                raise
            try:
                from accelerate import init_empty_weights
            except ImportError:
                raise e from None
            with init_empty_weights(include_buffers=False):
                model = model_class(config)
    if pruned:
        with torch.device("cpu"):
            model.prune_heads({int(k): list(v) for k, v in pruned.items()})
    return model


def rekey_pruned_heads(config: Any, kept_layers: list[int]) -> None:
    """After layers were dropped: `config.pruned_heads` is keyed by layer position, so move each entry to the
    layer's new position and forget the dropped ones (transformers re-applies it layer by layer on load)."""
    pruned = getattr(config, "pruned_heads", None)
    if not isinstance(pruned, dict) or not pruned:
        return
    new_pos = {old: new for new, old in enumerate(kept_layers)}
    config.pruned_heads = {new_pos[int(k)]: v for k, v in pruned.items() if int(k) in new_pos}


@cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (AttributeError, OSError, TypeError):
        return ""


def output_width_attrs(module: nn.Module) -> tuple[str, ...]:
    """Attributes holding the attention width (heads x head size) that the module's forward reshapes with.

    transformers 5 reshapes with -1; some 4.x attention classes use `self.hidden_size` (Qwen2-MoE, OLMoE) or
    `self.dim` (DistilBERT), which must follow the number of heads left."""
    src = _forward_source(type(module))
    found = []
    for attr in ("hidden_size", "embed_dim", "dim", "d_model_size"):
        shaped = re.search(rf"\.(view|reshape)\([^()]*self\.{attr}\b", src)
        per_head = re.search(rf"self\.{attr}\s*//\s*self\.n(um)?_heads", src)
        if isinstance(getattr(module, attr, None), int) and (shaped or per_head):
            found.append(attr)
    return tuple(found)


def input_width_reshape(module: nn.Module) -> bool:
    """Does the module reshape its attention output to the width of its input (`embed_dim` read off
    `hidden_states`)? Then it cannot run with fewer heads (CLIP's attention in transformers 4.x)."""
    src = _forward_source(type(module))
    named = re.search(r"\b(\w+)\s*=\s*\w*hidden_states\.shape\[(2|-1)\]", src)  # PEGASUS-X: a field of its
    if named and re.search(rf"\.(reshape|view)\([^()]*,\s*(\w+\.)?{named.group(1)}\)", src):  # dimensions
        return True
    reads = re.search(r"\w+,\s*\w+,\s*(\w+)\s*=\s*(hidden_states|query)\.(shape|size\(\))", src)
    if not reads:
        return False
    width = re.escape(reads.group(1))  # embed_dim (CLIP 4.x), num_channels (PVTv2)
    return bool(re.search(rf"\.(reshape|view)\([^()]*,\s*{width}\)", src))


def fixed_shards(module: nn.Module) -> int | None:
    """The number of shards a module's forward splits its fused query/key/value into when that number is a literal
    of the source, not the head count (CodeGen's `mp_num = 4` in transformers 4.x: each shard holds an equal share
    of the heads, so only head counts that keep the shares equal can run); None otherwise."""
    src = _forward_source(type(module))
    for m in re.finditer(r"\b(\w+)\s*=\s*(\d+)\b", src):
        if re.search(rf"\.(reshape|view)\([^\n]*\(\s*{m.group(1)}\s*,\s*-1\s*\)", src):
            return int(m.group(2))
    return None


def experts_list(experts: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The routed experts as (name, MLP module) pairs when they are stored as a list of modules (transformers
    4.x), None when stored as stacked tensors (5.x)."""
    if not isinstance(experts, nn.ModuleList):
        return None
    return [(str(i), m) for i, m in enumerate(experts)]
