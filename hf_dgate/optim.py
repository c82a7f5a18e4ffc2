"""D-Gating under any optimizer: gates and gated weights take a gradient-descent step, everything else the user's.

Why: D-Gating's exact zeros come from gradient descent on `w_g * gamma_1 * ... * gamma_{D-1}` plus the L2 surrogate
(Kolb et al., Lemma 2 and Theorem 1 are for gradient descent/flow). Near zero the data gradient of a group shrinks
with the product of its other factors while the L2 pull stays proportional to the factor itself, so a balanced
group that is not needed decays geometrically to exact zero. Adam, AdamW, RMSprop, Adafactor, ... divide each
coordinate's step by its own running gradient RMS: the shrinking data gradient of a dying group is rescaled back to a
step of size ~lr, so every group jitters at ~lr and the L2 pull cannot finish the job (measured in
docs/optimizers.md: Adam keeps 760+ of 784 Fashion-MNIST pixels where SGD keeps under 100).

The recipe: take the optimizer the user built (any class), move the gates (and, for vision and tabular targets, the
tensors holding their primary weights) into one parameter group of its own, and update that group with heavy-ball
momentum SGD on the raw gradient (data loss + penalty) inside a step pre-hook; the optimizer itself then skips those
tensors (their gradient is None) and updates the rest as before. The group lives in the user's optimizer, so learning-
rate schedulers scale it, gradient clipping and AMP unscaling happen before it, and its momentum buffers travel in the
optimizer's `state_dict` (under the key 'dgate_momentum_buffers').
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .methods.dgate import DGate
from .methods.l0 import L0, L0_LR
from .patch import get_bank
from .targets import BUILTIN

GROUP_KEY = DGate.optimizer.group_key  # marks the parameter group the recipe updates
BUFFERS_KEY = "dgate_momentum_buffers"  # the recipe's momentum buffers in the optimizer's state_dict

# The defaults, chosen by the measurements in docs/optimizers.md (Adam, AdamW, RMSprop, Adafactor for the rest):
# - module targets (features, filters, GroupRules): gates + gated weights at the paper's SGD rate for LeNet and VGG.
#   Their gated tensors are small per-group slices that SGD trains well, and only the full update matches SGD's
#   zeros on VGG filters (gates alone at 0.05 leave most filters grey, at 0.2 they remove 90% of them).
# - transformer block targets (heads, neurons, layers, experts), when asked for: the gates only, at a higher rate.
#   The gated tensors are whole projection matrices that momentum SGD does not train (NanoGPT: accuracy 0.31-0.36
#   against 0.41). DGateTrainer's gated_lr="auto" leaves these gates to the Trainer's own optimizer instead
#   (block_gates=False): on NanoGPT the gates on SGD at 0.2 turn a lam sweep into a cliff (heads 0% at lam 0.003,
#   100% at 0.02) where AdamW moves gradually (62.5% to 96.9% over lam 0.003 to 0.3) with exact D = 3 zeros.
MODULE_TARGET_LR = 0.05
BLOCK_TARGET_LR = 0.2


def is_block_target(name: str) -> bool:
    """Whether `name` is a transformer block target (heads, neurons, layers, experts), not a module target."""
    target = BUILTIN.get(name)
    return target is not None and target.per_block



def has_module_targets(model: nn.Module) -> bool:
    """Whether the model gates a module target (features, filters, GroupRules), whose gates take the SGD group
    under DGateTrainer's gated_lr="auto"."""
    return any(not is_block_target(gs.target) for gs in get_bank(model).group_sets)


