"""Export formats: one contract (`ExportFormat`, base.py), one registered plug-in per format.

- native: `save_pretrained` plus the pruning record (and a generated loader where the config cannot say the shape);
- gguf: llama.cpp's `deci` architecture with per-layer head, key/value-head and FFN counts (gguf.py);
- decilm: vLLM's DeciLMForCausalLM `block_configs` (decilm.py).
Shapes (uniform, rounded) are chosen before any format writes (shape.py).
"""

from .base import FORMATS, ExportFormat, get_format, register_format
from .shape import ExportShape

__all__ = ["FORMATS", "ExportFormat", "ExportShape", "get_format", "register_format"]
