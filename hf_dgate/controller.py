"""How lam moves during training: a linear warm-up and an optional controller toward a requested sparsity.

Kept apart from the Trainer so the rule is plain arithmetic that can be tested and reused in any loop:
call `lam_at(step)` before each optimizer step and `observe(step, norms, thresholds)` after it (it acts every
`interval` steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

FALLING_RATIO = 0.05  # a group under this fraction of its target's largest norm is on its way to zero
SETTLE_TOL = 0.2  # groups whose norms moved less than this (median |log change|) over an interval have settled


@dataclass
class LamController:
    """lam(step) = warm-up factor(step) * lam_base, with lam_base steered toward `target_sparsity` if one is given.

    The controller is integral in log-lam: every `interval` optimizer steps after the warm-up it measures the
    steered target (`measure`) and multiplies lam_base by exp(gain * clip(target - s, -max_error, max_error)).
    Too many zero groups (s = sparsity above target + tolerance): lam shrinks at once. Too dense: lam grows only when
    the committed sparsity s (zero groups plus those falling toward zero) is below target - tolerance, has not risen
    since the last measurement and the other groups' norms have settled. A zero group is a fixed point (it does not
    come back) and groups take many steps to collapse after lam rises, so raising lam while they are still answering
    the last change is what overshoots (measured before this rule: 0.94 for a 0.5 target on the demo's copy task).
    """

    lam: float
    warmup_steps: int = 0
    target_sparsity: float | None = None
    target_ramp_steps: int = 0
    interval: int = 10
    gain: float = 1.0
    tolerance: float = 0.01
    max_error: float = 0.5
    min_lam: float = 1e-8
    max_lam: float = 1e3
    last_sparsity: float = 0.0
    last_norms: list[float] | None = None  # the steered target's group norms at the last measurement

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
        if not (_int(self.target_ramp_steps) and self.target_ramp_steps >= 0):
            raise ValueError(f"target_ramp_steps={self.target_ramp_steps!r} is invalid: expected an int >= 0.")
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
        if self.last_norms is not None and not (
            isinstance(self.last_norms, list) and all(_finite(v) and v >= 0 for v in self.last_norms)
        ):
            raise ValueError("last_norms is invalid: expected null or a list of finite floats >= 0.")
        self.lam = float(self.lam)

    def warmup_factor(self, step: int) -> float:
        """Linear ramp from 1/warmup_steps at step 0 to 1 at step warmup_steps - 1 (step = optimizer steps done)."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def lam_at(self, step: int) -> float:
        """The lam the penalty uses for the optimizer step that follows `step` completed steps."""
        return self.lam * self.warmup_factor(step)

    def target_at(self, step: int) -> float | None:
        """The sparsity steered to after `step` optimizer steps: it ramps linearly from 0 over `target_ramp_steps`
        after the warm-up, so that groups fall a few at a time instead of in one late avalanche."""
        if self.target_sparsity is None or self.target_ramp_steps <= 0:
            return self.target_sparsity
        return self.target_sparsity * min(1.0, max(0, step - self.warmup_steps) / self.target_ramp_steps)

    def update(self, step: int, sparsity: float, settled: bool = True, committed: float | None = None) -> bool:
        """After `step` completed optimizer steps with measured `sparsity` (zero groups), `committed` (zero or
        falling, default `sparsity`) and `settled` (the other groups' norms have stopped moving). Returns whether lam
        changed."""
        if self.target_sparsity is None or step < self.warmup_steps or step % self.interval != 0:
            return False
        committed = sparsity if committed is None else committed
        rising, self.last_sparsity = committed > self.last_sparsity, committed
        target = self.target_at(step)
        if sparsity > target + self.tolerance:
            err = target - sparsity  # too many zeros: weaken so that falling groups can come back
        elif committed < target - self.tolerance and settled and not rising:
            err = target - committed  # too dense and nothing is moving: strengthen
        else:
            return False  # on target, or groups are still answering the last change: wait
        err = max(-self.max_error, min(self.max_error, err))
        self.lam = min(self.max_lam, max(self.min_lam, self.lam * math.exp(self.gain * err)))
        return True

    def observe(self, step: int, norms: torch.Tensor, thresholds: torch.Tensor) -> bool:
        """`update` from the steered target's group norms and thresholds after `step` optimizer steps (call it every
        `interval` steps); keeps the norms for the next call, and in `state_dict`, so a resumed run decides alike."""
        if self.target_sparsity is None or step % self.interval != 0:
            return False
        norms, thresholds = norms.detach().float().cpu(), thresholds.detach().float().cpu()
        previous = None if self.last_norms is None else torch.tensor(self.last_norms, dtype=torch.float32)
        committed, settled = measure(norms, thresholds, previous)
        zero = float((norms < thresholds).float().mean())
        self.last_norms = norms.tolist()
        return self.update(step, zero, settled=settled, committed=committed)

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


def measure(norms: torch.Tensor, thresholds: torch.Tensor, previous: torch.Tensor | None = None) -> tuple[float, bool]:
    """(committed sparsity, settled) of one target from its group norms now and one interval ago.

    Committed: groups under their threshold, and groups falling toward it: under FALLING_RATIO of the target's
    largest norm and shrinking by more than SETTLE_TOL (in log) over the interval. Counting a falling group before
    it arrives is what lets the controller stop in time; a small group that has stopped shrinking is not counted.
    Settled: the median |log change| of the other groups' norms over the interval is under SETTLE_TOL (no previous
    measurement: not settled).
    """
    norms = norms.detach().float()
    zero = norms < thresholds
    if previous is None or previous.shape != norms.shape:
        return float(zero.float().mean()), False
    change = norms.clamp_min(1e-30).log() - previous.detach().float().clamp_min(1e-30).log()
    committed = zero | ((norms < FALLING_RATIO * norms.max()) & (change < -SETTLE_TOL))
    if bool(committed.all()):
        return 1.0, False
    return float(committed.float().mean()), bool(change[~committed].abs().median() < SETTLE_TOL)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
