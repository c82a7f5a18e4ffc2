"""Run a written GGUF in llama.cpp itself (llama-cpp-python, optional) and compare its logits with PyTorch's.

The reference is the exported PyTorch model with its matrices rounded through the file's dtype (so f16/bf16
rounding of the weights is not counted as a difference); the tolerance, `max|llama.cpp - torch| <= atol + rtol *
max|torch|`, is looser for f16/bf16 files because llama.cpp also rounds activations for those matmuls.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from .base import text_config

TOLERANCE = {"f32": (1e-4, 1e-3), "f16": (1e-3, 1e-2), "bf16": (1e-2, 3e-2), "q8_0": (1e-2, 5e-2)}  # (atol, rtol)
INSTALL = "pip install 'hf-dgate[llama-cpp]'  (builds llama.cpp from source: cmake and a C++ compiler)"


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


_QUIET: list[Any] = []  # the ctypes log callback must outlive every call into llama.cpp


def _quiet_llama_cpp() -> None:
    """llama.cpp logs warnings to stderr even with verbose=False (e.g. a probe context longer than a tiny model's
    training context); an export prints its own one-line outcome instead."""
    import llama_cpp

    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_QUIET[0], None)


def load(
    path: str | os.PathLike,
    n_ctx: int = 256,
    n_threads: int = 1,
    n_batch: int | None = None,
    logits_all: bool = True,
    **llama_kwargs: Any,
) -> Any:
    """A llama_cpp.Llama for `path` that keeps the logits of every position (`logits_all=False`: of the last one
    only, as a server computes them); `llama_kwargs` go to llama_cpp.Llama (e.g. flash_attn=True)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ExportError(f"Running the GGUF needs llama-cpp-python: {INSTALL}.") from None
    _quiet_llama_cpp()
    kw = dict(n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all, verbose=False)
    if n_batch:
        kw.update(n_batch=n_batch, n_ubatch=n_batch)
    return Llama(model_path=os.fspath(path), **{**kw, **llama_kwargs})


def llama_cpp_logits(llm: Any, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids` from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)


@torch.no_grad()
def compare_with_llama_cpp(
    model: nn.Module, path: str | os.PathLike, dtype: str, probe_ids: list[int] | None = None, seq_len: int = 16
) -> dict[str, Any]:
    """Run the GGUF at `path` and the PyTorch `model` on one probe; ExportError beyond the tolerance."""
    from .gguf import rounded_like_file

    vocab = int(text_config(model).vocab_size)
    if probe_ids is None:
        gen = torch.Generator().manual_seed(0)
        probe_ids = torch.randint(0, vocab, (seq_len,), generator=gen).tolist()
    llm = load(path, n_ctx=max(64, len(probe_ids)))
    try:
        got = llama_cpp_logits(llm, list(probe_ids))
    finally:
        llm.close() if hasattr(llm, "close") else None
    ref = rounded_like_file(model, dtype)(input_ids=torch.tensor([probe_ids])).logits[0].float()
    diff = float((got - ref).abs().max())
    atol, rtol = TOLERANCE[dtype]
    tol = atol + rtol * float(ref.abs().max())
    result = {"verified": True, "max_abs_diff": diff, "tolerance": tol, "probe_tokens": len(probe_ids),
              "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}  # fmt: skip
    if not diff <= tol:
        raise ExportError(
            f"llama.cpp's logits for the written GGUF differ from the PyTorch export by {diff:.3g} (> tolerance "
            f"{tol:.3g}, {dtype}); the file is not written. Please report this with the model's config."
        )
    return result
