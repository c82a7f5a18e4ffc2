"""Cost of a model: parameters, FLOPs (torch.utils.flop_counter) and measured latency, for before/after figures."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    if pixels is vision and _image_token(cfg) is not None:
        # an image-text model reads pixels only where its processor put image tokens, how many depending on the
        # model: the probe is text only (what an export removes is certified zero either way; hf_dgate/verify.py)
        pixels = None
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


def _image_token(cfg: Any) -> int | None:
    """The id of the placeholder token an image-text model replaces by image features, if it has one."""
    for key in ("image_token_id", "image_token_index"):
        val = getattr(cfg, key, None)
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    return None


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


def aten_op_count(fn: Any) -> int:
    """How many aten operators `fn()` dispatches (a TorchDispatchMode, so no profiler and none of its log lines).
    train_overhead and the README use it to show that the penalty's op count does not grow with the groups."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def penalty_op_counts(layers: int = 2) -> list[tuple[int, int]]:
    """(groups, aten ops per hf_dgate.penalty call) of a gated GPT-2 (heads + neurons) at two MLP widths: the count
    must be the same for both (no per-group Python work)."""
    import transformers as T

    from .config import DGateConfig
    from .patch import apply_dgate, get_bank, penalty

    out = []
    for inner in (256, 1024):
        model = T.GPT2LMHeadModel(
            T.GPT2Config(
                n_layer=layers, n_embd=64, n_head=4, n_inner=inner, vocab_size=100, bos_token_id=0, eos_token_id=0
            )
        )
        apply_dgate(model, DGateConfig(target=["heads", "neurons"]))
        penalty(model)  # warm-up: caches built on first use are not counted
        out.append((sum(get_bank(model).sizes.values()), aten_op_count(lambda m=model: penalty(m))))
    return out


@dataclass
class SpeedUp:
    """A measured forward speed-up, dense / pruned, as a median over paired runs with its middle half. A speed-up
    above the FLOPs ratio is not something removing groups can cause: it is flagged as timing noise."""

    median: float
    low: float  # 25th percentile of the paired ratios
    high: float  # 75th percentile
    pairs: int
    threads: int
    latency_before_s: float  # median seconds per forward pass
    latency_after_s: float
    flops_ratio: float | None = None

    @property
    def noise(self) -> bool:
        return self.flops_ratio is not None and self.median > self.flops_ratio

    def describe(self) -> str:
        text = (
            f"{self.median:.2f}x (middle half {self.low:.2f}-{self.high:.2f} over {self.pairs} paired runs, "
            f"{self.threads} torch thread{'s' if self.threads != 1 else ''})"
        )
        if self.noise:
            text += f", above the {self.flops_ratio:.2f}x FLOPs ratio: timing noise, not a gain to expect"
        return text


@torch.no_grad()
def paired_speedup(
    before: nn.Module,
    after: nn.Module,
    inputs: dict[str, torch.Tensor],
    pairs: int = 9,
    warmup: int = 2,
    flops_ratio: float | None = None,
) -> SpeedUp:
    """Time `before` and `after` back to back `pairs` times (alternating which goes first, after `warmup` passes of
    each), so that load on a shared machine hits both alike; the speed-up is the median of the per-pair ratios."""
    for m in (before, after):
        m.eval()
        for _ in range(warmup):
            m(**inputs)
    t_before, t_after = [], []
    for i in range(pairs):
        for m, times in ((before, t_before), (after, t_after))[:: 1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            m(**inputs)
            times.append(time.perf_counter() - t0)
    ratios = sorted(b / max(a, 1e-12) for b, a in zip(t_before, t_after))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return SpeedUp(
        statistics.median(ratios), q[0], q[2], pairs, torch.get_num_threads(),
        statistics.median(t_before), statistics.median(t_after), flops_ratio,
    )  # fmt: skip


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
