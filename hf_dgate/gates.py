"""The D-Gating math on plain tensors, vectorised over all groups.

Notation (Kolb et al. 2025): group g has primary weights w_g and D-1 scalar gates gamma_{g,d}; the model uses
theta_g = w_g * prod_d gamma_{g,d}. `gammas` is a (D-1, G) tensor, `w_sq` the (G,) vector of ||w_g||^2.
Nothing here knows about modules or frameworks.
"""

from __future__ import annotations

import math

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


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt whose gradient at 0 is the subgradient 0 instead of NaN (the direct baseline hits exact zeros).
    NaN stays NaN, so a diverged group is never read as a zero one."""
    positive = x > 0
    rest = torch.where(torch.isnan(x), x, torch.zeros_like(x))
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), rest)


def effective_norms(w_sq: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """||theta_g||_2 = |s_g| * ||w_g||_2 for every group."""
    return gate_scale(gammas).abs() * safe_sqrt(w_sq)


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


# ---- L0 hard-concrete gates (Louizos, Welling, Kingma 2018), the best-known differentiable alternative ----------
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
L0_DROPRATE_INIT = 0.1  # the default drop rate at init (DGateConfig.l0_droprate_init)
L0_INIT_LOG_ALPHA = 2.1972245773362196  # log(0.9 / 0.1): drop rate 0.1, test-time gate 0.98 at init


def l0_init_log_alpha(n_groups: int, droprate: float = L0_DROPRATE_INIT) -> torch.Tensor:
    """log_alpha = logit(1 - droprate) for every group, shape (1, G) (Louizos et al.: 0.5 for input features, 0.2
    elsewhere; CoFiPruning 0.5). Deterministic (the papers add N(0, 0.01) noise): a gated model is reproducible
    and a bank re-made from the meta device holds exactly what a fresh one does."""
    return torch.full((1, n_groups), math.log(1.0 - droprate) - math.log(droprate))


def hard_concrete_sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """A stretched, clipped concrete sample per group (training-time gate, reparameterised)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HC_BETA)
    return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def hard_concrete_deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """The test-time gate min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma)); exactly 0 for small log_alpha."""
    return (torch.sigmoid(log_alpha) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0) per group: sigmoid(log_alpha - beta log(-gamma / zeta))."""
    return torch.sigmoid(log_alpha - HC_BETA * torch.log(torch.tensor(-HC_GAMMA / HC_ZETA)))


def l0_expected_sparsity(expected_kept: torch.Tensor, n_groups: int) -> torch.Tensor:
    """1 - (sum_g P(gate_g != 0)) / G: the fraction of groups expected to be zero (`expected_kept` is the sum)."""
    return 1.0 - expected_kept / n_groups


class _AscendGrad(torch.autograd.Function):
    """Identity whose backward negates the gradient: whatever optimizer descends on the loss ascends on its input."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def l0_lagrangian(expected_sparsity: torch.Tensor, target: float, multipliers: torch.Tensor) -> torch.Tensor:
    """CoFiPruning's constraint term l1 (s - t) + l2 (s - t)^2 for expected sparsity s and target t.

    The model minimises it, the multipliers (l1, l2) = `multipliers` maximise it: their gradient is negated here, so
    the optimizer that takes the model's descent step takes their ascent step (CoFi runs a second optimizer with a
    negative learning rate instead). Below the target, l1 grows negative and l2 positive, so the term and its push
    towards sparsity grow until s reaches t.
    """
    lam1, lam2 = _AscendGrad.apply(multipliers).unbind(0)
    gap = expected_sparsity - target
    return lam1 * gap + lam2 * gap * gap
