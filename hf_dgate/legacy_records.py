"""Records written before version 3 carry no rebuild spec: this translates one into the spec, so that every reload
still rebuilds through `pruned_modules.shrink` alone.

A version 1 or 2 record holds per-layer lists (heads, key/value heads, neurons, experts kept). Where the export also
wrote the generated loader, that record has `remote`, the same spec under its earlier name, and it is used as is.
Otherwise the lists are replayed by the targets on a model built on the meta device (what AutoPrunedModel itself
did before version 3), and the spec is read off the result the way an export reads it (`recording.rebuild_spec`).
The same translation serves a `model_class=` other than the exported class, whose module names the recorded spec
does not use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import StructureNotFoundError
from .compat import build_on_meta
from .config import DGateConfig
from .errors import ExportError
from .record import PruningRecord, StackRecord
from .recording import rebuild_spec
from .targets import BUILTIN, find_group_sets, get_target


def rebuild_from_lists(record: PruningRecord, model_class: type, config: Any, *, exported: bool) -> dict[str, Any]:
    """The rebuild spec of a record that has none: its `remote` spec when `model_class` is the exported class
    (`exported`), else the per-layer lists replayed on a meta-device build of `model_class`."""
    if exported and record.remote is not None:
        return record.remote
    model = build_on_meta(model_class, config)
    replay_lists(model, record)
    spec = rebuild_spec(model)
    if spec is None:
        raise ExportError(
            f"{model_class.__name__} cannot be built from this config on the meta device, so the recorded structure "
            "cannot be rebuilt; pass AutoPrunedModel.from_pretrained(dir, model_class=...)."
        )
    return spec


@torch.no_grad()
def replay_lists(model: nn.Module, record: PruningRecord) -> nn.Module:
    """Shrink a freshly built model to a record's per-layer lists, stack by stack, through the targets (which
    positions stay is irrelevant: only the shapes are read off the result)."""
    for path, stack in record.stacks.items():
        names = record.module_names if path is None else {**(record.module_names or {}), "layers": path}
        _replay_stack(model, stack, names)
    return model


def _replay_stack(model: nn.Module, record: StackRecord, module_names: dict[str, Any] | None) -> None:
    targets = [name for name, t in BUILTIN.items() if t.per_block and t.recorded_in(record)]
    sets = []
    for target in targets:
        dconfig = DGateConfig(target=[target], module_names=module_names)
        try:
            with torch.device("cpu"):  # index vectors stay on the CPU while the model lives on "meta"
                sets += find_group_sets(model, dconfig, refuse=False)
        except StructureNotFoundError:
            # a layout this transformers cannot gate (4.x listed experts) cannot have been pruned by an export made
            # with it; an export from another line that did shrink it then fails loudly on the weights' shapes
            continue
    for gs in sets:
        target = get_target(gs.target)
        key = target.record_field(gs)
        counts = record.kept(key) if key else []
        layer = int(gs.layer)
        if counts and layer >= len(counts):  # a short list would leave this layer at its full size
            raise ExportError(
                f"config.dgate_pruning[{key!r}] has {len(counts)} entries but the model has a layer {layer} with "
                f"{gs.target}: the record does not describe this model. Re-export it."
            )
        if layer >= len(counts) or not isinstance(counts[layer], int):
            continue
        dead = target.rebuild_dead(gs, counts[layer])
        if dead is not None:  # (a layer left with no head gets its bias-only forward here, as in the export)
            target.remove(model, gs, dead)
