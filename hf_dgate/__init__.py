"""hf_dgate: D-Gating structured sparsity (Kolb et al., NeurIPS 2025) for Hugging Face and PyTorch models."""

from .config import DGateConfig, GroupRule
from .patch import (
    apply_dgate,
    effective_norms,
    get_bank,
    induced_penalty,
    is_gated,
    misalignment,
    penalty,
    remove_dgate,
)
from .report import SparsityReport, sparsity_report
from .saving import load_gated, save_gated

__version__ = "0.1.0"

__all__ = [
    "DGateConfig",
    "GroupRule",
    "SparsityReport",
    "apply_dgate",
    "effective_norms",
    "get_bank",
    "induced_penalty",
    "is_gated",
    "load_gated",
    "misalignment",
    "penalty",
    "remove_dgate",
    "save_gated",
    "sparsity_report",
]
