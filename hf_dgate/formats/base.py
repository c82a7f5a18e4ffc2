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


LLAMA_FAMILIES = ("llama", "mistral", "qwen2")  # the decoders llama.cpp's deci and vLLM's DeciLM both run


def text_config(model: nn.Module) -> Any:
    """The language model's config (the text config of a multimodal one)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_llama_decoder(model: nn.Module, label: str, kinds: str, activation: str) -> Any:
    """ExportError unless `model` is a Llama-like causal LM with its lm_head and a SiLU-gated MLP, as the engines
    behind the GGUF and DeciLM formats need; returns its text config. `label`/`kinds`/`activation` word the errors."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in LLAMA_FAMILIES:
        raise ExportError(
            f"{label} export supports {kinds} ({', '.join(LLAMA_FAMILIES)}), not {mt!r}; use format='native'."
        )
    if getattr(model, "lm_head", None) is None or not hasattr(getattr(model, "model", None), "layers"):
        raise ExportError(f"{label} export needs the causal-LM model (e.g. LlamaForCausalLM) with its lm_head.")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"{label} export: {activation}; this model uses {cfg.hidden_act!r}.")
    return cfg


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
