"""The protocol of a target (a kind of group: heads, neurons, layers, experts, filters, features, rules), and
the tensor surgery every target's removal is made of.

A target finds its groups (as `GroupSet`s: tensor slices plus index vectors, see groups.py), removes the dead
ones from a folded model, proposes the config edit that expresses what is left, names the list of the pruning record
that counts what it keeps, and describes itself for reports, cards, logs and the CLI. Export, reload, verification,
the optimizer recipe, the trainer, reports and the CLI ask the target instead of testing its name. Adding a
built-in target is one module here plus a line in `hf_dgate/target_catalog.py`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compat import HAS_PER_LAYER_CONFIG, config_value, per_layer_overrides
from ..config import DGateConfig
from ..errors import ExportError
from ..groups import GroupSet, TensorSlice
from ..pruned_modules import make_no_input
from ..target_catalog import CATALOG


@dataclass
class RemovalContext:
    """What removals in one model share: the probe batch and, built once on first use, Torch-Pruning's
    dependency graph of the model (module targets remove through it)."""

    model: nn.Module
    example_inputs: Any = None
    _graph: Any = dataclasses.field(default=None, repr=False)

    def graph(self, target: str) -> Any:
        if self._graph is None:
            from ..channels import dependency_graph

            if self.example_inputs is None:
                raise ValueError(
                    f"Removing '{target}' groups needs the model traced: pass example_inputs=... or set "
                    "DGateConfig(example_input_shape=[...])."
                )
            self._graph = dependency_graph(self.model, self.example_inputs)
        return self._graph


class Target(ABC):
    """One kind of group. Transformer targets (`per_block`) are found in every block of every gated stack
    (`find_in_block`); the others on the whole model (`find`). Every target implements `remove`."""

    name: str = ""
    description: str = ""  # one line for reports, model cards and the CLI (built-ins: their catalog line's)
    unit: str = ""  # what one group is called on plots and tables ("key/value group"); default the name
    per_block: bool = True
    removed_by_export: bool = True  # False: zero groups are folded into the weights but stay (custom rules)
    removes_blocks: bool = False  # a dead group is a whole block of its stack (drop the block, renumber the rest)
    order: int = 5  # removal order inside a block stack (expert units index the experts as they were)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        entry = CATALOG.get(cls.__dict__.get("name", ""))
        if entry is not None:  # a built-in: the torch-free catalog is the one place its description is written
            cls.description = entry.description

    def find_in_block(
        self, model: nn.Module, hf_config: Any, dconfig: DGateConfig, layer: int, name: str, block: nn.Module
    ) -> list[GroupSet]:
        """The group sets of one block (per-block targets)."""
        raise NotImplementedError(f"target {self.name!r} is not found per block")

    def find(self, model: nn.Module, dconfig: DGateConfig, example_inputs: Any = None) -> list[GroupSet]:
        """The group sets of the whole model (targets that are not per block)."""
        raise NotImplementedError(f"target {self.name!r} is found per block")

    @abstractmethod
    def remove(self, model: nn.Module, gs: GroupSet, dead: torch.Tensor, ctx: RemovalContext | None = None) -> None:
        """Physically remove the dead groups of `gs` (and what only fed them) from a folded, ungated model."""

    def native_edit(self, cfg: Any, record: dict[str, Any]) -> dict[str, Any]:
        """Config fields that would make a fresh build match the pruned shapes (checked by the caller); per-layer
        values go under "per_layer_config" as {layer: {field: value}} (see `per_layer_edit`)."""
        return {}

    def record_field(self, gs: GroupSet) -> str | None:
        """The per-layer list of the pruning record (`record.StackRecord`) that counts what `gs` keeps in its
        layer; None when the record does not count this target per layer."""
        return None

    def recorded_in(self, record: Any) -> bool:
        """Whether a stack's pruning record (`record.StackRecord`) holds per-layer counts a record written before
        version 3 needs replayed to be reloaded (legacy_records.py)."""
        return False

    def rebuild_dead(self, gs: GroupSet, kept: int) -> torch.Tensor | None:
        """On translating a record written before version 3 (legacy_records.py): which groups of a freshly built
        `gs` to remove so that `kept` remain (their positions do not matter, only the shapes are read off the result);
        None when nothing goes."""
        if kept > gs.n_groups:
            raise ExportError(
                f"The recorded structure keeps {kept} {gs.target} in layer {gs.layer} but the config builds only "
                f"{gs.n_groups}: the config does not match the weights."
            )
        return None if kept == gs.n_groups else torch.arange(gs.n_groups, device="cpu") >= kept  # (reloads: meta)

    def track_kept(self, gs: GroupSet, dead: torch.Tensor, kept: dict[str, list[list[int]]]) -> None:
        """After `remove`: update the original numbers of what is kept, per layer, where the record lists them."""
        return None

    def probe_width(self, model: nn.Module, gs: GroupSet) -> int | None:
        """The input width a probe batch must have for `gs`'s module (targets that gate model inputs)."""
        return None

    def metric_name(self) -> str:
        """The key training logs this target's sparsity under."""
        return f"{self.name}_sparsity"


