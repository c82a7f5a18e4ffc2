"""hf_dgate: D-Gating structured sparsity (Kolb et al., NeurIPS 2025) for Hugging Face and PyTorch models.

The public names are imported on first use (PEP 562): `import hf_dgate` stays cheap, so `hf-dgate --help` answers
without loading torch and transformers (seconds on a busy machine)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_LAZY = {
    "DGateConfig": "config",
    "GroupRule": "config",
    "LamController": "controller",
    "export_pruned": "export",
    "prune_heads": "export",
    "export_to_dir": "hub",
    "AutoPrunedModel": "loading",
    "apply_dgate": "patch",
    "effective_norms": "patch",
    "get_bank": "patch",
    "induced_penalty": "patch",
    "is_gated": "patch",
    "merge_adapters": "patch",
    "misalignment": "patch",
    "penalty": "patch",
    "remove_dgate": "patch",
    "magnitude_prune": "pruning",
    "SparsityReport": "report",
    "sparsity_report": "report",
    "load_gated": "saving",
    "save_gated": "saving",
    "DGateTrainer": "trainer",
    "with_dgate": "trainer",
    "configure_threads": "threads",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below imports on first use
    from . import optim  # noqa: F401
    from .config import DGateConfig, GroupRule  # noqa: F401
    from .controller import LamController  # noqa: F401
    from .export import export_pruned, prune_heads  # noqa: F401
    from .hub import export_to_dir  # noqa: F401
    from .loading import AutoPrunedModel  # noqa: F401
    from .patch import (  # noqa: F401
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
    from .pruning import magnitude_prune  # noqa: F401
    from .report import SparsityReport, sparsity_report  # noqa: F401
    from .saving import load_gated, save_gated  # noqa: F401
    from .threads import configure_threads  # noqa: F401
    from .trainer import DGateTrainer, with_dgate  # noqa: F401


def __getattr__(name: str):
    """Import the submodule that defines `name` on first access, and cache the attribute."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _submodules():  # hf_dgate.optim.dgate_optimizer without an explicit `import hf_dgate.optim`
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'hf_dgate' has no attribute {name!r}")
    globals()[name] = value
    return value


def _submodules() -> set[str]:
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__)}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _submodules())


__version__ = "0.1.0"

__all__ = [
    "DGateTrainer",
    "with_dgate",
    "LamController",
    "AutoPrunedModel",
    "export_pruned",
    "export_to_dir",
    "prune_heads",
    "DGateConfig",
    "GroupRule",
    "SparsityReport",
    "apply_dgate",
    "configure_threads",
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
