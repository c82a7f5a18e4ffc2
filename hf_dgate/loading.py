"""Loading exports: `AutoPrunedModel` rebuilds any recorded pruned structure, and a generated modeling file
lets people without hf_dgate load it with `trust_remote_code=True`."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .compat import HAS_HF_PRUNE_HEADS
from .export import ExportError, pruned_structure
from .pruned_modules import shrink
from .record import RECORD_KEY, PruningRecord, RebuildSpec, RecordError
from .recording import rebuild_spec
from .registry import PRUNED_MODEL_TYPE_PREFIX


# ---- reload ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def rebuild_structure(model: nn.Module, structure: dict[str, Any] | PruningRecord) -> nn.Module:
    """Shrink a freshly built model to a recorded pruned structure (its weights are loaded afterwards): the
    record's rebuild spec applied by `pruned_modules.shrink`, as every reload does (a record written before version
    3 is first translated into one, legacy_records.py)."""
    record = structure if isinstance(structure, PruningRecord) else PruningRecord.from_dict(structure)
    shrink(model, rebuild_spec_for(record, type(model), model.config))
    return model


def rebuild_spec_for(record: PruningRecord, model_class: type, config: Any) -> RebuildSpec:
    """The spec `shrink` applies to `model_class` built from `config`: the record's own when the class is the one
    the export was saved from (the spec names its modules), else translated from the per-layer lists."""
    archs = getattr(config, "architectures", None) or [None]
    name = getattr(model_class, "__name__", None)
    spec = record.rebuild
    # heads removed by transformers 4.x's own prune_heads are rebuilt there from config.pruned_heads, so a spec
    # written on 4.x leaves them out; transformers 5 does not rebuild them: the lists say what to remove
    hf_heads = not HAS_HF_PRUNE_HEADS and any(st.hf_pruned_heads for st in record.stacks.values())
    if spec is not None and (spec.model_class or archs[0]) == name and not hf_heads:
        return spec
    exported = name == archs[0]
    from .legacy_records import rebuild_from_lists

    return RebuildSpec.from_dict(rebuild_from_lists(record, model_class, config, exported=exported))


class AutoPrunedModel:
    """Loads what `export_pruned(...).save_pretrained(dir)` wrote, any pruned structure included.

    Models whose shape the config expresses natively load through the usual `from_pretrained`; for the rest
    (different head or neuron counts per layer, layers without heads) the model is built from the config,
    shrunk by the rebuild spec recorded in `config.dgate_pruning` (`pruned_modules.shrink`, the code the generated
    loader runs too), and the safetensors weights are loaded into it.
    """

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, model_class: type | None = None, **kwargs: Any
    ) -> nn.Module:

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.md"])
        config = kwargs.pop("config", None) or _base_config(path)
        model_class = model_class or _architecture_class(config, path)
        try:
            structure = PruningRecord.read(config)
        except RecordError as e:
            raise ExportError(f"{path!r}: {e}") from None
        want_info = bool(kwargs.pop("output_loading_info", False))
        if structure is None or structure.native:
            model, info = model_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
            _check_complete(path, model_class, info)
            return (model, info) if want_info else model
        # transformers' own loader (key renaming, shards, dtype, device_map) on a class that shrinks itself to the
        # recorded structure right after construction; the instance gets its plain class back afterwards.
        spec = rebuild_spec_for(structure, model_class, config)
        shrinking = type(
            model_class.__name__,
            (model_class,),
            {"__init__": _shrinking_init(model_class, spec), "__module__": model_class.__module__},
        )
        model, info = shrinking.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
        model.__class__ = model_class
        _check_complete(path, model_class, info)
        return (model, info) if want_info else model


def _check_complete(path: str, model_class: type, info: dict[str, Any]) -> None:
    """Refuse a load that left tensors random or dropped some: transformers only logs them, and a model whose class
    the config names wrongly (or whose keys another class renames) would come back half initialised."""
    from .saving import check_loading_info

    remedy = (f"The export is damaged, or {model_class.__name__} does not read its weights: pass "
              "AutoPrunedModel.from_pretrained(dir, model_class=...).")  # fmt: skip
    check_loading_info(path, info, remedy, ExportError)


def _base_config(path: str) -> Any:
    """The export's config as its base family's config class: an export saved under its own model type
    ("dgate_pruned_llama", see `save_pruned`) is read as the model type it records, without running its code."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict, _ = transformers.PretrainedConfig.get_config_dict(path)
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or not model_type.startswith(PRUNED_MODEL_TYPE_PREFIX):
        return transformers.AutoConfig.from_pretrained(path)
    try:
        record = PruningRecord.read(config_dict)
    except RecordError as e:
        raise ExportError(f"{path!r}: {e}") from None
    base = record.base_model_type if record is not None else None
    if base not in CONFIG_MAPPING or PRUNED_MODEL_TYPE_PREFIX + base != model_type:
        raise ExportError(
            f"{path!r} has model type {model_type!r} but records base model type {base!r}, which does not match it "
            "or is unknown to this transformers: the config was edited or comes from a newer transformers."
        )
    return CONFIG_MAPPING[base].from_dict({**config_dict, "model_type": base})


