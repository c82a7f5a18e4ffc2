"""How lam moves during training: a linear warm-up and an optional controller toward a requested sparsity.

Kept apart from the Trainer so the rule is plain arithmetic that can be tested and reused in any loop:
call `lam_at(step)` before each optimizer step and `update(step, sparsity)` after it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class LamController:
    """lam(step) = warm-up factor(step) * lam_base, with lam_base steered toward `target_sparsity` if one is given.

    The controller is integral in log-lam: every `interval` optimizer steps after the warm-up it measures the
    sparsity s of the steered target and multiplies lam_base by exp(gain * clip(target - s, -max_error, max_error)),
    unless |target - s| <= tolerance. Too dense: lam grows geometrically; too sparse: it shrinks so that groups that
    are still useful can grow back. Groups take many steps to collapse and a balanced zero group is a fixed point,
    so a controller that keeps raising lam while groups are still falling overshoots: lam is only raised when the
    sparsity did not rise since the last measurement.
    """

    lam: float
    warmup_steps: int = 0
    target_sparsity: float | None = None
    interval: int = 10
    gain: float = 1.0
    tolerance: float = 0.01
    max_error: float = 0.5
    min_lam: float = 1e-8
    max_lam: float = 1e3
    last_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if not (_finite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam={self.lam!r} is invalid: expected a finite float >= 0.")
        if not (_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"lam_warmup_steps={self.warmup_steps!r} is invalid: expected an int >= 0.")
        if self.target_sparsity is not None:
            if not (_finite(self.target_sparsity) and 0.0 <= self.target_sparsity < 1.0):
                raise ValueError(f"target_sparsity={self.target_sparsity!r} is invalid: expected a float in [0, 1).")
            if self.lam <= 0:
                raise ValueError("target_sparsity needs a starting lam > 0 (the controller scales lam geometrically).")
        if not (_int(self.interval) and self.interval >= 1):
            raise ValueError(f"interval={self.interval!r} is invalid: expected an int >= 1.")
        for name in ("gain", "tolerance", "max_error", "min_lam", "max_lam"):
            value = getattr(self, name)
            if not (_finite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is invalid: expected a finite float >= 0.")
        if self.min_lam > self.max_lam:
            raise ValueError(f"min_lam={self.min_lam!r} is above max_lam={self.max_lam!r}: expected min_lam <= max_lam")
        if not (_finite(self.last_sparsity) and 0.0 <= self.last_sparsity <= 1.0):
            raise ValueError(f"last_sparsity={self.last_sparsity!r} is invalid: expected a float in [0, 1].")
        self.lam = float(self.lam)

    def warmup_factor(self, step: int) -> float:
        """Linear ramp from 1/warmup_steps at step 0 to 1 at step warmup_steps - 1 (step = optimizer steps done)."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def lam_at(self, step: int) -> float:
        """The lam the penalty uses for the optimizer step that follows `step` completed steps."""
        return self.lam * self.warmup_factor(step)

    def update(self, step: int, sparsity: float) -> bool:
        """After `step` completed optimizer steps with measured `sparsity`; returns whether lam changed."""
        if self.target_sparsity is None or step < self.warmup_steps or step % self.interval != 0:
            return False
        err = self.target_sparsity - sparsity
        rising, self.last_sparsity = sparsity > self.last_sparsity, sparsity
        if abs(err) <= self.tolerance or (err > 0 and rising):
            return False  # on target, or still too dense but groups are collapsing: wait for them to settle
        err = max(-self.max_error, min(self.max_error, err))
        self.lam = min(self.max_lam, max(self.min_lam, self.lam * math.exp(self.gain * err)))
        return True

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state, validated like a fresh controller: a ValueError names the bad field, and the
        controller is left unchanged."""
        if not isinstance(state, dict):
            raise ValueError(f"the lam controller state must be a JSON object, not {type(state).__name__}.")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"unknown lam controller field(s) {unknown}; allowed fields are {sorted(known)}.")
        restored = LamController(**{**self.state_dict(), **state})  # runs __post_init__'s checks
        for k in known:
            setattr(self, k, getattr(restored, k))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
