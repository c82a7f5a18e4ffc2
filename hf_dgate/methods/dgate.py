"""D-Gating (Kolb et al. 2025): each group's weights times D - 1 scalar gates, with the smooth L2 surrogate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import gates as G
from .base import Method, OptimizerPolicy

if TYPE_CHECKING:
    from ..groups import GateBank


class DGate(Method):
    name = "dgate"
    depth_in_gates = True
    optimizer = OptimizerPolicy(helper="dgate_optimizer", group_key="dgate", takes_weights=True)
    prices_groups = True
    holds_zeros = True

    def penalty(self, bank: GateBank, lam: float) -> torch.Tensor:
        """R = (lam / D) sum_g (||w_g||^2 + sum_d gamma_{g,d}^2)."""
        return sum(G.surrogate_penalty(bank.total_sq_norm(t), bank.gates(t), lam, bank.depth) for t in bank.targets)

    def priced_penalty(self, bank: GateBank, lam: float, prices: dict[str, torch.Tensor]) -> torch.Tensor:
        """(lam / D) sum_g u_g (||w_g||^2 + sum_d gamma_{g,d}^2), a price u_g per group: its minima are those of
        lam * sum_g u_g ||theta_g||^(2/D) (AM-GM holds group by group)."""
        total = None
        for t in bank.targets:
            gam = bank.gates(t)
            u = prices[t].to(device=gam.device, dtype=gam.dtype)
            term = (lam / bank.depth) * (u * (bank.group_sq_norms(t) + gam.pow(2).sum(dim=0))).sum()
            total = term if total is None else total + term
        return total

    def misalignment(self, bank: GateBank, lam: float) -> torch.Tensor:
        return sum(G.misalignment(bank.group_sq_norms(t), bank.gates(t), lam, bank.depth) for t in bank.targets)
