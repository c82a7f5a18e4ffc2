"""Uniform and rounded exports: keep some below-threshold groups so every layer has the same (or a rounded) count.

Serving engines other than llama.cpp's `deci` and vLLM's DeciLM read one head count and one FFN width for all
layers, and matmul kernels and tensor parallelism like counts that are multiples of 64 / 128 / 256 (neurons) or of
the tensor-parallel degree (key/value heads). Padding a layer keeps some of its own dead groups instead of removing
them: those groups are below the threshold (zero after training), so the padded export computes what the gated
model computes at least as closely as the unpadded one, and costs only their parameters and FLOPs, which the
report and card state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from ..choices import AttentionKind
from ..errors import ExportError
from ..groups import GroupSet, HeadInfo, LayerInfo, NeuronInfo

PADDABLE = ("heads", "neurons")  # key/value groups of self-attention; neurons of a dense MLP


class ExportShape(str, Enum):
    """How many groups each layer keeps."""

    PER_LAYER = "per_layer"  # exactly the groups above the threshold (the smallest model; per-layer counts)
    UNIFORM = "uniform"  # every layer as many as the layer keeping most (loadable wherever a config has one count)


@dataclass
class Padding:
    """What a uniform or rounded export kept beyond the live groups: per target, kept counts per layer before and
    after padding, and the parameters the padding costs (FLOPs are measured by `export_to_dir`)."""

    shape: str
    multiple_of: dict[str, int]
    kept: dict[str, list[int]] = field(default_factory=dict)  # live groups per layer (the non-uniform export)
    padded: dict[str, list[int]] = field(default_factory=dict)  # groups per layer in this export
    params_added: int = 0

    @property
    def groups_added(self) -> int:
        return sum(sum(p) - sum(k) for k, p in zip(self.kept.values(), self.padded.values()))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "groups_added": self.groups_added}


def parse_multiple_of(multiple_of: int | dict[str, int] | str | None) -> dict[str, int]:
    """`128` (neurons), `{"neurons": 128, "heads": 2}` or the CLI's "neurons=128,heads=2" as {target: N}."""
    if multiple_of is None:
        return {}
    if isinstance(multiple_of, str):
        text = multiple_of.strip()
        if text.isdigit():
            multiple_of = int(text)
        else:
            try:
                multiple_of = {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
            except ValueError:
                raise ExportError(
                    f"multiple_of={text!r} is not understood; pass a number (neurons) or 'neurons=128,heads=2'."
                ) from None
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, (int, dict)):
        raise ExportError(f"multiple_of={multiple_of!r} is invalid; pass an int (neurons) or {{'neurons': 128}}.")
    out = {"neurons": multiple_of} if isinstance(multiple_of, int) else dict(multiple_of)
    for k, v in out.items():
        if k not in PADDABLE:
            raise ExportError(f"multiple_of names {k!r}; only {list(PADDABLE)} can be rounded.")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ExportError(f"multiple_of[{k!r}]={v!r} is invalid; pass a positive integer.")
    return out


def parse_shape(shape: ExportShape | str) -> ExportShape:
    try:
        return ExportShape(shape)
    except ValueError:
        raise ExportError(f"shape={shape!r} is invalid; pass one of {[s.value for s in ExportShape]}.") from None


def _paddable(gs: GroupSet) -> str | None:
    """The `multiple_of` key a group set pads under, from its typed descriptor: key/value groups of a
    self-attention ("heads") or a dense MLP's neurons ("neurons", routed experts' units are not); else None."""
    if isinstance(gs.info, HeadInfo):
        return "heads" if gs.info.attention == AttentionKind.SELF else None
    return "neurons" if isinstance(gs.info, NeuronInfo) else None


def pad_plan(
    model: nn.Module,
    plan: list[tuple[GroupSet, torch.Tensor]],
    shape: ExportShape | str = ExportShape.PER_LAYER,
    multiple_of: int | dict[str, int] | str | None = None,
) -> Padding | None:
    """Revive dead groups in `plan` (in place) so that each layer keeps the uniform and/or rounded count; None when
    nothing is asked. Layers that leave entirely (target "layers") are not padded. Counts never exceed a layer's
    own group count, so a rounded count may stop at the original width."""
    shape = parse_shape(shape)
    mult = parse_multiple_of(multiple_of)
    if shape is ExportShape.PER_LAYER and not mult:
        return None
    dropped = {(gs.info.stack, gs.layer) for gs, d in plan if isinstance(gs.info, LayerInfo) and bool(d.all())}
    info = Padding(shape=shape.value, multiple_of=mult)
    for target in PADDABLE:
        by_stack: dict[Any, list[tuple[GroupSet, torch.Tensor]]] = {}
        for gs, dead in plan:
            if _paddable(gs) == target and (gs.info.stack, gs.layer) not in dropped:
                by_stack.setdefault(gs.info.stack, []).append((gs, dead))
        for entries in by_stack.values():
            live = [int((~dead).sum()) for _, dead in entries]
            goal = [max(live)] * len(live) if shape is ExportShape.UNIFORM else list(live)
            m = mult.get(target, 1)
            goal = [min(gs.n_groups, math.ceil(g / m) * m) for g, (gs, _) in zip(goal, entries)]
            for (gs, dead), have, want in zip(entries, live, goal):
                revive = dead.nonzero().flatten()[: max(want - have, 0)]
                if len(revive):
                    info.params_added += _group_params(model, gs, revive)
                    dead[revive] = False
            info.kept.setdefault(target, []).extend(live)
            info.padded.setdefault(target, []).extend(goal)
    return info


def _group_params(model: nn.Module, gs: GroupSet, groups: torch.Tensor) -> int:
    """Parameters that belong to `groups` of `gs` (its removable slices)."""
    total = 0
    for sl in gs.removable:
        if sl.axis is None or isinstance(sl.axis, tuple):
            continue
        t = getattr(model.get_submodule(sl.module), sl.param)
        per_position = t.numel() // t.shape[sl.axis]
        total += per_position * int(torch.isin(sl.index, groups).sum())
    return total


def padding_statement(summary: dict[str, Any]) -> str:
    """The card's paragraph on what padding costs (empty for an unpadded export)."""
    pad = summary.get("padding")
    if not pad:
        return ""
    rounds = ", ".join(f"{k} to multiples of {v}" for k, v in pad["multiple_of"].items())
    how = " and ".join(x for x in ("the same count in every layer" if pad["shape"] == "uniform" else "", rounds) if x)
    lines = [
        f"Padded export ({how}): {pad['groups_added']} below-threshold groups were kept instead of removed, so that "
        "engines reading one count per model (or preferring rounded counts) can run it. They are the layers' own "
        "zero groups: outputs are unchanged.",
    ]
    if pad.get("params_unpadded"):
        params, flops = pad["params_unpadded"], max(pad["flops_unpadded"], 1)
        lines.append(
            f"Cost versus the non-uniform export: parameters {params:,} -> {summary['params_after']:,} "
            f"(+{summary['params_after'] / params - 1:.1%}), forward FLOPs {flops:,} -> "
            f"{summary['flops_after']:,} (+{summary['flops_after'] / flops - 1:.1%})."
        )
    return "\n\n".join(lines) + "\n"
