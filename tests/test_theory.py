"""The paper's theory, measured: Lemma 2 decay rates and D=2 equivalence with the group lasso."""

from __future__ import annotations

import torch
from conftest import make_inputs, make_model

import hf_dgate
from hf_dgate import gates as G
from hf_dgate.baselines import group_lasso_fista


def _fit_slope(t: torch.Tensor, y: torch.Tensor) -> float:
    t, y = t - t.mean(), y - y.mean()
    return float((t * y).sum() / (t * t).sum())


def test_lemma2_imbalance_decays_at_rate_4_lam_over_d():
    """Full-batch GD with a small step on a tiny GPT-2: log|||w_g||^2 - gamma_g^2| falls with slope -4 lam / D."""
    lam, depth, lr, steps = 0.5, 3, 1e-3, 600
    model, inputs = make_model("gpt2"), make_inputs("gpt2", batch=4, seq=16)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], depth=depth, lam=lam))
    bank = hf_dgate.get_bank(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    logs = {t: [] for t in bank.targets}
    for _ in range(steps + 1):
        with torch.no_grad():
            for t in bank.targets:
                logs[t].append(G.imbalance(bank.group_sq_norms(t), bank.gammas[t]).double())
        loss = model(**inputs, labels=inputs["input_ids"]).loss + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    time = torch.arange(steps + 1, dtype=torch.float64) * lr
    expected = -4 * lam / depth
    for t, series in logs.items():
        imb = torch.stack(series)  # (steps, D-1, G)
        assert (imb[0].abs() > 1e-3).all()  # gates start at 1, weights do not: real imbalances to watch
        slopes = [_fit_slope(time, imb[:, d, g].abs().log()) for d in range(depth - 1) for g in range(imb.shape[2])]
        slopes = torch.tensor(slopes)
        rel = ((slopes - expected) / expected).abs()
        lo, hi = slopes.min().item(), slopes.max().item()
        print(f"{t}: slopes in [{lo:.4f}, {hi:.4f}], expected {expected:.4f}, max rel err {rel.max():.2e}")
        assert rel.max() < 0.05, (t, slopes.min(), slopes.max(), expected)


def _simulation(seed=0, n=200, p=200, size=5, informative=7):
    """The paper's group-lasso simulation: Gaussian features, effects and noise; 40 groups of 5, 7 informative."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    groups = torch.arange(p) // size
    beta = torch.zeros(p, dtype=torch.float64)
    for k in torch.randperm(p // size, generator=g)[:informative]:
        beta[k * size : (k + 1) * size] = torch.randn(size, generator=g, dtype=torch.float64)
    y = X @ beta + torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, groups


def test_depth2_gating_matches_proximal_group_lasso():
    X, y, groups = _simulation()
    n_groups = int(groups.max()) + 1
    lam_max = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, (X.T @ y / len(y)) ** 2).sqrt().max()
    lam = 0.15 * lam_max.item()
    beta_prox = group_lasso_fista(X, y, groups, lam)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 1, bias=False)).double()
    rule = hf_dgate.GroupRule("features", r"^0$", kind="in", size=5)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[], groups=[rule], depth=2, lam=lam, threshold=1e-6))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2000):
        loss = 0.5 * (model(X).squeeze(-1) - y).pow(2).mean() + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bank = hf_dgate.get_bank(model)
    beta_gated = (model[0].weight[0] * bank.scale("features")[groups]).detach()

    prox_norms = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, beta_prox**2).sqrt()
    selected_prox = set((prox_norms > 0).nonzero().flatten().tolist())
    report = hf_dgate.sparsity_report(model)
    selected_gated = set((bank.effective_norms("features") >= 1e-6).nonzero().flatten().tolist())
    assert 3 <= len(selected_prox) < n_groups  # a real selection problem
    assert selected_gated == selected_prox
    assert report.targets["features"].zero == n_groups - len(selected_prox)
    rel_err = ((beta_gated - beta_prox).norm() / beta_prox.norm()).item()
    print(f"groups selected {sorted(selected_gated)}; relative coefficient error {rel_err:.2e}")
    assert rel_err <= 0.02, rel_err
    # at the solution the surrogate and the group-lasso objective agree (balanced groups)
    assert hf_dgate.misalignment(model).item() < 1e-6
