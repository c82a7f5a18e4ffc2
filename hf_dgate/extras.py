"""Optional dependencies: the core install is torch, transformers, safetensors and huggingface_hub; a feature that
needs more names the pip extra that brings it (pyproject.toml [project.optional-dependencies], README 'Set-up')."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (pip distribution, hf-dgate extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "accelerate": ("accelerate", "trainer"),
    "torch_pruning": ("torch-pruning", "vision"),
    "matplotlib": ("matplotlib", "plot"),
    "datasets": ("datasets", "examples"),
    "peft": ("peft", "examples"),
    "evaluate": ("evaluate", "examples"),
    "sklearn": ("scikit-learn", "examples"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise MissingExtraError with the pip command that adds it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist, extra = OPTIONAL[module]
        raise MissingExtraError(
            f"{feature} needs {dist}, which the core install leaves out: pip install 'hf-dgate[{extra}]' "
            f"(or pip install {dist})."
        ) from e
