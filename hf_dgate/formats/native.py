"""The transformers format: `save_pretrained` plus the pruning record; a generated loader where the config cannot
express the shape (hf_dgate.loading.save_pruned)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .base import ExportFormat, register_format


class NativeFormat(ExportFormat):
    name = "native"
    description = "transformers save_pretrained (safetensors + config.json), loadable by AutoPrunedModel"
    loads_with = "transformers / hf_dgate.AutoPrunedModel"

    def write(self, model: nn.Module, directory: str | os.PathLike, *, remote_code: bool = True, **_: Any) -> dict:
        from ..loading import save_pruned

        return {"remote_code": save_pruned(model, directory, remote_code=remote_code)}


NATIVE = register_format(NativeFormat())
