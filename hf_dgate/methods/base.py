"""The contract every penalty method implements (a strategy behind the `GateBank`).

The bank owns gates, norms, hooks and folding; a method decides what the gates mean and what training minimises:
how gates start, which scale a group gets (deterministic and in a training forward), the penalty, the extra state
it saves, and which optimizer parameter group it wants. Methods hold no state of their own: everything they keep
lives on the bank (so it moves, saves and deep-copies with the model) and is passed in as `bank`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import gates as G

if TYPE_CHECKING:
    from ..groups import GateBank


@dataclass(frozen=True)
class OptimizerPolicy:
    """The parameter group a method's gates get under `DGateTrainer(gated_lr=...)`: the public helper in
    `hf_dgate.optim` that builds it, the key marking the group, and the rate used for gated_lr='auto' (None: the
    helper's own default)."""

    helper: str
    group_key: str
    auto_lr: float | None = None
    takes_weights: bool = False  # the helper also moves gated weights (DGateTrainer's gated_weights)


class Method(ABC):
    """One penalty method: subclass, set `name`, implement `penalty`, and register it in `hf_dgate.methods`."""

    name: ClassVar[str]
    trainable_gates: ClassVar[bool] = True  # False: gates stay at 1 and are not applied (direct, slimming)
    depth_in_gates: ClassVar[bool] = False  # the saved gates' rows encode the depth (D-Gating: D - 1 rows)
    options: ClassVar[tuple[str, ...]] = ()  # DGateConfig fields only this method reads (None for the others)
    optimizer: ClassVar[OptimizerPolicy | None] = None
    prices_groups: ClassVar[bool] = False  # its penalty takes a price per group (DGateTrainer(target_params=...))
    holds_zeros: ClassVar[bool] = False  # removed groups can be held at exactly zero (DGateTrainer's finish)

    def init_gates(self, config: Any, n_groups: int) -> torch.Tensor:
        """The gates of `n_groups` groups as a fresh model holds them ((rows, G)); default D - 1 rows of ones."""
        return G.init_gates(n_groups, config.depth)

    def setup(self, bank: GateBank) -> None:
        """Check the gated model suits the method and add any extra parameters to the bank (they save with it)."""
        return None

    def reset(self, bank: GateBank) -> None:
        """Re-initialise the extra parameters after the bank left the meta device (gates are re-made by the bank)."""
        return None

    def extra_parameters(self, bank: GateBank) -> list[torch.nn.Parameter]:
        """Parameters besides the gates that the method added in `setup` (kept in fp32 like the gates)."""
        return []

    @torch.no_grad()
    def hold_zero(self, bank: GateBank, target: str, mask: torch.Tensor) -> None:
        """Set the masked groups' gates so that their scale is exactly 0 (only where `holds_zeros`); default: the
        gates themselves to 0 (s_g is their product, and a zero product has zero gradient for every factor)."""
        bank.gammas[target][:, mask.to(bank.gammas[target].device)] = 0.0

    def scale(self, bank: GateBank, target: str) -> torch.Tensor:
        """The deterministic scale s_g of every group of `target` (what sparsity, export and folding read)."""
        return G.gate_scale(bank.gates(target))

    def forward_scale(self, bank: GateBank, target: str) -> torch.Tensor:
        """The scale a forward pass applies (a stochastic method samples it while training)."""
        return self.scale(bank, target)

    def attach(self, bank: GateBank) -> None:
        """Install hooks the method needs besides the bank's gate hooks (they must subclass `hooks.BankHook`)."""
        return None

    @abstractmethod
    def penalty(self, bank: GateBank, lam: float) -> torch.Tensor:
        """What training adds to the loss."""

    def priced_penalty(self, bank: GateBank, lam: float, prices: dict[str, torch.Tensor]) -> torch.Tensor:
        """The penalty with a price per group (DGateTrainer(target_params=...)); only where `prices_groups`."""
        raise NotImplementedError(f"method {self.name!r} does not price its groups")

    def misalignment(self, bank: GateBank, lam: float) -> torch.Tensor:
        """How far the penalty is above the induced penalty it stands for; 0 for methods without a surrogate."""
        return bank.gates(bank.targets[0]).new_zeros(())

    def record_keys(self) -> tuple[str, ...]:
        """The fields of a saved gate record a reload must agree with (see `saving.record_conflict`)."""
        return ("method", "targets", "depth") if self.depth_in_gates else ("method", "targets")