def _shrinking_init(model_class: type, spec: RebuildSpec):
    def __init__(self, config, *args, **kwargs):  # noqa: N807
        model_class.__init__(self, config, *args, **kwargs)
        with torch.no_grad():
            shrink(self, spec)  # as the generated loader's class does

    return __init__


def _architecture_class(config: Any, path: str) -> type:
    model_class = transformers_model_class(config)
    if model_class is None:
        raise ExportError(
            f"Cannot tell the model class of {path!r}; pass AutoPrunedModel.from_pretrained(dir, model_class=...)."
        )
    return model_class


def transformers_model_class(config: Any) -> type | None:
    """The transformers model class named by `config.architectures[0]`, or None: only a real `PreTrainedModel`
    subclass exported by transformers counts (the name comes from a file, so anything else is refused)."""
    import transformers

    archs = getattr(config, "architectures", None)
    arch = archs[0] if isinstance(archs, (list, tuple)) and archs else None
    if not isinstance(arch, str) or not arch.isidentifier() or arch.startswith("_"):
        return None
    model_class = getattr(transformers, arch, None)
    ok = isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    return model_class if ok else None


# ---- trust_remote_code loader for people without hf_dgate ------------------------------------------------------
REMOTE_CODE_FILE = "modeling_dgate_pruned.py"
FUTURE_IMPORT = "from __future__ import annotations\n"
AUTO_CLASSES = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "AutoModelForMaskedLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForSequenceClassification",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "AutoModelForTokenClassification",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "AutoModelForQuestionAnswering",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "AutoModelForImageClassification",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "AutoModelForSeq2SeqLM",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES": "AutoModelForSpeechSeq2Seq",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "AutoModelForImageTextToText",
    "MODEL_MAPPING_NAMES": "AutoModel",
}

REMOTE_CODE_HEADER = '''"""Generated by hf_dgate: loads this pruned model without hf_dgate (trust_remote_code=True).

The model is built from config.json as usual, then shrunk to the pruned shapes recorded in
`config.dgate_pruning["rebuild"]` before the weights are loaded, as hf_dgate.AutoPrunedModel does. Below:
hf_dgate's own pruned_modules.py and record.py (the pruning record's class, which checks the record as hf_dgate
does), copied verbatim, then the model class.
"""

from __future__ import annotations
'''

REMOTE_CODE_FOOTER = """

# ---- the model class ----------------------------------------------------------------------------------------
import transformers as _transformers  # noqa: E402

_Base = getattr(_transformers, {base_literal})
_BaseConfig = getattr(_transformers, {config_base_literal})


# the base family's config under the export's own model type: transformers runs this file only for a model type
# it does not know, so a plain from_pretrained stops and asks for trust_remote_code=True
class {config_cls}(_BaseConfig):
    model_type = {pruned_type_literal}


class {cls}(_Base):
    config_class = {config_cls}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        try:  # read through hf_dgate's record class (record.py above): every version and field checked there
            record = PruningRecord.from_dict(getattr(config, RECORD_KEY, None))
        except RecordError as e:
            raise ValueError(f"config.dgate_pruning is not a pruning record this loader reads ({{e}})") from None
        shrink(self, record.rebuild)


try:  # transformers >= 5 renames legacy checkpoint keys only for its own classes unless a mapping is registered
    from transformers import conversion_mapping as _cm

    # registered the way the base class finds it: by class name, or by the model type, which nested sub-models
    # (Step 3.7's Step3p7Model) share, so that transformers applies the renames once and not once per level
    _conversions = _cm.get_checkpoint_conversion_mapping({base_literal})
    if _conversions:
        _cm.register_checkpoint_conversion_mapping({cls_literal}, _conversions, overwrite=True)
    else:
        _conversions = _cm.get_checkpoint_conversion_mapping({model_type_literal})
        if _conversions:
            _cm.register_checkpoint_conversion_mapping({cls}.config_class.model_type, _conversions, overwrite=True)
except ImportError:
    pass
"""


def remote_code_source(base: str, cls: str, model_type: str, config_base: str) -> str:
    """The generated file: header, pruned_modules.py and record.py as shipped, and classes whose names are string
    literals."""
    from . import pruned_modules, record

    with open(pruned_modules.__file__) as f:
        shared = f.read()
    with open(record.__file__) as f:  # its own __future__ import is the generated file's (the header has it)
        shared += "\n\n" + f.read().replace(FUTURE_IMPORT, "", 1)
    footer = REMOTE_CODE_FOOTER.format(
        cls=cls,
        config_cls=cls + "Config",
        base_literal=repr(base),
        config_base_literal=repr(config_base),
        model_type_literal=repr(model_type),
        pruned_type_literal=repr(PRUNED_MODEL_TYPE_PREFIX + model_type),
        cls_literal=repr(cls),
    )
    return REMOTE_CODE_HEADER + shared + footer


