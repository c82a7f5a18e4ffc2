"""The direct baseline: the induced penalty lam * sum ||theta_g||^(2/D) itself, by (sub)gradient steps, no gates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Method

if TYPE_CHECKING:
    from ..groups import GateBank


class Direct(Method):
    name = "direct"
    trainable_gates = False

    def penalty(self, bank: GateBank, lam: float) -> torch.Tensor:
        return bank.induced_penalty(lam)
