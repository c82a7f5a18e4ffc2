"""Physical export: fold the gates, remove every zero group and what only fed it, and keep the model reloadable.

The group sets of the gate bank already say, per head / neuron / layer / expert, which tensor slices belong to
a group and nothing else (`GroupSet.removable`); each target (targets/) removes its dead groups from the folded
model. This module runs that plan stack by stack and checks the result against the gated model (verify.py);
recording.py records the pruned structure and native.py rewrites the config where it can express the new shape.

The pruned structure is recorded in `config.dgate_pruning`, with the spec that rebuilds it from the config
(recording.py); `AutoPrunedModel.from_pretrained` (loading.py) and the generated loader apply that spec. Where
the config alone can express the shape (layers dropped, equal head or neuron counts in every layer and a family
whose head size is a config field) the config is rewritten so that a plain `transformers.AutoModel*.from_pretrained`
loads the export as well. Writing to a directory with a model card and uploading live in hub.py.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .architectures import BlockStack, block_stacks
from .compat import rekey_pruned_heads
from .config import DGateConfig
from .errors import ExportError
from .groups import GroupSet, NeuronInfo
from .legacy_heads import prune_heads, prune_with_transformers
from .patch import get_bank, remove_dgate, unwrap
from .record import RECORD_KEY, PruningRecord
from .recording import current_heads, model_record, read_record, stack_record, write_record
from .registry import spec_for
from .targets import get_target
from .targets.layers import drop_layers

logger = logging.getLogger(__name__)
PRUNING_KEY = RECORD_KEY  # (the names earlier code imported from here)

__all__ = ["ExportError", "export_checked", "export_pruned", "prune_heads", "pruned_structure", "pruning_record"]


# ---- public API -----------------------------------------------------------------------------------------------
@torch.no_grad()
def export_pruned(
    model: nn.Module,
    threshold: float | None = None,
    inplace: bool = False,
    *,
    allow_inexact: bool = False,
    verify: bool = True,
    example_inputs: Any = None,
    shape: str = "per_layer",
    multiple_of: int | dict[str, int] | str | None = None,
) -> nn.Module:
    """A physically smaller copy of a gated model that computes what the gated model computes, checked.

    Gates are folded into the weights, then every group whose effective norm ||theta_g|| is below `threshold`
    (default: the DGateConfig's) is removed with everything that only fed it: heads (whole key/value groups
    under GQA), MLP neurons and whole layers. The caller's model is left untouched unless `inplace=True`
    (saves the memory of a copy; the model is then folded, ungated and pruned). Models gated only on filters,
    input features or custom groups go to `hf_dgate.surgery.prune_torch_model`.

    The export is verified (`hf_dgate.verify`): gated and exported model run on a probe batch
    (`example_inputs`, else one built from the config or `DGateConfig.example_input_shape`) and their outputs
    must agree within `max|diff| <= atol + rtol * max|gated|` (1e-4, 1e-4 in float32). Otherwise ExportError
    names the removed groups that were not zero, unless `allow_inexact=True`. NaN/inf gates or weights raise
    NonFiniteError. The outcome is `pruned.dgate_verification` (`verified`, `exact`, `max_abs_diff`, ...).

    `shape="uniform"` keeps in every layer as many key/value groups and neurons as the layer that keeps most, and
    `multiple_of` rounds kept counts up (an int: neurons; or {"neurons": 128, "heads": 2}), by keeping some of
    the layer's own below-threshold groups (hf_dgate.formats.shape): outputs stay the same, one count per layer
    lets a plain `from_pretrained` load the export wherever the config has one count. What padding kept is
    `pruned.dgate_padding` (counts before/after, parameters added).
    """
    pruned, result = export_checked(
        model,
        threshold,
        inplace,
        allow_inexact=allow_inexact,
        verify=verify,
        inputs=example_inputs,
        shape=shape,
        multiple_of=multiple_of,
    )
    pruned.dgate_verification = result
    return pruned


def export_checked(
    model: nn.Module,
    threshold: float | None,
    inplace: bool,
    *,
    allow_inexact: bool = False,
    verify: bool = True,
    inputs: Any = None,
    shape: str = "per_layer",
    multiple_of: int | dict[str, int] | str | None = None,
) -> tuple[nn.Module, Any]:
    """export_pruned's work: the pruned model and its verification result (`hf_dgate.verify.Verification`);
    export_to_dir passes its own batch as `inputs` so the outputs are measured once."""
    from .formats.shape import ExportShape, parse_multiple_of, parse_shape
    from .verify import ExportCheck

    padded = parse_shape(shape) is not ExportShape.PER_LAYER or bool(parse_multiple_of(multiple_of))
    bank = get_bank(model)
    bank.assert_finite("export")
    try:
        thr = bank.check_threshold(threshold)
    except ValueError as e:
        raise ExportError(str(e)) from None
    per_block = tuple(t for t in bank.targets if get_target(t, bank.config).per_block)
    transformer = bool(per_block)
    removed = per_block if transformer else None
    # the reference outputs come from the gated model before anything (PEFT merge, in-place pruning) changes it
    check = ExportCheck(model, bank, thr, inputs=inputs, verify=verify, targets=removed)
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):  # PEFT: merge adapters, then prune
        from .patch import merge_adapters

        model, inplace = merge_adapters(model if inplace else copy.deepcopy(model)), True
        bank = get_bank(model)
    if padded and not transformer:
        raise ExportError(
            "shape='uniform' and multiple_of apply to attention heads and MLP neurons; this model gates neither."
        )
    padding = None
    if not transformer:
        from .surgery import prune_torch_model  # filters, input features, custom groups of plain torch models

        pruned = prune_torch_model(model, thr, inplace=inplace)
    else:
        dead = {t: bank.zero_groups(t, thr).cpu() for t in bank.targets}
        plan = bank.per_set(dead)
        dconfig = bank.config
        base = unwrap(model)

        def prune(keep: dict[str, set[int]]) -> tuple[nn.Module, Any]:
            pruned = base if inplace else copy.deepcopy(base)
            remove_dgate(pruned, merge=True)
            padding = None
            if padded:
                from .formats.shape import pad_plan

                padding = pad_plan(pruned, plan, shape, multiple_of)
            _apply_plan(pruned, plan, dconfig, float(thr), keep)
            return pruned.eval(), padding

        refused: ExportError | None = None
        try:
            pruned, padding = prune({})
        except ExportError as e:  # (a strict config that refuses the new layer count)
            if inplace:
                raise
            pruned, refused = None, e
        keeps = [] if inplace else _dead_blocks_to_keep(base, plan)
        why = str(refused) if refused else (_reload_problem(pruned) or check.run_problem(pruned)) if keeps else None
        def works(keep: dict[str, set[int]]) -> tuple[nn.Module, Any] | None:
            try:
                again = prune(keep)
            except ExportError:
                return None
            return again if _reload_problem(again[0]) is None and check.run_problem(again[0]) is None else None

        for keep in keeps if why else ():  # dead blocks without which transformers cannot load or run the family
            found = works(keep)
            if found is None:
                continue
            for path in [k for k in keep if len(keep) > 1]:  # a stack that needs none of them drops its own
                fewer = {k: v for k, v in keep.items() if k != path}
                smaller = works(fewer)
                if smaller is not None:
                    keep, found = fewer, smaller
            logger.warning(
                "export: dead blocks %s stay in place as identity blocks (their branches zero): without them "
                "this transformers cannot load or run the export (%s).", {k: sorted(v) for k, v in keep.items()}, why,
            )
            pruned, padding = found
            break
        if pruned is None:
            raise refused
        _check_reloadable(pruned)
    pruned.dgate_padding = padding.to_dict() if padding is not None else None
    return pruned, check.finish(pruned, allow_inexact)


def _reload_problem(pruned: nn.Module) -> str | None:
    from .native import reload_problem

    return reload_problem(pruned)


def _dead_blocks_to_keep(model: nn.Module, plan: list[tuple[GroupSet, torch.Tensor]]) -> list[dict[str, set[int]]]:
    """Sets of dead blocks to keep (zeroed: the identity) where dropping them all leaves a config transformers
    cannot load: a kind of layer the family needs that would vanish (OLMo-Hybrid needs a linear-attention layer;
    one dead block of each kind of a per-layer config list that has no block left), the last or first dead block
    (a family that forces its last layer's kind, an init dividing by layers - 1), both, and every dead block."""
    from .targets.layers import CYCLED_CONFIG_LISTS, PER_LAYER_CONFIG_LISTS

    dead: dict[str, list[int]] = {}
    for gs, d in plan:
        if get_target(gs.target).removes_blocks and bool(d.all()) and isinstance(gs.layer, int):
            dead.setdefault(gs.info.stack, []).append(gs.layer)
    dead = {k: sorted(set(v)) for k, v in dead.items()}
    if not dead:
        return []
    kinds: dict[str, set[int]] = {}
    for st in block_stacks(model, get_bank(model).config):
        n = len(st.blocks)
        for key in PER_LAYER_CONFIG_LISTS + CYCLED_CONFIG_LISTS:
            val = getattr(st.layers_config, key, None)
            if st.path not in dead or not isinstance(val, (list, tuple)) or not val or len(val) > n:
                continue
            per_layer = [val[i % len(val)] for i in range(n)]
            left = {per_layer[i] for i in range(n) if i not in dead[st.path]}
            for i in reversed(dead[st.path]):
                if isinstance(per_layer[i], str) and per_layer[i] not in left:
                    left.add(per_layer[i])
                    kinds.setdefault(st.path, set()).add(i)
    last = {k: {v[-1]} for k, v in dead.items()}
    first = {k: {v[0]} for k, v in dead.items()}
    options = [kinds, last, first, {k: first[k] | last[k] for k in dead},
               {k: kinds.get(k, set()) | last[k] for k in dead}, {k: set(v) for k, v in dead.items()}]
    out: list[dict[str, set[int]]] = []
    for opt in sorted(options, key=lambda o: sum(len(v) for v in o.values())):  # the fewest first
        if opt and any(opt.values()) and opt not in out:
            out.append(opt)
    return out


def _check_reloadable(pruned: nn.Module) -> None:
    """Refuse an export that, once saved, would not load back (native.reload_problem): better no export than a
    directory that fails, or loads half initialised, on the user's next `from_pretrained`."""
    from .native import reload_problem

    why = reload_problem(pruned)
    if why is not None:
        raise ExportError(
            f"The export would not load back after saving: {why}. Gate other targets of this model, or report it."
        )


def pruned_structure(model: nn.Module) -> dict[str, Any] | None:
    """What export removed, as recorded in the config (None for a model that was not pruned); as a dict."""
    return read_record(unwrap(model))


def pruning_record(model: nn.Module) -> PruningRecord | None:
    """What export removed, as the typed record (None for a model that was not pruned)."""
    cfg = getattr(unwrap(model), "config", None)
    return PruningRecord.read(cfg) if cfg is not None else None


# ---- the plan -------------------------------------------------------------------------------------------------
def _apply_plan(
    model: nn.Module, plan: list[tuple[GroupSet, torch.Tensor]], dconfig: DGateConfig, thr: float,
    keep: dict[str, set[int]] | None = None,
) -> None:
    """Remove the dead groups of every gated stack and record what is left (per stack for multi-stack models);
    `keep`: dead blocks per stack path that stay in place (zeroed)."""
    prev = read_record(model) or {}
    block_targets = {t for t in dconfig.targets if get_target(t, dconfig).per_block}
    skipped = sorted({gs.target for gs, d in plan if gs.target not in block_targets and d.any()})
    stacks = block_stacks(model, dconfig) if block_targets else []
    # one record per stack wherever the model has several (even when one is gated): reloading must know which
    multi = len(stacks) > 1 or "stacks" in prev or any(st.name != st.path for st in stacks)
    records = {}
    for st in stacks:
        sub_plan = [(gs, d) for gs, d in plan if gs.info.stack == st.path]
        before = prev.get("stacks", {}).get(st.path, {}) if multi else prev
        records[st.path] = _prune_stack(model, st, sub_plan, dconfig, before, multi, (keep or {}).get(st.path, set()))
    write_record(model, model_record(dconfig, records, prev, multi, thr, skipped))


def _prune_stack(
    model: nn.Module,
    st: BlockStack,
    plan: list[tuple[GroupSet, torch.Tensor]],
    dconfig: DGateConfig,
    prev: dict,
    multi: bool = False,
    keep: set[int] = frozenset(),
) -> dict[str, Any]:
    n_before = len(st.blocks)
    kept = {kind: current_heads(model, st.blocks, dconfig, prev, kind) for kind in ("self", "cross")}
    dead_layers = {gs.layer for gs, d in plan if get_target(gs.target).removes_blocks and bool(d.all())}
    spec = spec_for(st.config)
    kept_dead = sorted(dead_layers & {0}) if spec is not None and spec.keeps_first_layer else []
    kept_dead = sorted(set(kept_dead) | (dead_layers & set(keep)))  # (`keep`: see _dead_blocks_to_keep)
    dead_layers -= set(kept_dead)
    single = not multi and not prev.get("stacks")  # transformers' prune_heads numbers the layers of one stack
    by_hf = prune_with_transformers(model, st, plan, dead_layers, kept["self"], single=single)
    for gs, dead in sorted(plan, key=lambda p: get_target(p[0].target).order):
        if gs.layer in dead_layers or not bool(dead.any()) or id(gs) in by_hf:
            continue
        target = get_target(gs.target)
        target.remove(model, gs, dead)
        target.track_kept(gs, dead, kept)  # (heads: which original heads are left, for the record)
    kept_layers = [i for i in range(n_before) if i not in dead_layers]
    if dead_layers:
        drop_layers(model, st, dead_layers)
        rekey_pruned_heads(getattr(model, "config", None), kept_layers)
    downs = {gs.layer: gs.info.down for gs, _ in plan if isinstance(gs.info, NeuronInfo)}  # the MLPs gated
    return stack_record(model, st, dconfig, kept, kept_layers, kept_dead, prev, n_before, bool(by_hf), downs)
