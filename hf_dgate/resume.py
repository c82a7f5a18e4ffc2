"""Resuming a DGateTrainer run: the checkpoint records the setup that shaped its state, and a resume compares.

A checkpoint's optimizer state is a list of tensors per parameter group, in order; the gates, which tensors they
scale and which group each lands in follow from the DGateConfig and the gate-group settings (`gated_lr`,
`gated_weights`). Resumed with another setup, the Trainer hands Adam's moments to other tensors (NaN, or a crash
inside torch) or restores a learning rate the user changed. So every save records the setup (`SETUP_KEY` in
`dgate_trainer_state.json`) and a resume sorts each changed field into one of two kinds:
- it shapes the state (what is gated and how, the optimizer's group layout): refused, naming the field;
- it steers training from here on (lam, thresholds, the lam controller's settings): the new value is used, the
  lam controller starts from it, and a warning says so.
A checkpoint whose save was cut short (no readable `trainer_state.json`, which the Trainer writes last, or a weight
file its manifest names is missing) is skipped by `resume_from_checkpoint=True` with a warning.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

SETUP_KEY = "setup"
# DGateConfig fields whose change only steers training from the resumed step on (everything else shapes state)
STEERING_CONFIG_FIELDS = ("lam", "threshold", "threshold_mode", "l0_train_size")
# DGateTrainer arguments that lay out the optimizer's parameter groups (refused when changed)
LAYOUT_ARGS = ("gated_lr", "gated_weights", "optim")
# Version of what gated_lr="auto" lays out. 2: without a budget, transformer block targets' gates stay on the
# Trainer's optimizer. Checkpoints without it (version 1) put every target's gates in the momentum-SGD group.
AUTO_LAYOUT = 2


def trainer_setup(trainer: Any) -> dict[str, Any]:
    """What shaped this run's state and what steers it: the DGateConfig, the optimizer layout, the controller."""
    args = getattr(trainer, "_dgate_setup_args", {})
    optim = getattr(getattr(trainer, "args", None), "optim", None)
    return {
        "dgate_config": trainer.dgate_bank.config.to_dict(),
        "optimizer": {
            "gated_lr": trainer.dgate_gated_lr,
            "gated_weights": trainer.dgate_gated_weights,
            "optim": str(getattr(optim, "value", optim)) if optim is not None else None,
            "auto_layout": AUTO_LAYOUT,
        },
        "controller": dict(args),
    }


def compare_setup(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[tuple[str, Any, Any]], list[tuple]]:
    """(refused, steering): the fields that differ, as (name, checkpoint value, this run's value)."""
    refused: list[tuple[str, Any, Any]] = []
    steering: list[tuple[str, Any, Any]] = []
    was_cfg, now_cfg = saved.get("dgate_config") or {}, now["dgate_config"]
    for key in sorted(set(was_cfg) | set(now_cfg)):
        if was_cfg.get(key) != now_cfg.get(key):
            (steering if key in STEERING_CONFIG_FIELDS else refused).append((key, was_cfg.get(key), now_cfg.get(key)))
    was_opt = saved.get("optimizer") or {}
    for key in LAYOUT_ARGS:
        if key in was_opt and was_opt[key] != now["optimizer"].get(key):
            refused.append((key, was_opt[key], now["optimizer"].get(key)))
    was_ctl = saved.get("controller") or {}
    for key in sorted(set(was_ctl) | set(now["controller"])):
        if key in was_ctl and was_ctl[key] != now["controller"].get(key):
            steering.append((key, was_ctl[key], now["controller"].get(key)))
    return refused, steering


def check_resume(
    checkpoint: str, state: dict[str, Any] | None, now: dict[str, Any], legacy_auto_rate: float | None = None
) -> bool:
    """Refuse a resume whose setup changed what the checkpoint's state means; warn about steering changes.
    Returns whether the saved lam controller may be restored (nothing that steers it changed).
    legacy_auto_rate: the gated_lr that lays this run out as gated_lr="auto" did before AUTO_LAYOUT 2 (None where
    both "auto"s agree); a checkpoint saved then under "auto" resumes with that rate and is refused under "auto"."""
    saved = (state or {}).get(SETUP_KEY)
    if not isinstance(saved, dict):
        return True  # a checkpoint from before setups were recorded: restored as it was
    was_opt = saved.get("optimizer") if isinstance(saved.get("optimizer"), dict) else {}
    if legacy_auto_rate is not None and was_opt.get("gated_lr") == "auto" and "auto_layout" not in was_opt:
        if now["optimizer"].get("gated_lr") == "auto":
            raise ValueError(
                f"Cannot resume from {checkpoint!r}: it was saved by an earlier hf_dgate, whose gated_lr='auto' put "
                "the gates of heads, neurons, layers and experts in the momentum-SGD group; this version's 'auto' "
                f"leaves them on the Trainer's optimizer. Resume it with gated_lr={legacy_auto_rate} (its layout)."
            )
        if now["optimizer"].get("gated_lr") == legacy_auto_rate:
            saved = {**saved, "optimizer": {**was_opt, "gated_lr": legacy_auto_rate}}
    refused, steering = compare_setup(saved, now)
    if refused:
        key, was, new = refused[0]
        more = f" (and {', '.join(k for k, _, _ in refused[1:])})" if len(refused) > 1 else ""
        raise ValueError(
            f"Cannot resume from {checkpoint!r}: it was trained with {key}={was!r}, this run has {key}={new!r}{more}; "
            "the saved gates and optimizer state belong to that setup. Resume with the checkpoint's setup (its "
            "dgate_config.json and the same DGateTrainer arguments), or start a new run from its weights."
        )
    if steering:
        changes = ", ".join(f"{k}={new!r} (checkpoint: {was!r})" for k, was, new in steering)
        warnings.warn(
            f"Resuming from {checkpoint!r} with {changes}: the new values are used from here on, and the lam "
            "controller starts from them instead of the checkpoint's state.",
            stacklevel=3,
        )
        return False
    return True


def checkpoint_complete(path: str) -> str | None:
    """None when the checkpoint's save finished, else why not (the Trainer writes trainer_state.json last)."""
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state) as f:
            json.load(f)
    except FileNotFoundError:
        return "it has no trainer_state.json (its save was cut short)"
    except (OSError, ValueError, RecursionError):
        return "its trainer_state.json is unreadable (its save was cut short)"
    manifest = os.path.join(path, "dgate_manifest.json")
    try:
        with open(manifest) as f:
            files = json.load(f).get("weights") or []
    except (OSError, ValueError, RecursionError, AttributeError):
        files = []
    missing = [n for n in files if isinstance(n, str) and not os.path.isfile(os.path.join(path, n))]
    return f"its weight file(s) {missing} are missing" if missing else None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint in `output_dir` whose save finished; each newer, incomplete one is named in a warning."""
    from .outdir import checkpoint_dirs

    ckpts = sorted(checkpoint_dirs(output_dir), key=lambda p: int(os.path.basename(p).split("-")[-1]))
    for path in reversed(ckpts):
        why = checkpoint_complete(path)
        if why is None:
            return path
        warnings.warn(f"Skipping the checkpoint {path!r}: {why}; resuming from an earlier one.", stacklevel=3)
    return None
