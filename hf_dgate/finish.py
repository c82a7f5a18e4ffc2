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
    gradual_from: int | None = None  # budget_schedule="gradual": the step its first cut was made
    gradual_cut: dict[str, int] = field(default_factory=dict)  # ... and the groups it had cut before the finish
    ranking: str | None = None  # ... and what it ranked the groups by (hf_dgate.budget.BudgetRanking)

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
        zeroed = _counts(self.zeroed) or "no groups"
        cut = _counts(self.cut_by_budget)
        by = {"saliency": "ranked by the estimated loss change of removing them per unit of cost, from the gates' "
                          "gradients", "norm": "ranked by D-Gating's norms"}.get(self.ranking or "", "")
        if self.gradual_from is not None:
            gradual = _counts(self.gradual_cut) or "no groups"
            which = f"the weakest groups ({by})" if by else "the weakest groups"
            text = (f"From optimizer step {self.gradual_from} {which} were set to exactly zero a few "
                    f"at a time and held ({gradual} by step {self.start_step}); at step {self.start_step} {zeroed} "
                    "were zero in all")  # fmt: skip
        else:
            text = f"At optimizer step {self.start_step} {zeroed} were set to exactly zero"
        by = f", {by}" if by and self.gradual_from is None else ""
        text += f" ({cut} of them above the threshold, cut to meet the budget{by})" if cut else ""
        if self.loss_change is not None:
            text += f"; the loss moved from {self.loss_before:.4f} to {self.loss_after:.4f} ({self.loss_change:+.4f})"
        if self.steps:
            text += f", then held at zero for {self.steps} steps while the rest trained without the penalty"
        text += "."
        late = _counts(self.late_zeros)
        if late:
            text += f" At the end {late} more fell under the threshold and were zeroed too."
        if self.budget is not None and self.params_kept is not None:
            text += f" Parameters kept: {self.params_kept:,} (budget {self.budget:,}"
            text += f" of {self.params_total:,})." if self.params_total else ")."
        return text


@torch.no_grad()
def zero_exactly(bank: GateBank, masks: dict[str, torch.Tensor], optimizer: Any = None) -> None:
    """Set the masked groups' scale to exactly 0 (the method's `hold_zero`: D-Gating's gates to 0, L0's log_alpha far
    negative), and clear their momentum (the D-Gating optimizer group of `hf_dgate.optim`, or an Adam/SGD state) so
    that it does not push them back out between steps."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's optimizer
    bufs = getattr(inner, "dgate_momentum_buffers", None) if inner is not None else None
    for t, m in masks.items():
        if not bool(m.any()):
            continue
        gam = bank.gammas[t]
        idx = m.to(gam.device)
        bank.strategy.hold_zero(bank, t, idx)
        if bufs and gam in bufs:
            bufs[gam][:, idx] = 0.0
        state = getattr(inner, "state", None)
        st = state.get(gam) if isinstance(state, dict) or hasattr(state, "get") else None
        for key in ("exp_avg", "momentum_buffer"):
            buf = st.get(key) if isinstance(st, dict) else None
            if isinstance(buf, torch.Tensor) and buf.shape == gam.shape:
                buf[:, idx] = 0.0


@torch.no_grad()
def exact_zero_masks(bank: GateBank) -> dict[str, torch.Tensor]:
    """Groups whose scale is exactly zero (what the finish leaves; read back when a run resumes)."""
    return {t: (bank.scale(t).detach() == 0).cpu() for t in bank.targets}


def _counts(by_target: dict[str, int]) -> str:
    """'3 heads, 1 neuron': target names are plural; a count of one reads singular."""
    return ", ".join(f"{n} {t[:-1] if n == 1 and t.endswith('s') else t}" for t, n in by_target.items() if n)
