"""Structured magnitude pruning of gated groups: the post-hoc step the paper gives the baselines (App. C.3)."""

from __future__ import annotations

import torch
from torch import nn

from .patch import get_bank


@torch.no_grad()
def magnitude_prune(model: nn.Module, ratio: float, target: str | None = None, scope: str = "global") -> dict[str, int]:
    """Zero the `ratio` fraction of groups with the smallest effective norm ||theta_g||, in place.

    The primary weights of a pruned group are set to 0, so ||theta_g|| = 0 for every method and export removes
    the group. `scope='global'` ranks all groups of a target together, `'layer'` prunes `ratio` in each layer.
    Returns the number of groups pruned per target.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} is invalid: expected a fraction in [0, 1].")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope={scope!r} is invalid: expected 'global' or 'layer'.")
    bank = get_bank(model)
    targets = bank.targets if target is None else [target]
    unknown = set(targets) - set(bank.targets)
    if unknown:
        raise ValueError(f"target={target!r} is not gated in this model; gated targets are {bank.targets}.")
    pruned = {}
    for t in targets:
        norms = bank.effective_norms(t)
        prune = torch.zeros_like(norms, dtype=torch.bool)
        if scope == "global":
            k = round(ratio * len(norms))
            prune[norms.argsort()[:k]] = True
        else:
            for (gs, local), (_, part) in zip(bank.per_set(norms, t), bank.per_set(prune, t)):
                part[local.argsort()[: round(ratio * gs.n_groups)]] = True  # (a view: writes into `prune`)
        _zero_groups(bank, t, prune)
        pruned[t] = int(prune.sum())
    return pruned


def _zero_groups(bank, target: str, prune: torch.Tensor) -> None:
    for gs, dead in bank.per_set(prune, target):
        dead = dead.cpu()
        if not bool(dead.any()):
            continue
        for sl in gs.primary:
            w = getattr(bank.module(sl.module), sl.param)
            if sl.axis is None:
                if bool(dead[sl.index].all()):
                    w.zero_()
                continue
            mask = torch.zeros(w.shape[sl.axis], dtype=torch.bool)
            inside = sl.index >= 0
            mask[inside] = dead[sl.index[inside]]
            w.index_fill_(sl.axis, mask.nonzero().flatten().to(w.device), 0.0)
