"""Cost of a model: parameters, FLOPs (torch.utils.flop_counter) and measured latency, for before/after figures."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Parameters once (tied tensors count once), gates excluded: what a saved model holds."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.startswith("dgate.") or ".dgate." in name:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def example_inputs(model: nn.Module, seq_len: int = 64, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch the model accepts: pixels for vision configs, token ids otherwise; both for text and
    vision towers (CLIP), audio features for speech encoders (Whisper), decoder ids for encoder-decoders."""
    cfg = getattr(model, "config", None)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batch: dict[str, torch.Tensor] = {}
    vision = getattr(cfg, "vision_config", None) if cfg is not None else None
    pixels = vision if vision is not None and getattr(cfg, "text_config", None) is not None else cfg
    if pixels is not None and hasattr(pixels, "image_size"):
        size = pixels.image_size if isinstance(pixels.image_size, int) else pixels.image_size[0]
        channels = getattr(pixels, "num_channels", 3)
        batch["pixel_values"] = torch.randn(batch_size, channels, size, size, generator=gen)
        if pixels is cfg:  # a vision-only model
            return {k: v.to(device) for k, v in batch.items()}
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text, "vocab_size", 100) or 100
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or seq_len
    ids = torch.randint(0, vocab, (batch_size, min(seq_len, max_pos)), generator=gen)
    if cfg is not None and hasattr(cfg, "num_mel_bins") and hasattr(cfg, "max_source_positions"):
        frames = 2 * cfg.max_source_positions  # Whisper's encoder takes exactly this many frames
        batch["input_features"] = torch.randn(batch_size, cfg.num_mel_bins, frames, generator=gen)
    else:
        batch["input_ids"] = ids
    if getattr(cfg, "is_encoder_decoder", False):
        target_pos = getattr(cfg, "max_target_positions", None) or max_pos
        batch["decoder_input_ids"] = ids[:, : min(ids.shape[1], target_pos, 16)]
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """FlopCounterMode does not see fused CPU attention kernels; count through the eager (matmul) path."""
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    saved = [(c, c.__dict__.get("_attn_implementation_internal", None)) for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = "eager"
        yield
    finally:
        for c, v in saved:
            c._attn_implementation_internal = v


@torch.no_grad()
def count_flops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward pass on `inputs` (matmuls and attention, as torch.utils.flop_counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with eager_attention(model), FlopCounterMode(display=False) as counter:
        model(**inputs)
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def forward_latency(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds per forward pass."""
    model.eval()
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def generate_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy decoding throughput (new tokens per second, median over repeats)."""
    model.eval()
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        kwargs["pad_token_id"] = 0
    model.generate(input_ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(input_ids, **kwargs)
        rates.append(new_tokens * input_ids.shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)
