"""Loading exports: `AutoPrunedModel` rebuilds any recorded pruned structure, and a generated modeling file
lets people without hf_dgate load it with `trust_remote_code=True`."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from .architectures import find_group_sets
from .config import DGateConfig
from .export import (
    PRUNING_KEY,
    ExportError,
    ZeroHeadAttention,
    ZeroInputConv1D,
    prune_head_group_set,
    prune_neuron_group_set,
)


# ---- reload ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def rebuild_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Shrink a freshly built model to a recorded pruned structure (which positions stay is irrelevant here:
    the weights are loaded afterwards)."""
    if not structure.get("heads") and not structure.get("neurons"):
        return model
    dconfig = DGateConfig(target=["heads", "neurons"], module_names=structure.get("module_names"))
    with torch.device("cpu"):  # index vectors stay on the CPU even while transformers builds on "meta"
        sets = find_group_sets(model, dconfig)
    n_kv, neurons = structure.get("kv_heads", []), structure.get("neurons", [])
    for gs in sets:
        layer = int(gs.layer)
        if gs.target == "heads" and layer < len(n_kv):
            want = n_kv[layer]
        elif gs.target == "neurons" and layer < len(neurons):
            want = neurons[layer]
        else:
            continue
        if want > gs.n_groups:
            raise ExportError(
                f"The recorded structure keeps {want} {gs.target} in layer {layer} but the config builds only "
                f"{gs.n_groups}: the config does not match the weights."
            )
        if want == gs.n_groups:
            continue
        dead = torch.arange(gs.n_groups, device="cpu") >= want
        # (a layer left with no head gets its bias-only forward here, as in the export)
        (prune_head_group_set if gs.target == "heads" else prune_neuron_group_set)(model, gs, dead)
    return model


class AutoPrunedModel:
    """Loads what `export_pruned(...).save_pretrained(dir)` wrote, any pruned structure included.

    Models whose shape the config expresses natively load through the usual `from_pretrained`; for the rest
    (different head or neuron counts per layer, layers without heads) the model is built from the config,
    shrunk to the structure recorded in `config.dgate_pruning`, and the safetensors weights are loaded into it.
    """

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, model_class: type | None = None, **kwargs: Any
    ) -> nn.Module:
        import transformers

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.md"])
        config = transformers.AutoConfig.from_pretrained(path)
        model_class = model_class or _architecture_class(config, path)
        structure = getattr(config, PRUNING_KEY, None)
        if not isinstance(structure, dict) or structure.get("native", False):
            return model_class.from_pretrained(path, **kwargs)
        # transformers' own loader (key renaming, shards, dtype, device_map) on a class that shrinks itself to the
        # recorded structure right after construction; the instance gets its plain class back afterwards.
        shrinking = type(
            model_class.__name__,
            (model_class,),
            {"__init__": _shrinking_init(model_class, structure), "__module__": model_class.__module__},
        )
        model = shrinking.from_pretrained(path, **kwargs)
        model.__class__ = model_class
        return model


def _shrinking_init(model_class: type, structure: dict[str, Any]):
    def __init__(self, config, *args, **kwargs):  # noqa: N807
        model_class.__init__(self, config, *args, **kwargs)
        rebuild_structure(self, structure)

    return __init__


def _architecture_class(config: Any, path: str) -> type:
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, arch, None) if arch else None
    if model_class is None:
        raise ExportError(
            f"Cannot tell the model class of {path!r}; pass AutoPrunedModel.from_pretrained(dir, model_class=...)."
        )
    return model_class


# ---- trust_remote_code loader for people without hf_dgate ------------------------------------------------------
REMOTE_CODE_FILE = "modeling_dgate_pruned.py"
AUTO_CLASSES = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "AutoModelForMaskedLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForSequenceClassification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "AutoModelForTokenClassification",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "AutoModelForQuestionAnswering",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForImageClassification",
    "MODEL_MAPPING_NAMES": "AutoModel",
}

