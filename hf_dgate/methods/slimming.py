"""Network slimming (Liu et al. 2017): L1 on the BatchNorm scales that follow the gated convolutions' filters."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Method

if TYPE_CHECKING:
    from ..groups import GateBank


class Slimming(Method):
    name = "slimming"
    trainable_gates = False

    def setup(self, bank: GateBank) -> None:
        if not self.norms(bank):
            raise ValueError(
                "method='slimming' penalises BatchNorm scales: use target='filters' on a model with "
                "BatchNorm after its convolutions."
            )

    @staticmethod
    def norms(bank: GateBank) -> list[nn.Module]:
        """The BatchNorm layers among the gated primary slices, each once."""
        bns = {
            id(m): m
            for gs in bank.group_sets
            for sl in gs.primary
            if isinstance(m := bank.module(sl.module), nn.modules.batchnorm._BatchNorm)
        }
        return list(bns.values())

    def penalty(self, bank: GateBank, lam: float) -> torch.Tensor:
        return lam * sum(m.weight.abs().sum() for m in self.norms(bank))