def save_pruned(model: nn.Module, directory: str | os.PathLike, remote_code: bool = True) -> str | None:
    """`model.save_pretrained(directory)` for an export. A non-native one (per-layer shapes the config cannot say)
    also gets the generated loader (`write_remote_code`) and is saved under its own model type,
    "dgate_pruned_<model type>": a plain `AutoModel*.from_pretrained` then stops before reading any weight with
    transformers' request for `trust_remote_code=True`, instead of a size mismatch. `hf_dgate.AutoPrunedModel`
    reads it either way. Returns the generated loader's Auto class, or None."""
    from .codefree import no_code_references, strip_code_references

    structure = pruned_structure(model) or {}
    auto_class = write_remote_code(model, directory) if remote_code and not structure.get("native", True) else None
    with no_code_references(model):  # a source model's remote code is not the export's (hf_dgate/codefree.py)
        model.save_pretrained(directory)
    strip_code_references(directory, REMOTE_CODE_FILE[:-3] if auto_class else None)
    if auto_class:
        _own_model_type(model, directory)
    return auto_class


def _own_model_type(model: nn.Module, directory: str | os.PathLike) -> None:
    """Rewrite the saved config.json: the pruned model type, its generated config class in `auto_map`, and the
    base model type in the pruning record (AutoPrunedModel maps it back). The in-memory config is left alone."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        saved = json.load(f)
    base = saved_model_type(model)[0]
    module, _, cls = saved["auto_map"][next(iter(saved["auto_map"]))].rpartition(".")
    saved["model_type"] = PRUNED_MODEL_TYPE_PREFIX + base
    saved["auto_map"] = {"AutoConfig": f"{module}.{cls}Config", **saved["auto_map"]}
    saved[RECORD_KEY]["base_model_type"] = base
    with open(path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")


def saved_model_type(model: nn.Module) -> tuple[str | None, type | None]:
    """(model type, config class) an export is saved under: the class's own, except where the instance's config is
    transformers' registered config of another model type (EXAONE, Param2MoE and Sarvam-MoE run Llama's or
    GLM-4-MoE's class on their own config): their checkpoint key renames are keyed by that model type, so saving
    under the class's would write keys the reload does not rename back. Never a string taken from a config.json
    alone: the type must map to exactly the instance's config class in transformers' registry."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = getattr(type(model), "config_class", None)
    own = getattr(model.config, "model_type", None)
    if isinstance(own, str) and own in CONFIG_MAPPING and CONFIG_MAPPING[own] is type(model.config):
        return own, type(model.config)
    return getattr(config_class, "model_type", None), config_class


def write_remote_code(model: nn.Module, directory: str | os.PathLike) -> str | None:
    """Add a generated `modeling_dgate_pruned.py` and the config's `auto_map` so that
    `AutoModel*.from_pretrained(dir, trust_remote_code=True)` loads a pruned structure without hf_dgate.
    Call it before `save_pretrained` (it edits the config), or use `save_pruned`, which also gives the saved config
    its own model type; returns the Auto class name or None when unsupported.

    Whoever loads the export runs this file, so nothing from the config reaches it as code: the class names must be
    transformers classes, the model type is the class's own (checked against transformers' registry) and all are
    written as string literals; the pruned shapes stay data in config.json, checked by the template when read.
    Any other `auto_map` entry is dropped: the export's only remote code is this file."""
    import transformers
    import transformers.models.auto.modeling_auto as auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    base = type(model).__name__
    auto_class = next((cls for table, cls in AUTO_CLASSES.items() if base in getattr(auto, table, {}).values()), None)
    if auto_class is None or not base.isidentifier() or getattr(transformers, base, None) is not type(model):
        return None
    structure = getattr(model.config, RECORD_KEY, None)
    if not isinstance(structure, dict):
        return None
    model_type, config_class = saved_model_type(model)
    config_base = getattr(config_class, "__name__", "")
    if not config_base.isidentifier() or getattr(transformers, config_base, None) is not config_class:
        return None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ExportError(
            f"{base} has no model type transformers knows ({model_type!r}), so no loader can be generated for it; "
            "export with remote_code=False and load with hf_dgate.AutoPrunedModel."
        )
    spec = rebuild_spec(model)  # (refreshed: the model as saved)
    if spec is None:
        return None
    structure["rebuild"] = spec
    cls = f"DGatePruned{base}"
    model.config.auto_map = {auto_class: f"{REMOTE_CODE_FILE[:-3]}.{cls}"}
    if not cls.isidentifier():
        return None
    source = remote_code_source(base, cls, model_type, config_base)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, REMOTE_CODE_FILE), "w") as f:
        f.write(source)
    return auto_class