def gated_parameters(
    model: nn.Module, include_weights: bool | None = True, *, block_gates: bool = True
) -> list[nn.Parameter]:
    """The trainable gates and every parameter tensor that holds gated primary weights (each once, in model order).

    include_weights: True every target's gated weights, False none, None those of module targets (features,
    filters, GroupRules) but not of transformer block targets (heads, neurons, layers, experts).
    block_gates: whether the gates of transformer block targets are included (False: module targets only).
    Fused tensors (GPT-2's `c_attn`) count whole: their ungated rows get the same plain-gradient update.
    """
    bank = get_bank(model)
    if bank.strategy.optimizer != DGate.optimizer:
        raise ValueError(
            f"hf_dgate.optim targets method='dgate' (gates times weights with the L2 surrogate); this model is gated "
            f"with method={bank.method!r}, which keeps the optimizer it was given."
        )
    ids = {id(p) for p in bank.parameters() if p.requires_grad}
    if not block_gates:
        ids -= {id(p) for t, p in bank.gammas.items() if is_block_target(t)}
    for gs in bank.group_sets if include_weights is not False else ():
        if (include_weights is None or not block_gates) and is_block_target(gs.target):
            continue
        for sl in gs.primary:
            p = getattr(bank.module(sl.module), sl.param)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                ids.add(id(p))
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) in ids and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def dgate_optimizer(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    lr: float | None = None,
    momentum: float = 0.9,
    include_weights: bool | None = None,
    block_gates: bool = True,
):
    """Give `optimizer` the D-Gating update for gates and gated weights and return it (the same object).

        opt = hf_dgate.optim.dgate_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model)

    Call it after `apply_dgate`, on an optimizer built over all of the model's parameters (any class, any parameter
    groups), before its first step and before creating an LR scheduler. The gates and gated tensors leave their
    groups for one group of their own (marked `group["dgate"] = True`, no weight decay: the penalty is their decay),
    updated by heavy-ball momentum SGD, `buf = momentum * buf + grad; p -= lr * buf`, on the raw gradient of data loss
    plus `hf_dgate.penalty(model)`: the update the paper's theory and experiments use.

    include_weights: which gated weights move too. None (default): those of module targets (features, filters,
        GroupRules), not those of transformer block targets (heads, neurons, layers, experts), whose gated tensors
        are whole projection matrices that momentum SGD trains badly. True: all; False: the gates only.
        Measured (docs/optimizers.md): gates only is as good as the full recipe on LeNet features, weaker on VGG
        filters, and the only variant that leaves a small transformer's training intact.
    lr: that group's peak learning rate, in SGD units (the paper's SGD rate for the model, e.g. 0.05 for LeNet and
        VGG), not the Adam rate; schedulers scale it like every other group. None (default): MODULE_TARGET_LR
        (0.05) when gated weights move, else BLOCK_TARGET_LR (0.2). Measured on LeNet features (Adam for the rest):
        0.02 and below leave every group above the threshold within 10 epochs, 0.05 matches SGD, 0.1 and above
        remove more and cost accuracy (docs/optimizers.md).
    block_gates: whether the gates of transformer block targets join the group (True, default: you asked for the
        recipe). DGateTrainer's gated_lr="auto" passes False and leaves them to the Trainer's optimizer: on NanoGPT
        heads, gates on SGD at 0.2 make the lam sweep a cliff (0% to 100% heads within lam 0.003 to 0.02), while
        AdamW alone moves it gradually and still reaches exact D = 3 zeros (docs/optimizers.md).
    """
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"lr={lr!r}: pass the gated group's SGD learning rate, a float > 0 (e.g. 0.05), or None.")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum!r}: pass a float in [0, 1).")
    if include_weights not in (None, True, False):
        raise ValueError(f"include_weights={include_weights!r}: pass None (per target), True or False.")
    if not isinstance(block_gates, bool):
        raise ValueError(f"block_gates={block_gates!r}: pass True or False.")
    gated = gated_parameters(model, include_weights, block_gates=block_gates)
    if lr is None:
        few = gated_parameters(model, False, block_gates=block_gates)
        lr = MODULE_TARGET_LR if len(gated) > len(few) else BLOCK_TARGET_LR
    if not gated:
        raise ValueError(
            "The model's gates and gated weights are all frozen (or, with block_gates=False, it gates no module "
            "target): the recipe has nothing to update."
        )
    group = {"lr": float(lr), "weight_decay": 0.0, GROUP_KEY: True, "dgate_momentum": float(momentum)}
    _own_group(optimizer, gated, group, "dgate_optimizer")
    optimizer.dgate_momentum_buffers = {}  # kept out of optimizer.state, whose entries each optimizer class parses
    optimizer.register_step_pre_hook(_gated_step)
    optimizer.register_state_dict_post_hook(_save_buffers)
    optimizer.register_load_state_dict_pre_hook(_load_buffers)
    return optimizer


def _dgate_group(optimizer: torch.optim.Optimizer) -> dict:
    return next(g for g in optimizer.param_groups if g.get(GROUP_KEY))


