"""The coverage matrix (docs/coverage.md) is what the code does: every family x target cell is run here."""

import os
import sys

import pytest
import transformers as T

import hf_dgate
from hf_dgate.registry import SPECS

sys.path.insert(0, os.path.dirname(__file__))
from families import FAMILIES, TARGETS, cell, expected  # noqa: E402

EXPECTED = expected()  # docs/coverage.md, with the 4.x cells of docs/transformers_versions.md on transformers 4.x


def test_table_lists_every_family():
    assert list(EXPECTED) == list(FAMILIES)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cell_matches_the_committed_table(family, target):
    assert cell(family, target) == EXPECTED[family][target]


def test_unknown_family_with_common_names_uses_the_fallback():
    """A family without a registry entry is found by module names (here: Llama under a new model_type)."""
    cfg = T.LlamaConfig(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                        num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(cfg)
    model.config.model_type = "my_llama_fork"
    assert "my_llama_fork" not in SPECS
    hf_dgate.apply_dgate(model, target=["heads", "neurons", "layers"])
    assert hf_dgate.get_bank(model).sizes == {"heads": 4, "neurons": 96, "layers": 2}


def test_target_registry_and_config_names_agree():
    """A new built-in target is one module in hf_dgate/targets plus its registration; config validation lists the
    same names (config.py stays free of torch imports, so the names are written there too)."""
    from hf_dgate.config import BUILTIN_TARGETS, TRANSFORMER_TARGETS
    from hf_dgate.targets import BUILTIN

    assert tuple(BUILTIN) == BUILTIN_TARGETS
    assert tuple(name for name, t in BUILTIN.items() if t.per_block) == TRANSFORMER_TARGETS
    assert all(t.description for t in BUILTIN.values())
