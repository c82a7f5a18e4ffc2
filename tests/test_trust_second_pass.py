"""Trust, second pass (issue 19): no foreign code in what hf_dgate writes, loads that restore every tensor or
refuse, atomic gated saves, exactness certified from what was removed, re-gating pruned models, resuming with a
changed setup, combinations that cannot mean anything, and one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_model

import hf_dgate
from hf_dgate.errors import ExportError
from hf_dgate.hub import export_to_dir, push_folder
from hf_dgate.loading import REMOTE_CODE_FILE

FOREIGN = {"AutoModelForCausalLM": "someone/repo--modeling_x.X", "AutoConfig": "someone/repo--configuration_x.C"}


def _kill(bank, target, layer, groups):
    for gs, off in zip(bank.group_sets, bank.offsets):
        if gs.target == target and gs.layer == layer:
            with torch.no_grad():
                bank.gammas[target][:, [off + g for g in groups]] = 0.0


# ---- 1. foreign code ------------------------------------------------------------------------------------------
def _foreign_llama():
    model = make_model("llama")
    model.config.auto_map = dict(FOREIGN)
    model.config.custom_pipelines = {"x": {"impl": "someone/repo--pipe.P"}}
    model._auto_class = "AutoModelForCausalLM"  # what a trust_remote_code load sets: save_pretrained copies code
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    return model


def _code_refs(folder):
    text = "".join(open(os.path.join(folder, n)).read() for n in os.listdir(folder) if n.endswith((".json", ".md")))
    return [n for n in os.listdir(folder) if n.endswith(".py")], "someone/repo" in text, "custom_pipelines" in text


@pytest.mark.parametrize("uniform", [True, False])
def test_an_export_carries_no_code_reference_but_its_own(tmp_path, uniform):
    model = _foreign_llama()
    bank = hf_dgate.get_bank(model)
    _kill(bank, "heads", 0, [1])  # kv group 1 of layer 0 (2 kv groups of 2 heads)
    if uniform:
        _kill(bank, "heads", 1, [1])
    summary = export_to_dir(model, tmp_path / "out", measure=False)
    assert summary["native"] is uniform
    py, foreign, pipes = _code_refs(tmp_path / "out")
    assert not foreign and not pipes
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if uniform:
        assert py == [] and "auto_map" not in cfg
    else:
        assert py == [REMOTE_CODE_FILE]
        assert all(v.startswith("modeling_dgate_pruned.") for v in cfg["auto_map"].values())
    assert model.config.auto_map == FOREIGN  # the caller's model is left as it was


def test_a_gated_save_carries_no_code_reference(tmp_path):
    model = _foreign_llama()
    hf_dgate.save_gated(model, tmp_path / "g")
    py, foreign, pipes = _code_refs(tmp_path / "g")
    assert py == [] and not foreign and not pipes


def test_an_upload_with_foreign_code_is_refused_before_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    export_to_dir(model, tmp_path / "out", measure=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: pytest.fail("the Hub was contacted"))
    for plant in ("auto_map", "py"):
        if plant == "auto_map":
            cfg = json.loads((tmp_path / "out" / "config.json").read_text())
            (tmp_path / "out" / "config.json").write_text(json.dumps({**cfg, "auto_map": FOREIGN}))
        else:
            (tmp_path / "out" / "modeling_x.py").write_text("import os\n")
        with pytest.raises(ExportError, match="carries code the export did not write"):
            push_folder(tmp_path / "out", "me/ok")