def _save_buffers(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """`state_dict()` carries the momentum buffers under BUFFERS_KEY, by position in the D-Gating group."""
    bufs = optimizer.dgate_momentum_buffers
    params = _dgate_group(optimizer)["params"]
    state_dict[BUFFERS_KEY] = {i: bufs[p] for i, p in enumerate(params) if p in bufs}
    return state_dict


def _load_buffers(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    params = _dgate_group(optimizer)["params"]
    saved = state_dict.pop(BUFFERS_KEY, {})
    optimizer.dgate_momentum_buffers = {
        params[int(i)]: b.to(device=params[int(i)].device, dtype=params[int(i)].dtype) for i, b in saved.items()
    }
    return state_dict


@torch.no_grad()
def _gated_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Runs before `optimizer.step()`: momentum SGD on the D-Gating group, then its gradients are set to None so the
    optimizer's own update (which skips tensors without a gradient) leaves it alone."""
    for group in optimizer.param_groups:
        if not group.get(GROUP_KEY):
            continue
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = optimizer.dgate_momentum_buffers.get(p)
            if buf is None:
                buf = optimizer.dgate_momentum_buffers[p] = p.grad.detach().clone()
            else:
                buf.mul_(group["dgate_momentum"]).add_(p.grad)
            p.add_(buf, alpha=-group["lr"])
            p.grad = None


# ---- method='l0': log_alpha at its own learning rate (Louizos et al. 2018; CoFiPruning, Xia et al. 2022) ----------
L0_GROUP_KEY = L0.optimizer.group_key  # marks the parameter group of the hard-concrete gates


def l0_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *, lr: float = L0_LR):
    """Give `optimizer` the L0 practice: the gates' log_alpha (and the Lagrange multipliers of `l0_target_sparsity`)
    in one parameter group of their own, at learning rate `lr`, without weight decay. Returns the same object.

        opt = hf_dgate.optim.l0_optimizer(torch.optim.AdamW(model.parameters(), lr=5e-3), model, lr=0.1)

    Why: a test-time gate is exactly 0 only once log_alpha < -2.4, and it starts at logit(1 - l0_droprate_init)
    (2.2 by default). At a model's learning rate (Adam moves a tensor by about lr per step) log_alpha cannot travel
    that far in a normal run, so L0 removes nothing until lam is so large that it removes everything. Louizos et al.
    and CoFiPruning therefore train the gates at a much larger rate (CoFi: AdamW at 0.01-0.1 on log_alpha).
    The group is updated by the optimizer's own class (Adam updates for Adam), so `lr` is in that class's units:
    an Adam rate such as 0.1, or for SGD a rate that suits log_alpha's small gradients (docs/compare_methods.md).
    The multipliers' gradient is negated inside the penalty, so this descent step is their ascent step.
    Call it after `apply_dgate`, on an optimizer over all of the model's parameters, before its first step and before
    creating an LR scheduler (which then scales this group like the others).
    """
    bank = get_bank(model)
    if bank.strategy.optimizer != L0.optimizer:
        raise ValueError(f"l0_optimizer is for method='l0' (hard-concrete gates); this model uses {bank.method!r}.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr={lr!r}: pass log_alpha's learning rate, a float > 0 (e.g. {L0_LR} for Adam).")
    params = [p for p in bank.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model's L0 gates are all frozen: l0_optimizer has nothing to move.")
    _own_group(optimizer, params, {"lr": float(lr), "weight_decay": 0.0, L0_GROUP_KEY: True}, "l0_optimizer")
    return optimizer


def _own_group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], group: dict, caller: str) -> None:
    """Move `params` out of the optimizer's groups into one new group with the settings in `group` (which holds the
    key marking it); the other groups keep their settings, and groups left empty are dropped."""
    key = next(k for k in (GROUP_KEY, L0_GROUP_KEY) if group.get(k))
    if any(g.get(key) for g in optimizer.param_groups):
        raise ValueError(f"This optimizer already has the group that {caller} adds ({caller} was called twice).")
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(f"Call {caller} before the optimizer's first step (its state is not empty).")
    if any("initial_lr" in g for g in optimizer.param_groups):  # what torch's LR schedulers leave on each group
        raise ValueError(
            f"Call {caller} before creating the learning-rate scheduler: this optimizer's groups carry 'initial_lr', "
            f"so a scheduler already holds one rate per group, which would go to the wrong groups once {caller} "
            "regroups them. Build the optimizer, call it, then create the scheduler."
        )
    ids = {id(p) for p in params}
    found: set[int] = set()
    for g in optimizer.param_groups:
        found |= {id(p) for p in g["params"] if id(p) in ids}
    if found != ids:
        raise ValueError(
            f"{len(ids - found)} gate or gated tensors are not in this optimizer; build it over all of the model's "
            "parameters (e.g. torch.optim.Adam(model.parameters(), ...)) after apply_dgate."
        )
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({"params": params, **group})