REMOTE_CODE_TEMPLATE = '''"""Generated by hf_dgate: loads this pruned {base} without hf_dgate (trust_remote_code=True).

The model is built from config.json as usual, then every tensor, attribute and attention layer listed in
`config.dgate_pruning["remote"]` is shrunk to its pruned shape before the weights are loaded.
"""

import torch
from torch import nn
from transformers import {base} as _Base


def _no_head_forward(self, hidden_states=None, *args, **kwargs):
    # an attention layer with no head left: its output is the output projection's bias
    if hidden_states is None:
        hidden_states = kwargs.pop("hidden_states")
    cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
    layer_idx = getattr(self, "layer_idx", None)
    if cache is not None and layer_idx is not None and hasattr(cache, "update"):
        cache = getattr(cache, "self_attention_cache", cache)
        marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
        cache.update(marker, marker, layer_idx)  # keeps the cache length right
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    out = self.get_submodule(self._dgate_out)(context) if self._dgate_out else context
    return out, None


def _no_input_forward(self, x):
    return x.new_zeros(*x.shape[:-1], self.nf) + self.bias.to(x.dtype)


def _shrink(model, spec):
    for name, shape in spec["shapes"].items():
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, param)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(module, param, nn.Parameter(new, requires_grad=old.requires_grad))
    for module_name, attrs in spec["attrs"].items():
        module = model.get_submodule(module_name)
        for key, value in attrs.items():
            setattr(module, key, value)
    for module_name, out in spec["no_head"].items():
        module = model.get_submodule(module_name)
        module._dgate_out = out
        cls = type(module)
        module.__class__ = type("NoHead" + cls.__name__, (cls,), {{"forward": _no_head_forward}})
    for module_name in spec["no_input"]:
        module = model.get_submodule(module_name)
        cls = type(module)
        module.__class__ = type("NoInput" + cls.__name__, (cls,), {{"forward": _no_input_forward}})


class {cls}(_Base):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _shrink(self, config.dgate_pruning["remote"])


try:  # transformers >= 5 renames legacy checkpoint keys only for its own classes unless a mapping is registered
    from transformers import conversion_mapping as _cm

    _conversions = _cm.get_checkpoint_conversion_mapping("{base}")
    _conversions = _conversions or _cm.get_checkpoint_conversion_mapping("{model_type}")
    if _conversions:
        _cm.register_checkpoint_conversion_mapping("{cls}", _conversions, overwrite=True)
except ImportError:
    pass
'''


def remote_code_spec(model: nn.Module) -> dict[str, Any]:
    """What a fresh `type(model)(config)` must change to become `model`: tensor shapes, int attributes, no-head
    attention layers and no-input Conv1Ds. Found by comparing with a fresh build on the meta device."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    fresh_params = dict(fresh.named_parameters())
    shapes = {
        n: list(p.shape)
        for n, p in model.named_parameters()
        if n in fresh_params and tuple(fresh_params[n].shape) != tuple(p.shape)
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
        if diff:
            attrs[name] = diff
    no_head = {n: m._dgate_out for n, m in model.named_modules() if isinstance(m, ZeroHeadAttention)}
    no_input = [n for n, m in model.named_modules() if isinstance(m, ZeroInputConv1D)]
    return {"shapes": shapes, "attrs": attrs, "no_head": no_head, "no_input": no_input}


def write_remote_code(model: nn.Module, directory: str | os.PathLike) -> str | None:
    """Add a generated `modeling_dgate_pruned.py` and the config's `auto_map` so that
    `AutoModel*.from_pretrained(dir, trust_remote_code=True)` loads a pruned structure without hf_dgate.
    Call it before `save_pretrained` (it edits the config); returns the Auto class name or None when unsupported."""
    import transformers.models.auto.modeling_auto as auto

    base = type(model).__name__
    auto_class = next((cls for table, cls in AUTO_CLASSES.items() if base in getattr(auto, table, {}).values()), None)
    if auto_class is None or getattr(__import__("transformers"), base, None) is not type(model):
        return None
    structure = getattr(model.config, PRUNING_KEY, None)
    if not isinstance(structure, dict):
        return None
    structure["remote"] = remote_code_spec(model)
    cls = f"DGatePruned{base}"
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    auto_map[auto_class] = f"{REMOTE_CODE_FILE[:-3]}.{cls}"
    model.config.auto_map = auto_map
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, REMOTE_CODE_FILE), "w") as f:
        f.write(REMOTE_CODE_TEMPLATE.format(base=base, cls=cls, model_type=model.config.model_type))
    return auto_class