MISSING = object()


def per_layer_edit(cfg: Any, rows: dict[str, list[int]], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config edit that would say "layer i has rows[field][i]" for each field, in the first form the config
    has: one value for every layer, the family's own per-layer list (Gemma 3n's `intermediate_size`), or 5.x
    `per_layer_config` overrides. Whether the family's modeling code reads that form is not assumed: the export
    builds the model from the edited config and compares every shape (native.make_native). {} when no form fits."""
    edit = dict(fixed or {})
    overridden = {k for layer in (per_layer_overrides(cfg) or {}).values() for k in layer}
    overrides: dict[int, dict[str, Any]] = {}
    for field, values in rows.items():
        current = config_value(cfg, field, MISSING)
        present = {v for v in values if v is not None}  # None: the layer has no such part (a dense block of a MoE)
        if current is MISSING or not present:
            return {}
        if isinstance(current, list) and len(current) == len(values) and None not in values:
            edit[field] = list(values)
        elif len(present) == 1 and field not in overridden:
            edit[field] = present.pop()
        elif HAS_PER_LAYER_CONFIG:
            for i, v in enumerate(values):
                if v is not None:
                    overrides.setdefault(i, {})[field] = v
        else:
            return {}
    if overrides:
        edit["per_layer_config"] = overrides
    return edit


def merge_edits(*edits: dict[str, Any]) -> dict[str, Any]:
    """One config edit from several (fields side by side, per-layer overrides merged layer by layer)."""
    out: dict[str, Any] = {}
    for edit in edits:
        for key, value in edit.items():
            if key == "per_layer_config":
                merged = out.setdefault(key, {})
                for layer, fields in value.items():
                    merged[layer] = {**merged.get(layer, {}), **fields}
            else:
                out[key] = value
    return out


# ---- surgery shared by the targets -------------------------------------------------------------------------------
def keep_mask(sl: TensorSlice, dead: torch.Tensor) -> torch.Tensor:
    idx = sl.index
    return (idx < 0) | ~dead[idx.clamp(min=0)]


def keep_slice(model: nn.Module, sl: TensorSlice, dead: torch.Tensor) -> None:
    """Replace `module.param` by its kept positions along `sl.axis`."""
    module = model.get_submodule(sl.module)
    p = getattr(module, sl.param)
    if sl.axis is None:
        return
    keep = torch.nonzero(keep_mask(sl, dead).cpu()).flatten().to(p.device)
    new = p.data.index_select(sl.axis, keep).contiguous()
    if sl.param in module._buffers:  # a per-group buffer (a router's per-expert score-correction bias)
        module._buffers[sl.param] = new
    else:
        setattr(module, sl.param, nn.Parameter(new, requires_grad=p.requires_grad))
    sync_features(module)


def sync_features(module: nn.Module) -> None:
    """Keep a module's size attributes true to its weight (they feed `extra_repr` and some forwards)."""
    w = getattr(module, "weight", None)
    if w is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif type(module).__name__.endswith("Conv1D"):
        module.nx, module.nf = w.shape
        if module.nx == 0:
            make_no_input(module)
    elif isinstance(module, nn.Embedding):  # a position bias with one column per head
        module.embedding_dim = w.shape[1]
    elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.in_channels == module.out_channels > 0:
        # depthwise: one filter per channel; one left empty runs no convolution (no_input_forward) and keeps sizes
        # of 1, which weight inits divide by
        module.groups = module.in_channels = module.out_channels = max(1, w.shape[0])
        if w.shape[0] == 0:
            make_no_input(module)


