"""Tiny random models of every covered family, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T
from hypothesis import settings

# CI replays the same draws every run (a landing must not hinge on a new random draw); local runs keep exploring,
# and whatever they find is pinned with @example (see test_export.py).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

COMMON = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4)


def _decoder(cfg_cls, **kw):
    return T.AutoModelForCausalLM.from_config(cfg_cls(vocab_size=64, **{**COMMON, **kw}))


FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(
            n_layer=2, n_head=4, n_embd=32, n_inner=48, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    ),
    "llama": lambda: _decoder(T.LlamaConfig, num_key_value_heads=2),
    "qwen3": lambda: _decoder(T.Qwen3Config, num_key_value_heads=2, head_dim=8),
    "qwen2": lambda: _decoder(T.Qwen2Config, num_key_value_heads=1),
    "mistral": lambda: _decoder(T.MistralConfig, num_key_value_heads=2),
    "gpt_neox": lambda: _decoder(T.GPTNeoXConfig),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            vocab_size=64,
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=48,
            num_attention_heads=4,
            word_embed_proj_dim=32,
        )
    ),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=64, **COMMON)),
    "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(vocab_size=64, pad_token_id=1, **COMMON)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_labels=3, **COMMON)),
}
POST_NORM = {"bert", "roberta"}


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    model.eval()
    return model


def make_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(2, 64, (batch, seq), generator=g)}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


@pytest.fixture(autouse=True)
def _quiet_transformers():
    T.logging.set_verbosity_error()
    yield
