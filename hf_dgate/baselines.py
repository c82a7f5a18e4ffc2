"""Reference solvers the paper compares D-Gating against.

`group_lasso_fista` is the accelerated proximal-gradient method (FISTA, Beck & Teboulle 2009) for the
least-squares group lasso; it reaches exact zeros through the group soft-threshold and serves as the ground
truth D-Gating with D = 2 must match.
"""

from __future__ import annotations

import torch


def group_soft_threshold(beta: torch.Tensor, groups: torch.Tensor, tau: float) -> torch.Tensor:
    """prox of tau * sum_g ||beta_g||_2: shrink each group's norm by tau, zero it when below."""
    n_groups = int(groups.max()) + 1
    norms = torch.zeros(n_groups, dtype=beta.dtype).index_add_(0, groups, beta.pow(2)).sqrt()
    factor = (1 - tau / norms.clamp_min(torch.finfo(beta.dtype).tiny)).clamp_min(0)
    return beta * factor[groups]


def group_lasso_fista(
    X: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    lam: float,
    max_iter: int = 20000,
    tol: float = 1e-12,
) -> torch.Tensor:
    """argmin_beta 1/(2n) ||y - X beta||^2 + lam * sum_g ||beta_g||_2 (no intercept).

    `groups[j]` is the group of column j. Step 1/L with L the largest eigenvalue of X^T X / n.
    """
    n = X.shape[0]
    lipschitz = torch.linalg.eigvalsh(X.T @ X / n).max().item()
    step = 1.0 / lipschitz
    beta = torch.zeros(X.shape[1], dtype=X.dtype)
    z, t = beta.clone(), 1.0
    for _ in range(max_iter):
        grad = X.T @ (X @ z - y) / n
        new = group_soft_threshold(z - step * grad, groups, step * lam)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = new + ((t - 1) / t_new) * (new - beta)
        done = (new - beta).norm() <= tol * max(1.0, beta.norm().item())
        beta, t = new, t_new
        if done:
            break
    return beta
