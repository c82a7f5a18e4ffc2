"""L0 hard-concrete gates (Louizos, Welling, Kingma 2018): one log_alpha per group, kept in the bank's `gammas`;
with a target sparsity, CoFiPruning's Lagrangian and its multipliers (`bank.l0_multipliers`, saved with the gates)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import gates as G
from ..hooks import BankHook, full_tensor
from .base import Method, OptimizerPolicy

if TYPE_CHECKING:
    from ..groups import GateBank

L0_LR = 0.1  # an Adam rate: CoFiPruning's reg_learning_rate; measured in docs/compare_methods.md
L0_OFF = -100.0  # a log_alpha whose test-time gate and every training sample are exactly 0 (see `L0.hold_zero`)


class L0(Method):
    name = "l0"
    options = ("l0_train_size", "l0_target_sparsity")
    optimizer = OptimizerPolicy(helper="l0_optimizer", group_key="dgate_l0", auto_lr=L0_LR)
    holds_zeros = True

    @torch.no_grad()
    def hold_zero(self, bank: GateBank, target: str, mask: torch.Tensor) -> None:
        """log_alpha = L0_OFF: sigmoid(L0_OFF) (zeta - gamma) + gamma < 0, and a sample's logit noise is at most
        log(1e6) (u is clipped to [1e-6, 1 - 1e-6]), so both clip to exactly 0."""
        bank.gammas[target][:, mask.to(bank.gammas[target].device)] = L0_OFF

    def init_gates(self, config: Any, n_groups: int) -> torch.Tensor:
        return G.l0_init_log_alpha(n_groups, config.l0_droprate_init)

    def setup(self, bank: GateBank) -> None:
        if bank.config.l0_target_sparsity is not None:
            bank.l0_multipliers = nn.Parameter(torch.zeros(2))

    def reset(self, bank: GateBank) -> None:
        multipliers = getattr(bank, "l0_multipliers", None)
        if multipliers is not None and not multipliers.is_meta:
            with torch.no_grad():
                multipliers.zero_()

    def extra_parameters(self, bank: GateBank) -> list[nn.Parameter]:
        multipliers = getattr(bank, "l0_multipliers", None)
        return [] if multipliers is None else [multipliers]

    def scale(self, bank: GateBank, target: str) -> torch.Tensor:
        """The test-time hard-concrete gate."""
        return G.hard_concrete_deterministic(bank.gates(target)[0])

    def forward_scale(self, bank: GateBank, target: str) -> torch.Tensor:
        """One sample per group per forward pass while training, shared by all sites of the group."""
        if not bank.training:
            return self.scale(bank, target)
        cache = bank.forward_cache
        if target not in cache:
            cache[target] = G.hard_concrete_sample(bank.gates(target)[0])
        return cache[target]

    def attach(self, bank: GateBank) -> None:
        bank.module("").register_forward_pre_hook(DrawSamples(bank))

    def penalty(self, bank: GateBank, lam: float) -> torch.Tensor:
        """lam * expected L0 (over l0_train_size when set), or with a target sparsity the Lagrangian."""
        if bank.l0_target is not None:
            if not hasattr(bank, "l0_multipliers"):
                raise ValueError("bank.l0_target needs multipliers: gate with DGateConfig(l0_target_sparsity=...).")
            return G.l0_lagrangian(self.expected_sparsity(bank), bank.l0_target, full_tensor(bank.l0_multipliers))
        kept = sum(G.expected_l0(bank.gates(t)).sum() for t in bank.targets)
        return lam * kept / (bank.config.l0_train_size or 1)

    @staticmethod
    def expected_sparsity(bank: GateBank) -> torch.Tensor:
        kept = sum(G.expected_l0(bank.gates(t)).sum() for t in bank.targets)
        return G.l0_expected_sparsity(kept, sum(bank.sizes.values()))


class DrawSamples(BankHook):
    """Root-model pre-hook: one L0 sample per group per forward pass, drawn before any checkpointed block so a
    recomputation reuses it."""

    def __call__(self, *args: Any) -> None:
        bank = self.bank
        bank.forward_cache.clear()
        if bank.training:
            for t in bank.targets:
                bank.forward_cache[t] = G.hard_concrete_sample(bank.gammas[t][0])
