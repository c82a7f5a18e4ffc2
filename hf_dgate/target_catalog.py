"""The built-in targets by name, free of torch imports: `DGateConfig` validates target names and `hf-dgate --help`
lists them without importing the stack. A new built-in target is one module in `hf_dgate/targets/` plus one line
here; `hf_dgate.targets` imports the class the line names, and the class takes its description from the line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetEntry:
    cls: str  # "module:Class" inside hf_dgate.targets
    description: str  # one line for reports, model cards and the CLI
    per_block: bool = True  # found in every block of a transformer stack (else on the whole model)


CATALOG: dict[str, TargetEntry] = {
    "heads": TargetEntry(
        "heads:Heads", "attention heads (key/value groups under GQA; cross-attention heads on their own)"
    ),
    "neurons": TargetEntry("neurons:Neurons", "MLP intermediate units (per expert in a mixture of experts)"),
    "layers": TargetEntry("layers:Layers", "whole blocks (pre-norm only: every residual branch gated together)"),
    "experts": TargetEntry(
        "experts:Experts", "routed experts of a mixture of experts (removal changes routing: measured and stated)"
    ),
    "filters": TargetEntry(
        "modules:Filters",
        "Conv2d output channels (the BatchNorm channel when one follows; skip-tied channels together)",
        per_block=False,
    ),
    "features": TargetEntry("modules:Features", "input columns of the first Linear", per_block=False),
}


def describe() -> str:
    """One line per built-in target, for help texts."""
    return "\n".join(f"{name}: {entry.description}" for name, entry in CATALOG.items())
