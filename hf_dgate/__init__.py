"""hf_dgate: D-Gating structured sparsity (Kolb et al., NeurIPS 2025) for Hugging Face and PyTorch models."""

from . import optim  # noqa: F401  (hf_dgate.optim.dgate_optimizer)
from .config import DGateConfig, GroupRule
from .controller import LamController
from .export import export_pruned, prune_heads
from .hub import export_to_dir
from .loading import AutoPrunedModel
from .patch import (
    apply_dgate,
    effective_norms,
    get_bank,
    induced_penalty,
    is_gated,
    merge_adapters,
    misalignment,
    penalty,
    remove_dgate,
)
from .pruning import magnitude_prune
from .report import SparsityReport, sparsity_report
from .saving import load_gated, save_gated


def __getattr__(name: str):
    """`DGateTrainer` is imported on first use: importing transformers' Trainer takes seconds."""
    if name == "DGateTrainer":
        from .trainer import DGateTrainer

        return DGateTrainer
    raise AttributeError(f"module 'hf_dgate' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "DGateTrainer",
    "LamController",
    "AutoPrunedModel",
    "export_pruned",
    "export_to_dir",
    "prune_heads",
    "DGateConfig",
    "GroupRule",
    "SparsityReport",
    "apply_dgate",
    "effective_norms",
    "get_bank",
    "induced_penalty",
    "is_gated",
    "load_gated",
    "magnitude_prune",
    "merge_adapters",
    "misalignment",
    "penalty",
    "remove_dgate",
    "save_gated",
    "sparsity_report",
]
