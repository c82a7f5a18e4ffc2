"""A parameter budget: what each group costs (the price a method that `prices_groups` weights its penalty by,
see `DGate.priced_penalty`) and the cut that meets the budget.

Why weight by cost: under one lam every group pays the same price to stay, so a key/value head of a small Llama
(27,648 parameters) and an MLP neuron (576) compete as equals and "half the parameters" cannot be asked for. With
`lam * c_g / mean(c)` per group the penalty is paid in the currency of the budget. Parameters are the default
currency because the budget is a parameter count (what the export writes and what memory holds); FLOPs per token
(`cost="flops"`) add the attention's sequence-length term to heads, which makes heads dearer than their weights.

Everything is counted the way the sparsity report counts the export (`hf_dgate.report`): removing a position along
an axis removes its hyper-row; the test suite checks `params_kept` against the exported model's own count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from math import prod

import torch

from .controller import FALLING_RATIO, SETTLE_TOL
from .groups import GateBank, HeadInfo
from .report import param_counts


class CostUnit(str, Enum):
    """What a group costs: the parameters an export removes with it, or the forward FLOPs per token it saves."""

    PARAMS = "params"
    FLOPS = "flops"


class BudgetSchedule(str, Enum):
    """How a budgeted run (`target_params`) reaches its budget.

    gradual (default): every controller interval the weakest groups (by `BudgetRanking`, `budget_cut`) are set to
    exactly zero and held there, so that the parameters kept fall on a cubic curve from the whole model to the budget
    by the start of the finish; lam stays as given, and the finish (by default the last 70% of the run) is pure
    recovery. Measured in docs/compress.md: the penalty alone did not zero groups in a short run, so a finish that
    cut late removed live groups and left too few steps to recover.
    steered: lam is steered toward the budget by the controller and a single cut at the finish (a tenth of the run)
    takes what the penalty has not removed.
    """

    GRADUAL = "gradual"
    STEERED = "steered"


class BudgetRanking(str, Enum):
    """Which groups the gradual schedule cuts first (`DGateTrainer(budget_ranking=...)`).

    saliency (default): the smallest estimated loss increase per unit of cost. For a group of scale s_g (D-Gating:
    the product of its gates, so gamma_1 dL/dgamma_1 = s_g dL/ds_g) removal is s_g -> 0, and E[(s_g dL/ds_g)^2]
    over training batches (an exponential average, the gradients training computes anyway) is the Fisher estimate of
    that loss change (Molchanov et al. 2019's gate importance); divided by the group's price (`group_cost`) it compares
    heads and neurons in one currency. Measured in docs/compress.md.
    norm: the smallest D-Gating norm ||theta_g|| relative to the median of its target's live groups (the earlier
    default: with a small lam this is gradual magnitude pruning).
    """

    SALIENCY = "saliency"
    NORM = "norm"


SALIENCY_DECAY = 0.9  # the saliency average's per-step decay: about one cut interval (10 steps) of memory


def gradual_budget(total: int, budget: int, progress: float) -> int:
    """Parameters the gradual schedule keeps at `progress` in [0, 1] of its ramp: budget + (total - budget) * (1-p)^3
    (Zhu & Gupta's cubic schedule: cut fastest while the model is most redundant, slowest near the budget)."""
    p = min(1.0, max(0.0, progress))
    return int(round(budget + (total - budget) * (1.0 - p) ** 3))


FLOPS_SEQ_LEN = 1024  # the sequence length at which `cost="flops"` prices attention scores (per token: ~4 * T * d)


@dataclass(frozen=True)
class ParamBudget:
    """`target`: a fraction in (0, 1) of the model's parameters, or an absolute count >= 1 (an int)."""

    target: float | int

    def __post_init__(self) -> None:
        t = self.target
        ok = not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and t > 0
        if not ok or (isinstance(t, float) and t >= 1 and not float(t).is_integer()):
            raise ValueError(
                f"target_params={t!r} is invalid: pass a fraction in (0, 1) (e.g. 0.5) or a parameter count (an int)."
            )

    def resolve(self, total: int) -> int:
        """The parameter count the export must not exceed."""
        t = self.target
        count = round(t * total) if t < 1 else int(t)
        if count > total:
            raise ValueError(f"target_params={t!r} is above the model's {total:,} parameters; pass fewer.")
        return count


def group_costs(bank: GateBank, unit: CostUnit | str = CostUnit.PARAMS) -> dict[str, torch.Tensor]:
    """Per target, a (G,) float64 vector: what removing each group alone saves (parameters, or FLOPs per token).

    Vectorised per tensor slice; a group's marginal cost, so a head inside a removed layer is not discounted.
    """
    unit = CostUnit(unit)
    costs = {t: torch.zeros(n, dtype=torch.float64) for t, n in bank.sizes.items()}
    for gs, c in bank.per_set(costs):
        for sl in gs.removable:
            w = getattr(bank.module(sl.module), sl.param)
            idx = sl.index.reshape(-1).cpu()
            if sl.axis is None:
                per = float(w.numel())
            else:
                axes = sl.axis if isinstance(sl.axis, tuple) else (sl.axis,)
                per = w.numel() / prod(w.shape[a] for a in axes)
            keep = idx >= 0
            c.index_add_(0, idx[keep], torch.full((int(keep.sum()),), per, dtype=torch.float64))
        if unit is CostUnit.FLOPS:
            c *= 2.0  # a multiply-add per weight and token
            info = gs.info
            if isinstance(info, HeadInfo) and info.head_dim:
                rep = info.n_heads // max(1, info.n_kv)
                c += 4.0 * FLOPS_SEQ_LEN * info.head_dim * rep  # q.k and attn.v of the group's query heads
    return costs


def cost_weights(costs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """c_g / mean(c) over every gated group: lam keeps its meaning for a group of average cost."""
    allc = torch.cat(list(costs.values()))
    mean = float(allc.mean()) if allc.numel() else 1.0
    return {t: (c / max(mean, 1e-12)).float() for t, c in costs.items()}


def params_after(bank: GateBank, dead: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(total, kept) parameters once the groups in `dead` are removed: the report's exact count."""
    return param_counts(bank, {t: d.to(torch.bool).cpu() for t, d in dead.items()})


@torch.no_grad()
def committed(bank: GateBank, previous: dict[str, torch.Tensor] | None) -> tuple[dict, dict, dict, bool]:
    """(zero, committed, norms, settled) per target, as `controller.measure` reads one target: committed = zero or
    falling (under FALLING_RATIO of its target's largest norm and shrinking by more than SETTLE_TOL in log)."""
    zero, comm, norms, settled = {}, {}, {}, True
    for t in bank.targets:
        n = bank.effective_norms(t).detach().float().cpu()
        z = n < bank.group_thresholds(t).detach().float().cpu()
        norms[t], zero[t] = n, z
        prev = None if previous is None else previous.get(t)
        if prev is None or prev.shape != n.shape:
            comm[t], settled = z, False
            continue
        change = n.clamp_min(1e-30).log() - prev.clamp_min(1e-30).log()
        c = z | ((n < FALLING_RATIO * n.max()) & (change < -SETTLE_TOL))
        comm[t] = c
        if not bool(c.all()) and not bool(change[~c].abs().median() < SETTLE_TOL):
            settled = False
    return zero, comm, norms, settled


@torch.no_grad()
def budget_cut(
    bank: GateBank, budget: int, importance: dict[str, torch.Tensor] | None = None, relative: bool = True
) -> tuple[dict[str, torch.Tensor], int]:
    """Which groups to zero so that the export keeps at most `budget` parameters: every group already under its
    threshold, then the weakest others, ranked by norm relative to the median norm of their target's live groups
    (heads and neurons have norms of different scales; their prices already acted through the penalty, which is
    what made the dear ones fall). `importance` replaces the norms as what that is ranked (one-shot pruners:
    magnitude, Taylor); they are compared the same way, relative to the median of their target, unless
    `relative=False` (scores already in one currency across targets, e.g. loss change per parameter). Returns (dead
    masks, parameters kept).
    Exact by bisection on the report's count, then the strongest cut groups that still fit are given back (a dear
    head cut last would otherwise overshoot by its price); if nothing can reach the budget, everything removable goes.
    """
    dead, scores, order_t, order_i = {}, [], [], []
    for t in bank.targets:
        n = bank.effective_norms(t).detach().float().cpu()
        z = n < bank.group_thresholds(t).detach().float().cpu()
        dead[t] = z.clone()
        if importance is not None:
            n = importance[t].detach().float().cpu()
        live = n[~z]
        ref = float(live.median()) if live.numel() and relative else 1.0
        s = n / max(ref, 1e-30)
        alive = (~z).nonzero().flatten()
        scores.append(s[alive])
        order_t += [t] * len(alive)
        order_i.append(alive)
    _, kept = params_after(bank, dead)
    if kept <= budget or not order_t:
        return dead, kept
    s_all, i_all = torch.cat(scores), torch.cat(order_i)
    order = torch.argsort(s_all, stable=True).tolist()

    def with_first(k: int) -> dict[str, torch.Tensor]:
        d = {t: m.clone() for t, m in dead.items()}
        for j in order[:k]:
            d[order_t[j]][i_all[j]] = True
        return d

    lo, hi = 0, len(order)  # kept(lo) > budget; find the smallest k with kept(k) <= budget
    if params_after(bank, with_first(hi))[1] > budget:
        d = with_first(hi)
        return d, params_after(bank, d)[1]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if params_after(bank, with_first(mid))[1] <= budget:
            hi = mid
        else:
            lo = mid
    d = with_first(hi)
    kept = params_after(bank, d)[1]
    # the last group cut may be a dear one: give back the strongest cut groups that still fit under the budget
    costs = group_costs(bank)
    for j in reversed(order[:hi]):
        t, i = order_t[j], int(i_all[j])
        if kept + float(costs[t][i]) > budget:
            continue
        d[t][i] = False
        now = params_after(bank, d)[1]
        if now <= budget:
            kept = now
        else:
            d[t][i] = True
    return d, kept
