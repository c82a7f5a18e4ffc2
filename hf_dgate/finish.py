"""The finish of a compression run: removed groups are set to exactly zero and held there while the rest recovers.

Why: under the penalty a group that is not needed decays geometrically, so at any finite step the groups on their
way out are small but not zero ("grey"), and an export that removes them changes the outputs. Zeroing them once and
holding them (the penalty off, every other weight training on) turns "small" into "exactly zero", lets the rest of
the model absorb what they still did, and makes the export exact by construction. The record says what was zeroed,
when, and how much the loss moved at that moment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .groups import GateBank


@dataclass
class FinishRecord:
    """What the finish did (saved with checkpoints as part of `dgate_trainer_state.json` and written into the card)."""

    start_step: int
    steps: int  # optimizer steps the zeros were held while the rest trained (0: zeroed at the end)
    zeroed: dict[str, int] = field(default_factory=dict)  # per target: groups set to exactly zero
    cut_by_budget: dict[str, int] = field(default_factory=dict)  # of those, groups above the threshold cut
    loss_before: float | None = None  # data loss on the probe batches just before zeroing
    loss_after: float | None = None  # ... and just after
    late_zeros: dict[str, int] = field(default_factory=dict)  # kept groups that fell under the threshold later
    budget: int | None = None  # parameters the export may keep
    params_kept: int | None = None  # parameters the export keeps (at the end of training)
    params_total: int | None = None

    @property
    def loss_change(self) -> float | None:
        if self.loss_before is None or self.loss_after is None:
            return None
        return self.loss_after - self.loss_before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss_change"] = self.loss_change
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinishRecord:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"loss_change"})
        if unknown:
            raise ValueError(f"unknown finish field(s) {unknown}; allowed fields are {sorted(known)}.")
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        """One paragraph for the model card and the end-of-training report."""
        zeroed = ", ".join(f"{n} {t}" for t, n in self.zeroed.items() if n) or "no groups"
        cut = ", ".join(f"{n} {t}" for t, n in self.cut_by_budget.items() if n)
        text = f"At optimizer step {self.start_step} {zeroed} were set to exactly zero"
        text += f" ({cut} of them above the threshold, cut to meet the budget)" if cut else ""
        if self.loss_change is not None:
            text += f"; the loss moved from {self.loss_before:.4f} to {self.loss_after:.4f} ({self.loss_change:+.4f})"
        if self.steps:
            text += f", then held at zero for {self.steps} steps while the rest trained without the penalty"
        text += "."
        late = ", ".join(f"{n} {t}" for t, n in self.late_zeros.items() if n)
        if late:
            text += f" At the end {late} more fell under the threshold and were zeroed too."
        if self.budget is not None and self.params_kept is not None:
            text += f" Parameters kept: {self.params_kept:,} (budget {self.budget:,}"
            text += f" of {self.params_total:,})." if self.params_total else ")."
        return text


@torch.no_grad()
def zero_exactly(bank: GateBank, masks: dict[str, torch.Tensor], optimizer: Any = None) -> None:
    """Set every gate of the masked groups to 0 (so theta_g = 0 exactly), and clear their momentum in the D-Gating
    optimizer group (`hf_dgate.optim`) so that it does not push them back out."""
    bufs = getattr(optimizer, "dgate_momentum_buffers", None) if optimizer is not None else None
    for t, m in masks.items():
        if not bool(m.any()):
            continue
        gam = bank.gammas[t]
        idx = m.to(gam.device)
        gam[:, idx] = 0.0
        if bufs and gam in bufs:
            bufs[gam][:, idx] = 0.0


@torch.no_grad()
def exact_zero_masks(bank: GateBank) -> dict[str, torch.Tensor]:
    """Groups whose scale is exactly zero (what the finish leaves; read back when a run resumes)."""
    return {t: (bank.scale(t).detach() == 0).cpu() for t in bank.targets}