def block_name(gs: GroupSet) -> str:
    """The block a head/neuron group set lives in (its site names are `<block>.<relative name>`)."""
    rels = gs.info.block_parts()
    rel = rels[0] if rels else None
    name = gs.sites[0].module if gs.sites else gs.removable[0].module
    if rel and name.endswith("." + rel):
        return name[: -len(rel) - 1]
    for sl in gs.removable:
        for r in rels:
            if isinstance(r, str) and r and sl.module.endswith("." + r):
                return sl.module[: -len(r) - 1]
    raise ExportError(f"Cannot locate the block of group set {gs.target}/{gs.layer}.")


def settable(cfg: Any, key: str) -> bool:
    """False for config fields computed from others (Mamba's `layer_types` is a read-only property; RecurrentGemma's
    maps through `attribute_map` to one)."""
    key = (getattr(cfg, "attribute_map", None) or {}).get(key, key)
    prop = getattr(type(cfg), key, None)
    return not isinstance(prop, property) or prop.fset is not None


RMS_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def rms_eps(m: nn.Module) -> str | None:
    """The name of `m`'s epsilon attribute where `m` computes weight * x / sqrt(mean(x^2) + eps) over its last axis
    (checked on a random input, so a LayerNorm or a (1 + weight) RMSNorm does not pass); None otherwise."""
    w = getattr(m, "weight", None)
    attr = next((a for a in RMS_EPS_ATTRS if isinstance(getattr(m, a, None), float)), None)
    if attr is None or not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(m, "bias", None) is not None:
        return None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, w.numel(), generator=g).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            y = m(x)
            want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + getattr(m, attr)))
    except Exception:  # noqa: BLE001 - a module this input does not fit is no such norm
        return None
    ok = isinstance(y, torch.Tensor) and y.shape == want.shape and torch.allclose(y, want, rtol=1e-4, atol=1e-6)
    return attr if ok else None


def rms_norms_over(block: nn.Module, parent_rel: str, width: int, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """RMSNorms directly under `parent_rel` that normalise `width` features (BitNet's attn_sub_norm over all heads'
    outputs, ffn_sub_norm over all MLP units); names starting with `exclude` (q_norm/k_norm) are not taken."""
    parent = block.get_submodule(parent_rel) if parent_rel else block
    found = []
    for child, m in parent.named_children():
        w = getattr(m, "weight", None)
        if "norm" not in type(m).__name__.lower() or not isinstance(w, torch.Tensor) or w.numel() != width:
            continue
        if child.lower().startswith(exclude) or rms_eps(m) is None:
            continue
        found.append(f"{parent_rel}.{child}" if parent_rel else child)
    return tuple(found)


@torch.no_grad()
def rescale_rms_norm(m: nn.Module, before: int, after: int) -> None:
    """An RMSNorm that read `before` features of which only `after` were nonzero, now given those `after` alone:
    x / sqrt(S / before + eps) = sqrt(before / after) * x / sqrt(S / after + eps * before / after), so the weight
    grows by sqrt(before / after) and eps by before / after: the same outputs, exactly."""
    attr = rms_eps(m)
    if attr is None or after <= 0 or after == before:
        return
    r = before / after
    m.weight.mul_(r**0.5)
    setattr(m, attr, float(getattr(m, attr)) * r)
    m._dgate_rescaled = True
