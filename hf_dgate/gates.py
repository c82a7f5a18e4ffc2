"""The D-Gating math on plain tensors, vectorised over all groups.

Notation (Kolb et al. 2025): group g has primary weights w_g and D-1 scalar gates gamma_{g,d}; the model uses
theta_g = w_g * prod_d gamma_{g,d}. `gammas` is a (D-1, G) tensor, `w_sq` the (G,) vector of ||w_g||^2.
Nothing here knows about modules or frameworks.
"""

from __future__ import annotations

import torch


def init_gates(n_groups: int, depth: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gates start at 1 (Algorithm 1), so the gated model computes what the ungated one does."""
    return torch.ones(depth - 1, n_groups, dtype=dtype)


def gate_scale(gammas: torch.Tensor) -> torch.Tensor:
    """s_g = prod_d gamma_{g,d}: the factor the group's contribution is multiplied by."""
    return gammas.prod(dim=0)


def surrogate_penalty(w_sq_total: torch.Tensor, gammas: torch.Tensor, lam: float, depth: int) -> torch.Tensor:
    """R = (lam / D) * sum_g (||w_g||^2 + sum_d gamma_{g,d}^2); `w_sq_total` is already summed over groups."""
    return (lam / depth) * (w_sq_total + gammas.pow(2).sum())


def effective_norms(w_sq: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """||theta_g||_2 = |s_g| * ||w_g||_2 for every group."""
    # sqrt has an infinite derivative at 0; a zero group gets the subgradient 0 instead of NaN.
    safe = torch.where(w_sq > 0, w_sq, torch.ones_like(w_sq)).sqrt()
    return gate_scale(gammas).abs() * torch.where(w_sq > 0, safe, torch.zeros_like(w_sq))


def induced_penalty(theta_norms: torch.Tensor, lam: float, depth: int) -> torch.Tensor:
    """The non-smooth penalty D-Gating solves: lam * sum_g ||theta_g||_2^(2/D)."""
    safe = torch.where(theta_norms > 0, theta_norms, torch.ones_like(theta_norms)).pow(2.0 / depth)
    return lam * torch.where(theta_norms > 0, safe, torch.zeros_like(theta_norms)).sum()


def group_surrogate(w_sq: torch.Tensor, gammas: torch.Tensor, lam: float, depth: int) -> torch.Tensor:
    """Per-group surrogate (lam / D) * (||w_g||^2 + sum_d gamma_{g,d}^2), shape (G,)."""
    return (lam / depth) * (w_sq + gammas.pow(2).sum(dim=0))


def misalignment(w_sq: torch.Tensor, gammas: torch.Tensor, lam: float, depth: int) -> torch.Tensor:
    """R - lam * sum ||theta_g||^(2/D) >= 0 by AM-GM; zero iff every group is balanced."""
    theta = effective_norms(w_sq, gammas)
    per_group = group_surrogate(w_sq, gammas, lam, depth) - lam * theta.pow(2.0 / depth)
    return per_group.sum()


def imbalance(w_sq: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """||w_g||^2 - gamma_{g,d}^2 for every gate, shape (D-1, G); decays as exp(-4 lam t / D) (Lemma 2)."""
    return w_sq.unsqueeze(0) - gammas.pow(2)
