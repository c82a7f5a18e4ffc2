"""The paper's tabular and multimodal networks: NODE trees, neural additive models, late fusion.

Each exposes its groups through ordinary tensors so a `GroupRule` gates them, and implements
`dgate_prune(target, keep)` so export can remove dead groups exactly (see `hf_dgate.surgery`).
"""

from __future__ import annotations

import torch
from torch import nn


class ObliviousTrees(nn.Module):
    """A layer of differentiable oblivious decision trees (NODE, Popov et al. 2020), one group per tree.

    `weight` is the (trees, leaves, out) response table, so a GroupRule of kind 'out' on this module gates
    whole trees: the tree axis is the last axis of the (batch, out, trees) output. Feature choice uses a
    softmax and splits a sigmoid (NODE uses entmax/entmoid; the group structure is the same).
    """

    def __init__(self, in_features: int, n_trees: int = 32, depth: int = 4, out_features: int = 1):
        super().__init__()
        self.depth = depth
        self.feature_logits = nn.Parameter(torch.randn(n_trees, depth, in_features) * 0.1)
        self.thresholds = nn.Parameter(torch.randn(n_trees, depth) * 0.1)
        self.log_temperatures = nn.Parameter(torch.zeros(n_trees, depth))
        self.weight = nn.Parameter(torch.randn(n_trees, 2**depth, out_features) / (n_trees * 2**depth) ** 0.5)
        codes = torch.arange(2**depth).unsqueeze(1).bitwise_right_shift(torch.arange(depth)).bitwise_and(1)
        self.register_buffer("leaf_codes", codes.float(), persistent=False)  # (leaves, depth)

    @property
    def n_trees(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen = torch.einsum("bf,tdf->btd", x, self.feature_logits.softmax(-1))
        right = torch.sigmoid((chosen - self.thresholds) * torch.exp(-self.log_temperatures))  # (b, t, d)
        # probability of each leaf: product over depths of right or (1 - right) by the leaf's code bits
        probs = right.unsqueeze(2) * self.leaf_codes + (1 - right.unsqueeze(2)) * (1 - self.leaf_codes)
        leaf = probs.prod(-1)  # (b, t, leaves)
        return torch.einsum("btl,tlo->bot", leaf, self.weight)

    @torch.no_grad()
    def dgate_prune(self, target: str, keep: torch.Tensor) -> None:
        for name in ("feature_logits", "thresholds", "log_temperatures", "weight"):
            setattr(self, name, nn.Parameter(getattr(self, name)[keep].clone()))


class NODE(nn.Module):
    """One layer of oblivious trees whose outputs are summed, plus a bias (the paper's single tree layer)."""

    def __init__(self, in_features: int, num_outputs: int = 1, n_trees: int = 32, depth: int = 4):
        super().__init__()
        self.trees = ObliviousTrees(in_features, n_trees, depth, num_outputs)
        self.bias = nn.Parameter(torch.zeros(num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trees(x).sum(-1) + self.bias


class FeatureFirstLayer(nn.Module):
    """First layer of every shape function at once: hidden_{b,j,k} = x_{b,j} * weight_{k,j} + bias_{k,j}.

    `weight` is (hidden, features) like a Linear, so a GroupRule of kind 'in' gates input feature j, i.e. the
    first-layer weights of shape function j (paper App. E.6).
    """

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, in_features))
        self.bias = nn.Parameter(torch.randn(hidden, in_features) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1) * self.weight.T + self.bias.T  # (b, features, hidden)


class NAM(nn.Module):
    """Neural additive model: y = sum_j f_j(x_j) + b, one small ReLU MLP per feature (run batched)."""

    def __init__(self, in_features: int, num_outputs: int = 1, hidden: int = 32):
        super().__init__()
        self.first = FeatureFirstLayer(in_features, hidden)
        self.w2 = nn.Parameter(torch.randn(in_features, hidden, hidden) * (2 / hidden) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(in_features, hidden))
        self.w3 = nn.Parameter(torch.randn(in_features, hidden, num_outputs) * (1 / hidden) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        self.register_buffer("kept_features", torch.arange(in_features), persistent=True)

    def shape_functions(self, x: torch.Tensor) -> torch.Tensor:
        """f_j(x_j) for every feature: (batch, features, outputs)."""
        h = torch.relu(self.first(x))
        h = torch.relu(torch.einsum("bfh,fhk->bfk", h, self.w2) + self.b2)
        return torch.einsum("bfh,fho->bfo", h, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shape_functions(x).sum(1) + self.bias

    @torch.no_grad()
    def dgate_prune(self, target: str, keep: torch.Tensor) -> None:
        """Drop dead shape functions; a dead f_j is the constant f_j(0), which moves into the bias."""
        probe = torch.zeros(1, len(keep), dtype=self.w2.dtype, device=self.w2.device)
        constants = self.shape_functions(probe)[0]  # (features, outputs); dead ones no longer depend on x_j
        self.bias.add_(constants[~keep].sum(0))
        self.first.weight = nn.Parameter(self.first.weight[:, keep].clone())
        self.first.bias = nn.Parameter(self.first.bias[:, keep].clone())
        for name in ("w2", "b2", "w3"):
            setattr(self, name, nn.Parameter(getattr(self, name)[keep].clone()))
        self.kept_features = self.kept_features[keep]


class LateFusion(nn.Module):
    """Small CNN for images + MLP for tabular data, fused by one linear layer per modality (paper App. E.5).

    The fusion heads `fusion.image` and `fusion.tabular` are whole-module groups: a zero gate drops a modality.
    """

    def __init__(self, tabular_features: int, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.tabular = nn.Sequential(nn.Linear(tabular_features, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.fusion = nn.ModuleDict(
            {"image": nn.Linear(2 * width, num_classes, bias=False), "tabular": nn.Linear(32, num_classes, bias=False)}
        )
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, image: torch.Tensor, tabular: torch.Tensor) -> torch.Tensor:
        out = self.bias
        if "image" in self.fusion:
            out = out + self.fusion["image"](self.image(image))
        if "tabular" in self.fusion:
            out = out + self.fusion["tabular"](self.tabular(tabular))
        return out.expand(image.shape[0] if image is not None else tabular.shape[0], -1)

    @torch.no_grad()
    def dgate_prune(self, target: str, keep: torch.Tensor) -> None:
        """Remove dead modalities (branch and fusion head); the forward still accepts both inputs."""
        for name, alive in zip(("image", "tabular"), keep.tolist()):
            if not alive and name in self.fusion:
                del self.fusion[name]
                setattr(self, name, nn.Identity())
