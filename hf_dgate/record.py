"""The pruning record: what an export removed, stored as `config.dgate_pruning` in the export's config.json.

One typed class for every reader (AutoPrunedModel's rebuild, the generated trust_remote_code loader, the
native-config edit, the model card, the CLI report): `PruningRecord.from_dict` reads both layouts written so far,
and `to_dict` writes the same layout back (key for key, unknown keys kept), so exports made by earlier versions
load unchanged.
- version 1: one block stack; the per-layer lists sit at the top level next to the export's settings;
- version 2: several block stacks (encoder/decoder, text/vision towers); `stacks` maps each stack's module path
  to its per-layer lists.
- version 3 (written now): either layout (`stacks` present: several stacks), plus `rebuild` (`RebuildSpec`): what a
  model freshly built from the saved config must change to take the pruned shapes (tensor shapes, int attributes,
  modules left without heads or inputs). Every reload rebuilds from it, through `pruned_modules.shrink`:
  AutoPrunedModel and the generated loader alike. Records without it (versions 1 and 2) are translated into one by
  `legacy_records.rebuild_from_lists`, from their per-layer lists.
A record of a version this code does not know is refused: guessing its meaning could rebuild the wrong shapes.
Plain data only (no torch, standard library only): the CLI reads it without loading a model, and the export copies
this file verbatim into its generated `modeling_dgate_pruned.py` (loading.remote_code_source).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

RECORD_KEY = "dgate_pruning"
SINGLE_STACK, MULTI_STACK = 1, 2  # the layouts' version numbers before the rebuild spec
WITH_REBUILD = 3  # either layout, plus `rebuild`
CURRENT = WITH_REBUILD
VERSIONS = (SINGLE_STACK, MULTI_STACK, WITH_REBUILD)
HF_PRUNED_HEADS = "hf_pruned_heads"  # heads removed by transformers' own prune_heads (4.x): config.pruned_heads


class RecordError(ValueError):
    """A `config.dgate_pruning` that cannot be read as written (another version, a malformed field)."""


@dataclass
class StackRecord:
    """Per current layer of one block stack, what the export kept (head numbers in the original numbering)."""

    heads: list[list[int]] | None = None  # kept query heads
    kv_heads: list[int] | None = None  # kept key/value heads (GQA groups)
    head_dim: int | None = None
    neurons: list[int | None] | None = None  # dense MLP width (None: a layer without one)
    cross_heads: list[list[int]] | None = None
    cross_kv_heads: list[int] | None = None
    experts: list[int | None] | None = None  # routed experts kept (None: a dense layer of a mixed family)
    expert_units: list[int | None] | None = None  # units per expert
    layers: list[int] | None = None  # original index of each kept layer
    num_hidden_layers_original: int | None = None
    dead_layers_kept: list[int] | None = None  # zeroed layers kept as identity blocks
    hf_pruned_heads: bool | None = None  # heads removed by transformers' prune_heads: config.pruned_heads has them
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, written back as read
    present: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # keys read, even if None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = RECORD_KEY) -> StackRecord:
        if not isinstance(data, dict):
            raise RecordError(f"{where} is {type(data).__name__}, not a mapping; re-export the model with hf_dgate.")
        known = _field_names(cls)
        for key in ("heads", "cross_heads", "kv_heads", "neurons", "layers", "experts", "expert_units"):
            if data.get(key) is not None and not isinstance(data[key], list):
                raise RecordError(f"{where}[{key!r}] is not a list; re-export the model with hf_dgate.")
        _check_counts(data, where)
        values = {k: data[k] for k in known if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra, present=frozenset(data))

    def to_dict(self) -> dict[str, Any]:
        return _dump(self)

    def kept(self, key: str) -> list[Any]:
        """The per-layer list `key` ("kv_heads", "neurons", "expert_units", ...), empty when not recorded."""
        return list(getattr(self, key, None) or [])


@dataclass
class RebuildSpec:
    """What a model freshly built from the saved config must change to take the pruned shapes (version 3's
    `rebuild`): found by the export (recording.rebuild_spec), applied by `pruned_modules.shrink`, which checks every
    name and size in it as data, in AutoPrunedModel and the generated loader alike."""

    shapes: dict[str, list[int]]  # parameter or buffer name -> its pruned shape
    attrs: dict[str, dict[str, int | float]]  # module -> int attributes that changed (out_features, num_heads, ...)
    # and the epsilon of an RMSNorm rescaled with the features it lost (float)
    no_head: dict[str, str | None]  # attention modules left with no head -> their output projection (or None)
    no_input: list[str]  # GPT-2 Conv1Ds left with no input feature
    head_configs: dict[str, list[int]] | None = None  # modules given their own [heads, kv heads] config (Phi-3)
    keep_on_switch: list[str] | None = None  # modules whose attention rebuilt at run time keeps its sizes (BigBird)
    model_class: str | None = None  # the class whose module names these are (another class: legacy_records.py)
    head_inputs: dict[str, dict[str, Any]] | None = None  # attention modules -> kept heads of an outside ALiBi bias
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = f"config.{RECORD_KEY}['rebuild']") -> RebuildSpec:
        kinds = {"shapes": dict, "attrs": dict, "no_head": dict, "no_input": list}
        if not isinstance(data, dict) or not all(isinstance(data.get(k), t) for k, t in kinds.items()):
            raise RecordError(f"{where} is not a rebuild spec (shapes, attrs, no_head, no_input); re-export it.")
        if not all(isinstance(data.get(k, {}), dict) for k in ("head_configs", "head_inputs")) or not isinstance(
            data.get("model_class", ""), str
        ):
            raise RecordError(f"{where} has a malformed head_configs, head_inputs or model_class; re-export it.")
        if not isinstance(data.get("keep_on_switch", []), list):
            raise RecordError(f"{where} has a malformed keep_on_switch; re-export it.")
        known = _field_names(cls)
        return cls(**{k: data[k] for k in known if k in data}, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {"shapes": self.shapes, "attrs": self.attrs, "no_head": self.no_head, "no_input": self.no_input}
        for key in ("head_configs", "keep_on_switch", "model_class", "head_inputs"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.extra}


# the export's settings; everything else at the top of a version-1 record belongs to its one stack
_TOP = (
    "version", "module_names", "threshold", "not_removed", "native", "base_model_type", "rebuild", "remote", "stacks"
)


@dataclass
class PruningRecord:
    """What one export removed from a model, per block stack, and how it was made."""

    version: int = SINGLE_STACK
    stacks: dict[str | None, StackRecord] = field(default_factory=dict)  # None: the one stack of a version 1
    module_names: dict[str, Any] | None = None  # DGateConfig.module_names the export used
    threshold: float | None = None
    not_removed: list[str] | None = None  # targets whose zeros were kept (custom GroupRules)
    native: bool | None = None  # the rewritten config builds these shapes by itself
    base_model_type: str | None = None  # set when saved under its own model type ("dgate_pruned_<type>")
    rebuild: RebuildSpec | None = None  # what a fresh build must change; None in records before version 3
    remote: dict[str, Any] | None = None  # versions 1-2: the same spec, written only with the generated loader
    extra: dict[str, Any] = field(default_factory=dict)
    present: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any) -> PruningRecord:
        """Read a record of any known version; a RecordError that says what to do otherwise."""
        if not isinstance(data, dict):
            raise RecordError(f"config.{RECORD_KEY} is not a mapping; re-export the model with hf_dgate.")
        version = data.get("version", SINGLE_STACK)
        if isinstance(version, bool) or version not in VERSIONS:
            raise RecordError(
                f"config.{RECORD_KEY} has version {version!r}, which this hf_dgate cannot read (it reads "
                f"{VERSIONS}); upgrade hf_dgate to load this export."
            )
        top = {k: data[k] for k in _TOP if k in data and k not in ("version", "stacks")}
        if top.get("rebuild") is not None:
            top["rebuild"] = RebuildSpec.from_dict(top["rebuild"])
        if version == MULTI_STACK or (version == WITH_REBUILD and "stacks" in data):
            raw = data.get("stacks")
            if not isinstance(raw, dict):
                raise RecordError(f"config.{RECORD_KEY} has no 'stacks' mapping; re-export the model.")
            stacks = {str(p): StackRecord.from_dict(r, f"{RECORD_KEY}['stacks'][{p!r}]") for p, r in raw.items()}
            extra = {k: v for k, v in data.items() if k not in _TOP}
        else:
            stacks = {None: StackRecord.from_dict({k: v for k, v in data.items() if k not in _TOP})}
            extra = {}  # (unknown top-level keys of a version 1 sit with its stack)
        return cls(version=version, stacks=stacks, **top, extra=extra, present=frozenset(data))

    @classmethod
    def read(cls, config: Any) -> PruningRecord | None:
        """The record of a model config (or its dict), None when the model was not pruned by hf_dgate."""
        data = config.get(RECORD_KEY) if isinstance(config, dict) else getattr(config, RECORD_KEY, None)
        return None if data is None else cls.from_dict(data)

    @property
    def multi_stack(self) -> bool:
        """Several block stacks (`stacks` keyed by module path), not the one stack of a single-stack layout."""
        return self.version == MULTI_STACK or (self.version >= WITH_REBUILD and None not in self.stacks)

    @property
    def single(self) -> StackRecord:
        """The one stack of a version-1 record (an empty StackRecord for version 2)."""
        return self.stacks.get(None, StackRecord()) if not self.multi_stack else StackRecord()

    def to_dict(self) -> dict[str, Any]:
        """The layout `from_dict` read (or that this version writes): one stack flat, several under `stacks`."""
        out: dict[str, Any] = {"version": self.version}
        out.update(_dump(self, skip=("version", "stacks")))
        if self.multi_stack:
            out["stacks"] = {path: rec.to_dict() for path, rec in self.stacks.items()}
        elif None in self.stacks:
            out.update(self.stacks[None].to_dict())
        return out


COUNT_LISTS = ("kv_heads", "neurons", "cross_kv_heads", "experts", "expert_units")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_counts(data: dict[str, Any], where: str) -> None:
    """Every reader trusts these numbers (a negative count would read as "remove everything", a short list would
    leave layers unshrunk): counts are ints >= 0 (or null), head lists hold ints, and each layer's query heads
    split evenly over its key/value heads."""
    for key in COUNT_LISTS:
        for i, v in enumerate(data.get(key) or []):
            if v is not None and not _count(v):
                raise RecordError(f"{where}[{key!r}][{i}] is {v!r} where a count (an int >= 0) belongs; re-export it.")
    for key, kv_key in (("heads", "kv_heads"), ("cross_heads", "cross_kv_heads")):
        heads, kv = data.get(key), data.get(kv_key)
        for i, row in enumerate(heads or []):
            if not isinstance(row, list) or not all(_count(h) for h in row):
                raise RecordError(f"{where}[{key!r}][{i}] is {row!r}, not a list of head numbers; re-export it.")
        if heads and kv is not None:
            if len(kv) != len(heads):
                raise RecordError(
                    f"{where} lists heads for {len(heads)} layers but {kv_key!r} for {len(kv)}; re-export the model."
                )
            for i, (row, n_kv) in enumerate(zip(heads, kv)):
                if n_kv is not None and (len(row) % n_kv if n_kv else len(row)):
                    raise RecordError(
                        f"{where} says layer {i} keeps {len(row)} heads over {n_kv} key/value heads, which cannot "
                        "be; the record does not describe these weights. Re-export the model."
                    )
    heads = data.get("heads")
    for key in ("neurons", "experts", "expert_units"):  # one entry per current layer, as for the heads
        if heads and isinstance(data.get(key), list) and len(data[key]) != len(heads):
            raise RecordError(
                f"{where} lists heads for {len(heads)} layers but {key!r} for {len(data[key])}; re-export the model."
            )


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra", "present"}


def _dump(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fields that were read or are set, then the unknown keys: the layout as it came in."""
    out = {
        f.name: getattr(obj, f.name)
        for f in fields(obj)
        if f.name not in ("extra", "present", *skip) and (getattr(obj, f.name) is not None or f.name in obj.present)
    }
    out = {k: v.to_dict() if isinstance(v, RebuildSpec) else v for k, v in out.items()}
    out.update(obj.extra)
    return out
