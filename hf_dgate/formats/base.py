"""The contract of an export format: check early what it cannot write, then write a pruned model to a folder."""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import Any

from torch import nn

from ..errors import ExportError


class ExportFormat(ABC):
    """One way to write an export. `check` runs before anything is measured or written (refuse early, by name);
    `write` puts the files into a fresh folder and returns what the summary and card should say about them."""

    name: str = ""
    description: str = ""  # one line for the CLI help and the card
    loads_with: str = ""  # how a user loads or runs the written files (card, README)
    default_multiple_of: dict[str, int] | None = None  # rounding export_to_dir applies unless given multiple_of

    def check(self, model: nn.Module, **options: Any) -> None:  # noqa: B027 (optional hook: most formats write anything)
        """Raise ExportError when this format cannot represent `model` (the pruned model) with `options`."""

    @abstractmethod
    def write(self, model: nn.Module, directory: str | os.PathLike, **options: Any) -> dict[str, Any]:
        """Write the pruned `model` into `directory`; return summary fields (files, verification, ...)."""


FORMATS: dict[str, ExportFormat] = {}
_BUILTIN = {"native": ".native", "gguf": ".gguf", "decilm": ".decilm"}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Make `fmt` available by its name (export_to_dir(format=...), `hf-dgate export --format`)."""
    if not fmt.name:
        raise ValueError("An export format needs a name.")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    """The registered format `name`; the built-in ones are imported on first use (their dependencies are optional)."""
    if name not in FORMATS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name], __package__)
    if name not in FORMATS:
        raise ExportError(f"Unknown export format {name!r}; choose one of {sorted({*FORMATS, *_BUILTIN})}.")
    return FORMATS[name]


def format_names() -> list[str]:
    return sorted({*FORMATS, *_BUILTIN})
